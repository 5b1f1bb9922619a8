"""RESULTS.md sections for the τ rule: its controls (results/controls.json) and its diagnosis (results/tau_trace_*.json).

Called by make_tables.py; paired differences use the same seed (same examples, same order) of both arms, with a
95 % Student-t interval over seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
PAIRS = [("learned", "dense"), ("uniform", "dense"), ("random", "dense"), ("learned", "uniform"), ("learned", "random")]
REGIME_MARGIN = 0.05


def interval(differences: list[float]) -> str:
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return f"{100 * mean:+.1f} (1 seed)"
    half = T975.get(len(differences) - 1, 1.96) * statistics.stdev(differences) / math.sqrt(len(differences))
    return f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}] ({len(differences)} seeds)"


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        for rank, index in enumerate(order):
            result[index] = float(rank)
        return result

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    norm = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / norm if norm else float("nan")


def controls_section(records: list[dict]) -> list[str]:
    if not records:
        return ["No runs yet: `python benchmarks/controls.py --task sst5 --kept 0.5 --seeds 0,1,2`.", ""]
    lines = ["MiniLM-L6 + LoRA r=8 (plain AdamW loop, `benchmarks/controls.py`); ts arms at the same kept target, "
             "τ calibrated in eval mode after training. probe: logistic regression on the frozen mean-pooled "
             "embeddings (L-BFGS to convergence, L2 chosen on a held-out fifth). Differences in accuracy points, "
             "paired by seed, 95 % t-interval.", ""]
    by_setting = defaultdict(list)
    for r in records:
        by_setting[(r["task"], r["sizes"].replace(" uncalibrated", ""))].append(r)
    for (task, sizes), runs in sorted(by_setting.items()):
        probes = [r["accuracy"] for r in records if r["task"] == task and r["arm"] == "probe"]
        arms = defaultdict(dict)
        for r in runs:
            arms[(r["arm"], r.get("kept"), "uncalibrated" in r["sizes"])][r["seed"]] = r
        lines += [f"### {task} (`{sizes}`)", "", "| arm | kept target | accuracy | eval kept | seeds |", "|---|---|---|---|---|"]
        if probes:
            lines.append(f"| probe | – | {statistics.fmean(probes):.3f} | – | {len(probes)} |")
        for (arm, kept, raw), seeds in sorted(arms.items(), key=lambda item: (str(item[0][1]), item[0][0], item[0][2])):
            accuracy = [r["accuracy"] for r in seeds.values()]
            kept_eval = [r["kept_fraction"] for r in seeds.values() if r.get("kept_fraction") is not None]
            spread = f"{statistics.stdev(accuracy):.3f}" if len(accuracy) > 1 else "–"
            lines.append(f"| {arm}{' (uncalibrated)' if raw else ''} | {kept if kept is not None else '–'} | "
                         f"{statistics.fmean(accuracy):.3f} ± {spread} | "
                         f"{statistics.fmean(kept_eval):.3f} | {len(seeds)} |" if kept_eval else
                         f"| {arm} | – | {statistics.fmean(accuracy):.3f} ± {spread} | 1 | {len(seeds)} |")
        lines.append("")
        dense = arms.get(("dense", None, False), {})
        if probes and dense:
            margin = statistics.fmean(r["accuracy"] for r in dense.values()) - statistics.fmean(probes)
            verdict = "in regime" if margin >= REGIME_MARGIN else "NOT in regime (flagged: excluded from claims)"
            lines += [f"Dense LoRA − probe: {100 * margin:+.1f} points: {verdict}.", ""]
        for kept in sorted({k for (_, k, _) in arms if k is not None}):
            table = {arm: arms.get((arm, kept if arm != "dense" else None, False), {}) for arm in ("dense", "learned", "uniform", "random")}
            rows = []
            for a, b in PAIRS:
                common = sorted(set(table[a]) & set(table[b]))
                if common:
                    rows.append(f"| {a} − {b} | {interval([table[a][s]['accuracy'] - table[b][s]['accuracy'] for s in common])} |")
            if rows:
                lines += [f"Paired differences at kept {kept}:", "", "| pair | points, mean [95 % interval] |", "|---|---|"] + rows + [""]
            learned = table["learned"]
            seeds = sorted(s for s in learned if learned[s].get("allocation"))
            if len(seeds) > 1:
                names = sorted(learned[seeds[0]]["allocation"])
                rhos = [spearman([learned[a]["allocation"][n] for n in names], [learned[b]["allocation"][n] for n in names])
                        for i, a in enumerate(seeds) for b in seeds[i + 1:]]
                lines += [f"Learned allocation reproducibility at kept {kept}: Spearman ρ of the per-module u between "
                          f"seeds, mean {statistics.fmean(rhos):.2f} over {len(rhos)} pairs (target ≥ 0.6).", ""]
            spreads = [statistics.pstdev(r["allocation"].values()) for r in learned.values() if r.get("allocation")]
            if spreads:
                lines += [f"Spread of the learned per-module u at kept {kept}: std {statistics.fmean(spreads):.3f}, range "
                          + "; ".join(f"{min(r['allocation'].values()):.2f}–{max(r['allocation'].values()):.2f}"
                                      for r in learned.values() if r.get("allocation")) + ".", ""]
    return lines


def trace_summary(record: dict) -> dict:
    warmup = record["rule"]["warmup_steps"]
    steps = [s for s in record["trace"] if s["step"] > warmup]
    modules = list(steps[-1]["u"])
    final_u = [steps[-1]["u"][m] for m in modules]
    slopes = {m: [s["slope"][m] for s in steps] for m in modules}
    means = [statistics.fmean(v) for v in slopes.values()]
    effective = max(1.0, len(steps) * (1 - record["rule"]["slope_momentum"]))  # ĝ is autocorrelated over 1/(1-β) steps
    errors = [statistics.pstdev(v) / math.sqrt(effective) for v in slopes.values()]
    moves = [abs(b["u"][m] - a["u"][m]) for a, b in zip(steps, steps[1:]) for m in modules]
    return {"u_range": (min(final_u), max(final_u)), "u_std": statistics.pstdev(final_u),
            "slope_mean": statistics.fmean(means), "slope_spread": statistics.pstdev(means),
            "slope_error": statistics.median(errors), "median_step": statistics.median(moves),
            "step_size": record["rule"]["step_size"]}


def diagnosis_section(paths: list[Path]) -> list[str]:
    if not paths:
        return ["No traces yet: `python benchmarks/tau_trace.py --out benchmarks/results/tau_trace_<name>.json`.", ""]
    lines = ["Per module and step, the rule's u and its slope estimate ∂L/∂u (`benchmarks/tau_trace.py`; MiniLM-L6 + "
             "LoRA, plain AdamW loop). Slope figures: mean over the steps after the warm-up per module, then across "
             "modules (spread = std of the per-module means; error = median standard error of a module's mean, "
             "counting 1/(1−β) steps as one sample). Step = median |Δu| of a module per step.", "",
             "| trace | task, sizes | accuracy | eval kept | final u range (std) | slope mean | slope spread | "
             "slope error | median step |", "|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        record = json.loads(path.read_text())
        s = trace_summary(record)
        lines.append(f"| {path.stem.replace('tau_trace_', '')} (commit {str(record.get('commit'))[:7]}) | {record['task']}, "
                     f"{record['n_train']} × {record['epochs']} ep, lr {record['lr']:g}, kept {record['target_kept']} | "
                     f"{record['accuracy']:.3f} | {record['eval_kept']:.3f} | {s['u_range'][0]:.2f}–{s['u_range'][1]:.2f} "
                     f"({s['u_std']:.3f}) | {s['slope_mean']:.2e} | {s['slope_spread']:.2e} | {s['slope_error']:.2e} | "
                     f"{s['median_step']:.1e} |")
    return lines + [""]
