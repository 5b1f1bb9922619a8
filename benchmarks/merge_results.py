"""Merge result files written by parallel benchmark processes into one results file.

Run quality.py / importance_selection.py in several processes with separate `--results` files (two
processes must never share one: each rewrites the whole file), then

    python benchmarks/merge_results.py /tmp/piqa.json /tmp/obqa.json --into benchmarks/results/quality.json

Records are identified as the scripts identify them when resuming; a record already in the target is kept,
and two different records for the same run are refused rather than one silently winning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from importance_selection import KEYS as IMPORTANCE_KEYS  # noqa: E402
from quality import KEYS, LR_TUNING_KEYS, load_records, save_records  # noqa: E402


def record_key(record: dict) -> tuple:
    keys = IMPORTANCE_KEYS if "criterion" in record else LR_TUNING_KEYS if "lr" in record else KEYS
    return tuple(record.get(k) for k in keys)


def merge(target: list[dict], sources: list[list[dict]]) -> tuple[list[dict], int]:
    """Target records followed by the new ones from sources; (merged, number added)."""
    merged, index = list(target), {record_key(r): r for r in target}
    for records in sources:
        for record in records:
            key = record_key(record)
            if key in index:
                if index[key] != record:
                    raise SystemExit(f"two different records for the same run {key}: refusing to choose one")
                continue
            index[key] = record
            merged.append(record)
    return merged, len(merged) - len(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", type=Path)
    parser.add_argument("--into", type=Path, required=True)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.sources if not p.is_file()]
    if missing:
        raise SystemExit(f"no such result file: {', '.join(missing)}")
    merged, added = merge(load_records(args.into), [load_records(p) for p in args.sources])
    save_records(args.into, merged)
    print(f"merged {added} new records into {args.into} ({len(merged)} in all)")


if __name__ == "__main__":
    main()
