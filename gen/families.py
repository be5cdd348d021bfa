"""Model families plug into the one training loop through a small interface:

    family.modules      {name: nn.Module}  the plain modules (never wrapped), in this order
    family.optimizers   {name: Optimizer}  one per module; `base_lr[name]` feeds the LR schedule
    family.ema_target   name of the module whose EMA is kept and sampled (G, or the whole VAE)
    family.phases(step) -> [Phase]: what one optimizer step does, in order (GAN: D, then G)
    family.diverging(means) -> 0-d bool tensor or None: losses that blew up without being NaN
    family.generate(module, z, labels) -> images in [-1, 1]

and brings its own specifics, so that the loop never asks a family's name:

    family.prepare(real_images, fresh, main)   data-dependent set-up before step 0 (a self-
                        conditioned GAN's clusters; the images a VAE's latent mixture is fitted on)
    family.sample_labels(module, n) / draw_labels(module, n, rng)   the labels samples get
                        (classes in turn, clusters by their share, or none), in one place
    family.sampling_prior(sampler, seed, choose) -> a VAE's latent mixture for a sampler, or None

A Phase names the modules it trains (and so their optimizers) and gives the losses of one
micro-batch, one per trained module, each backpropagated into that module's weights only (or,
a `shared` phase, one loss whose gradient in each module is that module's own loss's).
The loop prepares the modules (device, DDP, precision) and hands each phase that wrapped view,
`nets` (as stylegan2-ada hands its DDP modules to the loss): a call through `nets[name]` takes
part in DDP's gradient reduction; a call on `self.modules[name]` does not (frozen D in G's
phase, R1's double backward, G under no_grad). The loop runs each phase over all grad_accum
micro-batches, then steps that phase's optimizers, as stylegan2-ada does: D sees every
micro-batch before it steps, then G's micro-batches all go through the same, updated D. So k
micro-batches of b give the gradients of one batch of k*b. Families never call backward, step
or zero_grad themselves.
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import clusters, latent_prior, nets, regularisers
from .augment import check_policy, diff_augment
from .data import to_float
from .errors import UserError


@dataclass
class Phase:
    names: tuple                # the modules this phase trains, and so their optimizers
    loss: Callable              # (micro_batch, step, nets) -> ({name: loss}, {metric: 0-d tensor})
    frozen: tuple = ()          # modules that need no weight gradients here (G's phase: D)
    # the losses are one tensor, {"shared": loss}, backpropagated once into all the modules: its
    # gradient in each module is that module's own loss's (the family arranges it)
    shared: bool = False


def _adam(params, lr, cfg):
    return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


class Family:
    """What every family shares: the label policy and no-op defaults for the specifics."""
    num_labels = 0

    def labels(self, labels):
        """The labels a module is given: None for an unconditional model."""
        return labels if self.num_labels else None

    def sample_labels(self, module, n):
        """The labels of n samples (grids, evaluations, jobs.sample): a self-conditioned G's clusters
        in proportion to their sizes, spread evenly; else classes 0, 1, ... in turn (ignored by an
        unconditional model)."""
        if clusters.sizes(module) is not None:
            return clusters.draw(module.clusters_freq, n)
        return torch.arange(n) % max(self.num_labels, 1)

    def draw_labels(self, module, n, generator):
        """n labels drawn at random as sampling draws them (BatchNorm statistics of generated images)."""
        weights = clusters.sizes(module)
        if weights is not None:
            return torch.multinomial(weights.float().cpu(), n, replacement=True, generator=generator)
        return torch.randint(max(self.num_labels, 1), (n,), generator=generator)

    def prepare(self, real_images, fresh, main):
        """Data-dependent set-up before step 0; real_images() -> (uint8 images, labels) of the training split."""

    def sampling_prior(self, sampler, seed, choose):
        return None  # latents from N(0, I)


def gan_nets(model_cfg, shape, num_labels, sampling_only=False):
    """(G, D) of the configured architecture (D None when only sampling), self-conditioning buffers on G."""
    c, size, _ = shape
    if model_cfg.arch == "seed":
        if size != 28 and (size % 8 or (size // 8) & (size // 8 - 1)):
            raise UserError(f"the seed GAN is the 28x28 notebook model, widened for 8 x 2^k px; this data is "
                            f"{size}px (use --preset gan)")
        G = nets.SeedGenerator(model_cfg.latent_dim, c, num_labels, size)
        D = None if sampling_only else nets.SeedDiscriminator(c, num_labels, size)
    elif model_cfg.arch == "dcgan":
        G = nets.DCGenerator(model_cfg.latent_dim, c, size, model_cfg.width, num_labels, model_cfg.g_image_layer,
                             model_cfg.g_skip_excitation)
        D = None if sampling_only else nets.DCDiscriminator(
            c, size, model_cfg.width, num_labels, model_cfg.spectral_norm, model_cfg.d_batchnorm,
            model_cfg.d_convs_per_level, model_cfg.d_reconstruct > 0)
    else:
        G = nets.Generator(model_cfg.latent_dim, c, size, model_cfg.width, num_labels)
        D = None if sampling_only else nets.Discriminator(c, size, model_cfg.width, num_labels, model_cfg.spectral_norm,
                                                           model_cfg.d_batchnorm)
    if clusters.count(model_cfg):
        clusters.attach(G, clusters.count(model_cfg), shape, model_cfg.cluster_method)
    if D is not None and model_cfg.lecam > 0:  # (gen/regularisers.py: buffers, so checkpoints carry them)
        D.register_buffer("lecam_means", torch.zeros(2))  # D's mean logits (real, fake), running
    if D is not None and model_cfg.ada_target > 0:
        D.register_buffer("ada", torch.zeros(3))  # ADA's strength p, and the signs and images since it moved
    return G, D


def gan_optimizers(G, D, optim_cfg):
    if optim_cfg.optimizer_d == "rmsprop":
        # Keras' RMSprop: rho 0.9 (torch's default alpha is 0.99)
        opt_d = torch.optim.RMSprop(D.parameters(), lr=optim_cfg.lr_d, alpha=0.9, eps=optim_cfg.eps,
                                    weight_decay=optim_cfg.weight_decay)
    else:
        opt_d = _adam(D.parameters(), optim_cfg.lr_d, optim_cfg)
    return {"G": _adam(G.parameters(), optim_cfg.lr, optim_cfg), "D": opt_d}


class GANFamily(Family):
    ema_target = "G"

    def __init__(self, model_cfg, optim_cfg, shape, num_classes, sampling_only=False, mixed_precision="no"):
        self.cfg, self.optim_cfg = model_cfg, optim_cfg
        check_policy(model_cfg.diffaug)
        # fp16 would lose G's gradient for fakes D is sure of: their rescaled share underflows; LeCam pulls
        # on the fakes too, so D's gradient there is no longer nonsat's alone
        self.one_backward = (model_cfg.one_backward and model_cfg.gan_update == "simultaneous"
                             and model_cfg.gan_loss == "nonsat" and not model_cfg.d_batchnorm and model_cfg.lecam == 0
                             and model_cfg.d_reconstruct == 0 and mixed_precision != "fp16")
        self.num_labels = num_classes if model_cfg.conditional else clusters.count(model_cfg)
        G, D = gan_nets(model_cfg, shape, self.num_labels, sampling_only)
        self.modules = {"G": G} if sampling_only else {"G": G, "D": D}
        self.base_lr = {"G": optim_cfg.lr, "D": optim_cfg.lr_d}
        self.optimizers = {} if sampling_only else gan_optimizers(G, D, optim_cfg)

    def batch_labels(self, batch):
        """A real batch's labels as the modules see them: the shards' classes, the images' own
        clusters (self-conditioned), or None."""
        if clusters.count(self.cfg):
            return clusters.assign(self.modules["G"], batch["image"])
        return self.labels(batch["label"])

    def prepare(self, real_images, fresh, main):
        """A self-conditioned GAN clusters the training images before step 0 (every rank the same
        way; a resumed run loads its clusters with its weights)."""
        if clusters.count(self.cfg) and fresh:
            clusters.fit(self.modules["G"], to_float(real_images()[0]), seed=0)

    def _d_loss(self, real_logits, fake_logits):
        if self.cfg.gan_loss == "hinge":
            return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()  # BCE with logits

    def _with_regularisers(self, loss_d, out, real_logits, fake_logits, rec):
        """D's loss plus LeCam and the reconstruction loss (when on); ADA's strength follows D's
        real logits (gen/regularisers.py)."""
        D = self.modules["D"]
        if self.cfg.ada_target > 0:
            regularisers.adapt_strength(D.ada, real_logits, self.cfg.ada_target, self.cfg.ada_kimg)
            out["ada_p"] = D.ada[0].clone()
        if self.cfg.lecam > 0:
            reg = regularisers.lecam(D.lecam_means, real_logits, fake_logits)
            out["lecam"] = reg.detach()
            loss_d = loss_d + self.cfg.lecam * reg
        if rec is not None:
            out["d_rec"] = rec.detach()
            loss_d = loss_d + self.cfg.d_reconstruct * rec
        return loss_d

    def _g_loss(self, fake_logits):
        return -fake_logits.mean() if self.cfg.gan_loss == "hinge" else F.softplus(-fake_logits).mean()

    def phases(self, step):
        if self.cfg.gan_update == "simultaneous":
            return [Phase(("D", "G"), self._both_phase, shared=self.one_backward)]
        return [Phase(("D",), self._d_phase), Phase(("G",), self._g_phase, frozen=("D",))]

    divergence_text = "D separates real from fake outright (D(real) - D(fake) > 20) and G's loss exceeds 100"

    def diverging(self, means):
        """On the device (no sync): D pinned at 100 % accuracy with G's loss exploding."""
        return (means["loss_g"] > 100) & (means["d_real"] - means["d_fake"] > 20)

    def _aug(self, x):  # the same policy (and ADA strength) for real and fake
        return diff_augment(x, self.cfg.diffaug, self.modules["D"].ada[0] if self.cfg.ada_target > 0 else None)

    def _d_forward(self, D, x, labels, reals):
        """D's logits for x, and with d_reconstruct the MSE of its decoder's rebuilding of the
        first `reals` images (the augmented ones D saw, at the decoder's size), else None."""
        if self.cfg.d_reconstruct <= 0:
            return D(x, labels).float(), None
        logits, rebuilt = D(x, labels, reconstruct=True)
        return logits.float(), regularisers.reconstruction(rebuilt[:reals], x[:reals])

    def _d_logits(self, D, real, fake, labels):
        """(real logits, fake logits, reconstruction loss or None): one forward pass, or (BatchNorm
        in D) one per set, so each is normalised by its own batch statistics."""
        if self.cfg.d_batchnorm:
            real_logits, rec = self._d_forward(D, self._aug(real), labels, real.size(0))
            return real_logits, D(self._aug(fake), labels).float(), rec
        both_labels = torch.cat([labels, labels]) if labels is not None else None
        logits, rec = self._d_forward(D, self._aug(torch.cat([real, fake])), both_labels, real.size(0))
        return *logits.chunk(2), rec

    def _d_phase(self, batch, step, nets):
        """D on reals and fakes (see _d_logits), plus lazy R1 (_with_r1)."""
        G = self.modules["G"]  # no gradients, no DDP collectives
        x, labels = batch["image"], self.batch_labels(batch)
        z = torch.randn(x.size(0), self.cfg.latent_dim, device=x.device)
        with torch.no_grad():
            fake = G(z, labels)
        real_logits, fake_logits, rec = self._d_logits(nets["D"], x, fake.to(x.dtype), labels)
        loss = self._d_loss(real_logits, fake_logits)
        out = {"loss_d": loss.detach(), "d_real": real_logits.mean().detach(), "d_fake": fake_logits.mean().detach()}
        loss = self._with_regularisers(loss, out, real_logits, fake_logits, rec)
        return {"D": self._with_r1(loss, out, x, labels, step)}, out

    def _with_r1(self, loss_d, out, x, labels, step):
        """D's loss plus lazy R1 (StyleGAN2): the penalty every r1_every steps, scaled up by r1_every."""
        if self.cfg.r1_gamma <= 0 or step % self.cfg.r1_every != 0:
            return loss_d
        real = self._aug(x).detach().requires_grad_(True)
        # double backward outside the DDP wrapper
        grad, = torch.autograd.grad(self.modules["D"](real, labels).float().sum(), real, create_graph=True)
        r1 = grad.pow(2).sum(dim=[1, 2, 3]).mean()
        out["r1"] = r1.detach()
        return loss_d + 0.5 * self.cfg.r1_gamma * self.cfg.r1_every * r1

    def _both_phase(self, batch, step, nets):
        """The notebook's step: one batch of fakes, D on reals and fakes once, both losses from
        those logits; the loop backpropagates each loss into its own network only.

        one_backward: D's loss alone is backpropagated, into D and G. With the nonsat loss, per
        fake logit f, dL_G/df = -sigmoid(-f)/B = -exp(-f) * dL_D/df, and D scores each image on
        its own (no BatchNorm; spectral norm and DiffAugment act per image), so the gradient D's
        backward pass leaves on each fake image, times -exp(-f), is G's loss's gradient there:
        a hook on the fakes applies that factor on the way into G. Exact while f > -60 (D that
        sure of a fake has diverged; below, G's gradient is smaller than the true one)."""
        x, labels = batch["image"], self.batch_labels(batch)
        z = torch.randn(x.size(0), self.cfg.latent_dim, device=x.device)
        fake = nets["G"](z, labels)
        real_logits, fake_logits, rec = self._d_logits(nets["D"], x, fake.to(x.dtype), labels)
        loss_d, loss_g = self._d_loss(real_logits, fake_logits), self._g_loss(fake_logits)
        out = {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "d_real": real_logits.mean().detach(),
               "d_fake": fake_logits.mean().detach()}
        loss_d = self._with_r1(self._with_regularisers(loss_d, out, real_logits, fake_logits, rec), out, x, labels, step)
        if not self.one_backward:
            return {"D": loss_d, "G": loss_g}, out
        g_gradient_from_d_backward(fake, fake_logits)
        return {"shared": loss_d}, out

    def _g_phase(self, batch, step, nets):
        """G through the (frozen, already updated) D, outside D's DDP wrapper: D is not trained here."""
        x, labels = batch["image"], self.batch_labels(batch)
        z = torch.randn(x.size(0), self.cfg.latent_dim, device=x.device)
        fake = nets["G"](z, labels)
        loss = self._g_loss(self.modules["D"](self._aug(fake), labels).float())
        return {"G": loss}, {"loss_g": loss.detach()}

    @torch.no_grad()
    def generate(self, module, z, labels=None):
        return module(z, self.labels(labels)).float().clamp(-1, 1)


