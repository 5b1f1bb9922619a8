"""Users' files in other encodings: a UTF-8 BOM (Excel's export) is read correctly; bytes that are not UTF-8
give a one-line error naming the file and the line (issue #14)."""

from __future__ import annotations

import json

import pytest

from tspeft.tasks.data import load_file
from tspeft.tasks.files import read_rows

BOM = "\ufeff".encode("utf-8")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
def test_utf8_bom_is_not_part_of_the_first_column(tmp_path, suffix):
    path = tmp_path / f"excel{suffix}"
    if suffix == ".csv":
        body = "text,label\ncafé crème,pos\nbad,neg\n"
    elif suffix == ".tsv":
        body = "text\tlabel\ncafé crème\tpos\nbad\tneg\n"
    elif suffix == ".jsonl":
        body = "".join(json.dumps(row) + "\n" for row in ({"text": "café crème", "label": "pos"},
                                                             {"text": "bad", "label": "neg"}))
    else:
        body = json.dumps([{"text": "café crème", "label": "pos"}, {"text": "bad", "label": "neg"}])
    path.write_bytes(BOM + body.encode("utf-8"))
    rows = read_rows(path)
    assert "text" in rows[0] and not any(key.startswith("\ufeff") for key in rows[0])
    examples, names = load_file(path)
    assert examples[0]["text"] == "café crème" and names == ["neg", "pos"]


@pytest.mark.parametrize("suffix, line", [(".csv", 3), (".jsonl", 2), (".json", 1)])
def test_latin1_bytes_name_the_file_and_line(tmp_path, suffix, line):
    path = tmp_path / f"latin1{suffix}"
    if suffix == ".csv":
        text = "text,label\nfine,pos\ncafé,neg\n"
    elif suffix == ".jsonl":
        text = '{"text": "fine", "label": "pos"}\n{"text": "café", "label": "neg"}\n'
    else:
        text = '[{"text": "café", "label": "neg"}]'
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"latin1{suffix}: line {line}: the file is not UTF-8 \(byte 0xe9\)"):
        read_rows(path)


def test_utf16_file_is_named_as_not_utf8(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_bytes("text,label\nfine,pos\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"wide\.csv: line 1: the file is not UTF-8"):
        read_rows(path)
