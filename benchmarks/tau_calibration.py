"""Why the eval kept fraction misses the target, and what calibrating τ on which data does about it.

    python benchmarks/tau_calibration.py --task sst5 --n-train 500 --epochs 4 --lr 2e-3 --kept 0.5 \
        --out benchmarks/results/tau_calibration.json

One run per arm (the loop of `benchmarks/controls.py`), τ left as training set it; then, from that same state,
each calibration variant: on the training examples or on held-out examples of the task's pool (examples of the
training pool that this run did not train on), with one pass (the earlier calibration) or fixed-point rounds
(`TSPeftModel.calibrate`). Each variant records the eval kept fraction overall and per module and the kept
fraction on its own calibration examples, so a gap that remains on the calibration examples (upstream gates
moving a module's r) is told apart from one that appears only on unseen examples (r of fitted examples).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from controls import (  # noqa: E402
    add_run_arguments,
    calibrate,
    evaluate_arm,
    features_and_collator,
    fit_arm,
    task_examples,
    unused_examples,
)
from provenance import code_commit  # noqa: E402
from tspeft.core.io import atomic_write  # noqa: E402

VARIANTS = {"train, 1 pass": ("train", 1), "train, rounds": ("train", 4),
            "held-out, 1 pass": ("held-out", 1), "held-out, rounds": ("held-out", 4)}


def kept_on(model, features, collate) -> float:
    model.eval()
    model.reset_stats()
    with torch.no_grad():
        for i in range(0, len(features), 64):
            model(**collate(features[i:i + 64]))
    kept = model.kept_fraction()
    model.reset_stats()
    return kept


def run(args) -> dict:
    task_data = task_examples(args.task, args.n_train, args.n_eval, args.seed)
    held_out = unused_examples(args.task, args.n_train, args.n_eval, args.seed, args.calibration_examples)
    records = []
    for arm in args.arms.split(","):
        fitted = fit_arm(task_data, arm, args, args.seed)
        model = fitted["model"]
        trained_tau = {n: g.tau.clone() for n, g in model.gates.items()}
        data = {"train": (fitted["features"][:args.calibration_examples], fitted["collate"]),
                "held-out": features_and_collator(task_data, fitted["tokenizer"], held_out, args.max_length)}
        for variant, (source, rounds) in {"as trained": (None, 0), **VARIANTS}.items():
            for name, gate in model.gates.items():
                gate.tau.copy_(trained_tau[name])
            ran = calibrate(model, *data[source], args.calibration_examples, rounds) if rounds else 0
            result = evaluate_arm(fitted, task_data, args)
            records.append({"arm": arm, "variant": variant, "rounds_run": ran, "accuracy": result["accuracy"],
                            "eval_kept": result["kept_fraction"], "eval_per_module": result["per_module"],
                            "allocation": result["allocation"],
                            "kept_on_train": kept_on(model, *data["train"]),
                            "kept_on_held_out": kept_on(model, *data["held-out"])})
            print(f"{arm:8s} {variant:18s} eval kept {result['kept_fraction']:.4f} "
                  f"train {records[-1]['kept_on_train']:.4f} held-out {records[-1]['kept_on_held_out']:.4f}",
                  flush=True)
    return {"task": args.task, "n_train": args.n_train, "n_eval": args.n_eval, "epochs": args.epochs, "lr": args.lr,
            "seed": args.seed, "target_kept": args.kept, "calibration_examples": args.calibration_examples,
            "commit": code_commit(), "records": records}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="sst5")
    parser.add_argument("--arms", default="uniform,learned")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kept", type=float, default=0.5)
    add_run_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    record = run(args)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


if __name__ == "__main__":
    main()
