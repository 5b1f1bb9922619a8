"""Run folders as transactions: a run is written into a staging folder beside `--out` and published by one
rename once it is complete, so a folder at `--out` is always one whole, finished run (or nothing).

    <parent>/.<name>.partial/    while the run is written: run_state.json {"state": "running"}; checkpoints/
                                 live here, so a killed run resumes from them (--resume-from-checkpoint last)
    <parent>/<name>/             the published run: run_state.json {"state": "complete", ...}

    out = check_out(Path("runs/rt"), overwrite=False, resume=False)   # before any work: refuses what it must
    staging = begin(out, resume=False)                                # the folder to write into
    ... write metrics, adapter, logs into staging ...
    publish(staging, out, {"method": ..., "task": ...})

A finished run (or comparison) at `--out` is refused unless `overwrite`, which replaces it whole: the old
folder is moved aside, the new one renamed in, then the old one deleted; never a mix of two runs. An
unfinished staging folder is refused unless the run resumes from it (or `overwrite` discards it). A run that
fails before its first checkpoint leaves nothing behind (`abandon`). Readers (`tspeft eval`, `report`,
`importance`) call `require_complete` and say what to do with an unfinished run. Folders written before
run_state.json existed count as complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .run_folder import CHECKPOINTS, METRICS, RUN_STATE, read_metrics, write_json

STAGING_SUFFIX = ".partial"


def staging_folder(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def published_folder(staging: Path) -> Path | None:
    """The --out a staging folder belongs to (None if `staging` is not one)."""
    name = Path(staging).name
    if name.startswith(".") and name.endswith(STAGING_SUFFIX) and len(name) > len(STAGING_SUFFIX) + 1:
        return Path(staging).parent / name[1:-len(STAGING_SUFFIX)]
    return None


def as_published(path: str | None, out: Path) -> str | None:
    """`path` inside the staging folder of `out` as it reads once the run is published (others unchanged)."""
    if path is None:
        return None
    staging = staging_folder(out)
    try:
        return str(Path(out) / Path(path).relative_to(staging))
    except ValueError:
        return path


def run_state(folder: Path) -> dict[str, Any] | None:
    """run_state.json of `folder` (None when there is none)."""
    path = Path(folder) / RUN_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is corrupt (not valid JSON: {error.msg})") from None
    if not isinstance(state, dict) or state.get("state") not in ("running", "complete"):
        raise ValueError(f"{path} is corrupt (expected a 'state' of running or complete)")
    return state


def _what(folder: Path) -> str:
    state = run_state(folder) or {}
    metrics = read_metrics(folder) if (folder / METRICS).is_file() else {}
    if state.get("kind") == "comparison" or (folder / "compare.json").is_file():
        return "a finished comparison"
    method, task = state.get("method") or metrics.get("method"), state.get("task") or metrics.get("task")
    return f"a finished run ({method} on {task})" if method else "a finished run"


def check_out(out: Path, *, overwrite: bool, resume: bool, what: str = "run") -> Path:
    """Refuse an `--out` that a run may not write (see the module docstring); returns `out` as a Path."""
    out, staging = Path(out), staging_folder(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        state = run_state(out)
        if state is None and not (out / METRICS).is_file() and not (out / "compare.json").is_file():
            raise ValueError(f"--out {out}: the folder holds files that are not a tspeft {what}; choose another "
                             "folder")
        if state is not None and state["state"] == "running":
            raise ValueError(f"--out {out}: holds an unfinished {what} (run_state.json says running); "
                             "pass --overwrite to replace it")
        if not overwrite:
            hint = (f"; to continue from its checkpoints, pass --resume-from-checkpoint {out / CHECKPOINTS} and "
                    "another --out" if resume and (out / CHECKPOINTS).is_dir() else "")
            raise ValueError(f"--out {out}: holds {_what(out)}; pass --overwrite to replace it, or choose another "
                             f"folder{hint}")
    if staging.exists() and not resume and not overwrite:
        hint = ("continue it with --resume-from-checkpoint last, or pass --overwrite to start over" if what == "run"
                else "pass --overwrite to start over")
        raise ValueError(f"--out {out}: an earlier {what} into this folder did not finish (its files are in "
                         f"{staging}); {hint}")
    return out


def begin(out: Path, *, resume: bool, what: str = "run") -> Path:
    """The staging folder of `out`, ready to write into: kept as it is when resuming, else made fresh."""
    staging = staging_folder(out)
    if staging.exists() and not resume:
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    write_json(staging / RUN_STATE, {"state": "running", "kind": what, "started": _now(), "pid": os.getpid()})
    return staging


def has_checkpoint(staging: Path) -> bool:
    checkpoints = Path(staging) / CHECKPOINTS
    return checkpoints.is_dir() and any(p.name.startswith("checkpoint-") for p in checkpoints.iterdir())


def abandon(staging: Path, out: Path, interrupted: bool) -> None:
    """After a failed or interrupted run: remove the staging folder unless it holds a checkpoint to resume
    from (then say where it is)."""
    if not Path(staging).exists():
        return
    if has_checkpoint(staging):
        why = "interrupted" if interrupted else "failed"
        print(f"[tspeft] the run {why}; its checkpoints are kept in {staging / CHECKPOINTS}: continue it with "
              f"`tspeft train ... --out {out} --resume-from-checkpoint last`", file=sys.stderr, flush=True)
    else:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path, record: dict[str, Any]) -> None:
    """Mark `staging` complete and rename it to `out`, replacing a previous run there whole."""
    staging, out = Path(staging), Path(out)
    state = run_state(staging) or {}
    write_json(staging / RUN_STATE, {**state, **record, "state": "complete", "finished": _now()})
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            os.rename(out, old)
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def require_complete(folder: Path, flag: str) -> None:
    """Refuse a run folder that is not a finished run, saying what to do instead."""
    folder = Path(folder)
    out = published_folder(folder) or folder
    staging = staging_folder(out)
    state = run_state(folder) if folder.is_dir() else None
    unfinished = (state is not None and state["state"] == "running") or (not folder.exists() and staging.is_dir())
    if not unfinished:
        return
    if has_checkpoint(staging):
        todo = (f"its checkpoints are in {staging / CHECKPOINTS} (continue it with `tspeft train ... --out {out} "
                "--resume-from-checkpoint last`)")
    else:
        todo = "it saved no checkpoint (train it again with --overwrite; --save-steps makes a run resumable)"
    raise ValueError(f"{flag} {folder}: this run did not finish; {todo}")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
