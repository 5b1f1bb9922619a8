#!/usr/bin/env bash
# The env step of scripts/gpu_check.sh: unpack every wheel of wheels/ (scripts/fetch_gpu_wheels.sh) into a site
# folder that goes first on PYTHONPATH, so the pinned stack shadows the machine's versions while torch stays the
# machine's own CUDA build. No index, no dependency resolution (wheels/ holds the whole closure but torch).
# A venv would not do: the device image's python3 is itself a venv, whose packages a --system-site-packages venv
# does not see.
#   bash scripts/gpu_env.sh PYTHON SITE     (exit 0: PYTHON with SITE first on its path holds the pinned stack)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
SITE=${2:-/tmp/tspeft-gpu-site}
WHEELS=${WHEELS:-wheels}
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" scripts/gpu_extras.py env-ok && { echo "no $WHEELS/; the machine's packages match the pins"; exit 0; }
    echo "$WHEELS/ is missing: run scripts/fetch_gpu_wheels.sh where PyPI is reachable, and carry it over"
    exit 1
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || exit 1
PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" scripts/gpu_extras.py env-ok
