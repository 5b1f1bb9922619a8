"""Reading users' data files: JSONL / JSON list / CSV / TSV rows, each tagged with where it came from.

Rows are plain dicts with an extra ``_where`` ("line N", "item N") that error messages quote; the task kinds
(`tspeft.tasks.kind`) turn rows into examples.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .encoding import read_text


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line_number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {line_number} is not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {line_number} is a JSON {type(row).__name__}, expected an object")
        rows.append({**row, "_where": f"line {line_number}"})
    return rows


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (``.jsonl``; ``.json`` may also hold one JSON list of objects) or a CSV/TSV file,
    each with ``_where`` ("line N", for CSV the line a record ends on; "item N" in a JSON list)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json" and read_text(path).lstrip().startswith("["):
        try:
            rows = json.loads(read_text(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {error.lineno} is not valid JSON ({error.msg})") from None
        if not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{path}: a JSON list must hold one object per example")
        return [{**row, "_where": f"item {i}"} for i, row in enumerate(rows, start=1)]
    if suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        with io.StringIO(read_text(path), newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            rows = []
            for row in reader:
                if None in row:
                    raise ValueError(f"{path}: line {reader.line_num} has more fields than the header "
                                     f"({len(reader.fieldnames or [])} columns)")
                rows.append({**row, "_where": f"line {reader.line_num}"})
            return rows
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .csv (or .tsv)")


def check_columns(path: Path, rows: list[dict], mapping: dict[str, str], optional: tuple[str, ...]) -> None:
    if not rows:
        raise ValueError(f"{path}: no rows")
    found = sorted({key for row in rows for key in row if key != "_where"})
    for role, column in mapping.items():
        if role not in optional and column not in found:
            raise ValueError(f"{path}: missing column {column!r} (the {role}); columns found: {found}")


def text_field(row: dict, column: str, path: Path, where: str, required: bool = True) -> str | None:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"{path}: {where}: empty or missing {column!r}")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{path}: {where}: {column!r} must be text, got {type(value).__name__} {value!r}")
    return value

