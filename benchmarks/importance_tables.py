"""RESULTS.md section "Module importance" (results/importance.json), called by make_tables.py.

Each budgeted-selection run retrains plain LoRA on the top-k modules of one ranking; runs of the same seed share
examples, order and initialisation, so criteria are compared by paired differences over seeds with a 95 % t-interval
(as the τ-rule controls), and a verdict is given only for a task shown to be in regime (dense LoRA ≥ 5 points over
its frozen baseline at the same training size).
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tau_tables import REGIME_MARGIN, mean_and_half, paired_points  # noqa: E402

WEIGHT_CRITERIA = ("delta_weight_norm", "factor_norm")


def regime_margins(controls: list[dict], quality: list[dict]) -> dict[tuple[str, int], float]:
    """{(task, n_train): mean dense LoRA − mean frozen baseline}: the controls' probe, else the quality suite's
    strongest zero-/few-shot baseline."""
    runs: dict = defaultdict(lambda: defaultdict(list))
    for r in controls:
        if r["arm"] in ("dense", "probe"):
            runs[(r["task"], r["n_train"])][r["arm"]].append(r["accuracy"])
    for r in quality:
        arm = "dense" if r["method"] == "lora" else "probe:" + r["method"] if r["method"].startswith("none") else None
        if arm:
            runs[(r["task"], r.get("n_train") or _n_train(r.get("sizes", "")))][arm].append(r["accuracy"])
    margins = {}
    for key, arms in runs.items():
        frozen = [statistics.fmean(v) for arm, v in arms.items() if arm.startswith("probe")]
        if arms.get("dense") and frozen:
            margins[key] = statistics.fmean(arms["dense"]) - max(frozen)
    return margins


def _n_train(sizes: str) -> int | None:
    """The last --n-train of a size string (task flags follow the suite's)."""
    found = re.findall(r"--n-train (\d+)", sizes)
    return int(found[-1]) if found else None


def budget_line(model: str, task: str, k: int, n: int, by_seed: dict[str, dict[int, float]],
                margin: float | None) -> str:
    """The verdict for one budget: learned kept fraction vs the best weight criterion and vs random, paired."""
    means = {c: statistics.fmean(seeds.values()) for c, seeds in by_seed.items()}
    best = max((c for c in WEIGHT_CRITERIA if c in means), key=means.get)
    vs_weight = paired_points(by_seed["kept_fraction"], by_seed[best])
    vs_random = paired_points(by_seed["kept_fraction"], by_seed["random"])
    text = (f"- {model} / {task}, top {k} of {n} modules: learned kept fraction {means['kept_fraction']:.3f}; − best "
            f"weight criterion ({best}, {means[best]:.3f}) {_points(vs_weight)}; − random ({means['random']:.3f}) "
            f"{_points(vs_random)}")
    if "relative_magnitude" in by_seed:  # the gate's other learned statistic
        vs_weight_r = paired_points(by_seed["relative_magnitude"], by_seed[best])
        text += f"; mean r {means['relative_magnitude']:.3f}, − {best} {_points(vs_weight_r)}"
    if margin is None or margin < REGIME_MARGIN:
        why = "no frozen baseline at this size" if margin is None else f"dense − frozen {100 * margin:+.1f} points"
        return text + f". Not in regime ({why}): flagged, no verdict."
    if vs_weight is None or vs_random is None:
        return text + ". No seed in common: no verdict."
    low_weight, low_random = vs_weight[0] - vs_weight[1], vs_random[0] - vs_random[1]
    verdict = ("holds (both intervals above 0)" if low_weight > 0 and low_random > 0 else
               "does not hold (the learned ranking is below the weight criterion)" if vs_weight[0] + vs_weight[1] < 0
               else "is not supported (an interval includes 0)")
    return text + f". In regime (dense − frozen {100 * margin:+.1f} points): the claim {verdict}."


def _points(difference: tuple[float, float, int] | None) -> str:
    if difference is None:
        return "– (no seed in common)"
    mean, half, seeds = difference
    return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}] points ({seeds} seeds)"


def importance_section(records: list[dict], margins: dict[tuple[str, int], float], root: Path) -> list[str]:
    if not records:
        return ["No module-selection results yet: run "
                "`python benchmarks/importance_selection.py --suite encoder`.", ""]
    lines = ["LoRA retrained on the top-k modules of each ranking (same rank, steps, lr; the ranking from one "
             "ts-lora run); accuracy mean ± std over seeds. The claim holds if `kept_fraction` (learned token "
             "sparsity) beats the weight criteria (`delta_weight_norm` ‖sBA‖, `factor_norm` ‖A‖‖B‖) and `random`: "
             "paired differences over seeds (same seed = same examples, order and initialisation), 95 % intervals.",
             "", "| model | task | k / modules | criterion | seeds | accuracy |", "|---|---|---|---|---|---|"]
    table: dict = defaultdict(lambda: defaultdict(dict))  # (model, task, k, n, n_train) -> criterion -> seed -> acc
    for r in records:
        table[(r["model"], r["task"], r["k"], r["n_modules"], _n_train(r["sizes"]))][r["criterion"]][r["seed"]] = \
            r["accuracy"]
    for (model, task, k, n, _), criteria in sorted(table.items()):
        for criterion, seeds in sorted(criteria.items()):
            values = list(seeds.values())
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            lines.append(f"| {model} | {task} | {k} / {n} | {criterion} | {len(values)} | "
                         f"{statistics.fmean(values):.3f}{spread} |")
    lines.append("")
    for (model, task, k, n, n_train), criteria in sorted(table.items()):
        if {"kept_fraction", "random"} <= set(criteria) and set(WEIGHT_CRITERIA) & set(criteria):
            lines.append(budget_line(model, task, k, n, criteria, margins.get((task, n_train))))
    plot_budgets(table, root / "importance.png")
    return lines + ["", "![accuracy per selection criterion](importance.png)", ""]


def plot_budgets(table: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, len(table), figsize=(4.2 * len(table), 3.4), squeeze=False)
    for ax, ((model, task, k, n, _), criteria) in zip(axes[0], sorted(table.items())):
        scores = {c: mean_and_half(list(seeds.values())) for c, seeds in criteria.items()}
        names = sorted(scores, key=lambda c: -scores[c][0])
        ax.bar(range(len(names)), [scores[c][0] for c in names], yerr=[scores[c][1] for c in names], capsize=3,
               color=["tab:orange" if c == "kept_fraction" else "tab:blue" for c in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(max(0.0, min(scores[c][0] - scores[c][1] for c in names) - 0.03), None)
        ax.set_title(f"{model} / {task}: top {k} of {n} modules", fontsize=9)
        ax.set_ylabel("accuracy (bars: 95 % interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
