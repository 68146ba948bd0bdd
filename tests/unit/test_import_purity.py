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


# torch.distributed.{tensor,checkpoint,fsdp} (with sympy) cost ~0.75 s of CPU at import (-X importtime); only
# training.strategy=fsdp2 needs them, so a DDP rank, the driver and the training CLI import without them.
FSDP_ONLY = ("torch.distributed.tensor", "torch.distributed.checkpoint", "torch.distributed.fsdp")


def test_student_worker_and_cli_import_without_the_fsdp2_modules():
    code = ("import sys\nimport student_worker.worker, student_worker.driver, student_worker.train\n"
            f"print([m for m in {FSDP_ONLY!r} + ('sympy',) if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
