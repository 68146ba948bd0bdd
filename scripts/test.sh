#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs every check: ruff over the tree, the import contracts,
# then the whole test suite (unit, integration with a local Ray cluster, gpu tests skipped without CUDA).
# mypy over common/ is one of the tests: it runs beside them at a low priority (tests/type_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# Installed without byte-compiling, and this run's processes write each module's .pyc as they first import it
# (the machine may set PYTHONDONTWRITEBYTECODE=1): the suite compiles the modules it uses once, not all 18,400.
DELTAKD_BYTECODE=lazy bash scripts/setup.sh
unset PYTHONDONTWRITEBYTECODE
echo "== ruff"; .venv/bin/ruff check .
echo "== import contracts"; .venv/bin/lint-imports --no-cache
echo "== pytest"; .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
