"""RESULTS.md section and plot: accuracy vs kept fraction of every τ-rule arm (results/controls.json).

One panel per (task, setting) with at least two kept targets: a line per ts arm (mean over seeds, bars = 95 %
t-interval), dense LoRA as a band (mean ± its 95 % interval). Called by make_tables.py.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tau_tables import calibration_of, interval, mean_and_half, setting_of  # noqa: E402

# quality.py --sweep methods as the arms of controls.json: `tspeft train`'s default rule is the learned allocation
# with the prior at κ = 1 (controls.py's learned-prior arm)
SWEEP_ARMS = {"lora": "dense", "ts-lora": "learned-prior", "ts-lora:uniform": "uniform", "ts-lora:random": "random"}
ARM_STYLE = {"learned": ("tab:blue", "o"), "learned-prior": ("tab:purple", "D"), "uniform": ("tab:green", "s"),
             "random": ("tab:red", "^"),
             # diagnostics (pinned_allocation.py): the learned allocation pinned, and its mirror image
             "fixed-prior": ("tab:olive", "v"), "inverted-prior": ("tab:brown", "x")}


def sweep_arm_records(sweep: list[dict], quality: list[dict]) -> list[dict]:
    """The `quality.py --sweep` runs of every setting swept with a control (ts-lora:random / :uniform), as
    controls.json records; the setting's strongest frozen baseline in `quality` (zero- or few-shot, same task, model
    and sizes) joins as its probe arm. τ of those runs is calibrated on unused train examples (`tspeft train`)."""
    swept = {(r["model"], r["task"], r["sizes"]) for r in sweep if ":" in r["method"]}
    records = []
    for model, task, sizes in sorted(swept):
        runs = [r for r in sweep if (r["model"], r["task"], r["sizes"]) == (model, task, sizes)
                and r["method"] in SWEEP_ARMS]
        n_train = max(r["n_train"] for r in runs)
        setting = f"n_train={n_train} n_eval={runs[0]['n_eval']} {model} {sizes}"
        for r in runs:
            arm = SWEEP_ARMS[r["method"]]
            records.append({"task": task, "arm": arm, "seed": r["seed"], "kept": r.get("target_kept"),
                            "sizes": setting, "accuracy": r["accuracy"], "kept_fraction": r.get("kept_fraction"),
                            "n_train": n_train, "n_eval": r["n_eval"], "machine": r.get("machine"),
                            "train_seconds": r.get("train_seconds"),
                            "calibration": "unused examples" if arm != "dense" else None,
                            # per-module eval kept fractions: the allocation after calibration
                            **({"allocation": r["per_module"]} if arm == "learned-prior" and r.get("per_module")
                               else {})})
        frozen: dict = defaultdict(list)
        for r in quality:
            if (r["model"], r["task"], r.get("sizes")) == (model, task, sizes) and r["method"].startswith("none"):
                frozen[r["method"]].append(r["accuracy"])
        if frozen:
            best = max(frozen.values(), key=lambda accuracies: sum(accuracies) / len(accuracies))
            records += [{"task": task, "arm": "probe", "seed": i, "kept": None, "sizes": setting, "accuracy": a,
                         "n_train": n_train} for i, a in enumerate(best)]
    return records


def sweep_settings(records: list[dict]) -> dict:
    """{(task, setting): {"dense": {seed: acc}, arm: {kept: {seed: acc}}}} for settings with ≥ 2 kept targets of an
    arm; ts arms only with τ calibrated on unused examples (the current way)."""
    settings: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in records:
        if r["arm"] == "probe":
            continue
        key = (r["task"], setting_of(r["sizes"]))
        if r["arm"] == "dense":
            settings[key]["dense"][None][r["seed"]] = r["accuracy"]
        elif calibration_of(r) == "unused" and r.get("kept") is not None:
            settings[key][r["arm"]][r["kept"]][r["seed"]] = r["accuracy"]
    return {key: arms for key, arms in settings.items()
            if any(len(kepts) >= 2 for arm, kepts in arms.items() if arm != "dense")}


def sweep_rows(arms: dict) -> list[str]:
    """Accuracy per arm and kept target, and each arm's paired difference to dense at that target."""
    dense = arms.get("dense", {}).get(None, {})
    rows = ["| arm | kept target | accuracy (mean [95 % interval]) | − dense, paired (points) |", "|---|---|---|---|"]
    for arm in [a for a in ARM_STYLE if a in arms]:
        for kept, seeds in sorted(arms[arm].items()):
            common = sorted(set(seeds) & set(dense))
            paired = interval([seeds[s] - dense[s] for s in common]) if common else "–"
            rows.append(f"| {arm} | {kept} | {mean_with_interval(list(seeds.values()))} | {paired} |")
    if dense:
        rows.append(f"| dense | 1 | {mean_with_interval(list(dense.values()))} | – |")
    return rows + [""]


def mean_with_interval(values: list[float]) -> str:
    mean, half = mean_and_half(values)
    if len(values) < 2:  # no interval from one seed
        return f"{mean:.3f} (1 seed)"
    return f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}] ({len(values)} seeds)"


def plot_sweeps(settings: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 3.8), squeeze=False)
    for ax, ((task, sizes), arms) in zip(axes[0], sorted(settings.items())):
        dense = list(arms.get("dense", {}).get(None, {}).values())
        if dense:
            mean, half = mean_and_half(dense)
            ax.axhspan(mean - half, mean + half, color="0.85", label=f"dense LoRA ({len(dense)} seeds)")
            ax.axhline(mean, color="0.5", lw=1)
        for arm, (color, marker) in ARM_STYLE.items():
            if arm not in arms:
                continue
            kepts = sorted(arms[arm])
            stats = [mean_and_half(list(arms[arm][k].values())) for k in kepts]
            ax.errorbar(kepts, [m for m, _ in stats], yerr=[h for _, h in stats], color=color, marker=marker,
                        capsize=3, label=arm)
        n_train = sizes.split()[0].replace("n_train=", "")
        ax.set_title(f"{task} ({n_train} train)", fontsize=10)
        ax.set_xlabel("target kept fraction")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_section(records: list[dict], root: Path) -> list[str]:
    settings = sweep_settings(records)
    if not settings:
        return ["No sweep yet: `python benchmarks/controls.py --task trec --kept 0.3 --arms learned,uniform,random "
                "--seeds 0,1,2` (and 0.7, 0.9).", ""]
    lines = ["MiniLM-L6 + LoRA r=8 through `benchmarks/controls.py`, and SmolLM2-135M + LoRA through `tspeft train` "
             "(`quality.py --sweep` with the controls; settings naming smollm2), sizes as in \"τ rule vs controls\"; "
             "τ calibrated on unused pool examples. Bars and intervals: 95 % t-intervals over seeds; paired "
             "differences use the same seed (examples, order, initialisation) of both arms.", ""]
    for (task, sizes), arms in sorted(settings.items()):
        lines += [f"### {task} (`{sizes}`)", "", *sweep_rows(arms)]
    plot_sweeps(settings, root / "controls_sweep.png")
    return lines + ["![accuracy vs kept per arm](controls_sweep.png)", ""]
