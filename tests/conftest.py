"""Shared pytest wiring. Fixtures live in tests/fixtures/*.py, one module per real service, loaded as plugins."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))  # so `fixtures.*` and helpers import as top-level modules

# Keep CPU tests deterministic and polite on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# The operators these tests start run beside the stages' "pods" (played by the tests, or run as local processes) on
# this machine, so a file:// run store is shared by them; a real cluster refuses it without spec.storage.volumeClaim.
os.environ.setdefault("DDM_ALLOW_UNSHARED_FILE_STORAGE", "1")

pytest_plugins = [
    "fixtures.data",
    "fixtures.s3",
    "fixtures.k8s",
]


@pytest.fixture
def parallel_run_env() -> dict[str, str]:
    """The environment for a ``ddm run --parallel N`` subprocess: this one's without the suite's OMP_NUM_THREADS, so
    ddm run gives each stage its slice of the cores (2 stages of 2 spinning OpenMP threads on 2 cores: ~50x slower)."""
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
