#!/usr/bin/env bash
# The one prepared script for a session on the GPU machine (one H200; benchmarks/README.md, "On the GPU
# machine"). From the repository root, with the device bundle carried along (`.device`):
#
#   source .device/env.sh || exit 1; bash benchmarks/gpu_run.sh
#
# It prints nvidia-smi and ray.cluster_resources() first, then runs, each part under its own timeout and
# all inside one budget (DELTAKD_GPU_BUDGET_S, default 540 s, under the device's 10-minute command limit),
# the most valuable first (the real-shape figures nothing else can measure), so a slow first start skips
# only the last parts; the limits of parts 1-4 and the set-up add up to less than the budget
# (tests/unit/test_gpu_run_script.py checks both):
#   1. gpu_check --parts teacher                  4. pytest tests/gpu without the Ray test
#   2. gpu_check --parts loss,student             5. pytest tests/gpu/test_record_path_ray.py (Ray; what is left)
#   3. gpu_check --parts rdt (Ray, cuda_ipc)
# Memory: Ray's memory monitor is off for these runs (RAY_memory_monitor_refresh_ms=0: a machine whose memory
# starts small and grows must not have workers killed at start), and the object store is sized from the memory
# available (benchmarks/_common.py default_object_store_bytes), not a fixed 2 GiB.
# Everything lands in $OUT (at most 8 files): gpu_run.log (this log: each part's exit code and seconds, the
# targets and the tests' measured facts), env.txt, pytest_gpu.txt, gpu_facts.jsonl, gpu_check.json,
# gpu_check.txt.
#
# DELTAKD_GPU_PARTS (default: all) picks parts for a rerun, comma-separated: teacher, loss_student, rdt,
# tests, tests_ray (the numbered parts above); the environment report always runs.
#
# DELTAKD_GPU_DRYRUN=1 runs the same on a machine without CUDA (the tests on the CPU, gpu_check at --scale
# toy, RDT over gloo) into $OUT or /tmp/deltakd-gpu-run-dry/: it checks the script and the tests,
# not the GPU. PYTHON picks the interpreter (default: python3; .venv/bin/python on a dry run if present).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${DELTAKD_GPU_BUDGET_S:-540}
DRY=${DELTAKD_GPU_DRYRUN:-0}
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-/tmp/deltakd-gpu-run-dry}
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  SCALE=toy
else
  OUT=${OUT:?set OUT to the folder for the results (the device tool sets it)}
  PY=${PYTHON:-python3}
  SCALE=full
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_run.log
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 DELTAKD_GPU_DRYRUN=$DRY
export RAY_memory_monitor_refresh_ms=0
export DELTAKD_GPU_FACTS=$OUT/gpu_facts.jsonl
: > "$LOG"; : > "$OUT/pytest_gpu.txt"; : > "$OUT/gpu_check.txt"; : > "$DELTAKD_GPU_FACTS"

PARTS=${DELTAKD_GPU_PARTS:-teacher,loss_student,rdt,tests,tests_ray}
want() { [[ ",$PARTS," == *",$1,"* ]]; }

log() { echo "[gpu_run +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# run NAME LIMIT_S OUTFILE CMD...: CMD under `timeout`, capped by what is left of the budget (15 s kept for
# the summary); its output appended to OUTFILE; its exit code and seconds logged (124: timed out).
run() {
  local name=$1 limit=$2 outfile=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START) - 15))
  if [ "$left" -lt 20 ]; then
    log "$name: SKIPPED (budget: ${left}s left)"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name: start (limit ${limit}s)"
  local t0=$SECONDS
  echo "===== $name: $*" >> "$outfile"
  timeout -k 10 "$limit" "$@" >> "$outfile" 2>&1
  local rc=$?
  log "$name: rc=$rc in $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
  return 0
}

log "deltakd gpu_run: parts=$PARTS dry_run=$DRY scale=$SCALE python=$PY out=$OUT budget=${BUDGET}s git=$(git rev-parse --short HEAD 2>/dev/null || echo none)"
{
  echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  echo "== versions"
  "$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.is_available(), 'transformers', transformers.__version__)" 2>&1
  "$PY" -c "import accelerate; print('accelerate', accelerate.__version__)" 2>&1 || echo "no accelerate: engines load on the host, then move"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$LOG"
run "ray.cluster_resources" 40 "$OUT/env.txt" "$PY" -c "
import tempfile, ray
ray.init(address='local', include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix='dkr-', dir='/tmp'))
print('ray', ray.__version__, 'cluster_resources', ray.cluster_resources())
ray.shutdown()"
grep -E "^ray |Error" "$OUT/env.txt" | tail -3 >> "$LOG"
if [ "$DRY" != 1 ]; then  # RDT's cuda_ipc maps one process's CUDA memory in another: see that it works here
  cat > /tmp/deltakd_ipc_probe.py <<'PY'
import torch
import torch.multiprocessing as mp


def child(q, r):
    r.put(float(q.get().sum()))  # a CUDA tensor received through CUDA IPC


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    q, r = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=child, args=(q, r))
    p.start()
    x = torch.arange(1000, device="cuda", dtype=torch.float32)
    q.put(x)
    print("cuda_ipc probe: the child read sum", r.get(timeout=60), "of", float(x.sum()))
    p.join()
PY
  run "cuda_ipc probe" 40 "$OUT/env.txt" "$PY" /tmp/deltakd_ipc_probe.py
  grep -E "cuda_ipc probe|Error" "$OUT/env.txt" | tail -3 >> "$LOG"
fi

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=10)
# pytest-timeout's per-test limit (inside the part's) prints the stacks of a hung test before the kill
CHECK=("$PY" benchmarks/gpu_check.py --scale "$SCALE" --out-dir "$OUT" --merge --repeats 3)
want teacher && run "gpu_check teacher" 120 "$OUT/gpu_check.txt" "${CHECK[@]}" --parts teacher
want loss_student && run "gpu_check loss,student" 100 "$OUT/gpu_check.txt" "${CHECK[@]}" --parts loss,student
want rdt && run "gpu_check rdt" 90 "$OUT/gpu_check.txt" "${CHECK[@]}" --parts rdt
want tests && run "pytest tests/gpu (no Ray)" 120 "$OUT/pytest_gpu.txt" "${PYTEST[@]}" --timeout 60 tests/gpu \
  --ignore=tests/gpu/test_record_path_ray.py
want tests_ray && run "pytest tests/gpu/test_record_path_ray.py" 150 "$OUT/pytest_gpu.txt" "${PYTEST[@]}" --timeout 130 \
  tests/gpu/test_record_path_ray.py

{
  echo "== pytest summaries"; grep -E "(passed|failed|error|skipped)( |,|$)|^(FAILED|ERROR|SKIPPED)" "$OUT/pytest_gpu.txt" | tail -25
  echo "== gpu_check targets and figures"
  "$PY" - "$OUT/gpu_check.json" <<'PY' 2>&1
import json, sys
try:
    doc = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    sys.exit(f"no gpu_check.json: {exc}")
for t in doc["targets"]:
    print(f"{t['name']}: {t['value']} {t['op']} {t['threshold']} met={t['met']}")
f = doc["figures"]
print("wall_seconds", f.get("wall_seconds"), "scale", f.get("scale"), "device", f.get("device"))
PY
  echo "== facts measured by the tests"; cut -c1-400 "$DELTAKD_GPU_FACTS"
} >> "$LOG" 2>&1
log "done in $((SECONDS - START))s"
