"""RESULTS.md sections for the τ rule: its controls (results/controls.json), its diagnosis (results/tau_trace_*.json).

Called by make_tables.py. Paired differences use the same seed (same examples, same order) of both arms, with a
95 % Student-t interval over seeds.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
PAIRS = [("learned", "dense"), ("uniform", "dense"), ("random", "dense"), ("learned", "uniform"),
         ("learned", "random"), ("learned-prior", "dense"), ("learned-prior", "uniform"), ("learned-prior", "random"),
         ("learned-prior", "learned"), ("fixed-prior", "uniform"), ("inverted-prior", "uniform"),
         ("inverted-prior", "fixed-prior")]
TS_ARMS = ("learned", "learned-prior", "uniform", "random", "fixed-prior", "inverted-prior")
REGIME_MARGIN = 0.05
# How a ts arm's τ was calibrated, from the suffix controls.py adds to its sizes ("": training examples, one pass).
CALIBRATIONS = {"uncalibrated": " uncalibrated", "unused": " calibrated-on-unused"}
CALIBRATION_LABELS = {"": "", "uncalibrated": " (uncalibrated τ)", "unused": " (τ calibrated on unused examples)"}


def calibration_of(record: dict) -> str:
    """"", "uncalibrated" or "unused": from the sizes suffix, or the record's "calibration" field (written by
    controls.py since --calibrate-on; the first such records' sizes have no suffix)."""
    how = next((name for name, suffix in CALIBRATIONS.items() if record["sizes"].endswith(suffix)), "")
    return how or ("unused" if str(record.get("calibration", "")).startswith("unused") else "")


def setting_of(sizes: str) -> str:
    """The sizes of a run without its calibration suffix: the setting its dense reference shares."""
    how = next((name for name, suffix in CALIBRATIONS.items() if sizes.endswith(suffix)), "")
    return sizes[:-len(CALIBRATIONS[how])] if how else sizes


def mean_and_half(values: list[float]) -> tuple[float, float]:
    """Mean over seeds and the half-width of its 95 % Student-t interval (0 for one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def paired_points(a: dict, b: dict) -> tuple[float, float, int] | None:
    """a − b over the seeds both have ({seed: accuracy}), in accuracy points: mean, 95 % half-width and how many
    seeds; None when no seed is common."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    mean, half = mean_and_half([100 * (a[s] - b[s]) for s in common])
    return mean, half, len(common)


def interval(differences: list[float]) -> str:
    """Mean difference in points with its 95 % t-interval over seeds."""
    mean, half = mean_and_half(differences)
    if len(differences) < 2:
        return f"{100 * mean:+.1f} (1 seed)"
    return f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}] ({len(differences)} seeds)"


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values):
        result = [0.0] * len(values)
        for rank, index in enumerate(sorted(range(len(values)), key=values.__getitem__)):
            result[index] = float(rank)
        return result

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    norm = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / norm if norm else float("nan")


def arm_rows(arms: dict) -> list[str]:
    rows = ["| arm | kept target | accuracy (mean ± std over seeds) | eval kept | seeds |", "|---|---|---|---|---|"]
    for (arm, kept, how), seeds in sorted(arms.items(), key=lambda item: (str(item[0][1]), item[0][0], item[0][2])):
        accuracy = [r["accuracy"] for r in seeds.values()]
        kept_eval = [r["kept_fraction"] for r in seeds.values() if r.get("kept_fraction") is not None]
        spread = f" ± {statistics.stdev(accuracy):.3f}" if len(accuracy) > 1 else ""
        kept_text = f"{statistics.fmean(kept_eval):.3f}" if kept_eval else "–"
        rows.append(f"| {arm}{CALIBRATION_LABELS[how]} | {kept if kept is not None else '–'} | "
                    f"{statistics.fmean(accuracy):.3f}{spread} | {kept_text} | {len(seeds)} |")
    return rows + [""]


