"""The ways of updating an EMA that the benchmark compares, each checked and timed on the same tensors.

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
``limit_fused`` (see :func:`benchmarks.runner.derive_ratios`).

A method is a function from a :class:`Context` (the workload's live tensors)
to a :class:`Runner` (one update per ``step()``, its result in ``ema``); it
raises :class:`Skip` when it cannot run here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Sequence, Tuple

import torch
from torch import nn

import ema_cuda
from ema_cuda import ops
from benchmarks.workloads import Workload

FUSED = "fused"
LIMIT = "limit"
LIMIT_FUSED = "limit_fused"
NAIVE = "sg_loop"
FOREACH = "foreach"


class Skip(Exception):
    """A method that cannot run here (not installed, not on this device, unsupported dtypes)."""


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


def copy_into(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """Resets ``dst`` to ``src`` (every method starts from the same EMA)."""
    with torch.no_grad():
        for d, s in zip(dst, src):
            d.copy_(s)


def sg_update(ema_module: nn.Module, model_module: nn.Module, d: float) -> None:
    """SuperGradients' ``ModelEMA.update`` body, verbatim apart from names.

    Its two ``state_dict()`` calls and a key lookup per entry are part of its cost.
    """
    with torch.no_grad():
        msd = model_module.state_dict()
        for k, ema_v in ema_module.state_dict().items():
            if ema_v.dtype.is_floating_point:
                ema_v.copy_(ema_v * d + (1.0 - d) * msd[k].detach())


def m_sg_loop(ctx: Context) -> Runner:
    d, ema_module, model_module = ctx.decay, ctx.ema_module, ctx.model_module
    return Runner(lambda: sg_update(ema_module, model_module, d), ctx.ema)


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
    copy_into(ema, ctx.ema0)
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
    copy_into(ema, ctx.ema0)
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


def model_ema_class() -> Tuple[Any, str]:
    """``(ema_cuda.ModelEMA, "")``, or ``(None, why)`` when it does not import."""
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
    cls, why = model_ema_class()
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
    copy_into(ema, ctx.ema0)
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
    copy_into(ctx.ema, ctx.ema0)
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
    """A row of the tables: its key (``--methods``), its label and the function that prepares it."""

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
OURS = {m.key for m in METHODS if m.ours}
DEFAULT_METHOD_KEYS = tuple(m.key for m in METHODS if m.default)
# The rows that measure the memory limit rather than a way to update an EMA.
LIMIT_KEYS = (LIMIT, LIMIT_FUSED)
