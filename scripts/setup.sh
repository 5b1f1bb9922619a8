#!/usr/bin/env bash
# Creates .venv with the pinned stack and tspeft installed (editable). Idempotent; offline except for PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build on CPU machines.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[data,test,trl]"
