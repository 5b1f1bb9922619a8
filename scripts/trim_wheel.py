"""Copy a bitsandbytes wheel without the kernel libraries of the CUDA / ROCm versions not named (for carrying it).

    python scripts/trim_wheel.py bitsandbytes-X-py3-none-manylinux_2_24_x86_64.whl OUT_DIR 130 [132 ...]

The wheel's RECORD is rewritten for the files kept, so pip installs the copy as usual.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sys
import zipfile


def trim(source: str, out_dir: str, cuda_versions: list[str]) -> str:
    keep = {f"libbitsandbytes_cuda{v}.so" for v in cuda_versions}

    def dropped(name: str) -> bool:
        return bool(re.search(r"libbitsandbytes_(cuda|rocm)\d+\.so$", name)) and os.path.basename(name) not in keep

    target = os.path.join(out_dir, os.path.basename(source))
    with zipfile.ZipFile(source) as wheel, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as trimmed:
        names = [n for n in wheel.namelist() if not dropped(n)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        if not any(os.path.basename(n) in keep for n in names):
            sys.exit(f"{source}: holds none of {sorted(keep)}")
        lines = []
        for name in names:
            if name == record:
                continue
            data = wheel.read(name)
            trimmed.writestr(wheel.getinfo(name), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{name},sha256={digest},{len(data)}")
        trimmed.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
    return target


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    print(f"{trim(sys.argv[1], sys.argv[2], sys.argv[3:])}: kept libbitsandbytes_cuda{{{','.join(sys.argv[3:])}}}.so")
