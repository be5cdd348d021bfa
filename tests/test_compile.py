"""--train.compile (issue 36): each compiled step is the eager step from the same state within float
tolerance (a GAN's trajectory amplifies the last bits from step to step, so whole runs are compared
step by step, not end to end), with no graph break in the hot path; a compiled run resumes bit for
bit; under DDP the ranks stay identical (test_train.test_ddp_two_processes_keep_identical_weights
runs compiled too). R1's double backward runs through the plain, eager D every --model.r1_every steps."""
import pytest
import torch

from helpers import TINY, assert_same, metrics, run, state_files


# the default GAN (one simultaneous phase, the one-backward hook, R1) and the VAE path (a random op
# in the graph: seed-vae, cheap to compile); gan-small-data's alternating phases and BatchNorm D
# pass the same check (docs/speed.md) and cost another minute of compiling in CI
@pytest.mark.parametrize("preset", ["gan", "seed-vae"])
def test_each_compiled_step_is_the_eager_step(preset, mnist_shards):
    """15 steps (R1 on 4 of a GAN's), each from the eager run's state: the same losses and the same
    gradients to float tolerance. (Now and then a unit's input sits on a kink, a LeakyReLU's or a
    batch's, between two roundings, and one step's gradient moves by up to a few %: the median is
    held at float level, the worst step at 5 %.)"""
    import copy
    import statistics

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from torch._dynamo.utils import counters

    from gen.config import parse
    from gen.data import load_real, to_float
    from gen.families import build_family
    from gen.step import prepare, run_phases
    cfg = parse(["--preset", preset, "--model.width", "8", "--model.r1_every", "4", "--model.r1_gamma", "1"])
    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True)
    families = []
    for _ in range(2):
        set_seed(0)
        families.append(build_family(cfg.model, cfg.optim, (1, 28, 28), 10))
    eager, compiled = families
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format  # as the loop runs them
    for family in families:
        for m in family.modules.values():
            m.to(memory_format=layout)
    torch._dynamo.reset()
    counters.clear()
    prepared = [prepare(acc, eager), prepare(acc, compiled, compile_mode="default")]
    grads = [{}, {}]
    for i, prep in enumerate(prepared):  # each optimizer's gradients, as it steps
        for name, opt in prep.optimizers.items():
            def recording_step(*args, _step=opt.step, _name=name, _i=i, **kwargs):
                grads[_i][_name] = torch.cat([p.grad.flatten() for p in families[_i].modules[_name].parameters()
                                              if p.grad is not None])
                return _step(*args, **kwargs)
            opt.step = recording_step
    x, y = load_real(mnist_shards, "train")
    loss_diffs, grad_diffs = [], []
    for step in range(len(y) // 16):
        for name in eager.modules:  # the compiled step starts from the eager run's state
            compiled.modules[name].load_state_dict(eager.modules[name].state_dict())
            compiled.optimizers[name].load_state_dict(copy.deepcopy(eager.optimizers[name].state_dict()))
        batch = {"image": to_float(x[16 * step:16 * (step + 1)]).contiguous(memory_format=layout),
                 "label": y[16 * step:16 * (step + 1)]}
        results = []
        for family, prep in zip(families, prepared):
            torch.manual_seed(step)
            results.append(run_phases(family, prep, [batch], step, acc, 0.0))
        loss_diffs += [float((v - results[1][k]).abs() / (1 + v.abs())) for k, v in results[0].items()]
        grad_diffs += [float((g - grads[1][name]).norm() / g.norm()) for name, g in grads[0].items()]
    assert max(loss_diffs) < 1e-4, max(loss_diffs)
    assert statistics.median(grad_diffs) < 1e-5 and max(grad_diffs) < 0.05, sorted(grad_diffs)[-3:]
    # every module compiled to one graph: no graph break in the hot path
    assert counters["stats"]["unique_graphs"] >= len(eager.modules) and not counters["graph_break"], dict(counters["graph_break"])


def test_a_compiled_run_resumes_bit_for_bit(mnist_shards, tmp_path):
    common = ["--preset", "gan", "--data", str(mnist_shards), *TINY, "--log.wandb", "off", "--data.workers", "0",
              "--train.log_every", "1", "--train.ckpt_every", "10", "--train.compile"]
    for name, steps in (("straight", 20), ("resumed", 10), ("resumed", 20)):
        run(["-m", "jobs.train", *common, "--train.run_dir", str(tmp_path / name), "--train.steps", str(steps)],
            check=True)
    assert [m["step"] for m in metrics(tmp_path / "resumed")] == list(range(1, 21))
    assert_same(state_files(tmp_path / "straight/checkpoints/checkpoint-0000020"),
                state_files(tmp_path / "resumed/checkpoints/checkpoint-0000020"))
