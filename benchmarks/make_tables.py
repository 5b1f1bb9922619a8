"""Generate benchmarks/RESULTS.md (and plots) from benchmarks/results/*.json. Never edit RESULTS.md by hand.

    python benchmarks/make_tables.py
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "results"
PAIRS = [("lora", "ts-lora"), ("dora", "ts-dora"), ("adapter", "ts-adapter")]


def load(name: str) -> list[dict]:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else []


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


FROZEN_NAMES = {"none": "none (zero-shot)", "none-3shot": "none (3-shot)"}  # nothing trained (quality.py FEW_SHOT)


def is_frozen(method: str) -> bool:
    """A baseline that trains nothing: zero-shot (`none`) or few-shot (`none-<k>shot`)."""
    return method == "none" or method.startswith("none-")


def grouped(records: list[dict]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    table: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        table[(record["model"], record["task"])][record["method"]].append(record)
    return table


def majority_of(methods: dict[str, list[dict]]) -> float | None:
    """The eval set's majority-class accuracy (the same for every run of a task; None if no record has it)."""
    values = {r["majority_accuracy"] for runs in methods.values() for r in runs
              if r.get("majority_accuracy") is not None}
    if len(values) > 1:
        raise SystemExit(f"runs of one task disagree on the eval set's majority class: {sorted(values)}")
    return values.pop() if values else None


def claim_rows(table: list) -> list[str]:
    """Per task and dense → ts pair: the paired difference over seeds with its 95 % interval; the claim holds when
    30–70 % is discarded and the interval includes 0 or lies above it, on a task in regime only."""
    from tau_tables import REGIME_MARGIN, paired_points

    rows = ["Per task and pair: Δ = accuracy of the token-selective run minus its dense twin of the same seed, mean "
            "[95 % interval] over seeds (points); the claim holds when the discarded share is within 30–70 % (to the "
            "±0.02 tolerance of the kept target: 0.28–0.72) and the interval includes 0 or lies above it, and counts "
            "only on a task in regime (dense LoRA ≥ 5 points over the stronger of the best frozen baseline recorded "
            "for it and the majority class; a task without a frozen baseline is not shown to be in regime).", "",
            "| model | task | pair | discarded share | Δ accuracy (points) | dense − frozen (points) | holds |",
            "|---|---|---|---|---|---|---|"]
    for (model, task), methods in table:
        frozen = [statistics.fmean(r["accuracy"] for r in runs) for m, runs in methods.items() if is_frozen(m)]
        majority = majority_of(methods)
        margin = (statistics.fmean(r["accuracy"] for r in methods["lora"]) - max(frozen + [majority or 0.0])
                  if frozen and "lora" in methods else None)
        for dense, gated in PAIRS:
            if dense not in methods or gated not in methods:
                continue
            difference = paired_points({r["seed"]: r["accuracy"] for r in methods[gated]},
                                       {r["seed"]: r["accuracy"] for r in methods[dense]})
            mean, half, seeds = difference or (float("nan"), float("nan"), 0)
            kept = [r["kept_fraction"] for r in methods[gated] if r.get("kept_fraction") is not None]
            discarded = 1 - statistics.fmean(kept) if kept else float("nan")
            delta = (f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}] ({seeds})" if seeds > 1
                     else f"{mean:+.1f} ({seeds})")
            holds = 0.28 <= discarded <= 0.72 and seeds > 1 and mean + half >= 0
            in_regime = margin is not None and margin >= REGIME_MARGIN
            verdict = ("yes" if holds else "no") if in_regime else "flagged: " + ("yes" if holds else "no")
            regime = "–" if margin is None else f"{100 * margin:+.1f}"
            rows.append(f"| {model} | {task} | {dense} → {gated} | {discarded:.3f} | {delta} | {regime} | {verdict} |")
    return rows


