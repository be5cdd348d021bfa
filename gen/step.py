"""One optimizer step, the same for every family: the family's modules as the accelerator wrapped
them, each phase over all grad_accum micro-batches with explicit accumulation, then one clip,
step and zero_grad per trained module (stylegan2-ada's ddp_sync, written out)."""
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass


@dataclass
class Prepared:
    """The family's modules and optimizers as the accelerator wrapped them (device, DDP, precision):
    `nets` is the view the phases run through; the family keeps the plain modules."""
    nets: dict
    optimizers: dict


def prepare(accelerator, family, compile_mode=None):
    """The family's modules and optimizers through accelerator.prepare; with `compile_mode`, each
    wrapped module torch.compiled (its forward and backward one graph each, split by DDP at its
    buckets). The plain modules stay eager: R1's double backward and sampling run through them."""
    names = list(family.modules)
    wrapped = accelerator.prepare(*family.modules.values(), *(family.optimizers[n] for n in names))
    nets = dict(zip(names, wrapped[:len(names)]))
    if compile_mode:
        import torch
        import torch._inductor.config
        # random ops in a compiled graph draw from torch's generator, not inductor's own: the same
        # noise as the eager step (a VAE's reparameterisation), and a resume restores it
        torch._inductor.config.fallback_random = True
        nets = {n: torch.compile(net, mode=None if compile_mode == "default" else compile_mode) for n, net in nets.items()}
    return Prepared(nets, dict(zip(names, wrapped[len(names):])))


def run_phases(family, prepared, micro_batches, step, accelerator, max_norm):
    """One optimizer step for each of the family's phases, each over all k micro-batches: every
    loss divided by k (the mean over k*b samples), DDP's gradient reduction skipped (no_sync) on
    all but the last micro-batch, then one clip, step and zero_grad per trained module.
    Returns each metric's mean over the micro-batches, as device tensors."""
    sums, k = {}, len(micro_batches)
    for phase in family.phases(step):
        trained = [prepared.nets[n] for n in phase.names]
        with frozen([family.modules[n] for n in phase.frozen]):
            for i, batch in enumerate(micro_batches):
                with ExitStack() as stack:
                    if i < k - 1:
                        for net in trained:
                            stack.enter_context(accelerator.no_sync(net))
                    losses, metrics = phase.loss(batch, step, prepared.nets)
                    if phase.shared:  # one loss into all the phase's modules
                        accelerator.backward(losses["shared"] / k, inputs=[
                            p for name in phase.names for p in family.modules[name].parameters() if p.requires_grad])
                    else:
                        for j, name in enumerate(phase.names):  # each loss into its own module's weights only
                            accelerator.backward(losses[name] / k, **({} if len(phase.names) == 1 else {
                                "inputs": [p for p in family.modules[name].parameters() if p.requires_grad],
                                "retain_graph": j < len(phase.names) - 1}))
                add_into(sums, metrics)
        for name in phase.names:
            if max_norm > 0:
                accelerator.clip_grad_norm_(prepared.nets[name].parameters(), max_norm)
            prepared.optimizers[name].step()
            prepared.optimizers[name].zero_grad(set_to_none=True)
    return {name: v / k for name, v in sums.items()}


@contextmanager
def frozen(modules):
    """Weights that need no gradient in a phase (G's phase does not train D: stylegan2-ada's
    requires_grad_(False)), so no weight-gradient work is done for them."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def add_into(sums, metrics):
    """Sum device tensors by name (no host sync)."""
    for k, v in metrics.items():
        sums[k] = sums[k] + v if k in sums else v


def learning_rates(family, step, cfg):
    """{module name: learning rate} at this step (the schedule times the family's base rates)."""
    return {name: base * lr_factor(step, cfg) for name, base in family.base_lr.items()}


def set_learning_rates(prepared, family, step, cfg):
    rates = learning_rates(family, step, cfg)
    for name, opt in prepared.optimizers.items():
        for group in opt.param_groups:
            group["lr"] = rates[name]


def lr_factor(step, cfg):
    warm = min(1.0, (step + 1) / cfg.optim.warmup_steps) if cfg.optim.warmup_steps > 0 else 1.0
    if cfg.optim.schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, cfg.train.steps) / cfg.train.steps))
    return warm
