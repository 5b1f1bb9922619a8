"""Which code a benchmark record was measured on."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def code_commit() -> str | None:
    """The commit the benchmarked code is at (``+dirty`` when src/ or benchmarks/ has uncommitted edits)."""
    try:
        git = ["git", "-C", str(REPO)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "src", "benchmarks"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        # not a git checkout (an installed copy, a tree copied to a GPU machine): what the copier said, else None
        return os.environ.get("TSPEFT_COMMIT") or None
    return head.stdout.strip() + ("+dirty" if dirty else "")
