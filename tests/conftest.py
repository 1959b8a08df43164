import importlib
import os
import sys
from pathlib import Path

import pytest

# No hub at run time: every model comes from a package, a tiny config, or a local path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one core per worker, and per script a test starts
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def world_benchmark():
    """01's full default world benchmark (6,641 instances) and its scenes + claims: built once, read only."""
    return importlib.import_module("01_build_ted6k").build_world_benchmark(seed=0)
