"""Budgeted module selection: does learned token sparsity pick better modules than weight criteria?

1. Train TS-LoRA on all target modules once (`tspeft train --method ts-lora`).
2. `tspeft importance` ranks the modules by every criterion (kept fraction, mean r, ‖BA‖, ‖A‖‖B‖, random).
3. For each criterion and k = 25 % / 50 % of the modules, retrain plain LoRA on the top-k modules only
   (same rank, steps, lr), for each seed, and record the accuracy.

Results are appended to benchmarks/results/importance.json (resumable); `make_tables.py` renders them.

    python benchmarks/importance_selection.py --suite encoder   # MiniLM-L6 on rotten_tomatoes
    python benchmarks/importance_selection.py --suite decoder   # SmolLM2-135M on piqa
    python benchmarks/importance_selection.py --suite trec      # MiniLM-L6 on trec (in regime), ranked at kept 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from provenance import code_commit  # noqa: E402
from quality import SUITES, load_records, save_records  # noqa: E402
from tspeft.cli.main import main as tspeft_main  # noqa: E402

TASK = {"encoder": "rotten_tomatoes", "decoder": "piqa", "trec": "trec"}
# Setups beyond the quality suites: (model, flags of every run, extra flags of the ranked ts-lora run). trec is in
# regime (dense LoRA beats the frozen probe by 12 points, RESULTS.md "τ rule vs controls"); rotten_tomatoes is not.
EXTRA_SETUPS = {"trec": ("minilm", ["--n-train", "1000", "--n-eval", "1000", "--epochs", "3", "--lr", "2e-3"],
                         ["--target-kept", "0.5"])}
CRITERIA = ("kept_fraction", "relative_magnitude", "delta_weight_norm", "factor_norm", "random")
KEYS = ("suite", "criterion", "k", "seed")  # what identifies one run (resuming skips runs already recorded)


def _check_source(source: Path, task: str) -> None:
    """Refuse a --source run that is not a finished ts-lora run of this suite's task."""
    metrics_file = source / "metrics.json"
    if not metrics_file.is_file():
        raise SystemExit(f"--source {source}: no metrics.json (not a finished `tspeft train` run)")
    metrics = json.loads(metrics_file.read_text())
    expected = {"task": task, "method": "ts-lora"}
    wrong = {k: metrics.get(k) for k, v in expected.items() if metrics.get(k) != v}
    if wrong:
        raise SystemExit(f"--source {source}: expected a ts-lora run on {task}, found {wrong}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(TASK), required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.25,0.5")
    parser.add_argument("--criteria", default=",".join(CRITERIA), help="comma-separated subset of the criteria")
    parser.add_argument("--runs-dir", default="runs/importance")
    parser.add_argument("--results", default=str(ROOT / "results" / "importance.json"))
    parser.add_argument("--source", help="an existing ts-lora run of the suite (same task and flags, e.g. the quality "
                                         "suite's seed-0 run) to rank from, instead of training one")
    args = parser.parse_args(argv)
    criteria = args.criteria.split(",")
    unknown = sorted(set(criteria) - set(CRITERIA))
    if unknown:
        parser.error(f"unknown criteria {unknown}; choose from {', '.join(CRITERIA)}")
    task = TASK[args.suite]
    model, flags, ranked_flags = EXTRA_SETUPS.get(args.suite) or (SUITES[args.suite]["model"],
                                                                  SUITES[args.suite]["flags"], [])
    runs = Path(args.runs_dir) / args.suite
    common = ["--task", task, "--model", model, *flags, "--no-report"]

    source = Path(args.source) if args.source else runs / "ts-lora-all"
    if args.source:
        _check_source(source, task)
    elif not (source / "metrics.json").is_file():
        tspeft_main(["train", *common, *ranked_flags, "--method", "ts-lora", "--seed", "0", "--overwrite",
                     "--out", str(source)])
    importance = source / "importance.json"
    if not importance.is_file():
        tspeft_main(["importance", "--adapter", str(source)])
    n_modules = len(json.loads(importance.read_text())["ranking"]["kept_fraction"])

    results = Path(args.results)
    records = load_records(results)
    done = {tuple(r[key] for key in KEYS) for r in records}
    for fraction in (float(f) for f in args.fractions.split(",")):
        k = max(1, round(fraction * n_modules))
        for criterion in criteria:
            for seed in (int(s) for s in args.seeds.split(",")):
                if (args.suite, criterion, k, seed) in done:
                    continue
                out = runs / f"lora-{criterion}-k{k}-s{seed}"
                tspeft_main(["train", *common, "--method", "lora", "--seed", str(seed), "--modules-from",
                             str(importance), "--top-k", str(k), "--criterion", criterion, "--overwrite",
                             "--out", str(out)])  # resumable by record: a run without one is trained again
                metrics = json.loads((out / "metrics.json").read_text())
                records.append({"suite": args.suite, "task": task, "model": model, "criterion": criterion,
                                "k": k, "fraction": fraction, "n_modules": n_modules, "seed": seed,
                                "accuracy": metrics["accuracy"], "target_modules": metrics["target_modules"],
                                "train_seconds": metrics["train_seconds"], "sizes": " ".join(flags),
                                "commit": code_commit()})
                save_records(results, records)
                print(f"[importance] {criterion} k={k} seed {seed}: accuracy {metrics['accuracy']:.4f}", flush=True)


if __name__ == "__main__":
    main()
