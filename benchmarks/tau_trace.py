"""Trace the τ rule during one short real run: per optimizer step and per module, the rule's state.

    python benchmarks/tau_trace.py --task rotten_tomatoes --n-train 3000 --epochs 2 --target-kept 0.5 \
        --out benchmarks/results/tau_trace_rt.json

The training loop of `benchmarks/controls.py` (plain AdamW, linear decay, the training defaults' model, rank and
target modules, `model.update_thresholds()` after each step), so what is recorded is what the rule sees and
does. Each step records, per module: u (the allocation), the rule's slope estimate ∂L/∂u, τ, and the kept
fraction realised in that step. `tau_tables.trace_summary` turns a trace into the figures of the "τ rule
diagnosis" section of RESULTS.md: the spread of u across modules, the per-module mean slope and its standard
error over steps, the per-step movement of u, and the accuracy / eval kept fraction at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from controls import add_run_arguments, task_examples, train_arm  # noqa: E402
from provenance import code_commit  # noqa: E402
from tau_tables import trace_summary  # noqa: E402
from tspeft.core.io import atomic_write  # noqa: E402


def rule_snapshot(ts_model) -> dict:
    gates = ts_model.gates
    return {"u": {n: round(float(g.allocated_kept), 5) for n, g in gates.items()},
            "slope": {n: float(g.loss_slope) for n, g in gates.items()},
            "tau": {n: float(g.tau) for n, g in gates.items()},
            "kept": {n: g.kept_fraction() for n, g in gates.items()}}


def run(args) -> dict:
    task_data = task_examples(args.task, args.n_train, args.n_eval, args.seed)
    trace = []

    def on_step(model, step, loss):
        trace.append({"step": step, "loss": loss, **rule_snapshot(model)})
        model.reset_stats()

    args.kept = args.target_kept
    result = train_arm(task_data, args.arm, args, args.seed, on_step=on_step)
    return {"task": args.task, "n_train": len(task_data.train), "n_eval": len(task_data.eval), "epochs": args.epochs,
            "lr": args.lr, "seed": args.seed, "target_kept": args.target_kept, "arm": args.arm, "rule": result["rule"],
            "accuracy": result["accuracy"], "eval_kept": result["kept_fraction"],
            "eval_per_module": result["per_module"],
            "train_seconds": result["train_seconds"], "commit": code_commit(), "trace": trace}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="rotten_tomatoes")
    parser.add_argument("--arm", default="learned", choices=["learned", "uniform", "random"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-kept", type=float, default=0.5)
    add_run_arguments(parser)
    parser.add_argument("--out", required=True)
    parser.add_argument("--summary", action="store_true", help="only print the summary of an existing --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.summary:
        record = run(args)
        atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(record)))
    print(json.dumps(trace_summary(json.loads(out.read_text())), indent=1))


if __name__ == "__main__":
    main()
