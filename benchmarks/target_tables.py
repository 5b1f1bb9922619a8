"""RESULTS.md section "τ rule: the targets": each target of the τ-rule issue per setting, met or missed and by
how much, from the controls records (controls.json and the decoder sweep, as `tau_tables.controls_section` reads
them). The learned arm is `learned-prior`, the default rule; only ts runs with τ calibrated on unused examples.

Targets (means over the seeds run; paired differences in accuracy points with their 95 % interval):
kept 0.5: learned − uniform ≥ +0.5, learned − random ≥ +3, learned − dense ≥ −0.5; kept 0.7: the interval of
learned − dense includes 0 or lies above it; every eval kept fraction within ±0.02 of its target; Spearman ρ of
the per-module allocation between seeds ≥ 0.6 (at kept 0.5).
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from tau_tables import REGIME_MARGIN, calibration_of, mean_rho, paired_points, setting_of

LEARNED = "learned-prior"
FLOORS = {"uniform": 0.5, "random": 3.0, "dense": -0.5}  # kept 0.5: learned − arm ≥ floor (points)


def by_arm(runs: list[dict]) -> dict:
    """{(arm, kept): {seed: record}} of one setting, ts arms only as calibrated on unused examples."""
    arms: dict = defaultdict(dict)
    for r in runs:
        if r["arm"] in ("dense", "probe") or calibration_of(r) == "unused":
            arms[(r["arm"], r.get("kept"))][r["seed"]] = r
    return arms


def accuracies(seeds: dict) -> dict:
    """{seed: record} -> {seed: accuracy}."""
    return {seed: r["accuracy"] for seed, r in seeds.items()}


def floor_cell(difference, floor: float) -> str:
    if difference is None:
        return "not run"
    mean, half, seeds = difference
    verdict = "met" if mean >= floor else f"missed by {floor - mean:.1f}"
    spread = f" [{mean - half:+.1f}, {mean + half:+.1f}]" if seeds > 1 else ""
    return f"{mean:+.1f}{spread} ({seeds}): {verdict}"


def interval_cell(difference) -> str:
    if difference is None:
        return "not run"
    mean, half, seeds = difference
    if seeds < 2:
        return f"{mean:+.1f} (1 seed): no interval"
    high = mean + half
    return f"{mean:+.1f} [{mean - half:+.1f}, {high:+.1f}] ({seeds}): " + ("met" if high >= 0 else
                                                                         f"missed by {-high:.1f}")


def setting_row(task: str, sizes: str, arms: dict) -> str:
    dense, learned = arms.get(("dense", None), {}), arms.get((LEARNED, 0.5), {})
    probes = [r["accuracy"] for r in arms.get(("probe", None), {}).values()]
    margin = (statistics.fmean(r["accuracy"] for r in dense.values()) - statistics.fmean(probes)
              if dense and probes else None)
    regime = ("no frozen baseline" if margin is None else f"{100 * margin:+.1f}" +
              ("" if margin >= REGIME_MARGIN else ": flagged"))
    cells = [floor_cell(paired_points(accuracies(learned),
                                      accuracies(arms.get((arm, None if arm == "dense" else 0.5), {}))), floor)
             for arm, floor in FLOORS.items()]
    cells.append(interval_cell(paired_points(accuracies(arms.get((LEARNED, 0.7), {})), accuracies(dense))))
    off = [abs(r["kept_fraction"] - kept) for (arm, kept), seeds in arms.items() if kept is not None
           for r in seeds.values() if r.get("kept_fraction") is not None]
    cells.append(f"{max(off):.3f} ({len(off)} runs): " + ("met" if max(off) <= 0.02 else "missed") if off else "–")
    allocations = {s: r["allocation"] for s, r in learned.items() if r.get("allocation")}
    rho = mean_rho(allocations) if len(allocations) > 1 else None
    cells.append("–" if rho is None else f"{rho:.2f}: " + ("met" if rho >= 0.6 else f"missed by {0.6 - rho:.2f}"))
    n_train = sizes.split()[0].removeprefix("n_train=")
    return f"| {task} ({n_train} train) | {regime} | " + " | ".join(cells) + " |"


def targets_section(records: list[dict]) -> list[str]:
    settings = defaultdict(list)
    for r in records:
        if r["arm"] != "probe":
            settings[(r["task"], setting_of(r["sizes"]))].append(r)
    rows = []
    for (task, sizes), runs in sorted(settings.items()):
        n_train = runs[0]["n_train"]
        probes = [r for r in records if r["arm"] == "probe" and (r["task"], r["n_train"]) == (task, n_train)]
        if any(r.get("kept") == 0.5 for r in runs):
            rows.append(setting_row(task, sizes, by_arm(runs + probes)))
    if not rows:
        return ["No setting with kept-0.5 runs yet.", ""]
    times = [f"{task} ({runs[0]['n_train']} train): {len(runs)} runs, "
             f"{sum(r.get('train_seconds') or 0.0 for r in runs) / 60:.0f} min"
             for (task, _), runs in sorted(settings.items())]
    return [f"Learned = `{LEARNED}` (the default rule); cells: mean [95 % interval] (seeds): verdict. A flagged "
            "setting (dense − frozen baseline under 5 points) counts for no claim.", "",
            "| setting | dense − frozen (points) | learned − uniform ≥ +0.5 (kept 0.5) | learned − random ≥ +3 "
            "(kept 0.5) | learned − dense ≥ −0.5 (kept 0.5) | learned − dense includes 0 (kept 0.7) | "
            "largest eval kept − target gap ≤ 0.02 | ρ between seeds ≥ 0.6 (kept 0.5) |",
            "|---|---|---|---|---|---|---|---|", *rows, "",
            "Training time of each setting's recorded runs (sum of their train seconds, every arm and kept target; "
            "evaluation and model loading not included; the 2-core CPU machine of the records): "
            + "; ".join(times) + ".", ""]