def allocation_lines(learned: dict, kept: float, arm: str = "learned") -> list[str]:
    """Spread of the learned per-module u, and its reproducibility across seeds (Spearman ρ)."""
    runs = {s: r for s, r in learned.items() if r.get("allocation")}
    lines = []
    if len(runs) > 1:
        pairs = len(runs) * (len(runs) - 1) // 2
        lines += [f"Allocation of {arm} at kept {kept}: Spearman ρ of the per-module u between seeds, mean "
                  f"{mean_rho({s: r['allocation'] for s, r in runs.items()}):.2f} over {pairs} pairs "
                  "(target ≥ 0.6).", ""]
    if runs:
        ranges = "; ".join(f"seed {s} {min(r['allocation'].values()):.2f}–{max(r['allocation'].values()):.2f}"
                           for s, r in runs.items())
        spread = statistics.fmean(statistics.pstdev(r["allocation"].values()) for r in runs.values())
        lines += [f"Per-module u of {arm} at kept {kept}: std {spread:.3f} across modules (mean over seeds), "
                  f"range {ranges}.", ""]
        by_layer = layer_means(list(runs.values()))
        if by_layer:
            lines += [f"Mean u of {arm} at kept {kept} by layer (over modules and seeds): "
                      + ", ".join(f"{layer}: {u:.2f}" for layer, u in by_layer.items()) + ".", ""]
    return lines


def layer_means(runs: list[dict]) -> dict[int, float]:
    """{layer: mean u} over the runs' modules whose names hold a layer index (`layer.3.`, `layers.3.`)."""
    values = defaultdict(list)
    for run in runs:
        for name, u in run["allocation"].items():
            found = re.search(r"\blayers?\.(\d+)\.", name)
            if found:
                values[int(found.group(1))].append(u)
    return {layer: statistics.fmean(us) for layer, us in sorted(values.items())}


def setting_lines(task: str, sizes: str, runs: list[dict], probes: list[float]) -> list[str]:
    arms: dict = defaultdict(dict)
    for r in runs:
        arms[(r["arm"], r.get("kept"), calibration_of(r))][r["seed"]] = r
    lines = [f"### {task} (`{sizes}`)", ""]
    if probes:
        arms[("probe", None, "")] = {i: {"accuracy": a} for i, a in enumerate(probes)}
    lines += arm_rows(arms)
    dense = arms.get(("dense", None, ""), {})
    stuck = sorted(f"{r['arm']} seed {r['seed']}" + (f" (kept {r['kept']})" if r.get("kept") else "")
                   for r in runs if r.get("num_labels") and r["accuracy"] <= 1 / r["num_labels"] + 0.01)
    if stuck:
        lines += [f"Runs that did not learn (accuracy within 1 point of chance, 1/{runs[0]['num_labels']}): "
                  f"{', '.join(stuck)}. They stay in every mean and paired difference.", ""]
    if probes and dense:
        margin = statistics.fmean(r["accuracy"] for r in dense.values()) - statistics.fmean(probes)
        verdict = "in regime" if margin >= REGIME_MARGIN else "NOT in regime (flagged: excluded from claims)"
        lines += [f"Dense LoRA − probe: {100 * margin:+.1f} points: {verdict}.", ""]
    for kept in sorted({k for (_, k, _) in arms if k is not None}):
        # pairs from the newest calibration an arm has (unused examples), else the first records' way
        table = {"dense": dense, **{arm: arms.get((arm, kept, "unused")) or arms.get((arm, kept, ""), {})
                                    for arm in TS_ARMS}}
        rows = []
        for a, b in PAIRS:
            common = sorted(set(table[a]) & set(table[b]))
            if common:
                differences = [table[a][s]["accuracy"] - table[b][s]["accuracy"] for s in common]
                rows.append(f"| {a} − {b} | {interval(differences)} |")
        if rows:
            lines += [f"Paired differences at kept {kept} (accuracy points, mean [95 % interval]):", "",
                      "| pair | difference |", "|---|---|", *rows, ""]
        lines += allocation_lines(table["learned"], kept, "learned")
        lines += allocation_lines(table["learned-prior"], kept, "learned-prior")
    return lines


