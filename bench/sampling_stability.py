"""Do checkpoints a few steps apart score alike? Each checkpoint of a run scored as it is sampled
(gen.load_generator: the EMA weights with their own BatchNorm statistics) and, beside it, with
the live generator's statistics that the EMA copy carried before (what every figure used until
gen.batch_stats), plus the spread over sample seeds: the noise two checkpoints are held against.

    python -m jobs.train --preset gan --model.width 16 --data data/mnist --train.run_dir runs/g \\
        --train.steps 1600 --train.ckpt_every 400 --train.keep_last 30
    python -m jobs.train ... --train.steps 1603 --train.ckpt_every 1     # three more, one step apart
    python bench/sampling_stability.py runs/g --n 2000
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--data", default=None, help="real shards (default: the run's)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=3, help="sample seeds per checkpoint (the noise)")
    args = p.parse_args()
    from safetensors.torch import load_file

    from gen.checkpoint import checkpoints
    from gen.metrics import Evaluator
    from gen.sample import load_generator
    first = load_generator(args.run)
    ev = Evaluator(args.data or first.config.data.path, n=args.n, with_prdc=False, progress=False)
    rows = []
    print(f"{args.run}: n={ev.n}, {ev.space}; real vs real FID {ev.floors['real_vs_real']['fid']:.2f}")
    for step, ckpt in sorted(checkpoints(args.run)):
        g = load_generator(ckpt)
        sampled = [ev.score(g.sample(ev.n, seed=1000 + s)) for s in range(args.seeds)]
        live = load_file(str(ckpt / "model.safetensors"))  # the live G's buffers (the first prepared module)
        with torch.no_grad():
            for k, v in g.module.state_dict().items():
                if "running_" in k:
                    v.copy_(live[k])
        before = ev.score(g.sample(ev.n, seed=1000))
        fids = [s["fid"] for s in sampled]
        row = {"step": step, "fid": fids, "legibility": sampled[0].get("legibility"), "fid_before_fix": before["fid"],
               "legibility_before_fix": before.get("legibility")}
        rows.append(row)
        leg = f", legibility {row['legibility']:.3f} (before {row['legibility_before_fix']:.3f})" if row["legibility"] else ""
        print(f"step {step:6d}: FID {min(fids):.2f}-{max(fids):.2f} over {args.seeds} seeds; "
              f"before the fix {before['fid']:.2f}{leg}", flush=True)
    out = Path(args.run) / "sampling-stability.json"
    out.write_text(json.dumps({"n": ev.n, "space": ev.space, "floor": ev.floors["real_vs_real"], "rows": rows}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
