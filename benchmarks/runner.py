"""Checks and times every method on one workload: the benchmark's protocol.

Every method first makes one update from the same random start and its
result is compared with an fp64 reference; a method that gives a wrong
answer is reported as WRONG and not timed.  Then each method is warmed up
and timed in blocks of updates (:class:`benchmarks.timing.BlockTimer`), one
block of every method per round over ``repeats`` rounds in rotating order,
and the median block is reported: interleaving makes a burst of load from
elsewhere on the machine hit all methods alike, so the ratios of one run
stay comparable.  GB/s counts the bytes one update must move (12 per
element for fp32/fp32, 10 for an fp32 EMA of a bf16 model).  On CUDA the
profiler also counts the kernel launches per update of every method.
"""
from __future__ import annotations

import math
import os
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.methods import FOREACH, FUSED, LIMIT_KEYS, NAIVE, Context, Method, ParamModule, Runner, Skip, copy_into
from benchmarks.report import fmt_time
from benchmarks.timing import BlockTimer, count_cuda_launches, sync
from benchmarks.workloads import Workload, make_tensors

# Default check tolerance for an fp32 result (torch.testing's fp32 defaults).
# A method that ignores the update, swaps decay and 1 - decay, or rounds
# through 16-bit floats misses it by orders of magnitude at decay 0.999.
TOLERANCES = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (1e-3, 1e-5),
}


def reference_update(ema0: Sequence[torch.Tensor], model: Sequence[torch.Tensor], d: float) -> List[torch.Tensor]:
    """``ema0 * d + model * (1 - d)`` in fp64."""
    with torch.no_grad():
        return [e.double() * d + m.double() * (1.0 - d) for e, m in zip(ema0, model)]


def check_result(result: Sequence[torch.Tensor], ctx: Context) -> Tuple[bool, float, str]:
    """Compares one update's result with the fp64 reference; returns (ok, max abs error, first mismatch)."""
    if not ctx.reference:
        ctx.reference = reference_update(ctx.ema0, ctx.model, ctx.decay)
    with torch.no_grad():
        return compare(result, ctx.reference)