def g_gradient_from_d_backward(fake, fake_logits):
    """Turn the gradient D's nonsat loss leaves on the fakes into G's nonsat loss's: per image,
    times -exp(-f) (GANFamily._both_phase says why this is exact)."""
    factor = -torch.exp(-fake_logits.detach().float().clamp(min=-60)).view(-1, *[1] * (fake.dim() - 1))
    fake.register_hook(lambda grad: (grad.float() * factor).to(grad.dtype))


class VAEFamily(Family):
    ema_target = "vae"

    def __init__(self, model_cfg, optim_cfg, shape, num_classes, sampling_only=False):
        c, size, _ = shape
        self.cfg, self.optim_cfg = model_cfg, optim_cfg
        self.fit_images, self.mixture_size = None, None
        n = self.num_labels = num_classes if model_cfg.conditional else 0
        if model_cfg.arch == "dcgan":
            raise UserError("--model.arch dcgan is a GAN architecture (VAEs: seed or deep)")
        if model_cfg.arch == "seed":
            if size != 28:
                raise UserError(f"the seed VAE is the 28x28 tutorial model; this data is {size}px (use --preset vae)")
            enc, dec = nets.SeedEncoder(model_cfg.latent_dim, c, n, size), nets.SeedDecoder(model_cfg.latent_dim, c, n)
        else:
            enc = nets.Encoder(model_cfg.latent_dim, c, size, model_cfg.width, n)
            dec = nets.Decoder(model_cfg.latent_dim, c, size, model_cfg.width, n)
        vae = nets.VAE(enc, dec)
        if model_cfg.likelihood == "bernoulli":
            # the learned scale is the Gaussian likelihood's: no gradient reaches it, and DDP must
            # not wait for one (it stays a parameter, so checkpoints keep one layout)
            vae.log_sigma.requires_grad_(False)
        self.modules, self.base_lr = {"vae": vae}, {"vae": optim_cfg.lr}
        self.optimizers = {} if sampling_only else {"vae": _adam(vae.parameters(), optim_cfg.lr, optim_cfg)}

    def prepare(self, real_images, fresh, main):
        """The main process keeps training images: every sampler's latent mixture is fitted on them."""
        self.fit_images = real_images() if main else None

    def sampling_prior(self, sampler, seed, choose):
        """The ex-post latent mixture (gen.latent_prior) for `sampler`, fitted on the images kept by
        prepare: its size chosen by held-out likelihood where `choose` (where a checkpoint is
        written: ~15 s on a CPU), else refitted at the last chosen size (grids, evaluations: ~2 s)."""
        if self.fit_images is None:
            return None
        size = None if choose or self.mixture_size is None else self.mixture_size
        prior = latent_prior.fit_on(sampler, *self.fit_images, components=size, seed=seed)
        self.mixture_size = len(prior["weights"])
        return prior

    def kl_weight(self, step):
        warm = self.cfg.kl_warmup_steps
        return self.cfg.beta * (min(1.0, step / warm) if warm > 0 else 1.0)

    def phases(self, step):
        return [Phase(("vae",), self._elbo_phase)]

    def diverging(self, means):
        return None  # a VAE's NLL has no natural scale (it grows with the image size); NaN is caught

    def elbo_terms(self, forward, log_sigma, x, labels=None, kl="config"):
        """Per image, in nats: the reconstruction's negative log-likelihood (on binarised pixels
        for the Bernoulli tutorial model, on [-1, 1] pixels for the Gaussian one) and the KL term
        (analytic, or the tutorial's single-sample estimate when configured and kl="config")."""
        if self.cfg.binarize:
            x = (x > 0).to(x.dtype) * 2 - 1  # the tutorial's np.where(x > .5, 1, 0)
        recon, mean, logvar, z = forward(x, labels)
        recon, mean, logvar, z = recon.float(), mean.float(), logvar.float(), z.float()
        if self.cfg.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(recon, (x.float() + 1) / 2, reduction="none").sum(dim=[1, 2, 3])
        else:
            log_sigma = log_sigma.float().clamp(min=-6.0)
            nll = (0.5 * ((x.float() - recon) / log_sigma.exp()) ** 2 + log_sigma
                   + 0.5 * math.log(2 * math.pi)).sum(dim=[1, 2, 3])
        if self.cfg.kl == "mc" and kl == "config":  # single-sample estimate log q(z|x) - log p(z), as the tutorial
            kl_term = _log_normal(z, mean, logvar) - _log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        else:
            kl_term = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(dim=1)
        return nll, kl_term

    def _elbo_phase(self, batch, step, nets):
        # the DDP-wrapped module runs the forward (its hooks); the plain one holds log_sigma
        nll, kl = self.elbo_terms(nets["vae"], self.modules["vae"].log_sigma, batch["image"],
                                  self.labels(batch["label"]))
        loss = (nll + self.kl_weight(step) * kl).mean()
        return {"vae": loss}, {"loss": loss.detach(), "nll": nll.mean().detach(), "kl": kl.mean().detach(),
                      "elbo": -(nll + kl).mean().detach()}

    def decode(self, module, z, labels=None):
        out = module.decoder(z, self.labels(labels)).float()
        return torch.sigmoid(out) * 2 - 1 if self.cfg.likelihood == "bernoulli" else out.clamp(-1, 1)

    @torch.no_grad()
    def generate(self, module, z, labels=None):
        return self.decode(module, z, labels)

    @torch.no_grad()
    def reconstruct(self, module, x, labels=None):
        mean, _ = module.encoder(x, self.labels(labels))
        return self.decode(module, mean, labels)


def _log_normal(x, mean, logvar):
    return (-0.5 * ((x - mean) ** 2 * torch.exp(-logvar) + logvar + math.log(2 * math.pi))).sum(dim=1)


def build_family(model_cfg, optim_cfg, shape, num_classes, sampling_only=False, mixed_precision="no"):
    """shape = (channels, size, size); num_classes from the shards' manifest (0: unlabeled).
    sampling_only: just the sampled module (family.ema_target), no D, no optimizers.
    mixed_precision: the run's (TrainConfig.mixed_precision)."""
    if model_cfg.conditional and not num_classes:
        raise UserError("--model.conditional needs labeled shards; this data set has no classes")
    if model_cfg.family == "vae":
        return VAEFamily(model_cfg, optim_cfg, shape, num_classes, sampling_only)
    return GANFamily(model_cfg, optim_cfg, shape, num_classes, sampling_only, mixed_precision)
