"""Snapshot writes off the training thread: a copy taken at the snapshot step, the file written in the background.

NOTE [background snapshots]: writing a snapshot means serialising every
profile's tensors and an fsync, which takes far longer than an update.  The
training thread only copies the tensors, packed into one buffer (NOTE [packed
snapshots] in :mod:`ema_cuda.posthoc.snapshots`; to pinned host memory,
without waiting, from a CUDA device), and hands the copies to one writer
thread, so the values written are those of the snapshot step
whatever later updates do.  The queue holds at most ``MAX_PENDING``
snapshots: a writer that falls behind (a slow disk) makes the training
thread wait instead of piling up copies in host memory.  A failed write is
kept and raised on the training thread, by the next :meth:`submit` or by
:meth:`wait`, once: errors are never lost with the thread.  At interpreter
exit, pending writes are finished (an ``atexit`` flush), so a script that
ends right after its last update still leaves whole files.
"""
from __future__ import annotations

import atexit
import queue
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from ema_cuda.posthoc.snapshots import PackedState, pack_state

__all__ = ["MAX_PENDING", "SnapshotWriter", "host_copy"]

#: Snapshots (all profiles of one step) copied but not yet written before the training thread waits.
MAX_PENDING = 2

# (path, packed tensors or the bytes serialised from them, metadata) of one file to write.
Job = Tuple[Path, Union[PackedState, bytes], Dict[str, str]]


def host_copy(state: Dict[str, torch.Tensor]) -> Tuple[PackedState, bool]:
    """A CPU copy of ``state`` packed into one buffer (NOTE [packed snapshots]), and whether it came from CUDA.

    From CUDA, the packed buffer goes to pinned memory with ``non_blocking``:
    the copy is queued on the current stream, before any later update, so it
    holds this step's values once an event recorded after it has completed
    (the caller records one and hands it to :meth:`SnapshotWriter.submit`).
    """
    packed = pack_state(state)
    if not packed.data.is_cuda:
        return packed, False
    buf = torch.empty(packed.data.shape, dtype=torch.uint8, pin_memory=True)
    buf.copy_(packed.data, non_blocking=True)
    return packed._replace(data=buf), True


class SnapshotWriter:
    """One background thread writing snapshot files with ``write(path, packed, metadata)`` (NOTE [background
    snapshots])."""

    def __init__(self, write: Callable[..., Any], where: str):
        self._write = write
        self._where = where
        self._queue: "queue.Queue[Optional[Tuple[List[Job], Any]]]" = queue.Queue(maxsize=MAX_PENDING)
        self._thread: Optional[threading.Thread] = None
        self._errors: List[BaseException] = []  # list.append and pop are atomic
        ref = weakref.ref(self)
        # A weak reference: the exit hook must not keep every writer (and its EMA's copies) alive.
        self._exit_hook = lambda: (ref() is not None and ref().close(raise_error=False))
        atexit.register(self._exit_hook)

    def submit(self, jobs: List[Job], event: Any = None) -> None:
        """Queues the files of one snapshot (blocking while ``MAX_PENDING`` are pending); raises an earlier write's
        error first."""
        self.raise_error()
        if self._thread is None or not self._thread.is_alive():
            # The thread holds the queue and the error list, not the writer, so
            # that a writer nobody refers to any more is collected (and its thread ended).
            self._thread = threading.Thread(target=_drain, args=(self._queue, self._write, self._errors),
                                            name="ema_cuda-snapshots", daemon=True)
            self._thread.start()
        self._queue.put((jobs, event))

    def raise_error(self) -> None:
        if self._errors:
            error = self._errors.pop(0)
            self._errors.clear()
            raise RuntimeError(f"{self._where}: writing a snapshot failed: {error}") from error

    def wait(self) -> None:
        """Blocks until every queued snapshot is written; raises the first error of a failed write."""
        if self._thread is not None:
            self._queue.join()
        self.raise_error()

    def close(self, raise_error: bool = True) -> None:
        """Writes what is queued and ends the thread (a later :meth:`submit` starts a new one)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join()
        self._thread = None
        if raise_error:
            self.raise_error()

    def __del__(self):
        try:
            atexit.unregister(self._exit_hook)
            if self._thread is not None and self._thread.is_alive():
                self._queue.put_nowait(None)
        except Exception:  # at interpreter exit, or a full queue: the daemon thread ends with the process
            pass


def _drain(jobs_queue: "queue.Queue", write: Callable[..., Any], errors: List[BaseException]) -> None:
    while True:
        item = jobs_queue.get()
        try:
            if item is None:
                return
            jobs, event = item
            if event is not None:
                event.synchronize()
            for path, packed, metadata in jobs:
                write(path, packed, metadata)
        except BaseException as e:  # kept for the training thread (NOTE [background snapshots])
            errors.append(e)
        finally:
            jobs_queue.task_done()
