"""Vision suite: EfficientNet-lite0 on Fashion-MNIST; frozen baseline (linear probe), dense vs token-selective
LoRA / DoRA on the pointwise convolutions, seeds, and a kept-fraction sweep of TS-LoRA.

Each run is one `tspeft train` (in process); its metrics.json becomes one record of
benchmarks/results/vision.json. Records already present are skipped, so an interrupted suite resumes where it
stopped. The grid runs seed by seed (every method of seed 0 first), then the sweep, so a suite cut short still
holds complete pairs. Tables: `python benchmarks/make_tables.py` (section "Vision").

    python benchmarks/vision.py                      # grid: none, lora, ts-lora, dora, ts-dora x seeds 0,1,2
    python benchmarks/vision.py --sweep              # ts-lora at kept 0.9 / 0.5 / 0.3, seed 0
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
from quality import MACHINE, load_records, save_records  # noqa: E402
from tspeft.cli.main import main as tspeft_main  # noqa: E402

MODEL, TASK = "efficientnet-lite0", "fashion_mnist"
# 32×32 inputs (Fashion-MNIST is 28×28), 3,000 training images, 1,000 eval images (a fixed subset of the test
# set). Adapters: 1 epoch = 94 optimizer steps of 32 at lr 5e-3. The frozen baseline (the linear probe: the head
# alone) gets 5 epochs at lr 1e-2, so that it is fitted, not cut short: it is the bar dense LoRA must clear by 5
# points. Time: RESULTS.md's Vision section sums the runs' recorded train and eval seconds; on 2 quiet cores the
# grid and the sweep take minutes, far below the hour the suite may use (on a heavily shared machine, load ~15,
# one LoRA run took ~20 min instead).
SIZES = ["--n-train", "3000", "--n-eval", "1000", "--image-size", "32"]
METHODS = ["none", "lora", "ts-lora", "dora", "ts-dora"]
ADAPTER_FLAGS = ["--epochs", "1", "--lr", "5e-3"]
FLAGS = {"none": ["--epochs", "5", "--lr", "1e-2"], **{method: ADAPTER_FLAGS for method in METHODS[1:]}}
SWEEP_KEPT = ["0.5", "0.3", "0.9"]  # 0.7 (the default) is in the grid; the far points first
KEYS = ("task", "model", "method", "seed", "target_kept")


def run_folder(runs_dir: str, method: str, seed: int, kept: str | None) -> Path:
    return Path(runs_dir) / "vision" / TASK / f"{method}{'@' + kept if kept else ''}-s{seed}"


def plan(sweep: bool, seeds: list[int], methods: list[str]) -> list[tuple[str, int, str | None]]:
    if sweep:
        return [("ts-lora", seeds[0], kept) for kept in SWEEP_KEPT]
    return [(method, seed, None) for seed in seeds for method in methods]


def record_of(metrics: dict, target_kept: float | None, sizes: list[str]) -> dict:
    record = {k: metrics.get(k) for k in ("task", "method", "seed", "accuracy", "majority_accuracy", "kept_fraction",
                                          "train_seconds", "eval_seconds", "trainable_params", "per_module",
                                          "n_train", "n_eval", "lr", "epochs", "image_size", "train_steps")}
    record.update(model=MODEL, suite="vision", target_kept=target_kept, target_kept_used=metrics.get("target_kept"),
                  sizes=" ".join(sizes), machine=MACHINE + f", device {metrics.get('device')}", commit=code_commit())
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="ts-lora kept-fraction sweep (first seed)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the grid's methods")
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", default=str(ROOT / "results" / "vision.json"))
    args = parser.parse_args(argv)
    results = Path(args.results)
    records = load_records(results)
    done = {tuple(r.get(k) for k in KEYS) for r in records}
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; the grid's methods are {METHODS}")
    for method, seed, kept in plan(args.sweep, [int(s) for s in args.seeds.split(",")], methods):
        target = float(kept) if kept else None
        if (TASK, MODEL, method, seed, target) in done:
            continue
        out = run_folder(args.runs_dir, method, seed, kept)
        flags = [*SIZES, *FLAGS[method], *(["--target-kept", kept] if kept else [])]
        tspeft_main(["train", "--task", TASK, "--model", MODEL, "--method", method, "--seed", str(seed),
                     "--out", str(out), "--overwrite", "--device", args.device, "--no-report", *flags])
        record = record_of(json.loads((out / "metrics.json").read_text()), target, flags)
        records.append(record)
        save_records(results, records)
        print(f"[vision] {method} seed {seed}{' kept ' + kept if kept else ''}: accuracy {record['accuracy']:.4f} "
              f"kept {record['kept_fraction']} ({record['train_seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
