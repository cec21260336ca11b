#!/usr/bin/env bash
# Create .venv and install omnicore (editable) with its test and serving extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# timm needs torchvision; this pair installs side by side on CPU machines (and from the local disk where it lies).
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/pip install -q -e ".[dev,serve]"
.venv/bin/omni --version
