"""Generate benchmarks/SPEED.md from benchmarks/results/speed.json (written by speed.py). Never edit SPEED.md by hand.

    python benchmarks/speed_table.py [--json benchmarks/results/speed.json] [--out benchmarks/SPEED.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TRAIN_TARGET = 1.03  # train step ≤ 1.03× the peft twin (LoRA, DoRA), every row
MEMORY_TARGET = 1.02  # peak memory ≤ 1.02×
INFERENCE_TARGET = 1.0  # gated inference at kept ≤ 0.5 ≤ 1.0× unmerged LoRA, hidden ≥ 384 (MiniLM included)
INFERENCE_MIN_HIDDEN = 384
MERGED_TARGET = 1.15  # ... and within 1.15× merged LoRA at hidden ≥ 1024
MERGED_MIN_HIDDEN = 1024


def verdict(value: float | None, target: float, applies: bool = True) -> str:
    if value is None or not applies:
        return "–"
    return "met" if value <= target else "**missed**"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1e3:.2f}"


def hidden_label(record: dict) -> str:
    return f"{record['case']} (h={record['hidden']})" if record["case"] != "synthetic" else str(record["hidden"])


def train_section(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("phase") == "train"]
    if not rows:
        return ["No train-step results.", ""]
    lines = ["| case | hidden | tokens | method / baseline | step ms (TS / base) | step ratio | target ≤ "
             f"{TRAIN_TARGET} | peak memory (TS / base) | memory ratio | activation ratio | target ≤ {MEMORY_TARGET} "
             "| kept | repeats |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["case"] != "synthetic", r["method"], r["hidden"] or 0, r["tokens"])):
        lines.append(
            f"| {r['case']} | {r['hidden']} | {r['tokens']} | {r['method']} / {r['baseline']} | "
            f"{ms(r['train_step_s'])} / {ms(r['baseline_train_step_s'])} | {fmt(r['train_step_ratio'])} | "
            f"{verdict(r['train_step_ratio'], TRAIN_TARGET)} | "
            f"{fmt_bytes(r['peak_memory_bytes'])} / {fmt_bytes(r['baseline_peak_memory_bytes'])} | "
            f"{fmt(r['peak_memory_ratio'])} | {fmt(r.get('activation_memory_ratio'))} | "
            f"{verdict(r['peak_memory_ratio'], MEMORY_TARGET)} | {fmt(r['kept_fraction'], 2)} | {r['repeats']} |")
    measures = sorted({r.get("memory_measure", "") for r in rows} - {""})
    lines += ["", "Memory measure: " + "; ".join(f"`{m}`" for m in measures) + ". The activation ratio compares the "
              "activation part alone (CPU only).", ""]
    return lines


def kept_at_most_half(r: dict) -> bool:
    return r["method"].startswith("ts-") and r["kept_fraction"] is not None and r["kept_fraction"] <= 0.51


def core_default(r: dict) -> bool:
    """Whether this TS inference row is the path core takes by itself (older files: the kept-rows rows)."""
    return r.get("core_default", r["method"] == "ts-lora-skip")


def inference_section(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("phase") == "inference"]
    if not rows:
        return ["No inference results.", ""]
    lines = ["Ratios are against unmerged LoRA with the same weights. Both TS rows are core paths, forced at every "
             "gate: `ts-lora` adds s·B(z⊙S) to peft's result in place (a dropped token's B·z is computed and is "
             "zero) and `ts-lora-skip` adds s·B·z for the kept rows only (`index_add_`). Without autograd, core "
             "takes the kept-rows path by itself when a layer call keeps at most half of its tokens and its output "
             "has at least 2^18 entries (here: tokens × hidden); `default` marks the row core takes. `lora-merged` "
             "is the base-model cost floor.", "",
             "| case | hidden | tokens | method | default | kept | forward ms | unmerged LoRA ms | ratio vs LoRA "
             f"| target ≤ {INFERENCE_TARGET} | ratio vs merged | target ≤ {MERGED_TARGET} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["case"] != "synthetic", r["case"], r["hidden"] or 0, r["tokens"],
                                         r["method"] != "lora-merged", -(r["kept_fraction"] or 0), r["method"])):
        ts = r["method"].startswith("ts-")
        applies = kept_at_most_half(r) and core_default(r)
        vs_lora = verdict(r["inference_ratio"], INFERENCE_TARGET, applies and r["hidden"] >= INFERENCE_MIN_HIDDEN)
        vs_merged = verdict(r.get("inference_ratio_vs_merged"), MERGED_TARGET,
                            applies and r["hidden"] >= MERGED_MIN_HIDDEN)
        lines.append(f"| {r['case']} | {r['hidden']} | {r['tokens']} | {r['method']} | "
                     f"{('yes' if core_default(r) else '') if ts else '–'} | {fmt(r['kept_fraction'], 2)} | "
                     f"{ms(r['inference_s'])} | {ms(r['baseline_inference_s'])} | {fmt(r['inference_ratio'])} | "
                     f"{vs_lora} | {fmt(r.get('inference_ratio_vs_merged'))} | {vs_merged} |")
    return lines + [""]


def target_rows(records: list[dict]) -> list[tuple[str, list[dict], str, float]]:
    """(target, the rows it applies to, the ratio it bounds, the bound), as issue 17 states them."""
    train = [r for r in records if r.get("phase") == "train"]
    lora_dora = [r for r in train if r["method"] in ("ts-lora", "ts-dora")]
    infer = [r for r in records if r.get("phase") == "inference" and kept_at_most_half(r) and core_default(r)]
    return [
        (f"train step ≤ {TRAIN_TARGET}× LoRA / DoRA, every row", lora_dora, "train_step_ratio", TRAIN_TARGET),
        ("same for the bottleneck adapter (not an issue-17 target; the hook route)",
         [r for r in train if r["method"] == "ts-adapter"], "train_step_ratio", TRAIN_TARGET),
        (f"peak memory ≤ {MEMORY_TARGET}×, every row (LoRA, DoRA, adapter)", train, "peak_memory_ratio",
         MEMORY_TARGET),
        (f"gated inference (core's path, kept ≤ 0.5) ≤ {INFERENCE_TARGET}× unmerged LoRA, hidden ≥ "
         f"{INFERENCE_MIN_HIDDEN}", [r for r in infer if r["hidden"] >= INFERENCE_MIN_HIDDEN], "inference_ratio",
         INFERENCE_TARGET),
        (f"same, ≤ {MERGED_TARGET}× merged LoRA, hidden ≥ {MERGED_MIN_HIDDEN}",
         [r for r in infer if r["hidden"] >= MERGED_MIN_HIDDEN], "inference_ratio_vs_merged", MERGED_TARGET)]


def row_name(r: dict) -> str:
    kept = f" kept {r['kept_fraction']:.2f}" if r.get("phase") == "inference" else ""
    return f"{r['case']} h={r['hidden']} n={r['tokens']} {r['method']}{kept}"


def why(r: dict) -> str:
    """The profile line of a row: where the TS call's extra time goes (profiled per call)."""
    profile = r.get("profile")
    if not profile:
        return "no profile recorded"
    ops = ", ".join(f"{name} +{extra:.2f} ms ({calls:+.0f} calls)" for name, extra, calls in profile["extra_ops"][:4])
    rule = f"τ rule {profile['rule_ms']:.2f} ms; " if profile.get("rule_ms") else ""
    return (f"profiled {profile['ts_ms']:.1f} vs {profile['base_ms']:.1f} ms per call; {rule}most added self time: "
            f"{ops}")


