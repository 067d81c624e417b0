"""The "busy CPU" scenario: the same updates timed on a quiet machine and beside a spinning process.

A training job rarely has the CPU to itself: data loader workers, logging
and other jobs take cores.  A parallel region then waits for its slowest
thread, and a thread whose core is taken waits a whole scheduler time slice.
This scenario times ``torch._foreach_lerp_``, the direct op call
``ema_cuda.ema_update_(E, M, d)`` and ``FusedUpdater.update`` at 1 and 2
torch threads, first quiet and then with one busy-looping process started by
the benchmark itself (:class:`Spinner`), in the same run.

The spinner is a separate Python process (``subprocess``, no fork of this
torch process), stopped in a ``finally`` block whatever happens, and it also
ends by itself when its parent is gone (it checks its parent's pid), so an
interrupted or killed benchmark leaves nothing spinning.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Sequence

import torch

from benchmarks.methods import Method
from benchmarks.report import fmt_time
from benchmarks.runner import run_workload
from benchmarks.workloads import Workload

# Spins until its parent (the benchmark) is gone; the inner loop keeps the
# parent check from costing anything measurable.
_SPIN = "import os, sys\nppid = int(sys.argv[1])\nwhile os.getppid() == ppid:\n    for _ in range(200_000): pass\n"


class Spinner:
    """A context manager running one busy-looping process while inside it."""

    def __init__(self, processes: int = 1):
        self.processes = processes
        self.procs: List[subprocess.Popen] = []

    def __enter__(self) -> "Spinner":
        try:
            for _ in range(self.processes):
                self.procs.append(
                    subprocess.Popen([sys.executable, "-c", _SPIN, str(os.getpid())],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                )
            time.sleep(0.2)  # let it reach its loop before anything is timed
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"busy process exited at once (code {p.returncode})")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - kill is not ignorable
                pass
        self.procs = []

    def __exit__(self, *exc) -> None:
        self.stop()


BUSY_METHODS = ("foreach", "fused_list", "fused")


def run_busy(
    workloads: Sequence[Workload],
    methods: Sequence[Method],
    threads: Sequence[int] = (1, 2),
    min_time: float = 0.3,
    repeats: int = 5,
    decay: float = 0.999,
) -> List[Dict[str, Any]]:
    """Times ``methods`` on ``workloads`` at each thread count, quiet then busy; returns one record per case.

    The spinner runs only around the busy measurements, and torch's thread
    count is restored afterwards.
    """
    saved = torch.get_num_threads()
    rows = []
    try:
        for wl in workloads:
            for n in threads:
                torch.set_num_threads(n)
                for state in ("quiet", "busy"):
                    if state == "busy":
                        with Spinner():
                            out = run_workload(wl, torch.device("cpu"), methods, decay, min_time, repeats,
                                               log=lambda *_: None)
                    else:
                        out = run_workload(wl, torch.device("cpu"), methods, decay, min_time, repeats,
                                           log=lambda *_: None)
                    times = {k: r.get("median_s") for k, r in out["methods"].items()}
                    rows.append({"workload": wl.name, "description": wl.description, "threads": n,
                                 "state": state, "median_s": times,
                                 "status": {k: r["status"] for k, r in out["methods"].items()}})
    finally:
        torch.set_num_threads(saved)
    return rows


def busy_table(rows: List[Dict[str, Any]]) -> str:
    """Plain-text table: one line per (workload, threads, quiet/busy)."""
    head = (f"{'workload':<9} {'thr':>3} {'CPU':<5} {'foreach':>9} {'ema_update_':>11} {'FusedUpdater':>12} "
            f"{'fused x foreach':>15}")
    lines = [head]
    for r in rows:
        t = r["median_s"]
        ratio = (t.get("foreach") / t["fused"]) if t.get("foreach") and t.get("fused") else None
        lines.append(
            f"{r['workload']:<9} {r['threads']:>3} {r['state']:<5} {fmt_time(t.get('foreach')):>9} "
            f"{fmt_time(t.get('fused_list')):>11} {fmt_time(t.get('fused')):>12} "
            f"{'-' if ratio is None else f'{ratio:.2f}x':>15}"
        )
    return "\n".join(lines)
