"""Times one EMA update of a model's weights, fused vs the ways people do it today.

``python -m benchmarks.bench_ema`` (what ``make bench`` runs) times, for every
workload of :mod:`benchmarks.workloads`, in one process and on the same
tensors:

=================  ==========================================================
``sg_loop``        SuperGradients' update: for every floating ``state_dict``
                   entry, ``ema.copy_(ema * d + (1 - d) * p)``
``mul_add``        ``ema.mul_(d).add_(p, alpha=1 - d)`` per tensor
``lerp_loop``      ``ema.lerp_(p, 1 - d)`` per tensor (model cast first when
                   the dtypes differ: ``lerp_`` needs one dtype)
``foreach``        ``torch._foreach_lerp_(ema, model, 1 - d)``; with a bf16
                   model, cast the model to fp32 and then ``_foreach_lerp_``
                   ("cast+foreach")
``averaged_model`` ``torch.optim.swa_utils.AveragedModel`` with
                   ``get_ema_multi_avg_fn(d)``, ``update_parameters``
``timm_v3``        timm's ``ModelEmaV3.update`` (only when timm imports)
``fused_list``     ``ema_cuda.ema_update_(ema, model, d)`` (lists through the
                   dispatcher every call)
``fused``          ``ema_cuda.FusedUpdater(ema, model).update(d)``: the hot
                   path; every "fused vs" ratio refers to this row
``model_ema``      ``ema_cuda.ModelEMA.update`` (only when it imports)
``cuda_graph``     CUDA only: replay of a CUDA graph holding ``fused`` with a
                   0-dim decay tensor
``limit``          the same bytes moved by one op over one flat buffer: on the
                   CPU ``flat_ema.lerp_(flat_model, 1 - d)`` (with a bf16
                   model, an fp32 ``lerp_`` over as many bytes: ``lerp_``
                   rejects mixed dtypes and torch's mixed-dtype ``add_`` is
                   far slower than memory); on CUDA a device-to-device copy
                   whose reads plus writes equal the update's
``limit_fused``    CPU only: the fused op over one flat buffer per side, in
                   the workload's dtypes (the update's own mix of reads and
                   writes, no jumps between tensors)
=================  ==========================================================

``mul_add`` and ``lerp_loop`` run only when named (``--methods all``).  The
limit of a workload is the fastest block of the faster of ``limit`` and
``limit_fused``: a bound on what the memory did during the run, so that "%
of limit" stays at or below 100% (a flat fp32 ``lerp_`` alone was beaten by
the fused update of a bf16 model, which reads 6 bytes per 4 written where
the ``lerp_`` reads 8).

Protocol.  Every method first makes one update from the same random start
and its result is compared with an fp64 reference; a method that gives a
wrong answer is reported as WRONG and not timed.  Then each method is warmed
up and timed in blocks of updates (``torch.utils.benchmark`` on all threads
on the CPU, CUDA events on a GPU), one block of every method per round over
``--repeats`` rounds in rotating order, and the median block is reported:
interleaving makes a burst of load from elsewhere on the machine hit all
methods alike, so the ratios of one run stay comparable.
GB/s counts the bytes one update must move (12 per element for fp32/fp32,
10 for an fp32 EMA of a bf16 model).  On CUDA the profiler also counts the
kernel launches per update of every method.  At the end, an end-to-end run
measures the share of a small CNN's SGD training step spent in the EMA
update, SG loop vs fused.

Prints one compact table per workload, the busy-CPU scenario (see
:mod:`benchmarks.busy`), the end-to-end share and the goals: under 80 lines.
Writes ``<device>-<date>.json``, the full markdown tables (``.md``) and a bar
plot per workload (``.png``, when matplotlib is installed) to
``benchmarks/results/latest/``, which git ignores; the reference run that
RESULTS.md cites is written with ``--out benchmarks/results``.  ``--quick``
runs three reduced workloads in seconds (for checking that everything works,
not for figures).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import ema_cuda
from ema_cuda import ops
from benchmarks.workloads import WORKLOAD_NAMES, Workload, get_workload, make_tensors

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FUSED = "fused"
LIMIT = "limit"
LIMIT_FUSED = "limit_fused"
NAIVE = "sg_loop"
FOREACH = "foreach"

# Default check tolerance for an fp32 result (torch.testing's fp32 defaults).
# A method that ignores the update, swaps decay and 1 - decay, or rounds
# through 16-bit floats misses it by orders of magnitude at decay 0.999.
_TOLERANCES = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (1e-3, 1e-5),
}


class Skip(Exception):
    """A method that cannot run here (not installed, not on this device, unsupported dtypes)."""


# --------------------------------------------------------------------------- methods


@dataclass
class Context:
    """What a method gets: the workload's live tensors and a module around them."""

    workload: Workload
    device: torch.device
    decay: float
    ema: List[torch.Tensor]  # separately allocated, reset to ema0 before each method
    model: List[torch.Tensor]
    ema0: List[torch.Tensor]  # the starting EMA, for methods that own their EMA copy
    model_module: nn.Module
    ema_module: nn.Module
    reference: List[torch.Tensor] = field(default_factory=list)  # one update from ema0, in fp64


@dataclass
class Runner:
    """A prepared method: ``step()`` makes one update; the result is in ``ema``."""

    step: Callable[[], None]
    ema: List[torch.Tensor]
    note: str = ""
    check: bool = True  # False for the limit, which does not update the workload's tensors


class ParamModule(nn.Module):
    """A module whose parameters are exactly the given tensors (no copy)."""

    def __init__(self, tensors: Sequence[torch.Tensor], requires_grad: bool):
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(t, requires_grad=requires_grad) for t in tensors])


