"""Shared fixtures.  The suite runs once per backend (see the Makefile):
EMA_CUDA_BACKEND=compiled and EMA_CUDA_BACKEND=fallback, each on several
processes (pytest-xdist, ``-n 2``)."""
import fcntl
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


@pytest.fixture(autouse=True)
def _one_process_group_at_a_time(request, tmp_path_factory):
    """Under pytest-xdist, tests that start their own group of processes
    (dist_helpers.run_workers: ranks on loopback) run one at a time across the
    workers, while the other workers go on with the rest of the suite.  Two
    groups at once could pick the same port (a free one is found by binding
    port 0 and releasing it before the rendezvous), and each group already
    keeps the machine's cores busy within its deadline."""
    if "PYTEST_XDIST_WORKER" not in os.environ or not hasattr(request.module, "run_workers"):
        yield
        return
    # The workers' base temporary directories share this session's parent.
    with open(tmp_path_factory.getbasetemp().parent / "process-groups.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield
