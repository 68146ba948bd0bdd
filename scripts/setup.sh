#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with torch 2.13.0 installed first (on our CPU
# machines pip takes the CPU build that lies on disk; DELTAKD_TORCH_VERSION picks another), then this
# project and its dev tools. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip on some machines warns once per package about missing local index folders; keep the log readable.
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }
quiet .venv/bin/python -m pip install -q --upgrade pip
# torch first: a bare "torch" requirement on a machine with none would pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  quiet .venv/bin/python -m pip install -q "torch==${DELTAKD_TORCH_VERSION:-2.13.0}"
fi
quiet .venv/bin/python -m pip install -q -e ".[dev]"
echo "deltakd: environment ready in .venv"
