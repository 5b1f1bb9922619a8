#!/usr/bin/env bash
# Downloads, on a machine that reaches PyPI, the wheels scripts/gpu_check.sh installs on a GPU machine that has
# CUDA and a torch but no internet: the pinned stack of this checkout's .venv (or /work/main/.venv) WITHOUT torch
# and its own dependencies, for Linux x86_64 and the GPU machine's CPython (PYVERS, default 3.12: the device image's
# python3), into wheels/ (git-ignored; carry it over, e.g. the device tool's `carry: ["wheels"]`).
#
#   ./scripts/fetch_gpu_wheels.sh                 # wheels/*.whl + wheels/requirements.txt (~45 MB)
#   PYVERS="3.11 3.12" ./scripts/fetch_gpu_wheels.sh  # several Pythons (numpy alone is ~17 MB per version)
#   WITH_DEEPSPEED=0 ./scripts/fetch_gpu_wheels.sh  # skip DeepSpeed (built here from its sdist, pure Python)
#   WITH_BITSANDBYTES=0 ./scripts/fetch_gpu_wheels.sh  # skip bitsandbytes (carried trimmed to the kernels of
#                                                      # BNB_CUDA=130 only: the whole wheel is 43 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-$( [ -x .venv/bin/python ] && echo .venv || echo /work/main/.venv )}
PY="$VENV/bin/python"
OUT=${OUT:-wheels}
mkdir -p "$OUT"
# What the GPU check imports (tspeft core + Trainer callback, the CUDA tests, benchmarks/speed.py) and, for the
# DeepSpeed step, deepspeed's own requirements. torch is excluded: the GPU machine brings its own CUDA build.
ROOTS="transformers peft accelerate safetensors tokenizers huggingface_hub numpy tqdm pytest"
DEEPSPEED_VERSION=0.19.8
BITSANDBYTES_VERSION=0.50.2
# deepspeed's requirements that the venv does not hold (pydantic, psutil, numpy, packaging, tqdm it does)
DEEPSPEED_PINS="hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0 einops==0.8.2"
[ "${WITH_DEEPSPEED:-1}" = 1 ] && ROOTS="$ROOTS psutil pydantic"
# Pinned closure of ROOTS as installed in the venv, minus torch and everything only torch needs.
"$PY" - "$OUT/requirements.txt" $ROOTS <<'EOF'
import re, sys
from importlib import metadata

out, roots = sys.argv[1], sys.argv[2:]
torch_only = {"torch", "triton", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "setuptools"}
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
seen, todo = {}, [norm(r) for r in roots]
while todo:
    name = todo.pop()
    if name in seen or name in torch_only or name.startswith("nvidia-"):
        continue
    dist = metadata.distribution(name)
    seen[name] = dist.version
    for requirement in dist.requires or []:
        if "extra ==" in requirement:
            continue
        marker = requirement.split(";", 1)[1] if ";" in requirement else ""
        if "sys_platform == \"win32\"" in marker or "platform_system == \"Windows\"" in marker:
            continue
        dep = norm(re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0))
        try:
            metadata.distribution(dep)
        except metadata.PackageNotFoundError:
            continue  # an environment marker excluded it here (e.g. python_version)
        todo.append(dep)
with open(out, "w") as handle:
    handle.writelines(f"{name}=={version}\n" for name, version in sorted(seen.items()))
print(f"{len(seen)} packages -> {out}")
EOF
if [ "${WITH_DEEPSPEED:-1}" = 1 ]; then
    printf '%s\n' $DEEPSPEED_PINS >> "$OUT/requirements.txt"
fi
for pyver in ${PYVERS:-3.12}; do  # tspeft needs Python >= 3.11
    abi="cp${pyver/./}"
    "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary=:all: --dest "$OUT" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform linux_x86_64 --python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none \
        -r "$OUT/requirements.txt" || { echo "some pinned package has no wheel for CPython $pyver" >&2; exit 1; }
done
if [ "${WITH_DEEPSPEED:-1}" = 1 ] && ! ls "$OUT"/deepspeed-*.whl >/dev/null 2>&1; then
    # DeepSpeed ships an sdist only; with DS_BUILD_OPS=0 (its default) the wheel is pure Python (ops build JIT).
    DS_BUILD_OPS=0 "$VENV/bin/pip" wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
        -w "$OUT" "deepspeed==$DEEPSPEED_VERSION"
    echo "deepspeed==$DEEPSPEED_VERSION" >> "$OUT/requirements.txt"
fi
if [ "${WITH_BITSANDBYTES:-1}" = 1 ] && ! ls "$OUT"/bitsandbytes-*.whl >/dev/null 2>&1; then
    # The wheel (~43 MB) holds a kernel library per CUDA version; keep only BNB_CUDA's (default 130: the device
    # image's torch is +cu130; bitsandbytes loads the library matching torch.version.cuda), ~4 MB each.
    TMP=$(mktemp -d)
    "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary=:all: --dest "$TMP" \
        --platform manylinux_2_24_x86_64 --python-version 3.12 --implementation cp --abi abi3 --abi none \
        "bitsandbytes==$BITSANDBYTES_VERSION"
    "$PY" scripts/trim_wheel.py "$TMP"/bitsandbytes-*.whl "$OUT" ${BNB_CUDA:-130}
    rm -rf "$TMP"
fi
du -sh "$OUT"
