#!/usr/bin/env bash
# Submits a deltakd training run to a Ray cluster as a Ray job, with this checkout as its working dir.
#
#   deploy/submit.sh --config deploy/configs/qwen2_7b_dolly.yaml [--address http://127.0.0.1:8265]
#                    [--no-wait] [--submission-id ID] [--python PYTHON]
#                    [-- EXTRA TRAIN ARGS, e.g. --set training.max_steps=10]
#
# The address defaults to $RAY_ADDRESS, else http://127.0.0.1:8265 (the head's dashboard, forwarded by
# `ray dashboard deploy/cluster.yaml`). The auth token comes from where Ray's job CLI looks for it:
# $RAY_AUTH_TOKEN, the file named by $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token.
set -euo pipefail

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

cd "$(dirname "$0")/.."
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
CONFIG=""
PYTHON_BIN="python"  # the interpreter on the cluster's nodes, not this machine's
WAIT=1
EXTRA=()
SUBMIT_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="${2:?--config needs a path}"; shift 2 ;;
    --address) ADDRESS="${2:?--address needs a URL}"; shift 2 ;;
    --python) PYTHON_BIN="${2:?--python needs an interpreter}"; shift 2 ;;
    --no-wait) WAIT=0; shift ;;
    --submission-id) SUBMIT_ARGS+=(--submission-id "${2:?--submission-id needs an id}"); shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "submit.sh: unknown argument '$1'" >&2; usage 2 ;;
  esac
done
[ -n "$CONFIG" ] || { echo "submit.sh: --config is required" >&2; usage 2; }
[ -f "$CONFIG" ] || { echo "submit.sh: config file not found: $CONFIG" >&2; exit 2; }

RAY_BIN="${RAY_BIN:-ray}"
if [ -x .venv/bin/ray ] && [ "$RAY_BIN" = "ray" ]; then RAY_BIN=.venv/bin/ray; fi

# The working dir is uploaded to the cluster (limit 500 MiB): leave out the venv, run outputs, caches.
RUNTIME_ENV='{"excludes": [".venv", "runs", "outputs", ".cache", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".mypy_cache"], "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}'

[ "$WAIT" = 1 ] || SUBMIT_ARGS+=(--no-wait)

set -x
exec "$RAY_BIN" job submit --address "$ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV" \
  "${SUBMIT_ARGS[@]}" -- "$PYTHON_BIN" -m student_worker.train --config "$CONFIG" "${EXTRA[@]}"
