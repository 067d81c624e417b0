"""Shared fixtures.  The suite runs once per backend (see the Makefile):
EMA_CUDA_BACKEND=compiled and EMA_CUDA_BACKEND=fallback."""
import os

import pytest
import torch

from ema_cuda import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = list(ops.SUPPORTED_DTYPES)

requires_compiled = pytest.mark.skipif(
    ops.backend() != "compiled", reason="exercises the compiled library (run with EMA_CUDA_BACKEND=compiled)"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def expected_backend():
    return os.environ.get("EMA_CUDA_BACKEND", "auto")