def compare(result: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> Tuple[bool, float, str]:
    worst, msg = 0.0, ""
    if len(result) != len(reference):
        return False, math.inf, f"{len(result)} result tensors for {len(reference)} parameters"
    for i, (r, ref) in enumerate(zip(result, reference)):
        if r.shape != ref.shape:
            return False, math.inf, f"tensor {i}: shape {list(r.shape)}, expected {list(ref.shape)}"
        err = (r.double() - ref).abs()
        rtol, atol = TOLERANCES.get(r.dtype, (1.3e-6, 1e-5))
        bad = err > atol + rtol * ref.abs()
        if err.numel():
            worst = max(worst, float(err.max()))
        if bool(bad.any()) and not msg:
            j = int(bad.flatten().nonzero()[0])
            msg = (
                f"tensor {i} element {j}: got {float(r.flatten()[j]):.8g}, "
                f"expected {float(ref.flatten()[j]):.8g}"
            )
    return not msg, worst, msg


@dataclass
class MethodResult:
    key: str
    label: str
    status: str  # ok | wrong | skipped | error
    detail: str = ""
    note: str = ""
    times_s: List[float] = field(default_factory=list)
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    max_abs_err: Optional[float] = None
    launches: Optional[float] = None
    gpu_ops: Optional[float] = None
    gb_s: Optional[float] = None
    pct_of_limit: Optional[float] = None
    fused_speedup: Optional[float] = None  # this method's time / fused time
    x_naive: Optional[float] = None  # SG loop time / this method's time
    x_foreach: Optional[float] = None  # foreach time / this method's time

    def to_json(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def run_workload(
    wl: Workload,
    device: torch.device,
    methods: Sequence[Method],
    decay: float = 0.999,
    min_time: float = 0.5,
    repeats: int = 5,
    seed: int = 0,
    log: Callable[[str], None] = print,
    max_time: float = 3.0,
) -> Dict[str, Any]:
    """Checks and times every method on one workload; returns a JSON-ready dict.

    Every method is first checked; then each gets ``repeats`` timed blocks of
    about ``min_time / repeats`` seconds (at least one call), in interleaved
    rounds.  Past 3 rounds, timing stops once the methods have used
    ``max_time`` seconds each on average.
    """
    t0 = time.perf_counter()
    ctx = _context(wl, device, decay, seed)
    log(
        f"\n## {wl.name}: {wl.description} ({wl.num_tensors:,} tensors, {wl.numel / 1e6:.1f}M elements, "
        f"{wl.dtype_label()}, {wl.bytes_per_update / 1e9:.2f} GB per update; set-up {time.perf_counter() - t0:.1f} s)"
    )
    results = {meth.key: MethodResult(meth.key, meth.label, "ok") for meth in methods}
    runners = _build_and_check(ctx, methods, results, log)
    # The start and the fp64 reference are no longer needed: give the memory back.
    ctx.ema0, ctx.reference = [], []

    # Warm up and size one block per method.
    block_time = min_time / max(1, repeats)
    timers: Dict[str, BlockTimer] = {}
    for key, runner in runners.items():
        try:
            timers[key] = BlockTimer(runner.step, device, block_time)
        except Exception as exc:
            _fail(results[key], exc, log)
    runners.clear()
    _interleaved_rounds(timers, results, repeats, max_time, log)
    for key, timer in timers.items():
        _summarise(results[key], timer, wl, device, log)
    timers.clear()
    limit = derive_ratios(results)
    log(f"  ({time.perf_counter() - t0:.1f} s)")
    out = {
        "name": wl.name,
        "description": wl.description,
        "tensors": wl.num_tensors,
        "elements": wl.numel,
        "ema_dtype": str(wl.ema_dtype),
        "model_dtype": str(wl.model_dtype),
        "bytes_per_element": wl.bytes_per_element,
        "bytes_per_update": wl.bytes_per_update,
        "methods": {k: r.to_json() for k, r in results.items()},
        "seconds": time.perf_counter() - t0,
    }
    out.update(limit)
    return out


def _context(wl: Workload, device: torch.device, decay: float, seed: int) -> Context:
    ema, model = make_tensors(wl, device, seed)
    ema0 = [e.clone() for e in ema]
    # The model's parameters require grad, as in training (every method runs
    # under no_grad); the EMA's never do.
    model_module = ParamModule(model, requires_grad=True)
    ema_module = ParamModule(ema, requires_grad=False)
    return Context(wl, device, decay, list(ema_module.parameters()), list(model_module.parameters()), ema0,
                   model_module, ema_module)


def _fail(res: MethodResult, exc: Exception, log: Callable[[str], None]) -> None:
    res.status, res.detail = "error", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    log(f"  {res.label:<22} ERROR: {res.detail}")
    if os.environ.get("EMA_BENCH_TRACEBACK"):
        traceback.print_exc()


def _build_and_check(
    ctx: Context, methods: Sequence[Method], results: Dict[str, MethodResult], log: Callable[[str], None]
) -> Dict[str, Runner]:
    """Builds every method from the same start and checks its first update; returns the ones to time."""
    runners: Dict[str, Runner] = {}
    for meth in methods:
        res = results[meth.key]
        copy_into(ctx.ema, ctx.ema0)
        sync(ctx.device)
        try:
            runner = meth.make(ctx)
            res.note = runner.note
            if runner.check:
                runner.step()
                sync(ctx.device)
                ok, worst, msg = check_result(runner.ema, ctx)
                res.max_abs_err = worst
                if not ok:
                    res.status, res.detail = "wrong", msg
                    log(f"  {meth.label:<22} WRONG RESULT (not timed): {msg}")
                    continue
            runners[meth.key] = runner
        except Skip as exc:
            res.status, res.detail = "skipped", str(exc)
            log(f"  {meth.label:<22} skipped: {exc}")
        except Exception as exc:
            _fail(res, exc, log)
    return runners


def _interleaved_rounds(
    timers: Dict[str, BlockTimer], results: Dict[str, MethodResult], repeats: int, max_time: float,
    log: Callable[[str], None],
) -> None:
    """One block of every method per round, the order rotated each round.

    A burst of load from elsewhere on the machine then lands on all methods
    alike instead of on whichever was running.  A method that fails leaves
    ``timers``.
    """
    keys = list(timers)
    spent = 0.0
    for rnd in range(max(1, repeats)):
        if rnd >= 3 and spent > max_time * len(keys):
            break  # very slow methods (the SG loop at 1B parameters): 3 rounds are enough
        shift = rnd % len(keys) if keys else 0
        for key in keys[shift:] + keys[:shift]:
            if key not in timers:
                continue
            t1 = time.perf_counter()
            try:
                results[key].times_s.append(timers[key].block())
            except Exception as exc:
                _fail(results[key], exc, log)
                timers.pop(key)
            spent += time.perf_counter() - t1


def _summarise(res: MethodResult, timer: BlockTimer, wl: Workload, device: torch.device,
               log: Callable[[str], None]) -> None:
    """Median, fastest block and GB/s of one timed method; on CUDA its launches per update."""
    if device.type == "cuda":
        try:
            res.__dict__.update(count_cuda_launches(timer.step, device))
        except Exception as exc:  # the profiler is optional; keep the timing
            res.detail = f"profiler failed: {exc}"
    res.median_s = statistics.median(res.times_s)
    res.min_s = min(res.times_s)
    res.gb_s = wl.bytes_per_update / res.median_s / 1e9
    extra = f", {res.launches:g} launches" if res.launches is not None else ""
    log(
        f"  {res.label:<22} {fmt_time(res.median_s):>10}  {res.gb_s:7.1f} GB/s"
        f"  (min {fmt_time(res.min_s)}, {len(res.times_s)} blocks of {timer.number}){extra}"
    )


def derive_ratios(results: Dict[str, MethodResult]) -> Dict[str, Any]:
    """Ratios of every timed method; returns the limit used (``limit_s``, ``limit_key``).

    The limit is the fastest block of the faster limit row: a bound on what
    the memory system did during the run, so that a method's median lands
    at or below 100% of it.  Two rows, because either alone has been beaten
    (benchmarks/RESULTS.md): the flat ``lerp_`` standing in for an fp32 EMA
    of a bf16 model moves the same bytes with more reads per write than the
    update, and the fused op over one flat buffer is the implementation's
    own best case, not the machine's.
    """
    fused, naive, foreach = results.get(FUSED), results.get(NAIVE), results.get(FOREACH)
    limits = [results[k] for k in LIMIT_KEYS if k in results and results[k].min_s]
    best = min(limits, key=lambda r: r.min_s) if limits else None
    for r in results.values():
        if r.median_s is None:
            continue
        if fused is not None and fused.median_s:
            r.fused_speedup = r.median_s / fused.median_s
        if naive is not None and naive.median_s:
            r.x_naive = naive.median_s / r.median_s
        if foreach is not None and foreach.median_s:
            r.x_foreach = foreach.median_s / r.median_s
        if best is not None:
            r.pct_of_limit = 100.0 * best.min_s / r.median_s
    if best is None:
        return {"limit_s": None, "limit_key": None, "limit_label": None}
    return {"limit_s": best.min_s, "limit_key": best.key,
            "limit_label": best.note or best.label}