def summary(records: list[dict]) -> list[str]:
    lines = ["| target | rows met / rows | worst ratio |", "|---|---|---|"]
    misses = []
    for label, rows, key, target in target_rows(records):
        values = [r for r in rows if r.get(key) is not None]
        met = sum(1 for r in values if r[key] <= target)
        worst = max((r[key] for r in values), default=None)
        lines.append(f"| {label} | {met} / {len(values)} | {fmt(worst)} |")
        misses += [f"* {label}: {row_name(r)}: {r[key]:.3f}. {why(r) if key != 'peak_memory_ratio' else memory_why(r)}"
                   for r in values if r[key] > target]
    lines += ["", "### Misses and their profiles", ""] + (misses or ["None."])
    return lines + [""]


def memory_why(r: dict) -> str:
    activation = r.get("activation_memory_ratio")
    extra = (r["peak_memory_bytes"] or 0) - (r["baseline_peak_memory_bytes"] or 0)
    return (f"{fmt_bytes(extra)} more, activations {fmt(activation)}× (the DoRA and output-difference routes keep "
            "M(x) of every token for the c_i of backward)" if "dora" in r["method"] or "adapter" in r["method"]
            else f"{fmt_bytes(extra)} more, activations {fmt(activation)}×")


def _fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) of y on x; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def slope_section(records: list[dict]) -> list[str]:
    """Cost linear in tokens: per hidden size, step (or forward) time = a + b · tokens for TS and its twin."""
    lines = ["Least-squares fit of seconds = a + b · tokens over the synthetic rows of one hidden size; b in µs per "
             "token, a in ms. b ratio ≈ the ratio at many tokens; Δa is the TS fixed cost per call (e.g. the τ "
             "rule per optimizer step).", "",
             "| phase | hidden | TS / twin | b TS | b twin | b ratio | a TS − a twin (ms) | points |",
             "|---|---|---|---|---|---|---|---|"]
    synthetic = [r for r in records if r["case"] == "synthetic"]
    groups: dict[tuple, list[dict]] = {}
    for r in synthetic:
        if r.get("phase") == "train" or (r["method"] == "ts-lora-skip" and r["kept_fraction"] is not None
                                         and abs(r["kept_fraction"] - 0.5) < 0.05):
            groups.setdefault((r["phase"], r["hidden"], r["method"], r["baseline"]), []).append(r)
    for (phase, hidden, method, baseline), rows in sorted(groups.items()):
        key, base_key = (("train_step_s", "baseline_train_step_s") if phase == "train"
                         else ("inference_s", "baseline_inference_s"))
        ts_fit = _fit([(r["tokens"], r[key]) for r in rows])
        base_fit = _fit([(r["tokens"], r[base_key]) for r in rows])
        if ts_fit is None or base_fit is None:
            continue
        label = f"{method} @0.5 / {baseline}" if phase == "inference" else f"{method} / {baseline}"
        lines.append(f"| {phase} | {hidden} | {label} | {ts_fit[1] * 1e6:.3f} | {base_fit[1] * 1e6:.3f} | "
                     f"{fmt(ts_fit[1] / base_fit[1]) if base_fit[1] > 0 else '–'} | "
                     f"{(ts_fit[0] - base_fit[0]) * 1e3:.2f} | {len(rows)} |")
    return lines + [""]


