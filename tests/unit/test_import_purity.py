"""common.losses and common.topk import with ray, transformers and vllm blocked (docs/DESIGN.md section 3)."""

from __future__ import annotations

import subprocess
import sys

# sys.modules[name] = None makes `import name` raise ModuleNotFoundError, however deep the import is.
BLOCK = "import sys\nfor name in ('ray', 'transformers', 'vllm'):\n    sys.modules[name] = None\n"
PURE_MODULES = ["common.losses", "common.topk", "common.sparse", "common.config"]


def test_imports_without_ray_transformers_vllm():
    # one subprocess for all modules: each start pays torch's import (seconds on a loaded 2-core box)
    code = BLOCK + "".join(f"import {m}\n" for m in PURE_MODULES)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_block_works():
    """The check can fail: a blocked module really raises on import."""
    done = subprocess.run([sys.executable, "-c", BLOCK + "import transformers\n"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr
