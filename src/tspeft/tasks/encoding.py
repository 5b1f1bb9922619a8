"""Reading users' text files: UTF-8, with or without a byte-order mark; anything else is a one-line error.

Spreadsheet programs (Excel's "CSV UTF-8") start a file with the byte-order mark U+FEFF. Read as plain UTF-8
it sticks to the first column's name ('\\ufefftext'), so the column is reported missing; "utf-8-sig" drops it.
A file in another encoding (latin-1, UTF-16) fails with the file, the line and the first offending byte
instead of Python's UnicodeDecodeError without either.
"""

from __future__ import annotations

from pathlib import Path

UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_text(path: str | Path) -> str:
    """The text of `path` decoded as UTF-8 (a leading BOM removed); ValueError naming the line if it is not UTF-8."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(UTF16_BOMS):
        raise ValueError(f"{path}: line 1: the file is not UTF-8 (it starts with a UTF-16 byte-order mark); "
                         "save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}: line {line}: the file is not UTF-8 (byte 0x{data[error.start]:02x}); "
                         "save it as UTF-8") from None
