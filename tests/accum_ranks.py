"""One optimizer step through the training loop's phase runner (gen.step.run_phases) with
grad_accum k at micro-batch b, against the gradients of one batch of k*b written out here from
the loss formulas (no family code, no accumulation), on the same images and noise. Run as one
process or under 2 DDP ranks (the reference then covers both ranks' data, as DDP averages).
Also records, for each DDP all-reduce, how many micro-batches its phase had run: with no_sync in
effect, none happens before the last (k-th) one.

    python tests/accum_ranks.py OUT.json --preset gan --k 2 --b 8 [--gan-update simultaneous] [--gan-loss hinge]
    python tests/accum_ranks.py OUT.json --case A --preset gan ... --case B --preset vae ...   (one report per case)

GAN simultaneous with the nonsat loss takes the one-backward path (G's gradient out of D's
backward, rescaled per image), so the reference written out here checks that rescaling too.
"""
import argparse
import copy
import dataclasses
import json
import math
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from gen.config import parse
from gen.data import make_loader
from gen.families import build_family
from gen.step import prepare, run_phases
from helpers import split_cases

p = argparse.ArgumentParser()
p.add_argument("--preset", default="gan")
p.add_argument("--data", required=True)
p.add_argument("--k", type=int, default=2)
p.add_argument("--b", type=int, default=8)
p.add_argument("--gan-update", choices=("alternating", "simultaneous"), default="alternating")
p.add_argument("--gan-loss", choices=("hinge", "nonsat"), default="hinge")