def _key(r: dict) -> tuple:
    kept = None if r.get("phase") == "train" or r["kept_fraction"] is None else round(r["kept_fraction"], 1)
    return r.get("phase"), r["case"], r["hidden"], r["tokens"], r["method"], kept


def before_after_section(records: list[dict], before: list[dict], source: str) -> list[str]:
    """This run's ratios beside an earlier run's on the same rows (train: step and memory; inference: kept 0.5)."""
    earlier = {_key(r): r for r in before}
    lines = [f"Earlier run: `{source}` (commit {before[0].get('machine', {}).get('commit', 'not recorded')}), "
             "same script and grid; budgets and machine load may differ.", "",
             "| phase | case | hidden | tokens | method | ratio before | ratio now | memory before | memory now |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r.get("phase"), r["case"] != "synthetic", r["case"], r["method"],
                                            r["hidden"] or 0, r["tokens"])):
        if r.get("phase") == "inference" and (not r["method"].startswith("ts-") or _key(r)[-1] != 0.5):
            continue
        old = earlier.get(_key(r))
        if old is None:
            continue
        key = "train_step_ratio" if r.get("phase") == "train" else "inference_ratio"
        lines.append(f"| {r['phase']} | {r['case']} | {r['hidden']} | {r['tokens']} | {r['method']} | "
                     f"{fmt(old.get(key))} | {fmt(r.get(key))} | {fmt(old.get('peak_memory_ratio'))} | "
                     f"{fmt(r.get('peak_memory_ratio'))} |")
    return lines + [""]


