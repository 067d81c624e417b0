"""Running a test function in several processes on loopback, the way torchrun would start them.

Each worker gets ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` in its environment,
one intra-op thread, and the backend of the parent (``EMA_CUDA_BACKEND`` is
inherited).  A worker that raises writes its traceback next to the test's
files; :func:`run_workers` kills workers still alive at the deadline, so a
hung collective fails the test instead of hanging the suite.
"""
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, errdir, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        fn(rank, world_size, *args)
        if dist.is_available() and dist.is_initialized():
            # Tear down together: a rank destroying its group while its peer
            # has already exited can abort inside gloo's threads.
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        Path(errdir, f"rank{rank}.err").write_text(traceback.format_exc())
        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (and the destructors of communication threads run from it).
    os._exit(0)


def run_workers(fn, world_size, args=(), *, workdir, timeout=45.0, check=True):
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; returns their exit codes.

    With ``check`` (the default) a worker that failed, or did not finish
    within ``timeout`` seconds, fails the calling test with its traceback.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    errdir = Path(workdir)
    errdir.mkdir(parents=True, exist_ok=True)
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, port, str(errdir), tuple(args)), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    codes = [p.exitcode for p in procs]
    if check:
        errors = "\n".join(
            f"--- rank {r} ---\n{(errdir / f'rank{r}.err').read_text()}"
            for r in range(world_size)
            if (errdir / f"rank{r}.err").exists()
        )
        assert not hung, f"workers {hung} did not finish within {timeout} s\n{errors}"
        assert all(c == 0 for c in codes), f"worker exit codes {codes}\n{errors}"
    return codes