def check(args, acc):
    """One case: the accumulated step through the loop's phase runner against the reference."""
    K, B = args.k, args.b
    cfg = parse(["--preset", args.preset, "--data", args.data, "--model.width", "8", "--model.diffaug",
                 "--model.r1_gamma", "1", "--model.r1_every", "1", "--model.kl_warmup_steps", "0",
                 "--model.gan_update", args.gan_update, "--model.gan_loss", args.gan_loss,
                 "--model.self_condition", "0"])  # the references' labels: none
    simultaneous = cfg.model.family == "gan" and cfg.model.gan_update == "simultaneous"
    world, rank = acc.num_processes, acc.process_index
    torch.manual_seed(0)  # the same initial weights on every rank
    family = build_family(cfg.model, cfg.optim, (1, 28, 28), 10)
    if "D" in family.modules:  # converge spectral norm's power iteration, which moves a little on every forward
        with torch.no_grad():
            for _ in range(200):
                family.modules["D"](torch.zeros(1, 1, 28, 28))
    initial = {n: copy.deepcopy(m) for n, m in family.modules.items()}
    names = list(family.modules)
    prepared = prepare(acc, family)

    # what the optimizers see when they step, and at which micro-batch DDP all-reduces each module's gradients
    grads, steps, reduces = {}, {n: 0 for n in names}, {n: [] for n in names}
    micro_batches_run = [0]
    family_phases = family.phases


    def counting_phases(step):
        """The family's phases, each counting the micro-batches it has run (from 1)."""
        def counted(phase):
            def loss(batch, step, nets):
                micro_batches_run[0] += 1
                return phase.loss(batch, step, nets)
            return dataclasses.replace(phase, loss=loss)
        phases = family_phases(step)
        return [counted(ph) for ph in phases]


    family.phases = counting_phases
    for n, opt in prepared.optimizers.items():
        def pre_step(optimizer, a, kw, n=n):
            steps[n] += 1
            micro_batches_run[0] = 0  # the next phase counts from its first micro-batch
            grads[n] = [p.grad.detach().clone() for p in family.modules[n].parameters()]
        opt.optimizer.register_step_pre_hook(pre_step)
        if world > 1:
            def recording(state, bucket, n=n):
                reduces[n].append(micro_batches_run[0])  # K: only on the last micro-batch
                return default_hooks.allreduce_hook(None, bucket)
            prepared.nets[n].register_comm_hook(None, recording)

    loader, _, _ = make_loader(args.data, B, seed=0, rank=rank, world_size=world, workers=0)
    it = iter(loader)
    micro = [{"image": b["image"], "label": b["label"]} for b in (next(it) for _ in range(K))]
    NOISE_SEED = 1234 + rank
    torch.manual_seed(NOISE_SEED)
    run_phases(family, prepared, micro, 0, acc, 0.0)

    # the reference: every rank's images and noise, drawn in the family's order, as one batch
    torch.manual_seed(NOISE_SEED)
    latent = cfg.model.latent_dim
    noise = [torch.randn(B, latent) for _ in range(K * (2 if cfg.model.family == "gan" and not simultaneous else 1))]
    everyone = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(everyone, ([m["image"] for m in micro], noise))
    else:
        everyone = [([m["image"] for m in micro], noise)]


    def param_grads(module, loss, retain_graph=False):
        return torch.autograd.grad(loss, [p for p in module.parameters()], allow_unused=True, retain_graph=retain_graph)


    def loss_g_sum(fake_logits):
        """G's loss, summed over the images: hinge -D(G(z)), or nonsat -log sigmoid(D(G(z)))."""
        return -fake_logits.sum() if args.gan_loss == "hinge" else F.softplus(-fake_logits).sum()


    def r1_loss_d(D, reals, fakes):
        """D's loss (hinge, or nonsat: BCE on logits) plus R1 at gamma 1, every step (the options
        parsed above); also D's fake logits."""
        real_logits, fake_logits = D(reals), D(fakes)
        if args.gan_loss == "hinge":
            loss_d = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        else:
            loss_d = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        xr = reals.clone().requires_grad_(True)
        g, = torch.autograd.grad(D(xr).sum(), xr, create_graph=True)
        return fake_logits, loss_d + 0.5 * 1.0 * 1 * g.pow(2).sum(dim=[1, 2, 3]).mean()


    report = {"steps": steps, "reduces": reduces}
    if simultaneous:
        # the notebook's step: one batch of fakes per micro-batch, both losses from the same logits of
        # the same D; D's loss (+ R1) moves only D, G's only G
        G, D = initial["G"], initial["D"]
        xs = torch.cat([torch.cat(imgs) for imgs, _ in everyone])
        fake_logits, loss_d = r1_loss_d(D, xs, torch.cat([G(z) for _, nz in everyone for z in nz]))
        reference = {"D": param_grads(D, loss_d, retain_graph=True), "G": param_grads(G, loss_g_sum(fake_logits) / len(xs))}
    elif cfg.model.family == "gan":
        G, D = initial["G"], initial["D"]
        xs = torch.cat([torch.cat(imgs) for imgs, _ in everyone])
        with torch.no_grad():  # G's BatchNorm sees each micro-batch of b, as in the accumulated run
            fakes = torch.cat([G(z) for _, nz in everyone for z in nz[:K]])
        ref_d = param_grads(D, r1_loss_d(D, xs, fakes)[1])
        # D steps with torch's own Adam on that gradient, then G's batch goes through the new D
        for p_, g_ in zip(D.parameters(), ref_d):
            p_.grad = g_
        torch.optim.Adam(D.parameters(), lr=cfg.optim.lr_d, betas=cfg.optim.betas).step()
        # each rank's D runs once per micro-batch, and spectral norm's power iteration moves its
        # sigma a little on every forward after D's step: so here too, per rank, micro-batch by micro-batch
        loss_g = 0
        for _, nz in everyone:
            D_rank = copy.deepcopy(D)
            loss_g = loss_g + sum(loss_g_sum(D_rank(G(z))) for z in nz[K:])
        ref_g = param_grads(G, loss_g / (world * K * B))
        reference = {"D": ref_d, "G": ref_g}
    else:
        vae = initial["vae"]
        losses = []
        for imgs, nz in everyone:
            for x, eps in zip(imgs, nz):
                mean, logvar = vae.encoder(x)
                recon = vae.decoder(mean + torch.exp(0.5 * logvar) * eps)
                log_sigma = vae.log_sigma.clamp(min=-6.0)
                nll = (0.5 * ((x - recon) / log_sigma.exp()) ** 2 + log_sigma + 0.5 * math.log(2 * math.pi)).sum(dim=[1, 2, 3])
                kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(dim=1)
                losses.append(nll + kl)
        reference = {"vae": param_grads(vae, torch.cat(losses).mean())}

    for n, ref in reference.items():
        got = torch.cat([g.flatten() for g in grads[n]])
        want = torch.cat([(r if r is not None else torch.zeros_like(p)).flatten()
                          for r, p in zip(ref, family.modules[n].parameters())])
        report[f"rel_err_{n}"] = float((got - want).abs().max() / want.abs().max())
        report[f"max_abs_{n}"] = float(want.abs().max())

    return report


acc = Accelerator(cpu=True)
out, report = sys.argv[1], {}
for name, argv in split_cases(sys.argv[2:]):
    one = check(p.parse_args(argv), acc)
    if acc.process_index == 0:
        report[name] = one
        json.dump(report if name else one, open(out, "w"))  # after each case: a failure later names the ones done
acc.end_training()