LIMITS = [
    "## Where the time goes (by construction; the misses above carry measured profiles)", "",
    "* **TS-LoRA training.** peft's own forward, with the gate in its LoRA-variant slot (core/variant.py): per "
    "gated layer and forward ‖W0 x − b‖ from peft's result (two reads of the output), ‖M(x)‖² = zᵀ(s²BᵀB)z on "
    "the rank-r z, the mask multiply on z, the counts (one fp32 matrix-vector product), one `bucketize` for the "
    "r bin and one fp64 histogram index-add; backward adds c_i = ⟨∂L/∂z̃, z⟩ and one index-add: small tensor "
    "ops per layer (counted in `benchmarks/results/op_counts.json`) and no hooks. Their fixed per-op cost (CPU "
    "dispatch, GPU kernel launches) dominates at small hidden sizes and few tokens, and the τ rule "
    "(`update_thresholds`: one device read, one zero and one write for all gates, numpy arithmetic on the host "
    "vectorised over modules) is a fixed cost per optimizer step, the same number of tensor ops for any number "
    "of modules.",
    "* **TS-DoRA training.** peft's DoRA module returns M(x) itself; the gate adds one norm of M, the base norm "
    "and result + M⊙S in one `addcmul` (in place of peft's add), and keeps M(x) of every token for the c_i of "
    "backward (an output-sized tensor per layer: the memory ratio), into which backward writes the c_i product.",
    "* **Inference.** A·x must run for every token (r needs z), and so must the base-output norm. The update is "
    "added to peft's result in place (no zero row, no output-sized temporary beyond B·z); with few kept tokens "
    "B·z runs for the kept rows only, after one `nonzero` (a host sync). So below merged LoRA it cannot go: "
    "the floor is merged LoRA + A·x + the norm.", ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write SPEED.md from speed.json")
    parser.add_argument("--json", default=str(ROOT / "results" / "speed.json"))
    parser.add_argument("--out", default=str(ROOT / "SPEED.md"))
    parser.add_argument("--before", default=str(ROOT / "results" / "speed_before.json"),
                        help="an earlier speed.json to set beside this one ('' for none)")
    args = parser.parse_args(argv)
    records = json.loads(Path(args.json).read_text())
    before = json.loads(Path(args.before).read_text()) if args.before and Path(args.before).exists() else []
    machines = {json.dumps(r.get("machine", {}), sort_keys=True) for r in records}
    dropped = sorted({tuple(c) for r in records for c in r.get("dropped_combos", [])})
    out = ["# Speed and memory: token-selective PEFT vs peft", "",
           "Generated by `python benchmarks/speed_table.py` from `benchmarks/results/speed.json` "
           "(written by `python benchmarks/speed.py`); do not edit by hand.", "",
           "Every ratio is a token-selective model over its peft twin with identical weights, measured in the same "
           "process; times are medians of interleaved repeats after warm-up. TS training runs in target mode "
           "(kept 0.5) and includes `update_thresholds()`; synthetic = 2 stacked `nn.Linear(hidden, hidden)`, "
           "LoRA/DoRA r = 8 or a bottleneck adapter of size 8 (`adapter`); minilm = all-MiniLM-L6 (BERT) on query, "
           "key, value, dense; smollm2 = SmolLM2-135M (Llama) on q_proj, k_proj, v_proj, o_proj.", "",
           f"Targets (issue 17): train step ≤ {TRAIN_TARGET}× LoRA (DoRA) in every row, peak memory ≤ "
           f"{MEMORY_TARGET}×, gated inference at kept ≤ 0.5 ≤ {INFERENCE_TARGET}× unmerged LoRA at hidden ≥ "
           f"{INFERENCE_MIN_HIDDEN} and ≤ {MERGED_TARGET}× merged LoRA at hidden ≥ {MERGED_MIN_HIDDEN}, cost "
           "linear in tokens.", ""]
    for m in sorted(machines):
        info = json.loads(m)
        out.append(f"Machine: {info.get('device_name')} ({info.get('device')}), {info.get('cpu_count')} CPUs, "
                   f"{info.get('torch_threads')} torch threads, torch {info.get('torch')}, {info.get('platform')}; "
                   f"code at commit {info.get('commit', 'not recorded')}.")
    if any(r.get("quick") for r in records):
        out.append("This was a `--quick` run (fewer sizes and repeats).")
    if dropped:
        out.append(f"Dropped for time on this device (hidden, tokens): {', '.join(map(str, dropped))}.")
    out += ["", "## Summary", ""] + summary(records) + LIMITS + ["## Cost in tokens", ""] + slope_section(records)
    out += ["## Train step and peak memory", ""] + train_section(records)
    out += ["## Inference forward", ""] + inference_section(records)
    if before:
        out += ["## Before / after", ""] + before_after_section(records, before, Path(args.before).name)
    Path(args.out).write_text("\n".join(out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