def _load(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for d, s in zip(dst, src):
            d.copy_(s)


def m_sg_loop(ctx: Context) -> Runner:
    # SuperGradients' ModelEMA.update body, verbatim apart from names: two
    # state_dict() calls and a key lookup per entry are part of its cost.
    d = ctx.decay
    ema_module, model_module = ctx.ema_module, ctx.model_module

    def step():
        with torch.no_grad():
            msd = model_module.state_dict()
            for k, ema_v in ema_module.state_dict().items():
                if ema_v.dtype.is_floating_point:
                    ema_v.copy_(ema_v * d + (1.0 - d) * msd[k].detach())

    return Runner(step, ctx.ema)


def m_mul_add(ctx: Context) -> Runner:
    d, w = ctx.decay, 1.0 - ctx.decay
    pairs = list(zip(ctx.ema, ctx.model))

    def step():
        with torch.no_grad():
            for e, p in pairs:
                e.mul_(d).add_(p, alpha=w)

    return Runner(step, ctx.ema)


def m_lerp_loop(ctx: Context) -> Runner:
    w = 1.0 - ctx.decay
    pairs = list(zip(ctx.ema, ctx.model))
    if ctx.workload.mixed:

        def step():
            with torch.no_grad():
                for e, p in pairs:
                    e.lerp_(p.to(e.dtype), w)

        return Runner(step, ctx.ema, note="model cast per tensor")

    def step():
        with torch.no_grad():
            for e, p in pairs:
                e.lerp_(p, w)

    return Runner(step, ctx.ema)


def m_foreach(ctx: Context) -> Runner:
    w = 1.0 - ctx.decay
    ema, model = ctx.ema, ctx.model
    if ctx.workload.mixed:
        # What one writes today for an fp32 EMA of a bf16 model (and what the
        # pure-PyTorch fallback does): cast, then one foreach call.
        def step():
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.to(e.dtype) for e, p in zip(ema, model)], w)

        return Runner(step, ema, note="cast+foreach")

    def step():
        with torch.no_grad():
            torch._foreach_lerp_(ema, model, w)

    return Runner(step, ema)


def m_averaged_model(ctx: Context) -> Runner:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    avg = AveragedModel(ctx.model_module, multi_avg_fn=get_ema_multi_avg_fn(ctx.decay))
    avg.requires_grad_(False)
    if ctx.workload.mixed:
        avg.to(ctx.workload.ema_dtype)
    ema = list(avg.module.parameters())
    _load(ema, ctx.ema0)
    # n_averaged == 0 would make the first call a copy of the model.
    avg.n_averaged.fill_(1)
    model_module = ctx.model_module

    def step():
        with torch.no_grad():
            avg.update_parameters(model_module)

    return Runner(step, ema)


def m_timm_v3(ctx: Context) -> Runner:
    try:
        from timm.utils.model_ema import ModelEmaV3
    except ImportError as exc:
        raise Skip(f"timm not installed ({exc.msg})") from None
    ema_obj = ModelEmaV3(ctx.model_module, decay=ctx.decay)
    if ctx.workload.mixed:
        ema_obj.module.to(ctx.workload.ema_dtype)
    ema = list(ema_obj.module.parameters())
    _load(ema, ctx.ema0)
    model_module = ctx.model_module

    def step():
        with torch.no_grad():
            ema_obj.update(model_module)

    return Runner(step, ema)


def m_fused_list(ctx: Context) -> Runner:
    ema, model, d = ctx.ema, ctx.model, ctx.decay
    return Runner(lambda: ema_cuda.ema_update_(ema, model, d), ema)


def m_fused(ctx: Context) -> Runner:
    updater = ema_cuda.FusedUpdater(ctx.ema, ctx.model)
    d = ctx.decay
    return Runner(lambda: updater.update(d), ctx.ema)


def _model_ema_class():
    try:
        from ema_cuda import ModelEMA  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"ema_cuda.ModelEMA not available ({exc})"
    return ModelEMA, ""


def _ema_module_of(obj: Any) -> nn.Module:
    for attr in ("ema", "module", "ema_model", "model"):
        m = getattr(obj, attr, None)
        if isinstance(m, nn.Module):
            return m
    raise Skip(f"cannot find the EMA module of {type(obj).__name__}")


def m_model_ema(ctx: Context) -> Runner:
    cls, why = _model_ema_class()
    if cls is None:
        raise Skip(why)
    # An fp32 EMA of a bf16 model is asked for explicitly (ModelEMA keeps the
    # model's dtype by default).
    extra = {"ema_dtype": ctx.workload.ema_dtype} if ctx.workload.mixed else {}
    obj = cls.from_params(ctx.model_module, decay=ctx.decay, decay_type="constant", **extra)
    ema = list(_ema_module_of(obj).parameters())
    dtypes = {t.dtype for t in ema}
    if dtypes != {ctx.workload.ema_dtype}:
        raise Skip(
            f"ModelEMA keeps its EMA in {', '.join(sorted(map(str, dtypes)))}, "
            f"not {ctx.workload.ema_dtype}"
        )
    _load(ema, ctx.ema0)
    model_module = ctx.model_module
    counter = [0]

    def step():
        counter[0] += 1
        obj.update(model_module, counter[0], 10**9)

    return Runner(step, ema)


def m_cuda_graph(ctx: Context) -> Runner:
    if ctx.device.type != "cuda":
        raise Skip("CUDA only")
    if not ops.cuda_kernel_available():
        raise Skip("ema_cuda was built without the CUDA kernel")
    updater = ema_cuda.FusedUpdater(ctx.ema, ctx.model)
    decay = torch.tensor(ctx.decay, dtype=torch.float32, device=ctx.device)
    # Warm-up outside the capture builds the plan (its host-to-device copy
    # cannot be captured); the reset below then restores the start.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        updater.update(decay)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        updater.update(decay)
    _load(ctx.ema, ctx.ema0)
    torch.cuda.synchronize()
    return Runner(graph.replay, ctx.ema, note="fused, 0-dim decay tensor")