def quality_section(records: list[dict]) -> list[str]:
    if not records:
        return ["No quality results yet: run `python benchmarks/quality.py --suite encoder` (and `decoder`).", ""]
    table = sorted(grouped(records).items())
    majorities = {key: majority_of(methods) for key, methods in table}
    lines = ["| model | task | method | seeds | accuracy (mean ± std) | kept fraction | train s |",
             "|---|---|---|---|---|---|---|"]
    for (model, task), methods in table:
        for method, runs in sorted(methods.items()):
            kept = [r["kept_fraction"] for r in runs if r.get("kept_fraction") is not None]
            name = FROZEN_NAMES.get(method, method)
            lines.append(f"| {model} | {task} | {name} | {len(runs)} | {fmt([r['accuracy'] for r in runs])} | "
                         f"{fmt(kept, 2)} | {fmt([r['train_seconds'] for r in runs], 0)} |")
        majority = majorities[(model, task)]
        if majority is not None:
            lines.append(f"| {model} | {task} | majority class (always the most common answer) | – | {majority:.3f} "
                         "| – | – |")
    lines += ["", "### Does discarding 30–70 % of token updates keep accuracy?", "", *claim_rows(table)]
    lines.append("")
    for (model, task), methods in table:
        trained = [r["accuracy"] for method, runs in methods.items() if not is_frozen(method) for r in runs]
        if len(trained) > 1 and len(set(trained)) == 1:
            # Every run scoring exactly the same means the classifiers predict one class: no evidence either way.
            lines.append(f"- {model} / {task}: all {len(trained)} trained runs score exactly {trained[0]:.3f}, i.e. "
                         "they predict a single class; this task gives no evidence for or against the claim at "
                         "these sizes.")
        tuned_means = [statistics.fmean(r["accuracy"] for r in runs) for m, runs in methods.items()
                       if not is_frozen(m)]
        best = max(tuned_means) if tuned_means else None  # best fine-tuned method mean, for both flags below
        majority = majorities[(model, task)]
        n_eval = max(r.get("n_eval") or 0 for runs in methods.values() for r in runs)
        if majority is not None and n_eval and len(set(trained)) > 1:
            se = math.sqrt(majority * (1 - majority) / n_eval)
            if best < majority + se:
                lines.append(f"- {model} / {task}: the best fine-tuned mean ({best:.3f}) is within one standard error "
                             f"({se:.3f}) of always answering the most common class ({majority:.3f}) or below it: the "
                             "runs learned little beyond the class balance, so the comparison says little about the "
                             "claim.")
        frozen = {m: statistics.fmean(r["accuracy"] for r in runs) for m, runs in methods.items() if is_frozen(m)}
        if frozen and "lora" in methods:
            strongest = max(frozen, key=frozen.get)
            dense = statistics.fmean(r["accuracy"] for r in methods["lora"]) if "lora" in methods else None
            if dense is not None and dense < frozen[strongest] + 0.05:
                lines.append(f"- {model} / {task}: dense LoRA ({dense:.3f}) does not beat the strongest frozen "
                             f"baseline, {FROZEN_NAMES.get(strongest, strongest)} ({frozen[strongest]:.3f}), by 5 "
                             "points: flagged, the task does not count for a claim.")
        if "none" in methods and best is not None:
            zero_shot = statistics.fmean(r["accuracy"] for r in methods["none"])
            if best < zero_shot:
                lines.append(f"- {model} / {task}: every fine-tuned method scores below the zero-shot model "
                             f"({best:.3f} at best vs {zero_shot:.3f}): at these sizes fine-tuning hurts, so the "
                             "comparison says little about the claim.")
    return lines + [""]


