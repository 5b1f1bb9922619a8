"""The "Vision" section of RESULTS.md, from benchmarks/results/vision.json (written by benchmarks/vision.py).

Statistics: per-seed paired differences (token-selective − dense, same seed, so the same training images and
order) with a 95 % Student-t interval. Regime rule: the task counts for a claim only if dense LoRA beats the
frozen baseline (the linear probe, method none) by at least 5 points; otherwise it is flagged and no verdict is
drawn. Verdict of a pair: the interval includes 0 or lies above it.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

REGIME_MARGIN = 0.05
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
PAIRS = [("lora", "ts-lora"), ("dora", "ts-dora")]


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def paired_interval(differences: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95 % t interval; None for a single pair)."""
    mean = statistics.fmean(differences)
    n = len(differences)
    if n < 2:
        return mean, None
    return mean, T_975.get(n - 1, 1.96) * statistics.stdev(differences) / math.sqrt(n)


def common_sizes(flags: str) -> str:
    """A record's size flags without the per-method ones (epochs, lr, target), shown in the table instead."""
    words = flags.split()
    pairs = zip(words[::2], words[1::2])
    return " ".join(f"{flag} {value}" for flag, value in pairs if flag not in ("--epochs", "--lr", "--target-kept"))


def flag_value(flags: str, flag: str) -> str | None:
    """The value of `flag` in a record's size flags (records written before a field was recorded)."""
    words = flags.split()
    return words[words.index(flag) + 1] if flag in words[:-1] else None


def grid_table(grid: dict[str, list[dict]]) -> list[str]:
    lines = ["| method | epochs | lr | seeds | accuracy (mean ± std) | kept fraction | train s (mean) "
             "| trainable params |",
             "|---|---|---|---|---|---|---|---|"]
    for method in ("none", "lora", "ts-lora", "dora", "ts-dora"):
        runs = grid.get(method, [])
        if not runs:
            continue
        kept = [r["kept_fraction"] for r in runs if r.get("kept_fraction") is not None]
        name = "none (linear probe, frozen baseline)" if method == "none" else method
        seconds = statistics.fmean(r["train_seconds"] for r in runs)
        epochs = runs[0].get("epochs") or flag_value(runs[0]["sizes"], "--epochs")
        lines.append(f"| {name} | {epochs} | {runs[0].get('lr')} | {len(runs)} | "
                     f"{mean_std([r['accuracy'] for r in runs])} | "
                     f"{mean_std(kept) if kept else '–'} | {seconds:.0f} | {runs[0]['trainable_params']:,} |")
    return lines + [""]


def regime_line(grid: dict[str, list[dict]]) -> tuple[list[str], bool]:
    if not grid.get("none") or not grid.get("lora"):
        return ["Regime: not decided yet (needs the linear probe and dense LoRA).", ""], False
    probe = statistics.fmean(r["accuracy"] for r in grid["none"])
    dense = statistics.fmean(r["accuracy"] for r in grid["lora"])
    in_regime = dense - probe >= REGIME_MARGIN
    verdict = ("in regime: the pairs below count for the claim" if in_regime else
               f"NOT in regime (margin under {REGIME_MARGIN * 100:.0f} points): flagged, no claim verdict is drawn")
    return [f"Regime: dense LoRA {dense:.3f} vs frozen baseline (linear probe) {probe:.3f}, margin "
            f"{(dense - probe) * 100:+.1f} points: {verdict}.", ""], in_regime


def pairs_table(grid: dict[str, list[dict]], in_regime: bool) -> list[str]:
    lines = ["| pair | seeds paired | discarded share | Δ accuracy (TS − dense), 95 % interval | holds |",
             "|---|---|---|---|---|"]
    for dense, gated in PAIRS:
        by_seed = {r["seed"]: r for r in grid.get(dense, [])}
        paired = [(by_seed[r["seed"]], r) for r in grid.get(gated, []) if r["seed"] in by_seed]
        if not paired:
            continue
        mean, half = paired_interval([g["accuracy"] - d["accuracy"] for d, g in paired])
        discarded = 1 - statistics.fmean(g["kept_fraction"] for _, g in paired)
        interval = (f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]" if half is not None
                    else f"{mean:+.3f} (one seed)")
        holds = ("–" if not in_regime or half is None else "yes" if mean + half >= 0 else "no")
        lines.append(f"| {dense} → {gated} | {len(paired)} | {discarded:.3f} | {interval} | {holds} |")
    if len(lines) == 2:
        return ["Dense vs token-selective pairs: none complete yet.", ""]
    return lines + [""]


def sweep_table(records: list[dict]) -> list[str]:
    points = defaultdict(list)
    for r in records:
        if r["method"] in ("lora", "ts-lora") and r["seed"] == 0:
            target = r.get("target_kept_used") or r.get("target_kept")
            if r["method"] == "lora" or target is not None:
                points["dense" if r["method"] == "lora" else f"{target:g}"].append(r)
    if len(points) < 2:
        return ["Kept sweep: not run yet (`python benchmarks/vision.py --sweep`).", ""]
    lines = ["Kept sweep (TS-LoRA, seed 0; 0.7 is the default target, from the grid):", "",
             "| target kept | measured kept | accuracy |", "|---|---|---|"]
    order = sorted(points, key=lambda k: -1.0 if k == "dense" else -float(k))
    for key in order:
        runs = points[key]
        kept = [r["kept_fraction"] if r.get("kept_fraction") is not None else 1.0 for r in runs]
        lines.append(f"| {key} | {statistics.fmean(kept):.3f} | {statistics.fmean(r['accuracy'] for r in runs):.3f} |")
    return lines + [""]


def vision_section(records: list[dict]) -> list[str]:
    if not records:
        return ["No vision results yet: run `python benchmarks/vision.py`.", ""]
    grid = defaultdict(list)
    for r in records:
        if r.get("target_kept") is None:
            grid[r["method"]].append(r)
    first = records[0]
    sizes = common_sizes(first["sizes"])
    lines = [f"EfficientNet-lite0 (ImageNet weights) on Fashion-MNIST, LoRA / DoRA rank 8 on its 32 pointwise "
             f"(1×1) convolutions, every spatial position a token; sizes `{sizes}` (epochs and lr per method "
             f"below), eval on {first['n_eval']} test images (a fixed subset, the same for every run); machine "
             f"{first['machine']}; commit "
             f"{', '.join(sorted({str(r['commit']) for r in records}))}. Majority class: "
             f"{first['majority_accuracy']:.3f}.", ""]
    train = sum(r["train_seconds"] for r in records)
    evaluation = sum(r.get("eval_seconds") or 0.0 for r in records)
    lines += [f"{len(records)} runs: {train / 60:.1f} min of training and {evaluation / 60:.1f} min of evaluation "
              "in all (the runs' own wall-clock seconds; speed claims are SPEED.md's).", ""]
    regime, in_regime = regime_line(grid)
    return lines + grid_table(grid) + regime + pairs_table(grid, in_regime) + sweep_table(records)
