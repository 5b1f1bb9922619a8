"""Copy generated figures into the README: the main job's table and one token heatmap (main-job markers),
and the headline tables of benchmarks/RESULTS.md (results markers): the τ rule's targets on the in-regime tasks
and the per-task claim table.

    python scripts/readme_figures.py runs/main          # after the README's main command and make_tables.py
    python scripts/readme_figures.py --results-only     # only the results block (no main-job run needed)
Nothing between the markers is typed by hand.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from tspeft.core.io import atomic_write

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- main-job:start -->", "<!-- main-job:end -->"
RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"
CLAIM_HEADING = "### Does discarding 30–70 % of token updates keep accuracy?"
TARGETS_HEADING = "## τ rule: the targets"


def replace_block(text: str, start: str, end: str, block: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    return text[:text.index(start)] + f"{start}\n{block}\n{end}" + text[text.index(end) + len(end):]


def section_of(results: str, heading: str) -> str | None:
    """The text under `heading` in RESULTS.md, up to the next heading."""
    if heading not in results:
        return None
    return results.split(heading, 1)[1].split("\n#", 1)[0].strip()


def claim_table() -> str:
    """The τ rule's targets and the per-task claim table of RESULTS.md (each its description and table)."""
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    targets, claims = section_of(results, TARGETS_HEADING), section_of(results, CLAIM_HEADING)
    if claims is None:
        return "No quality results yet (benchmarks/RESULTS.md has no claim table)."
    parts = ["From [benchmarks/RESULTS.md](benchmarks/RESULTS.md) (written by `scripts/readme_figures.py`)."]
    if targets:
        parts += ["The τ rule against its controls (same code path: `--allocation uniform`, `--selection random`) "
                  "on the tasks where fine-tuning beats the frozen baseline:", targets]
    parts += ["The quality suite, per task and dense → token-selective pair at the default kept 0.7:", claims]
    return "\n\n".join(parts)


def learned_ts_run(folder: Path) -> bool:
    """A ts-* run of the rule itself (not a control such as ts-lora:random) with a report."""
    metrics = folder / "metrics.json"
    if not (folder / "report").is_dir() or not metrics.is_file():
        return False
    run = json.loads(metrics.read_text())
    controls = (run.get("allocation"), run.get("selection"))
    return run["method"].startswith("ts-") and controls == ("learned", "magnitude")


def main(run_dir: str = "runs/main") -> None:
    readme = ROOT / "README.md"
    if run_dir == "--results-only":
        text = replace_block(readme.read_text(), RESULTS_START, RESULTS_END, claim_table())
        atomic_write(readme, lambda tmp: Path(tmp).write_text(text))
        print("updated README.md's results block")
        return
    run = ROOT / run_dir
    if not (run / "compare.md").is_file():
        raise SystemExit(f"{run_dir}: no compare.md (run the README's main command first, or --results-only)")
    table = (run / "compare.md").read_text().split("\n\n")
    heading_and_table = "\n\n".join(part for part in table[1:3])  # the description and the mean ± std table
    ts_run = next(p for p in sorted(run.iterdir()) if learned_ts_run(p))
    image = ROOT / "docs" / "images" / "main_tokens.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ts_run / "report" / "tokens_0.png", image)
    block = (f"Output of the main command above, measured on 2 CPU cores (train seconds are the runs' own "
             f"wall clock, not a speed measurement: see SPEED.md; written by `scripts/readme_figures.py` "
             f"from `{run_dir}/compare.md`):\n\n{heading_and_table}\n\n"
             f"Which tokens each layer updated, first eval example of `{ts_run.relative_to(ROOT)}` "
             f"(from its report):\n\n![token heatmap](docs/images/main_tokens.png)")
    text = replace_block(readme.read_text(), START, END, block)
    text = replace_block(text, RESULTS_START, RESULTS_END, claim_table())
    atomic_write(readme, lambda tmp: Path(tmp).write_text(text))
    print(f"updated README.md from {run}")


if __name__ == "__main__":
    main(*sys.argv[1:])
