"""Shared test set-up.

Triton kernels run on the CPU through Triton's interpreter when no GPU is present. The variable must
be set before triton is first imported, hence here, at collection time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """Where kernel tests run: the GPU when there is one, else the CPU under TRITON_INTERPRET=1."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _no_plan_cache(monkeypatch):
    """The plan cache is off in tests (tests compile the same model with the same config under other
    fake timings): tests/test_plan_cache.py turns it on, in a folder of its own."""
    monkeypatch.setenv("SPARSIFY_PLAN_CACHE", "0")
    # and so is the disk cache of emitted programs: every test emits what it runs (its own test turns it on)
    monkeypatch.setenv("SPARSIFY_PROGRAM_CACHE", "0")
