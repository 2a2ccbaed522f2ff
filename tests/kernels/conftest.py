"""Fixtures for the kernel tests: which backend runs, and poisoned outputs.

The Triton path runs on CPU tensors in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when CUDA is absent); shapes stay tiny because every interpreted program step costs milliseconds.
"""
import importlib.util
import math

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton missing"))]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SAE_KERNELS", request.param)
    from sae.core.kernels.pairs import CACHE

    CACHE.clear()
    return request.param


@pytest.fixture
def dev(backend):
    """Where the op under test runs: the GPU when there is one (compiled kernels), else the CPU
    (reference, or Triton kernels in the interpreter). Ground truths always run on the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every torch.empty comes back full of NaN (floats) or out-of-range values (ints), so a kernel
    that forgets to write part of its output fails the comparison instead of passing on zeros."""
    real_empty = torch.empty

    def poisoned_empty(*size, **kw):
        t = real_empty(*size, **kw)
        if t.is_floating_point():
            t.fill_(math.nan)
        elif t.dtype == torch.bool:
            t.fill_(True)
        elif t.dtype in (torch.int64, torch.int32):
            t.fill_(2**30)
        return t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