def target_lines(records: list[dict], tolerance: float = 0.02) -> list[str]:
    """How many ts runs measured an eval kept fraction within ±tolerance of their target, and which did not."""
    runs = [r for r in records if r.get("kept") is not None and r.get("kept_fraction") is not None]
    missed = [r for r in runs if abs(r["kept_fraction"] - r["kept"]) > tolerance]
    if not runs:
        return []
    how = {"": "τ calibrated on its training examples", "unused": "τ calibrated on unused examples",
           "uncalibrated": "τ uncalibrated"}
    named = "; ".join(f"{r['task']} {r['arm']} seed {r['seed']} at {r['kept']}: {r['kept_fraction']:.3f} "
                      f"({how[calibration_of(r)]})" for r in missed)
    return [f"Eval kept fraction within ±{tolerance} of the target: {len(runs) - len(missed)} of {len(runs)} ts runs"
            + (f"; outside: {named}." if missed else "."), ""]


def controls_section(records: list[dict]) -> list[str]:
    if not records:
        return ["No runs yet: `python benchmarks/controls.py --task sst5 --kept 0.5 --seeds 0,1,2`.", ""]
    lines = ["MiniLM-L6 + LoRA r=8 (plain AdamW loop, `benchmarks/controls.py`); the ts arms at the same kept target, "
             "τ calibrated in eval mode after training. probe: logistic regression on the frozen mean-pooled "
             "embeddings (L-BFGS to convergence, L2 chosen on a held-out fifth of the training examples). "
             f"Machine (from the records): {'; '.join(sorted({str(r.get('machine')) for r in records}))}; times "
             "are not comparable across runs.", ""]
    if any(" smollm2 " in r["sizes"] for r in records):
        lines += ["Settings naming smollm2: SmolLM2-135M + LoRA through `tspeft train` (`quality.py --sweep` with "
                  "ts-lora, ts-lora:uniform and ts-lora:random; learned-prior is plain ts-lora, the default rule); "
                  "their probe is the strongest frozen prompt baseline (zero- or 3-shot) of the quality suite.", ""]
    lines += target_lines(records)
    by_setting = defaultdict(list)
    for r in records:
        if r["arm"] != "probe":
            by_setting[(r["task"], setting_of(r["sizes"]))].append(r)
    for (task, sizes), runs in sorted(by_setting.items()):
        n_train = runs[0]["n_train"]
        probes = [r["accuracy"] for r in records if r["arm"] == "probe" and r["task"] == task
                  and r["n_train"] == n_train]
        lines += setting_lines(task, sizes, runs, probes)
    covered = {(r["task"], r["n_train"]) for runs in by_setting.values() for r in runs}
    for r in records:
        if r["arm"] == "probe" and (r["task"], r["n_train"]) not in covered:
            lines += [f"{r['task']} (`{r['sizes']}`), probe only so far: accuracy {r['accuracy']:.3f} "
                      f"(seed {r['seed']}); no fine-tuned arm has finished.", ""]
    return lines


def trace_summary(record: dict) -> dict:
    warmup = record["rule"]["warmup_steps"]
    steps = [s for s in record["trace"] if s["step"] > warmup]
    modules = list(steps[-1]["u"])
    final_u = [steps[-1]["u"][m] for m in modules]
    slopes = {m: [s["slope"][m] for s in steps] for m in modules}
    means = [statistics.fmean(v) for v in slopes.values()]
    # the running estimate is autocorrelated over ~1/(1-β) steps: count that many steps as one sample
    effective = max(1.0, len(steps) * (1 - record["rule"]["slope_momentum"]))
    errors = [statistics.pstdev(v) / math.sqrt(effective) for v in slopes.values()]
    moves = [abs(b["u"][m] - a["u"][m]) for a, b in zip(steps, steps[1:]) for m in modules]
    return {"u_range": (min(final_u), max(final_u)), "u_std": statistics.pstdev(final_u),
            "slope_mean": statistics.fmean(means), "slope_spread": statistics.pstdev(means),
            "slope_error": statistics.median(errors), "median_step": statistics.median(moves)}