def m_limit(ctx: Context) -> Runner:
    wl = ctx.workload
    n, dev = wl.numel, ctx.device
    w = 1.0 - ctx.decay
    if dev.type == "cuda":
        # A copy reads and writes its size: half the update's bytes each way.
        half = wl.bytes_per_update // 2
        src = torch.randint(0, 255, (half,), dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        return Runner(lambda: dst.copy_(src), [], note=f"D2D copy of {half / 1e9:.2f} GB", check=False)
    if wl.ema_dtype == wl.model_dtype:
        flat_e = torch.randn(n, device=dev).to(wl.ema_dtype)
        flat_m = torch.randn(n, device=dev).to(wl.model_dtype)
        return Runner(lambda: flat_e.lerp_(flat_m, w), [], note="flat lerp_", check=False)
    # lerp_ takes one dtype, and TensorIterator's mixed-dtype kernels (e.g.
    # fp32.add_(bf16, alpha=w)) run a slow converting loop, far from any
    # limit.  The same bytes moved by an fp32 lerp_ is the bound instead.
    n32 = wl.bytes_per_update // 12
    flat_e = torch.randn(n32, device=dev)
    flat_m = torch.randn(n32, device=dev)
    return Runner(lambda: flat_e.lerp_(flat_m, w), [], note="flat fp32 lerp_ of the same bytes", check=False)


def m_limit_fused(ctx: Context) -> Runner:
    # The update itself over one flat buffer per side, in the workload's
    # dtypes: its bytes with the update's own mix of reads and writes (an fp32
    # EMA of a bf16 model reads 6 bytes and writes 4 per element, where an
    # fp32 lerp_ reads 8 and writes 4), and no jumps between tensors.
    if ctx.device.type != "cpu":
        raise Skip("CPU only (on CUDA the limit is a copy)")
    wl = ctx.workload
    flat_e = torch.randn(wl.numel, device=ctx.device).to(wl.ema_dtype)
    flat_m = torch.randn(wl.numel, device=ctx.device).to(wl.model_dtype)
    updater = ema_cuda.FusedUpdater([flat_e], [flat_m])
    d = ctx.decay
    return Runner(lambda: updater.update(d), [], note="fused over one flat buffer", check=False)


@dataclass
class Method:
    key: str
    label: str
    make: Callable[[Context], Runner]
    ours: bool = False
    default: bool = True  # run unless --methods names the methods


METHODS: List[Method] = [
    Method("sg_loop", "SG loop", m_sg_loop),
    Method("mul_add", "mul_+add_ loop", m_mul_add, default=False),
    Method("lerp_loop", "lerp_ loop", m_lerp_loop, default=False),
    Method("foreach", "torch._foreach_lerp_", m_foreach),
    Method("averaged_model", "AveragedModel", m_averaged_model),
    Method("timm_v3", "timm ModelEmaV3", m_timm_v3),
    Method("fused_list", "ema_update_ (lists)", m_fused_list, ours=True),
    Method(FUSED, "FusedUpdater.update", m_fused, ours=True),
    Method("model_ema", "ModelEMA.update", m_model_ema, ours=True),
    Method("cuda_graph", "fused, CUDA graph", m_cuda_graph, ours=True),
    Method(LIMIT, "flat lerp_", m_limit),
    Method(LIMIT_FUSED, "fused, one flat buffer", m_limit_fused),
]
METHOD_KEYS = tuple(m.key for m in METHODS)
_OURS = {m.key for m in METHODS if m.ours}
DEFAULT_METHOD_KEYS = tuple(m.key for m in METHODS if m.default)
# The rows that measure the memory limit rather than a way to update an EMA.
LIMIT_KEYS = (LIMIT, LIMIT_FUSED)


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BlockTimer:
    """Times blocks of ``number`` calls of one method: the unit of the interleaved rounds.

    On the CPU a ``torch.utils.benchmark.Timer`` on all of torch's threads
    (its default is one thread), whose ``blocked_autorange`` also warms up
    and picks ``number`` so that the timer's overhead stays below 0.1%; on
    CUDA, events around the block (the host only waits at the block's end).
    """

    def __init__(self, step: Callable[[], None], device: torch.device, block_time: float):
        self.step, self.device = step, device
        if device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            for _ in range(3):
                step()
            self.number = 1
            while True:  # double until a block lasts block_time (at least ~1 ms)
                t = self.block()
                if t >= max(block_time, 1e-3) or self.number >= 1 << 14:
                    break
                self.number *= 2
        else:
            from torch.utils.benchmark import Timer

            self._timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
            step()  # first-touch page faults, allocator, thread pool
            m = self._timer.blocked_autorange(min_run_time=block_time)
            per_call = m.median
            self.number = max(m.number_per_run, int(block_time / per_call) if per_call > 0 else 1)

    def block(self) -> float:
        """Seconds per call, averaged over one block."""
        if self.device.type == "cuda":
            self._start.record()
            for _ in range(self.number):
                self.step()
            self._end.record()
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3 / self.number
        return self._timer.timeit(self.number).raw_times[0] / self.number


def count_cuda_launches(step: Callable[[], None], device: torch.device, calls: int = 5) -> Dict[str, float]:
    """Kernel launches (host-side launch API calls) and GPU activities per update."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize(device)
    launch_apis = re.compile(r"^(cuda|cu)(LaunchKernel|LaunchKernelExC|LaunchCooperativeKernel|GraphLaunch|MemcpyAsync|MemsetAsync)")
    launches = gpu_ops = 0
    for ev in prof.events():
        if ev.device_type == DeviceType.CUDA:
            gpu_ops += 1
        elif launch_apis.match(ev.name):
            launches += 1
    return {"launches": launches / calls, "gpu_ops": gpu_ops / calls}


# --------------------------------------------------------------------------- checking


def reference_update(ema0: Sequence[torch.Tensor], model: Sequence[torch.Tensor], d: float) -> List[torch.Tensor]:
    """``ema0 * d + model * (1 - d)`` in fp64."""
    with torch.no_grad():
        return [e.double() * d + m.double() * (1.0 - d) for e, m in zip(ema0, model)]


def check_result(result: Sequence[torch.Tensor], ctx: Context) -> Tuple[bool, float, str]:
    """Compares one update's result with the fp64 reference; returns (ok, max abs error, first mismatch)."""
    if not ctx.reference:
        ctx.reference = reference_update(ctx.ema0, ctx.model, ctx.decay)
    with torch.no_grad():
        return _compare(result, ctx.reference)


def _compare(result: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> Tuple[bool, float, str]:
    worst, msg = 0.0, ""
    if len(result) != len(reference):
        return False, math.inf, f"{len(result)} result tensors for {len(reference)} parameters"
    for i, (r, ref) in enumerate(zip(result, reference)):
        if r.shape != ref.shape:
            return False, math.inf, f"tensor {i}: shape {list(r.shape)}, expected {list(ref.shape)}"
        err = (r.double() - ref).abs()
        rtol, atol = _TOLERANCES.get(r.dtype, (1.3e-6, 1e-5))
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


# --------------------------------------------------------------------------- running


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


def _as_module(tensors: Sequence[torch.Tensor], requires_grad: bool) -> nn.Module:
    return ParamModule(tensors, requires_grad)


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
    ema, model = make_tensors(wl, device, seed)
    ema0 = [e.clone() for e in ema]
    # The model's parameters require grad, as in training (every method runs
    # under no_grad); the EMA's never do.
    model_module = _as_module(model, requires_grad=True)
    model = list(model_module.parameters())
    ema_module = _as_module(ema, requires_grad=False)
    ema = list(ema_module.parameters())
    ctx = Context(wl, device, decay, ema, model, ema0, model_module, ema_module)
    log(
        f"\n## {wl.name}: {wl.description} ({wl.num_tensors:,} tensors, {wl.numel / 1e6:.1f}M elements, "
        f"{wl.dtype_label()}, {wl.bytes_per_update / 1e9:.2f} GB per update; set-up {time.perf_counter() - t0:.1f} s)"
    )

    results: Dict[str, MethodResult] = {}
    runners: Dict[str, Runner] = {}

    def fail(res: MethodResult, exc: Exception) -> None:
        res.status, res.detail = "error", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        log(f"  {res.label:<22} ERROR: {res.detail}")
        if os.environ.get("EMA_BENCH_TRACEBACK"):
            traceback.print_exc()
        runners.pop(res.key, None)

    # 1. Build and check every method from the same start.
    for meth in methods:
        res = results[meth.key] = MethodResult(meth.key, meth.label, "ok")
        _load(ctx.ema, ctx.ema0)
        _sync(device)
        try:
            runner = meth.make(ctx)
            res.note = runner.note
            if runner.check:
                runner.step()
                _sync(device)
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
            fail(res, exc)
    # The start and the fp64 reference are no longer needed: give the memory back.
    ctx.ema0, ctx.reference = [], []

    # 2. Warm up and size one block per method.
    block_time = min_time / max(1, repeats)
    timers: Dict[str, BlockTimer] = {}
    for key in list(runners):
        try:
            timers[key] = BlockTimer(runners[key].step, device, block_time)
        except Exception as exc:
            fail(results[key], exc)

    # 3. Interleaved rounds: one block of every method per round, the order
    # rotated each round, so that a burst of load from elsewhere on the
    # machine lands on all methods alike instead of on whichever was running.
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
                fail(results[key], exc)
                timers.pop(key)
            spent += time.perf_counter() - t1

    # 4. Launch counts (CUDA), statistics.
    for key, timer in timers.items():
        res = results[key]
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
            f"  {res.label:<22} {_fmt_time(res.median_s):>10}  {res.gb_s:7.1f} GB/s"
            f"  (min {_fmt_time(res.min_s)}, {len(res.times_s)} blocks of {timer.number}){extra}"
        )
    timers.clear()
    runners.clear()
    limit = _derive(results)
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


def _derive(results: Dict[str, MethodResult]) -> Dict[str, Any]:
    """Ratios of every timed method; returns the limit used (``limit_s``, ``limit_key``).

    The limit is the fastest block of the faster limit row: a bound on what
    the memory system did during the run, so that a method's median lands
    at or below 100% of it.  Two rows, because either alone has been beaten:
    the flat ``lerp_`` of an fp32 EMA of a bf16 model moves the same bytes
    with more reads per write than the update (102% in the runs of
    2026-12-01), and the fused op over one flat buffer is the
    implementation's own best case, not the machine's.
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


# --------------------------------------------------------------------------- end to end


class SmallCNN(nn.Module):
    """A CIFAR-sized CNN (~4.5M parameters, BN buffers included) for the end-to-end run."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128 * 8 * 8, 512), nn.ReLU(), nn.Linear(512, classes))

    def forward(self, x):
        return self.head(self.features(x))


def run_end_to_end(
    device: torch.device,
    steps: int,
    batch: int,
    decay: float,
    log: Callable[[str], None] = print,
    model_fn: Callable[[], nn.Module] = SmallCNN,
) -> Dict[str, Any]:
    """Share of an SGD training step spent in the EMA update: none vs SG loop vs fused.

    ``model_fn`` builds the model (input ``[batch, 3, 32, 32]``, 10 classes).
    """
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    out: Dict[str, Any] = {"model": getattr(model_fn, "__name__", "model"), "batch": batch, "steps": steps,
                           "variants": {}}
    warmup = min(3, steps)

    def make_sg(model, ema_model):
        def update():
            with torch.no_grad():
                msd = model.state_dict()
                for k, ema_v in ema_model.state_dict().items():
                    if ema_v.dtype.is_floating_point:
                        ema_v.copy_(ema_v * decay + (1.0 - decay) * msd[k].detach())
        return update

    def make_fused(model, ema_model):
        msd = model.state_dict(keep_vars=True)
        pairs = [(v, msd[k]) for k, v in ema_model.state_dict(keep_vars=True).items() if v.dtype.is_floating_point]
        updater = ema_cuda.FusedUpdater([e for e, _ in pairs], [m.detach() for _, m in pairs])
        return lambda: updater.update(decay)

    def make_model_ema(model, ema_model):
        cls, why = _model_ema_class()
        if cls is None:
            raise Skip(why)
        obj = cls.from_params(model, decay=decay, decay_type="constant")
        counter = [0]

        def update():
            counter[0] += 1
            obj.update(model, counter[0], 10**9)
        return update

    variants = [("none", "no EMA", None), ("sg_loop", "SG loop", make_sg), (FUSED, "FusedUpdater", make_fused),
                ("model_ema", "ModelEMA.update", make_model_ema)]
    live = []
    for key, label, make in variants:
        torch.manual_seed(0)
        model = model_fn().to(device)
        ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        try:
            update = make(model, ema_model) if make else None
        except Skip as exc:
            out["variants"][key] = {"label": label, "status": "skipped", "detail": str(exc)}
            log(f"  {label:<16} skipped: {exc}")
            continue
        live.append((key, label, model, opt, update, [], []))

    # Interleaved, one step of each variant in turn, so that load from
    # elsewhere on the machine falls on all variants alike.
    for i in range(steps + warmup):
        for key, label, model, opt, update, step_times, ema_times in live:
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)
            t1 = time.perf_counter()
            if update is not None:
                update()
                _sync(device)
            t2 = time.perf_counter()
            if i >= warmup:
                step_times.append(t2 - t0)
                ema_times.append(t2 - t1)
    for key, label, model, opt, update, step_times, ema_times in live:
        step = statistics.median(step_times)
        ema_t = statistics.median(ema_times)
        rec = {"label": label, "status": "ok", "step_s": step, "ema_s": ema_t, "ema_share": ema_t / step}
        extra = ""
        if device.type == "cuda" and update is not None:
            # With BatchNorm's integer buffers in the model: the SG loop
            # launches per tensor, the fused update once.
            rec.update(count_cuda_launches(update, device))
            extra = f", {rec['launches']:g} launches"
        out["variants"][key] = rec
        log(f"  {label:<16} step {_fmt_time(step):>10}, EMA {_fmt_time(ema_t):>10} ({100 * ema_t / step:4.1f}% of "
            f"the step){extra}")
    n_params = sum(p.numel() for p in model_fn().state_dict().values() if p.dtype.is_floating_point)
    out["ema_elements"] = n_params
    return out


