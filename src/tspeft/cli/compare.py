"""`tspeft compare`: train several methods × seeds and tabulate accuracy / kept fraction / time."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

from ..core.io import atomic_write
from ..training.run_folder import REPORT
from .commands import fmt, is_main_process, write_report

METHOD_NOTES = {  # said under the table when the comparison has such a method (prefix match)
    "none": "none: the frozen baseline (for text classification a probe fitted on the frozen model's pooled "
            "features).",
    **{f"ts-{m}:random": f"ts-{m}:random: the control with random tokens at the same kept fraction in every module."
       for m in ("lora", "dora", "adapter")},
    **{f"ts-{m}:uniform": f"ts-{m}:uniform: the control with every module at the target, tokens by r."
       for m in ("lora", "dora", "adapter")},
}


def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        chosen = [r for r in runs if r.get("compare_method", r["method"]) == method]
        row = {"method": method, "runs": len(chosen), "seeds": [r["seed"] for r in chosen]}
        for key in ("accuracy", "kept_fraction", "train_seconds"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r.get(key) for r in chosen])
        rows.append(row)
    return rows


def comparison_table(rows: list[dict[str, Any]]) -> str:
    def cell(row, key, digits):
        mean, std = row[f"{key}_mean"], row[f"{key}_std"]
        return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = ["| method | runs | accuracy | kept fraction | train seconds |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['runs']} | {cell(row, 'accuracy', 4)} | "
                     f"{cell(row, 'kept_fraction', 3)} | {cell(row, 'train_seconds', 1)} |")
    return "\n".join(lines)


def cmd_compare(args) -> int:
    """Every run is trained into the comparison's staging folder, which is published at --out once the table
    is written (tspeft.training.staging): a finished comparison there is refused unless --overwrite, and an
    interrupted one leaves the previous comparison as it was."""
    from ..training import staging

    name = args.task or Path(args.data).stem
    out = Path(args.out or f"runs/compare-{name}")
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under a launcher only rank 0 writes
    if not main_rank:
        _run_all(args, out, out)
        return 0
    staging.check_out(out, overwrite=args.overwrite, resume=False, what="comparison")
    folder = staging.begin(out, resume=False, what="comparison")
    try:
        runs, reports = _run_all(args, folder, out)
        table = _write_tables(args, name, runs, reports, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    staging.publish(folder, out, {"kind": "comparison", "methods": args.methods, "seeds": args.seeds, "task": name})
    print()
    print(table)
    print(f"\n[tspeft] wrote {out / 'compare.md'} and {out / 'compare.json'}")
    for report in reports:
        print(f"[tspeft] report: {report}")
    return 0


def _run_all(args, folder: Path, out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Train every method × seed into `folder` (the runs' paths are given as they will be under `out`)."""
    from ..training.run_config import split_method_spec
    from ..training.train import train

    runs, reports = [], []
    plan = [(spec, seed) for spec in args.methods for seed in args.seeds]
    is_main = True  # known after the first train() (under a launcher every rank runs every run; rank 0 reports)
    for i, (spec, seed) in enumerate(plan, 1):
        method, control = split_method_spec(spec)  # a control (ts-lora:random) is the method with its settings
        run_dir = folder / f"{spec.replace(':', '.')}-s{seed}"
        if is_main:
            print(f"[tspeft] compare run {i}/{len(plan)}: {spec} seed {seed} -> {out / run_dir.name}", flush=True)
        run_args = argparse.Namespace(**{**vars(args), "method": method, **control, "seed": seed,
                                         "out": str(run_dir), "overwrite": False})
        metrics = train(run_args)
        is_main = is_main_process()
        metrics["run_dir"], metrics["compare_method"] = str(out / run_dir.name), spec
        runs.append(metrics)
        if not is_main:
            continue
        print(f"[tspeft]   accuracy {fmt(metrics['accuracy'])}  kept {fmt(metrics['kept_fraction'], 3)}  "
              f"train {metrics['train_seconds']:.1f} s", flush=True)
        if method.startswith("ts-") and not args.no_report:
            write_report(run_dir)
            reports.append(str(out / run_dir.name / REPORT))
    return runs, reports


def _write_tables(args, name: str, runs: list[dict[str, Any]], reports: list[str], folder: Path) -> str:
    """compare.md and compare.json into `folder`; returns the summary table."""
    rows = summarise(runs, args.methods)
    table = comparison_table(rows)
    first = runs[0]
    header = (f"# tspeft compare: {name}\n\nmodel {first['model']}, {first['n_train']} train / {first['n_eval']} eval "
              f"examples, seeds {', '.join(map(str, args.seeds))}; mean ± standard deviation over seeds. "
              "Kept fraction: share of real-token adapter updates applied on the eval set (1 for dense methods)."
              + "".join(f" {note}" for spec, note in METHOD_NOTES.items() if any(m.startswith(spec)
                                                                                 for m in args.methods))
              + "\n\n")
    per_run = ["", "| method | seed | accuracy | kept fraction | train seconds | run |", "|---|---|---|---|---|---|"]
    per_run += [f"| {r['compare_method']} | {r['seed']} | {fmt(r['accuracy'])} | {fmt(r['kept_fraction'], 3)} | "
                f"{r['train_seconds']:.1f} | {r['run_dir']} |" for r in runs]
    markdown = header + table + "\n" + "\n".join(per_run) + "\n"
    atomic_write(folder / "compare.md", lambda tmp: Path(tmp).write_text(markdown, encoding="utf-8"))
    summary = {"task": name, "methods": args.methods, "seeds": args.seeds, "summary": rows, "runs": runs,
               "reports": reports}
    atomic_write(folder / "compare.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2, default=str)))
    return table

