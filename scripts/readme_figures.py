"""Copy the main job's table and one token heatmap into the README (between the main-job markers).

    python scripts/readme_figures.py runs/main
Run after the README's main command; nothing in that README section is typed by hand.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- main-job:start -->", "<!-- main-job:end -->"


def main(run_dir: str = "runs/main") -> None:
    run = ROOT / run_dir
    table = (run / "compare.md").read_text().split("\n\n")
    heading_and_table = "\n\n".join(part for part in table[1:3])  # the description and the mean ± std table
    ts_run = next(p for p in sorted(run.iterdir()) if p.name.startswith("ts-") and (p / "report").is_dir())
    image = ROOT / "docs" / "images" / "main_tokens.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ts_run / "report" / "tokens_0.png", image)
    block = (f"{START}\nOutput of the main command above, measured on 2 CPU cores (train seconds are "
             f"wall-clock and were disturbed by other work on the machine; written by `scripts/readme_figures.py` "
             f"from `{run_dir}/compare.md`):\n\n{heading_and_table}\n\n"
             f"Which tokens each layer updated, first eval example of `{ts_run.relative_to(ROOT)}` "
             f"(from its report):\n\n![token heatmap](docs/images/main_tokens.png)\n{END}")
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        raise SystemExit(f"README.md has no {START} marker")
    readme.write_text(text)
    print(f"updated README.md from {run}")


if __name__ == "__main__":
    main(*sys.argv[1:])
