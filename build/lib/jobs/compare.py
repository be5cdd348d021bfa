"""GAN vs VAE (or any runs side by side): one self-contained HTML report (see gen/report.py).

    python -m jobs.compare runs/quickstart-gan runs/quickstart-vae --out report.html
    python -m jobs.compare runs/a runs/b runs/c --data data/mnist --n 10000 --out report.html

Runs jobs.evaluate's scoring where a run has no matching RUN/eval/metrics.json. With W&B on,
the metrics table is also logged as a W&B Table in the runs' project.
"""
import argparse
import sys
import tempfile

from gen.cli import command


@command
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run dirs (or checkpoints / export folders)")
    p.add_argument("--out", default="report.html")
    p.add_argument("--data", default=None, help="real shards (default: each run's data.path)")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--space", choices=("domain", "inception"), default="domain")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from gen.report import render, run_facts, summary
    from gen.durable import atomic_write_bytes
    from gen.tracking import log_compare_table
    with tempfile.TemporaryDirectory() as tmp:
        facts = [run_facts(r, args, tmp) for r in args.runs]
        page = render(facts, args)
    atomic_write_bytes(args.out, page.encode())
    for line in summary(facts):
        print(f"- {line}")
    print(f"report: {args.out}")
    if log_compare_table(facts, args.out):
        print("W&B: table compare/table logged in the runs' project")
    return 0


if __name__ == "__main__":
    sys.exit(main())
