#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with torch pinned to 2.13.0 (on our CPU machines
# the CPU build that lies on disk; DELTAKD_TORCH_VERSION picks another), this project and its dev tools,
# every installed module byte-compiled at install time. Safe to run again: it only installs what is missing.
# uv (from the package index, into .venv beside pip) does the install: one resolve, then install and
# byte-compile on both cores. Where uv cannot be had or fails, pip installs as it did before. Byte-compiling
# stays: this machine sets PYTHONDONTWRITEBYTECODE=1, so without .pyc files every process (each Ray actor,
# each CLI) would compile torch and transformers on import.
# Measured on this loaded 2-core machine (other agents running; fresh clone, no .venv), wall / CPU user+sys:
# pip 78-149 s / 76-109 s (6 runs), uv 31-103 s / 49-75 s (11 runs; runs side by side: 127 -> 93 s,
# 149 -> 103 s, 91 -> 36 s); ~45 s of the CPU is the byte-compile of 18,400 files, either way. Same versions
# and wheel files as pip, uv added.
# DELTAKD_BYTECODE=lazy (the test command, scripts/test.sh) skips the byte-compile (measured: the set-up takes
# 7 s / 5 CPU-s instead of 49 s / 44 CPU-s with uv's cache warm): the caller lets Python write each module's
# .pyc when a process first imports it, so only what runs is compiled, once.
set -euo pipefail
cd "$(dirname "$0")/.."
BYTECODE=${DELTAKD_BYTECODE:-install}
case "$BYTECODE" in install|lazy) ;; *) echo "deltakd: DELTAKD_BYTECODE must be install or lazy, got '$BYTECODE'" >&2; exit 2;; esac
pip_compile=()
[ "$BYTECODE" = lazy ] && pip_compile=(--no-compile)
PY=${PYTHON:-python3}
TORCH="torch==${DELTAKD_TORCH_VERSION:-2.13.0}"
if [ ! -x .venv/bin/python ]; then
  # without the bundled pip: the system's pip puts the newest pip and uv in below (ensurepip's pip would be
  # replaced at once; 3 s of CPU)
  "$PY" -m venv --without-pip .venv
fi
# pip on some machines warns once per package about missing local index folders; keep the log readable.
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }
# torch pinned when there is none yet: a bare "torch" requirement would pull a multi-GB CUDA build. A torch
# already installed (a CUDA build on a GPU machine) is kept.
pin_torch=()
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pin_torch=("$TORCH")
fi

with_pip() {
  quiet .venv/bin/python -m pip install -q --upgrade pip
  if [ ${#pin_torch[@]} -gt 0 ]; then
    quiet .venv/bin/python -m pip install -q "${pip_compile[@]}" "${pin_torch[@]}"
  fi
  quiet .venv/bin/python -m pip install -q "${pip_compile[@]}" -e ".[dev]"
}

# uv reads none of pip's settings; this hands it the ones pip has here (pip.conf, PIP_* variables: local
# indexes, find-links with the CPU torch, constraints, certificate, timeout) and runs `uv pip install`.
# pip takes the best file of a version from all indexes, uv the first index that has the version: the main
# index goes first so that uv takes the same files as pip (the local mirrors hold fewer files of some
# versions, e.g. multiprocess for py310 only). Settings it does not translate: exit 3, pip installs.
with_uv() {
  .venv/bin/python - "$@" <<'PYEOF'
import os
import sys

from pip._internal.commands import create_command

o, _ = create_command("install").parse_args([])
fc = o.format_control
if o.no_index or o.proxy or o.trusted_hosts or o.pre or o.prefer_binary or fc.no_binary or fc.only_binary:
    sys.exit(3)
args = ["pip", "install", "-q", "--python", sys.executable, "--index-strategy", "unsafe-best-match",
        "--index-url", o.index_url]
if os.environ.get("DELTAKD_BYTECODE", "install") == "install":
    args.append("--compile-bytecode")
for url in [o.index_url, *o.extra_index_urls]:
    args += ["--extra-index-url", url]
for path in o.find_links:
    args += ["--find-links", path]
for path in o.constraints:
    args += ["--constraint", path]
if o.cert:
    os.environ.setdefault("SSL_CERT_FILE", o.cert)
os.environ.setdefault("UV_HTTP_TIMEOUT", str(int(o.timeout)))
uv = os.path.join(os.path.dirname(sys.executable), "uv")
os.execv(uv, [uv, *args, *sys.argv[1:]])
PYEOF
}

UV='uv>=0.13,<1'
if [ ! -x .venv/bin/pip ] || [ ! -x .venv/bin/uv ]; then
  if ! quiet "$PY" -m pip --python .venv/bin/python install -q --upgrade pip "$UV"; then
    echo "deltakd: the system's pip did not put pip and uv into .venv; trying with .venv's own pip (ensurepip)"
    [ -x .venv/bin/pip ] || .venv/bin/python -m ensurepip >/dev/null
    quiet .venv/bin/python -m pip install -q --upgrade pip "$UV" \
      || echo "deltakd: uv could not be installed from the index; pip installs instead (slower)"
  fi
fi
if [ -x .venv/bin/uv ]; then
  # one resolve for all (torch pinned as above), pip kept at its newest as pip's own upgrade did
  if ! with_uv --upgrade-package pip pip "${pin_torch[@]}" -e ".[dev]"; then
    echo "deltakd: uv did not finish the install (or pip has settings here that it is not handed); pip installs"
    with_pip
  fi
else
  with_pip
fi
# The project's own modules too: the editable install imports them from here, and with PYTHONDONTWRITEBYTECODE=1
# every process (each Ray actor) would compile them again (~0.1 s of CPU each; a stale .pyc is ignored).
if [ "$BYTECODE" = install ]; then
  .venv/bin/python -m compileall -q -j 0 common student_worker teacher_service tests benchmarks >/dev/null
fi
echo "deltakd: environment ready in .venv"
