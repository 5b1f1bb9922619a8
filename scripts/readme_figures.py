"""Copy generated figures into the README: the main job's table and one token heatmap (main-job markers),
and the headline claim table of benchmarks/RESULTS.md (results markers).

    python scripts/readme_figures.py runs/main
Run after the README's main command and after benchmarks/make_tables.py; nothing between the markers is
typed by hand.
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


def replace_block(text: str, start: str, end: str, block: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    return text[:text.index(start)] + f"{start}\n{block}\n{end}" + text[text.index(end) + len(end):]


def claim_table() -> str:
    """The per-task claim table of RESULTS.md (its description and table, up to the next heading)."""
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    if CLAIM_HEADING not in results:
        return "No quality results yet (benchmarks/RESULTS.md has no claim table)."
    section = results.split(CLAIM_HEADING, 1)[1].split("\n#", 1)[0].strip()
    return ("From [benchmarks/RESULTS.md](benchmarks/RESULTS.md) (written by `scripts/readme_figures.py`):\n\n"
            f"{section}")


def learned_ts_run(folder: Path) -> bool:
    """A ts-* run of the rule itself (not a control such as ts-lora:random) with a report."""
    metrics = folder / "metrics.json"
    if not (folder / "report").is_dir() or not metrics.is_file():
        return False
    run = json.loads(metrics.read_text())
    controls = (run.get("allocation"), run.get("selection"))
    return run["method"].startswith("ts-") and controls == ("learned", "magnitude")


def main(run_dir: str = "runs/main") -> None:
    run = ROOT / run_dir
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
    readme = ROOT / "README.md"
    text = replace_block(readme.read_text(), START, END, block)
    text = replace_block(text, RESULTS_START, RESULTS_END, claim_table())
    atomic_write(readme, lambda tmp: Path(tmp).write_text(text))
    print(f"updated README.md from {run}")


if __name__ == "__main__":
    main(*sys.argv[1:])
