"""Shared fixtures. The Ray cluster fixture lives in tests/integration/conftest.py (one per session)."""

import os

# Keep tests on the CPU, single-threaded BLAS per process (2-core machines), and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import torch  # noqa: E402

# On a loaded 2-core machine, intra-op threads make tiny ops 100x slower (thread hand-off dominates).
torch.set_num_threads(1)