def rule_name(rule: dict) -> str:
    return "slope step (band estimate; rule of ec291ae)" if "band" in rule else "Frank–Wolfe on loss curves"


def diagnosis_section(paths: list[Path]) -> list[str]:
    if not paths:
        return ["No traces yet: `python benchmarks/tau_trace.py --out benchmarks/results/tau_trace_<name>.json`.", ""]
    lines = ["Per module and step, the rule's u and its slope estimate ∂L/∂u (`benchmarks/tau_trace.py`; MiniLM-L6 "
             "+ LoRA, plain AdamW loop). Slope: mean over the steps after the warm-up per module, then across "
             "modules (spread = std of the per-module means; error = median standard error of a module's mean, "
             "counting 1/(1−β) steps as one sample). Step = median |Δu| of a module per step.", "",
             "| trace | rule | task, sizes | accuracy | eval kept | final u range (std) | slope mean | slope spread "
             "| slope error | median step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        record = json.loads(path.read_text())
        s = trace_summary(record)
        sizes = (f"{record['task']}, {record['n_train']} × {record['epochs']} ep, lr {record['lr']:g}, "
                 f"kept {record['target_kept']}")
        u_text = f"{s['u_range'][0]:.2f}–{s['u_range'][1]:.2f} ({s['u_std']:.3f})"
        lines.append(f"| {path.stem.replace('tau_trace_', '')} | {rule_name(record['rule'])} | {sizes} | "
                     f"{record['accuracy']:.3f} | {record['eval_kept']:.3f} | {u_text} | {s['slope_mean']:.2e} | "
                     f"{s['slope_spread']:.2e} | {s['slope_error']:.2e} | {s['median_step']:.1e} |")
    return lines + [""]


def calibration_section(paths: list[Path]) -> list[str]:
    """Eval kept fraction per calibration variant (results/tau_calibration*.json, `benchmarks/tau_calibration.py`)."""
    if not paths:
        return ["No runs yet: `python benchmarks/tau_calibration.py --out benchmarks/results/tau_calibration.json`.",
                ""]
    lines = ["One run per arm, then from the same trained state each way of calibrating τ "
             "(`benchmarks/tau_calibration.py`): on the training examples or on examples of the train pool the run "
             "did not train on ('held-out'), one pass or fixed-point rounds (`TSPeftModel.calibrate`). Kept "
             "fraction measured in eval mode on the eval set, on the training examples and on the held-out ones.",
             "", "| run | arm | calibration | rounds | eval kept | on train | on held-out | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        record = json.loads(path.read_text())
        run = (f"{record['task']}, {record['n_train']} × {record['epochs']} ep, lr {record['lr']:g}, "
               f"target {record['target_kept']}, seed {record['seed']}, commit {record['commit']}")
        for r in record["records"]:
            lines.append(f"| {run} | {r['arm']} | {r['variant']} | {r['rounds_run']} | {r['eval_kept']:.4f} | "
                         f"{r['kept_on_train']:.4f} | {r['kept_on_held_out']:.4f} | {r['accuracy']:.3f} |")
    return lines + [""]


def lambda_section(records: list[dict], target_runs: list[dict] = ()) -> list[str]:
    """The loss-driven rule's λ → eval kept fraction and accuracy (results/lambda_sweep.json, controls.py with
    `--kept none --rule '{"sparsity_weight": λ}'`)."""
    rows = [r for r in records if r.get("kept") is None and r.get("rule", {}).get("target_kept") is None
            and r["arm"] != "dense"]
    if not rows:
        return ["No runs yet: `python benchmarks/controls.py --kept none --arms learned --rule "
                "'{\"sparsity_weight\": 1}' --results benchmarks/results/lambda_sweep.json`.", ""]
    lines = ["Loss-driven mode (`target_kept=None`): a slice of a module's tokens is kept when its first-order "
             "benefit per token is at least λ times the mean benefit per token of keeping every token "
             "(docs/method.md). `benchmarks/controls.py --kept none`, learned allocation, τ calibrated after "
             "training.", "",
             "| task, sizes | λ | curve shrinkage, β | seed | eval kept | discarded | accuracy | commit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["rule"]["sparsity_weight"], r["seed"])):
        sizes = r["sizes"].split(" rule=")[0]
        kept = r["kept_fraction"]
        shrink = f"{'on' if r['rule'].get('shrink_curves') else 'off'}, {r['rule']['slope_momentum']:g}"
        lines.append(f"| {r['task']} `{sizes}` | {r['rule']['sparsity_weight']:g} | {shrink} | {r['seed']} | "
                     f"{kept:.3f} | {1 - kept:.3f} | {r['accuracy']:.3f} | {r['commit']} |")
    return lines + [""] + target_mode_lines(rows, target_runs)


def target_mode_lines(loss_driven: list[dict], target_runs: list[dict]) -> list[str]:
    """The loss-driven points beside target mode's (learned-prior, τ calibrated on unused examples) of the same task,
    sizes and seed: accuracy against eval kept, one line per task and seed."""
    lines = []
    for task, sizes, seed in sorted({(r["task"], r["sizes"].split(" rule=")[0], r["seed"]) for r in loss_driven}):
        targets = sorted((r["kept"], r["kept_fraction"], r["accuracy"]) for r in target_runs
                         if (r["task"], setting_of(r["sizes"]), r["seed"], r["arm"]) == (task, sizes, seed,
                                                                                          "learned-prior")
                         and r.get("kept") is not None and calibration_of(r) == "unused")
        if not targets:
            continue
        driven = sorted((r["kept_fraction"], r["accuracy"]) for r in loss_driven
                        if (r["task"], r["sizes"].split(" rule=")[0], r["seed"]) == (task, sizes, seed))
        lines += [f"{task}, seed {seed}, accuracy at eval kept: loss-driven "
                  + ", ".join(f"{k:.2f} → {a:.3f}" for k, a in driven) + "; target mode (learned-prior, same seed) "
                  + ", ".join(f"{k:.2f} → {a:.3f}" for _, k, a in targets) + ".", ""]
    return lines


def same_seed_lines(records: list[dict], reference: list[dict], label: str) -> list[str]:
    """Spearman ρ of the learned per-module u between `records` and `reference` runs of the same task, sizes, kept
    and seed (same examples, order and initialisation; only the rule's settings differ), against other seeds."""
    def learned(rows):
        return {(r["task"], setting_of(r["sizes"]), r["kept"], r["seed"]): r["allocation"] for r in rows
                if r["arm"] == "learned" and r.get("allocation")}

    mine, theirs = learned(records), learned(reference)
    same = [spearman(*[[run[n] for n in sorted(run)] for run in (mine[k], theirs[k])]) for k in mine if k in theirs]
    other = [spearman(*[[run[n] for n in sorted(run)] for run in (mine[a], theirs[b])])
             for a in mine for b in theirs if a[:3] == b[:3] and a[3] != b[3]]
    if not same:
        return []
    return [f"Learned u against {label}, same seed (same examples, order and initialisation): Spearman ρ mean "
            f"{statistics.fmean(same):.2f} over {len(same)} seeds ({', '.join(f'{v:.2f}' for v in same)}); "
            f"different seeds: {statistics.fmean(other):.2f} over {len(other)} pairs.", ""]


def mean_rho(allocations: dict) -> float | None:
    """Mean Spearman ρ of the per-module u over every pair of seeds ({seed: {module: u}})."""
    seeds = sorted(allocations)
    if len(seeds) < 2:
        return None
    names = sorted(allocations[seeds[0]])
    return statistics.fmean(spearman([allocations[a][n] for n in names], [allocations[b][n] for n in names])
                            for i, a in enumerate(seeds) for b in seeds[i + 1:])


def prior_section(records: list[dict]) -> list[str]:
    """The κ pilot (results/prior_dev.json): every arm on a development split, learned at several κ."""
    if not records:
        return ["No runs yet: `python benchmarks/controls.py --task trec --dev --results "
                "benchmarks/results/prior_dev.json ...`.", ""]
    arms: dict = defaultdict(dict)
    for r in records:
        kappa = (r.get("rule") or {}).get("allocation_prior", 0.0) if r["arm"].startswith("learned") else None
        arms[(r["task"], r["arm"], kappa)][r["seed"]] = r
    sizes = sorted({r["sizes"].split(" warmup")[0] for r in records})
    lines = [f"Development split (`controls.py --dev`: {records[0]['n_eval']} train-pool examples neither trained nor "
             f"calibrated on, in place of the eval set), {', '.join(sizes)}, kept 0.5; seeds "
             f"{', '.join(str(s) for s in sorted({r['seed'] for r in records}))} (not the reported seeds). "
             "κ = 0 is the plain water-filling oracle.", "",
             "| task | arm | κ | accuracy | − uniform, paired (points) | u std across modules | ρ between seeds |",
             "|---|---|---|---|---|---|---|"]
    for (task, arm, kappa), seeds in sorted(arms.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or 0)):
        uniform = arms.get((task, "uniform", None), {})
        common = sorted(set(seeds) & set(uniform))
        paired = interval([seeds[s]["accuracy"] - uniform[s]["accuracy"] for s in common]) \
            if common and arm != "uniform" else "–"
        allocations = {s: r["allocation"] for s, r in seeds.items() if r.get("allocation")}
        spread = (f"{statistics.fmean(statistics.pstdev(a.values()) for a in allocations.values()):.3f}"
                  if allocations else "–")
        rho = mean_rho(allocations) if arm.startswith("learned") else None
        accuracy = statistics.fmean(r["accuracy"] for r in seeds.values())
        lines.append(f"| {task} | {arm} | {'–' if kappa is None else f'{kappa:g}'} | {accuracy:.3f} | {paired} | "
                     f"{spread} | {'–' if rho is None else f'{rho:.2f}'} |")
    return lines + [""]


def calibration_cost_lines(capped: list[dict], quality: list[dict]) -> list[str]:
    """Train seconds (training + τ calibration) of a ts run with the calibration token budget
    (results/calibration_cap.json) beside the quality suite's records of the same task, method and seed."""
    if not capped:
        return []
    lines = ["Calibration cost on a decoder: the same `quality.py` run (task, method, seed, sizes) with calibration "
             "on up to 640 unused examples (quality.json) and on at most 16k real tokens of them "
             "(`DEFAULTS.calibration_tokens`, calibration_cap.json). Train seconds include the calibration; dense "
             "LoRA's are the reference.", "",
             "| task | seed | run | commit | train s | accuracy | eval kept |", "|---|---|---|---|---|---|---|"]
    for new in capped:
        def same(r: dict, method: str) -> bool:
            return (r["task"], r["method"], r["seed"]) == (new["task"], method, new["seed"])

        rows = ([("dense lora", r) for r in quality if same(r, "lora")]
                + [("640 examples", r) for r in quality if same(r, new["method"])] + [("16k tokens", new)])
        for label, r in rows:
            lines.append(f"| {r['task']} | {r['seed']} | {label} | {r.get('commit')} | {r['train_seconds']:.0f} | "
                         f"{r['accuracy']:.3f} | {r.get('kept_fraction') or 1:.3f} |")
    return lines + [""]