def sweep_section(records: list[dict]) -> list[str]:
    if not records:
        return ["No sweep results yet: run `python benchmarks/quality.py --suite encoder --sweep`.", ""]
    # settings swept with the controls are in "τ rule vs controls: accuracy vs kept", a line per arm
    with_controls = {(r["model"], r["task"]) for r in records if ":" in r["method"]}
    records = [r for r in records if (r["model"], r["task"]) not in with_controls]
    lines = ["| model | task | target kept | measured kept | accuracy |", "|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for (model, task), methods in sorted(grouped(records).items()):
        points = defaultdict(list)
        for runs in methods.values():
            for r in runs:
                points[r.get("target_kept") or 1.0].append(r)
        xs, ys, es = [], [], []
        for target in sorted(points, reverse=True):
            runs = points[target]
            kept = [r["kept_fraction"] if r.get("kept_fraction") is not None else 1.0 for r in runs]
            acc = [r["accuracy"] for r in runs]
            label = "dense" if target == 1.0 and runs[0]["method"] in dict(PAIRS) else f"{target:g}"
            lines.append(f"| {model} | {task} | {label} | {fmt(kept, 2)} | {fmt(acc)} |")
            xs.append(statistics.fmean(kept)), ys.append(mean_std(acc)[0]), es.append(mean_std(acc)[1])
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{model} / {task}")
    ax.set_xlabel("kept fraction of token updates (measured on eval)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs kept fraction (TS-LoRA target sweep)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "sweep.png", dpi=110)
    plt.close(fig)
    return lines + ["", "![accuracy vs kept fraction](sweep.png)", ""]


def layer_spans(layers: list[str], most: int = 8) -> list[list[str]]:
    """Consecutive layers grouped so that a table has at most `most` layer columns (deep decoders)."""
    size = -(-len(layers) // most)
    return [layers[i:i + size] for i in range(0, len(layers), size)]


def span_name(span: list[str]) -> str:
    return f"layer {span[0]}" if len(span) == 1 else f"layers {span[0]}–{span[-1]}"


BYTE_BPE_MARKS = {"Ġ": "␣", "Ċ": "↵"}  # how GPT-2-style tokenizers spell a leading space and a newline


def readable(token: str) -> str:
    for mark, shown in BYTE_BPE_MARKS.items():
        token = token.replace(mark, shown)
    return token


def vocabulary_lines(stats: list[dict], shown: int = 8) -> list[str]:
    """Most and least kept vocabulary items, each token's kept fraction averaged over the seeds that list it."""
    lines = []
    for field, label in (("most_kept_tokens", "Most kept tokens"), ("least_kept_tokens", "Least kept tokens")):
        seen = defaultdict(list)
        for st in stats:
            for token, kept, _count in st.get(field) or []:
                seen[token].append(kept)
        if seen:
            ranked = sorted(seen, key=lambda t: statistics.fmean(seen[t]), reverse=field == "most_kept_tokens")
            lines.append(f"- {label}: " + ", ".join(f"`{readable(t)}` {statistics.fmean(seen[t]):.2f}"
                                                    for t in ranked[:shown]))
    if any(mark in line for line in lines for mark in BYTE_BPE_MARKS.values()):
        lines.append("- (byte-level BPE tokens: ␣ is a leading space, ↵ a newline)")
    return lines + [""] if lines else []



def token_section(records: list[dict]) -> list[str]:
    """Kept fraction by token kind and by position, per layer, averaged over the seeds of each gated method."""
    groups = defaultdict(list)
    for r in records:
        if r.get("token_stats") and r["token_stats"].get("by_kind"):
            groups[(r["model"], r["task"], r["method"])].append(r["token_stats"])
    if not groups:
        return ["No token statistics yet (written by quality.py for ts-* runs).", ""]
    lines = ["Share of each kind of token whose update a layer applied (mean over the layer's gated modules, then "
             "over seeds), measured on the first 256 eval examples of each run.", ""]
    columns = min(3, len(groups))
    rows = -(-len(groups) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, ((model, task, method), stats) in zip(axes.flat, sorted(groups.items())):
        for table_name in ("by_kind", "by_position"):
            layers = sorted(stats[0][table_name], key=int)
            kinds = sorted({kind for st in stats for layer in st[table_name].values() for kind in layer})
            spans = layer_spans(layers)
            lines += [f"**{model} / {task} / {method}, {table_name.replace('_', ' ')}** ({len(stats)} seeds)", "",
                      "| token " + table_name[3:] + " | " + " | ".join(span_name(span) for span in spans)
                      + " | all layers |", "|---" * (len(spans) + 2) + "|"]
            means = {}
            for kind in kinds:
                per_layer = [statistics.fmean(st[table_name][layer][kind]["kept_fraction"] for st in stats
                                              if kind in st[table_name].get(layer, {})) for layer in layers]
                means[kind] = statistics.fmean(per_layer)
                by_layer = dict(zip(layers, per_layer))
                per_span = [statistics.fmean(by_layer[layer] for layer in span) for span in spans]
                lines.append(f"| {kind} | " + " | ".join(f"{v:.2f}" for v in per_span) + f" | {means[kind]:.2f} |")
                if table_name == "by_kind":
                    ax.plot([int(layer) for layer in layers], per_layer, marker="o", markersize=3, label=kind)
            lines.append("")
            if table_name == "by_kind":
                most, least = max(means, key=means.get), min(means, key=means.get)
                lines += [f"Across layers, {most} tokens are kept most ({means[most]:.2f}) and {least} tokens least "
                          f"({means[least]:.2f}).", ""]
        vocabulary = vocabulary_lines(stats)
        if vocabulary:
            lines += [f"**{model} / {task} / {method}, vocabulary** (tokens seen at least 3 times per run)", "",
                      *vocabulary]
        ax.set_title(f"{model} / {task} / {method}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("kept fraction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "tokens.png", dpi=110)
    plt.close(fig)
    return lines + ["![kept fraction by token kind and layer](tokens.png)", ""]


def lr_tuning_lines(records: list[dict], suite_lrs: dict[str, float]) -> list[str]:
    """The one learning-rate tuning of the dense baseline per suite (quality.py --lr-tune).

    Decision rule (one-standard-error rule): every lr whose accuracy is within one binomial standard error
    sqrt(p(1-p)/n) of the best is indistinguishable from it on this eval set; the suite keeps its lr if that lr is
    among them, else the best lr should replace it (and the suite be rerun).
    """
    lines = []
    for suite in sorted({r["suite"] for r in records}):
        runs = sorted((r for r in records if r["suite"] == suite), key=lambda r: r["lr"])
        best = max(runs, key=lambda r: r["accuracy"])
        se = math.sqrt(best["accuracy"] * (1 - best["accuracy"]) / best["n_eval"])
        tied = [r["lr"] for r in runs if r["accuracy"] >= best["accuracy"] - se]
        used = suite_lrs.get(suite)
        verdict = (f"the suite's lr {used:g} is within one standard error ({se:.3f}) of the best, so it is kept"
                   if used in tied else f"the suite's lr {used:g} is more than one standard error ({se:.3f}) below "
                   f"the best: use {best['lr']:g} and rerun the suite")
        lines += [f"Learning-rate tuning, {suite} suite (dense {runs[0]['method']}, {runs[0]['task']}, seed "
                  f"{runs[0]['seed']}, {best['n_eval']} eval examples; `{runs[0]['sizes']}`): "
                  + ", ".join(f"{r['lr']:g} → {r['accuracy']:.3f}" for r in runs)
                  + f"; best {best['lr']:g}; {verdict}.", ""]
    return lines


def main() -> None:
    quality, sweep = load("quality.json"), load("sweep.json")
    sizes = defaultdict(set)  # (model, size flags) -> tasks run with them
    for r in quality + sweep:
        sizes[(r["model"], r.get("sizes", ""))].add(r["task"])
    out = ["# Benchmark results", "",
           "Generated by `python benchmarks/make_tables.py` from `benchmarks/results/*.json`; "
           "do not edit by hand.", ""]
    out += ["Sizes per run: " + "; ".join(f"{m} ({', '.join(sorted(tasks))}): `{s}`"
                                          for (m, s), tasks in sorted(sizes.items())) if sizes else "", ""]
    from quality import SUITES, suite_lr  # the planned grid, to say which rows are still missing

    out += ["Learning rates: " + "; ".join(f"{name} suite ({suite['model']}): {suite['lr_choice']}"
                                           for name, suite in sorted(SUITES.items())) + ".", ""]
    out += lr_tuning_lines(load("lr_tuning.json"), {name: suite_lr(suite) for name, suite in SUITES.items()})
    totals = defaultdict(lambda: [0, 0.0])
    for r in quality:
        totals[r["model"]][0] += 1
        totals[r["model"]][1] += r.get("train_seconds") or 0.0
    if totals:
        out += ["Training time of the recorded quality runs (sum of train seconds, evaluation not included): "
                + "; ".join(f"{m}: {n} runs, {sec / 60:.0f} min" for m, (n, sec) in sorted(totals.items())) + ".", ""]
    out += ["Train seconds are wall-clock (records written since the machine field was added name their machine; "
            "earlier ones ran on the 2-core CPU development machine); runs that overlapped other work "
            "are slower, so compare speed with SPEED.md (same-process ratios), not with this column.", ""]

    have = {(r["task"], r["method"]) for r in quality}
    missing = [f"{task}/{method}" for suite in SUITES.values() for task in suite["tasks"]
               for method in suite.get("task_methods", {}).get(task, suite["methods"]) if (task, method) not in have]
    if missing:
        out += [f"Not run yet ({len(missing)} task/method cells of the planned suites): " + ", ".join(missing), ""]
    out += ["## Quality (dense vs token-selective)", ""] + quality_section(quality)
    out += ["## Accuracy vs kept fraction", ""] + sweep_section(sweep)
    out += ["## Which tokens are kept", ""] + token_section(quality)
    from importance_tables import importance_section, regime_margins

    controls_runs = load("controls.json")
    margins = regime_margins(controls_runs, quality)
    out += ["## Module importance: budgeted module selection", ""] + importance_section(load("importance.json"),
                                                                                      margins, ROOT)
    from controls_sweep import sweep_arm_records
    from controls_sweep import sweep_section as controls_sweep_section
    from tau_tables import calibration_section, controls_section, diagnosis_section, lambda_section, same_seed_lines

    controls = controls_runs + sweep_arm_records(sweep, quality)
    out += ["## τ rule vs controls", ""] + controls_section(controls)
    out += ["## τ rule vs controls: accuracy vs kept", ""] + controls_sweep_section(controls, ROOT)
    from target_tables import targets_section

    out += ["## τ rule: the targets", ""] + targets_section(controls)
    from tau_tables import prior_section

    out += ["## τ rule: choosing the prior κ (development split)", ""] + prior_section(load("prior_dev.json"))
    out += ["## τ rule diagnosis", ""] + diagnosis_section(sorted(RESULTS.glob("tau_trace_*.json")))
    out += ["## τ rule with curve shrinkage (β 0.97), calibrated on unused examples", ""] + \
        controls_section(load("tau_rule_v2.json")) + \
        same_seed_lines(load("tau_rule_v2.json"), load("controls.json"), "the default rule (controls.json)")
    from tau_tables import calibration_cost_lines

    out += ["## Hitting the target: τ calibration", ""] + calibration_section(sorted(RESULTS.glob("tau_calib*.json")))
    out += calibration_cost_lines(load("calibration_cap.json"), quality)
    out += ["## Loss-driven rule: λ", ""] + lambda_section(load("lambda_sweep.json"), controls)
    from vision_tables import vision_section

    out += ["## Vision (image positions as tokens)", ""] + vision_section(load("vision.json"))
    speed = RESULTS / "speed.json"
    out += ["## Speed and memory", "",
            "See [SPEED.md](SPEED.md) (generated by `python benchmarks/speed_table.py` from `results/speed.json`)."
            if speed.exists() else "No speed results yet: run `python benchmarks/speed.py`.", ""]
    (ROOT / "RESULTS.md").write_text("\n".join(out))
    print(f"wrote {ROOT / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