# --------------------------------------------------------------------------- goals


def evaluate_goals(device: torch.device, workloads: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's targets, met / not met, from this run's figures (None where not measured)."""
    by_name = {w["name"]: w for w in workloads}

    def t(wname: str, key: str, stat: str) -> Optional[float]:
        w = by_name.get(wname)
        if w is None:
            return None
        if key == LIMIT and w.get("limit_s"):
            return w["limit_s"]  # the run's limit (runs before 2026-12-03: the flat lerp_ row)
        r = w["methods"].get(key)
        return r.get(stat) if r and r["status"] == "ok" else None

    def ratio(wname: str, slow: str, fast: str, stat: str = "median_s") -> Optional[float]:
        a, b = t(wname, slow, stat), t(wname, fast, stat)
        return a / b if a and b else None

    goals = []

    def add(name: str, target: float, measured: Optional[float], unit: str = "x", of_mins: Optional[float] = None):
        goals.append(
            {
                "goal": name,
                "target": target,
                "measured": measured,
                "unit": unit,
                "met": None if measured is None else measured >= target,
                # The same ratio from each method's fastest block: what the
                # run shows once bursts of load from elsewhere are set aside.
                "measured_of_mins": of_mins,
            }
        )

    def add_ratio(name: str, target: float, wname: str, slow: str, fast: str):
        add(name, target, ratio(wname, slow, fast), of_mins=ratio(wname, slow, fast, "min_s"))

    if device.type == "cpu":
        for wname in ("resnet50", "vit_b16"):
            add_ratio(f"fused >= 0.9x flat-buffer limit on {wname}", 0.9, wname, LIMIT, FUSED)
        add_ratio("fused >= 3x _foreach_lerp_ on 10k x 1k", 3.0, "small", "foreach", FUSED)
        add_ratio("fused >= 3x SG loop on ResNet-50", 3.0, "resnet50", "sg_loop", FUSED)
        add_ratio("bf16 model + fp32 EMA: fused >= 3x cast+foreach", 3.0, "vit_b16_bf16", "foreach", FUSED)
    else:
        launches = [
            w["methods"][FUSED].get("launches")
            for w in workloads
            if w["methods"].get(FUSED, {}).get("launches") is not None
        ]
        goals.append(
            {
                "goal": "fused: 1 kernel launch per update (every workload)",
                "target": 1,
                "measured": max(launches) if launches else None,
                "unit": "launches",
                "met": None if not launches else max(launches) <= 1,
            }
        )
        big = [w for w in workloads if w["elements"] >= 100e6 and not (w["ema_dtype"] != w["model_dtype"])]
        fracs = [ratio(w["name"], LIMIT, FUSED) for w in big]
        fracs = [f for f in fracs if f is not None]
        add("fused >= 90% of copy bandwidth at 100M+ parameters (worst workload)", 0.9,
            min(fracs) if fracs else None)
        add_ratio("fused >= 5x _foreach_lerp_ on 10k x 1k", 5.0, "small", "foreach", FUSED)
        add_ratio("bf16 model + fp32 EMA: fused >= 1.6x cast+foreach", 1.6, "vit_b16_bf16", "foreach", FUSED)
    return goals


# --------------------------------------------------------------------------- reporting


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt_x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _cell(r: Dict[str, Any]) -> str:
    if r is None:
        return "-"
    if r["status"] == "ok":
        return _fmt_time(r["median_s"])
    return r["status"]


def summary_table(workloads: List[Dict[str, Any]]) -> str:
    lines = [
        "| workload | tensors | elements | dtypes | naive (SG loop) | foreach | fused | fused vs naive "
        "| fused vs foreach | % of limit |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w in workloads:
        m = w["methods"]
        fused = m.get(FUSED)
        dt = w["ema_dtype"].replace("torch.", "")
        if w["model_dtype"] != w["ema_dtype"]:
            dt = f"{dt} EMA, {w['model_dtype'].replace('torch.', '')} model"
        lines.append(
            f"| {w['name']} | {w['tensors']:,} | {w['elements'] / 1e6:.1f}M | {dt} | {_cell(m.get('sg_loop'))} "
            f"| {_cell(m.get('foreach'))} | {_cell(fused)} "
            f"| {_fmt_x((m.get('sg_loop') or {}).get('fused_speedup'))} "
            f"| {_fmt_x((m.get('foreach') or {}).get('fused_speedup'))} "
            f"| {'-' if not fused or fused.get('pct_of_limit') is None else format(fused['pct_of_limit'], '.0f') + '%'} |"
        )
    return "\n".join(lines)


def detail_table(w: Dict[str, Any], cuda: bool) -> str:
    head = "| method | median | min | GB/s | fused is x faster | % of limit | check |"
    sep = "|---|---:|---:|---:|---:|---:|---|"
    if cuda:
        head += " launches / update |"
        sep += "---:|"
    lines = [f"**{w['name']}**: {w['description']}", "", head, sep]
    for r in w["methods"].values():
        label = r["label"] + (f" ({r['note']})" if r.get("note") else "")
        if r["status"] == "ok":
            check = "n/a" if r["key"] in LIMIT_KEYS else "ok"
            row = (
                f"| {label} | {_fmt_time(r['median_s'])} | {_fmt_time(r.get('min_s'))} | {r['gb_s']:.1f} "
                f"| {_fmt_x(r['fused_speedup'])} "
                f"| {'-' if r.get('pct_of_limit') is None else format(r['pct_of_limit'], '.0f') + '%'} | {check} |"
            )
        else:
            detail = (r.get("detail") or "").replace("|", "/")
            row = f"| {label} | {r['status']} | - | - | - | - | {detail} |"
        if cuda:
            row += f" {'-' if r.get('launches') is None else format(r['launches'], 'g')} |"
        lines.append(row)
    return "\n".join(lines)


def _dtypes(w: Dict[str, Any]) -> str:
    e, m = (w[k].replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16") for k in ("ema_dtype", "model_dtype"))
    return e if e == m else f"{e} EMA of a {m} model"


def workload_table(w: Dict[str, Any]) -> str:
    """The compact plain-text table of one workload: methods as rows, the limit named in the title."""
    limit = "no limit measured"
    if w.get("limit_s"):
        limit = (f"limit {_fmt_time(w['limit_s'])} = {w['bytes_per_update'] / w['limit_s'] / 1e9:.1f} GB/s "
                 f"({w['limit_label']})")
    lines = [f"{w['name']}: {w['tensors']:,} tensors, {w['elements'] / 1e6:.1f}M, {_dtypes(w)}; {limit}"]
    for r in w["methods"].values():
        if r["key"] in LIMIT_KEYS:
            continue
        label = "cast + _foreach_lerp_" if r.get("note") == "cast+foreach" else r["label"]
        if r["status"] != "ok":
            lines.append(f"  {label:<30} {r['status']}: {(r.get('detail') or '')[:60]}")
            continue
        pct = r.get("pct_of_limit")
        lines.append(
            f"  {label:<30} {_fmt_time(r['median_s']):>9} {_fmt_x(r.get('x_naive')):>8} "
            f"{_fmt_x(r.get('x_foreach')):>9} {'-' if pct is None else f'{pct:.0f}%':>6}"
        )
    return "\n".join(lines)


COMPACT_HEADER = f"  {'method':<30} {'time':>9} {'x naive':>8} {'x foreach':>9} {'%limit':>6}"


def goals_lines(goals: List[Dict[str, Any]]) -> List[str]:
    out = []
    for g in goals:
        if g["measured"] is None:
            out.append(f"  {g['goal']}: not measured")
            continue
        meas = f"{g['measured']:.2f}x" if g["unit"] == "x" else f"{g['measured']:.2f} {g['unit']}"
        out.append(f"  {g['goal']}: {meas} ({'met' if g['met'] else 'not met'})")
    return out


def goals_table(goals: List[Dict[str, Any]]) -> str:
    lines = [
        "| goal | measured (medians) | met | same ratio from fastest blocks |",
        "|---|---:|---|---:|",
    ]
    for g in goals:
        mins = g.get("measured_of_mins")
        mins = "-" if mins is None else f"{mins:.2f}x"
        if g["measured"] is None:
            meas, met = "not measured", "-"
        else:
            meas = f"{g['measured']:.2f} {g['unit']}" if g["unit"] != "x" else f"{g['measured']:.2f}x"
            met = "met" if g["met"] else f"**not met** ({g['measured'] / g['target']:.0%} of target)"
        lines.append(f"| {g['goal']} | {meas} | {met} | {mins} |")
    return "\n".join(lines)


def e2e_table(e2e: Dict[str, Any]) -> str:
    lines = [
        f"{e2e['model']} ({e2e['ema_elements'] / 1e6:.2f}M EMA elements incl. BN buffers), batch {e2e['batch']}, "
        f"SGD with momentum, median of {e2e['steps']} steps",
        "",
    ]
    # Launches per EMA update: counted on CUDA only.
    launches = any(v.get("launches") is not None for v in e2e["variants"].values())
    head, rule = "| EMA | step (train + EMA) | EMA update | EMA share of step |", "|---|---:|---:|---:|"
    lines += [head + (" launches / EMA update |" if launches else ""), rule + ("---:|" if launches else "")]
    for v in e2e["variants"].values():
        if v["status"] != "ok":
            row = f"| {v['label']} | {v['status']} | - | {v.get('detail', '')} |" + (" - |" if launches else "")
        else:
            row = f"| {v['label']} | {_fmt_time(v['step_s'])} | {_fmt_time(v['ema_s'])} | {100 * v['ema_share']:.1f}% |"
            if launches:
                row += f" {'-' if v.get('launches') is None else format(v['launches'], 'g')} |"
        lines.append(row)
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: Path) -> Optional[str]:
    """One bar chart per workload (each method's % of the limit, its time as label); returns why not, if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    wls = result["workloads"]
    cols = min(3, len(wls)) or 1
    rows = (len(wls) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.3 * rows), squeeze=False)
    for ax, w in zip(axes.flat, wls):
        rs = [r for r in w["methods"].values() if r["status"] == "ok" and r["key"] not in LIMIT_KEYS]
        # Runs before 2026-12-03 saved no limit_s: their flat lerp_ row's fastest block stands in.
        limit_s = w.get("limit_s") or (w["methods"].get(LIMIT) or {}).get("min_s")
        if not rs or not limit_s:
            ax.set_title(f"{w['name']}: no limit measured", fontsize=8)
            continue
        # Percent of the limit on a linear axis: every bar is comparable with
        # the memory limit (100%), and the label gives the time itself.
        labels = ["cast + _foreach_lerp_" if r.get("note") == "cast+foreach" else r["label"] for r in rs]
        pct = [100.0 * limit_s / r["median_s"] for r in rs]
        colors = ["tab:red" if r["key"] == FUSED else ("tab:orange" if r["key"] in _OURS else "0.6") for r in rs]
        y = list(range(len(rs)))
        ax.barh(y, pct, color=colors)
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(100, color="black", linestyle="--", linewidth=1)
        ax.set_xlim(0, max(105, max(pct) * 1.05))
        for yi, (v, r) in enumerate(zip(pct, rs)):
            ax.text(min(v, 100) + 1, yi, _fmt_time(r["median_s"]), va="center", fontsize=6)
        ax.set_title(f"{w['name']}: {w['tensors']:,} tensors, {w['elements'] / 1e6:.1f}M, "
                     f"{_dtypes(w)}", fontsize=8)
        ax.set_xlabel(f"% of the limit ({_fmt_time(limit_s)}, dashed); labels: median time", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(wls):]:
        ax.axis("off")
    meta = result["meta"]
    fig.suptitle(f"EMA update, one step: {meta['device_name']}, torch {meta['torch']}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _wrong(result: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    return [
        (w["name"], r["key"], r["label"])
        for w in result["workloads"]
        for r in w["methods"].values()
        if r["status"] == "wrong"
    ]


def report(result: Dict[str, Any]) -> str:
    """All the markdown tables of a run (also from a saved JSON: ``--from-json``)."""
    meta, workloads = result["meta"], result["workloads"]
    cuda = meta["device"].startswith("cuda")
    load = ""
    if meta.get("loadavg_start") is not None:
        load = f" Load average {meta['loadavg_start']} at the start, {meta.get('loadavg_end')} at the end."
    parts = [
        f"# Results: {meta['device_name']}, torch {meta['torch']}, {meta['date']}",
        "",
        f"ema_cuda {meta.get('ema_cuda')} ({meta.get('backend')} backend), {meta.get('threads')} threads, "
        f"size scale {meta['args'].get('size_scale')}, {meta['args'].get('repeats')} rounds.{load}",
        "",
        summary_table(workloads),
        "",
        "fused = FusedUpdater.update; naive = SG loop; foreach = torch._foreach_lerp_ (cast+foreach for a bf16 "
        "model); % of limit = limit time / fused time. Medians.",
        "",
    ]
    for w in workloads:
        parts += [detail_table(w, cuda), ""]
    if result.get("end_to_end"):
        parts += ["## End to end", "", e2e_table(result["end_to_end"]), ""]
    parts += ["## Goals", ""]
    if meta["args"].get("quick") or meta["args"].get("size_scale") != 1.0 or meta["args"].get("small_count") != 10_000:
        parts += ["Sizes differ from the goals' workloads (--quick, --size-scale or --small-count): indicative only.", ""]
    parts += [goals_table(result["goals"])]
    wrong = _wrong(result)
    if wrong:
        parts += ["", "WRONG RESULTS (not timed): " + "; ".join(f"{lbl} on {wn}" for wn, _, lbl in wrong)]
    return "\n".join(parts)


# --------------------------------------------------------------------------- main


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` ones (their help says what they mean)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_ema",
        description=(
            "Time one EMA update of model weights: ema_cuda's fused op vs the SuperGradients loop, "
            "per-tensor loops, torch._foreach_lerp_, AveragedModel, timm ModelEmaV3 and the "
            "bandwidth limit. Every method is checked against an fp64 reference first."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--workloads", nargs="+", default=None, choices=WORKLOAD_NAMES, metavar="NAME",
        help=f"workloads to run, from: {', '.join(WORKLOAD_NAMES)} (default: all; with --quick: {', '.join(QUICK_WORKLOADS)})",
    )
    p.add_argument(
        "--dtypes", nargs="+", default=None, metavar="EMA[/MODEL]",
        help="run every workload with these dtype pairs instead of its own, e.g. fp32 fp32/bf16 bf16 "
        "(EMA dtype / model dtype; fp32, fp64, bf16, fp16)",
    )
    p.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHOD_KEYS), choices=METHOD_KEYS + ("all",), metavar="NAME",
        help=f"methods to run, from: {', '.join(METHOD_KEYS)}, or all (keep '{FUSED}', '{NAIVE}', '{FOREACH}' "
        f"and the limits '{LIMIT}', '{LIMIT_FUSED}' for the ratios)",
    )
    p.add_argument("--size-scale", type=float, default=None,
                   help="multiply the parameter count of the model and huge workloads, e.g. 12 for a 1.2B-parameter "
                   "GPT-2 (default 1, or 0.05 with --quick)")
    p.add_argument("--small-count", type=int, default=None,
                   help="number of 1,000-element tensors in the 'small' workload (default 10000, 1000 with --quick)")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed blocks per method, taken in interleaved rounds over the methods; medians over blocks")
    p.add_argument("--min-time", type=float, default=0.35,
                   help="seconds of timing per method, split into the blocks (a block holds at least one update)")
    p.add_argument("--decay", type=float, default=0.999, help="EMA decay (does not change the speed)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke run: size scale 0.05, 1000 small tensors, short timing, nothing saved "
                   "unless --out is given")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training-step measurement")
    p.add_argument("--no-busy", action="store_true",
                   help="skip the busy-CPU scenario (foreach / ema_update_ / FusedUpdater on small and resnet50 at "
                   "1 and 2 threads, quiet and beside one spinning process)")
    p.add_argument("--verbose", action="store_true", help="also print every method's timing as it is measured")
    p.add_argument("--e2e-steps", type=int, default=20, help="timed training steps per end-to-end variant")
    p.add_argument("--e2e-batch", type=int, default=64, help="batch size of the end-to-end training step")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the JSON, the full markdown report and the PNG (default: "
                   "benchmarks/results/latest, which git ignores; the reference run RESULTS.md cites is written "
                   "with --out benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="print only; write no files")
    p.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                   help="run nothing: print the tables of a saved result (and redraw its plot next to it)")
    args = p.parse_args(argv)
    # --quick checks that every part runs (seconds, for the smoke test), so
    # it keeps one workload of each kind and sizes where the slow loops
    # (the SG loop at 0.6 s per update on a full GPT-2) take milliseconds.
    if args.workloads is None:
        args.workloads = list(QUICK_WORKLOADS if args.quick else WORKLOAD_NAMES)
    if args.size_scale is None:
        args.size_scale = 0.02 if args.quick else 1.0
    if args.small_count is None:
        args.small_count = 300 if args.quick else 10_000
    if "all" in args.methods:
        args.methods = list(METHOD_KEYS)
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.min_time = min(args.min_time, 0.005)
        args.e2e_steps = min(args.e2e_steps, 1)
        args.e2e_batch = min(args.e2e_batch, 8)
        if args.out is None:
            args.no_save = True
    if args.out is None:
        args.out = RESULTS_DIR / "latest"
    return args


QUICK_WORKLOADS = ("resnet50", "small", "vit_b16_bf16")
_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype_pairs(specs: Optional[Sequence[str]]) -> Optional[List[Tuple[torch.dtype, torch.dtype]]]:
    if not specs:
        return None
    pairs = []
    for s in specs:
        parts = s.lower().split("/")
        if len(parts) > 2 or any(p not in _DTYPES for p in parts):
            raise SystemExit(f"--dtypes: cannot parse {s!r}; use EMA or EMA/MODEL from {', '.join(_DTYPES)}")
        pairs.append((_DTYPES[parts[0]], _DTYPES[parts[-1]]))
    return pairs


def build_workloads(args: argparse.Namespace) -> List[Workload]:
    wls = [get_workload(n, args.size_scale, args.small_count) for n in args.workloads]
    pairs = _dtype_pairs(args.dtypes)
    if pairs is None:
        return wls
    out = []
    for w in wls:
        for e, m in pairs:
            v = copy.copy(w)
            v.ema_dtype, v.model_dtype = e, m
            v.name = f"{w.name}[{v.dtype_label().replace(' ', '')}]"
            out.append(v)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        # Goals are re-derived from the timings, so a saved run is judged by today's rules.
        result["goals"] = evaluate_goals(torch.device(result["meta"]["device"]), result["workloads"])
        print(report(result))
        why = plot(result, args.from_json.with_suffix(".png"))
        print(f"\nPlot: {why}; skipped" if why else f"\nWrote {args.from_json.with_suffix('.png')}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to this torch build")
    # CUDA-only rows would only say "skipped" on the CPU.
    methods = [m for m in METHODS if m.key in args.methods and not (m.key == "cuda_graph" and device.type != "cuda")]
    name = device_name(device)
    date = _dt.date.today().isoformat()
    meta = {
        "date": date,
        "datetime": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "ema_cuda": ema_cuda.__version__,
        "backend": ops.backend(),
        "cuda_kernel": ops.cuda_kernel_available(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        # Other processes on the machine disturb the timings: the 1-minute
        # load average before and after the run says how busy it was.
        "loadavg_start": _loadavg(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    print(f"# EMA update benchmark: {name}; torch {torch.__version__}, ema_cuda '{ops.backend()}' backend, {date}"
          + (f", size scale {args.size_scale:g}" if args.size_scale != 1 else ""))
    if ops.backend() != "compiled":
        print(f"WARNING: the fused rows run the pure-PyTorch fallback ({ops.fallback_reason()})")
    if args.quick:
        print("--quick: reduced sizes, mostly cache-resident, and short timing: checks that everything runs; "
              "its figures are not measurements.")
    print("Median time per update. x naive / x foreach: how many times faster than the SG loop / "
          "torch._foreach_lerp_.\n%limit: the limit's time / this time; the limit is the fastest block of the "
          "faster of a flat lerp_ and the fused op over one flat buffer, moving the same bytes.")
    log = print if args.verbose else (lambda *_: None)

    workloads = []
    for i, wl in enumerate(build_workloads(args)):
        w = run_workload(wl, device, methods, args.decay, args.min_time, args.repeats, args.seed, log=log)
        workloads.append(w)
        if i == 0:
            print(COMPACT_HEADER)
        print(workload_table(w), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    busy = None
    if not args.no_busy and device.type == "cpu":
        from benchmarks.busy import BUSY_METHODS, busy_table, run_busy

        names = ["small"] if args.quick else ["small", "resnet50"]
        bwls = [get_workload(n, args.size_scale, args.small_count) for n in names]
        busy = run_busy(bwls, [m for m in METHODS if m.key in BUSY_METHODS], run_workload,
                        min_time=args.min_time, repeats=args.repeats, decay=args.decay)
        print("\nBusy CPU: the same run, quiet and beside one spinning process (a Python busy loop), "
              "medians per update")
        print(busy_table(busy, _fmt_time))

    e2e = None
    if not args.no_e2e:
        e2e = run_end_to_end(device, args.e2e_steps, args.e2e_batch, args.decay, log=log)
        shares = ", ".join(f"{v['label']} {_fmt_time(v['ema_s'])} = {100 * v['ema_share']:.1f}%"
                           for k, v in e2e["variants"].items() if k != "none" and v["status"] == "ok")
        print(f"\nEnd to end: one SGD step of a {e2e['ema_elements'] / 1e6:.1f}M-parameter CNN, batch {e2e['batch']}, "
              f"{_fmt_time(e2e['variants']['none'].get('step_s'))} without EMA; EMA update and its share of the step:"
              f"\n  {shares}")

    goals = evaluate_goals(device, workloads)
    meta["loadavg_end"] = _loadavg()
    result = {"meta": meta, "workloads": workloads, "end_to_end": e2e, "goals": goals, "busy": busy}
    measured = [g for g in goals if g["met"] is not None]
    print(f"\nGoals ({sum(g['met'] for g in measured)} of {len(measured)} met; targets and earlier runs: "
          "benchmarks/RESULTS.md):")
    print("\n".join(goals_lines(goals)))
    wrong = _wrong(result)
    if wrong:
        print("WRONG RESULTS (not timed): " + "; ".join(f"{lbl} on {wn}" for wn, _, lbl in wrong))

    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"{_slug(device.type if device.type == 'cpu' else 'cuda-' + name)}-{date}"
        jpath = args.out / f"{stem}.json"
        jpath.write_text(json.dumps(result, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(report(result) + "\n")
        why = plot(result, args.out / f"{stem}.png")
        print(f"\nWrote {jpath}, the full tables ({stem}.md)" + (f"; plot skipped: {why}" if why else " and the plot"))
    ours = {m.key for m in METHODS if m.ours}
    return 1 if any(key in ours for _, key, _ in wrong) else 0


if __name__ == "__main__":
    sys.exit(main())
