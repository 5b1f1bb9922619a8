#!/usr/bin/env bash
# Creates .venv with the pinned stack and tspeft installed (editable). Idempotent; offline except for PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build on CPU machines.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[data,test,trl]"
# Fashion-MNIST, the shipped image task, is Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist).
# The tests do not need it (they generate their own images); `tspeft train --task fashion_mnist` does.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "setup: Fashion-MNIST not installed; run 'sudo apt-get install -y dataset-fashion-mnist' for the image task" >&2
  fi
fi
