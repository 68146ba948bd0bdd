"""Shared fixtures. The Ray cluster fixture lives in tests/integration/conftest.py (one per session)."""

import os

# Keep tests on the CPU, single-threaded BLAS per process (2-core machines), and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
