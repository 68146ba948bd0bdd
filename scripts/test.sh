#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs every check: ruff over the tree, the import contracts,
# then the whole test suite (unit, integration with a local Ray cluster, gpu tests skipped without CUDA).
# mypy over common/ is one of the tests: it runs beside them at a low priority (tests/type_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check .
echo "== import contracts"; .venv/bin/lint-imports --no-cache
echo "== pytest"; .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
