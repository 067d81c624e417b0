"""The fused EMA op: ``ema[i] = ema[i] * decay + model[i] * (1 - decay)``.

Two backends provide the same ops under ``torch.ops.ema_cuda``:

* ``"compiled"``: the C++/CUDA library ``ema_cuda._C``.  All tensors are updated
  in one kernel launch on CUDA and one parallel region on the CPU, from a
  chunk table cached per list signature.
* ``"fallback"``: pure PyTorch (``torch._foreach_lerp_`` grouped by device and
  dtype pair, casting where dtypes differ).  Used when the compiled library
  is missing (with a warning) or when ``EMA_CUDA_BACKEND=fallback``.

``EMA_CUDA_BACKEND`` may be ``auto`` (default), ``compiled`` (an import error
is raised instead of falling back) or ``fallback``.  :func:`backend` tells
which one is running.
"""
from __future__ import annotations

import math
import operator
import os
import warnings
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "ema_update_",
    "FusedUpdater",
    "backend",
    "cuda_kernel_available",
    "fallback_reason",
    "SUPPORTED_DTYPES",
    "release_captured_plans",
]

OP_NAME = "ema_cuda::ema_update_"
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_BACKEND_ENV = "EMA_CUDA_BACKEND"
_C = None
_fallback_reason: Optional[str] = None


def _why_compiled_library_failed(exc: ImportError) -> str:
    """Why ``ema_cuda._C`` did not import, in plain words, with the command that fixes it.

    The two usual causes: a source checkout that was never built, and a library
    built against another torch release than the one running (pip's default
    build isolation compiles against a freshly downloaded torch; the library
    then fails to load, typically with an undefined symbol).  setup.py records
    the torch it built against in ``ema_cuda/_build_info.py``.
    """
    import importlib.machinery

    package_dir = os.path.dirname(os.path.abspath(__file__))
    # setup.py next to the package: an editable install or a checkout on sys.path.
    source_checkout = os.path.exists(os.path.join(os.path.dirname(package_dir), "setup.py"))
    fix = "pip install --no-build-isolation -e ." if source_checkout else "pip install --no-build-isolation ."
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    built = any(os.path.exists(os.path.join(package_dir, "_C" + suffix)) for suffix in suffixes)
    if not built:
        if source_checkout:
            return (
                f"the compiled extension ema_cuda._C is not built in this source checkout "
                f"({os.path.dirname(package_dir)}); build it there with `{fix}` (or `make build`)"
            )
        return (
            f"this installation has no compiled extension ema_cuda._C ({package_dir}); "
            f"reinstall it from the source tree with `{fix}`"
        )
    try:
        from ema_cuda._build_info import TORCH_VERSION as built_against
    except ImportError:
        built_against = None
    if built_against is not None and built_against != torch.__version__:
        return (
            f"the compiled extension ema_cuda._C was built against torch {built_against}, running torch "
            f"{torch.__version__}, and it only loads with the torch it was built against ({exc}). pip's "
            f"default build isolation builds against a newly downloaded torch instead of the installed one; "
            f"rebuild against the installed torch with `{fix}`"
        )
    return f"the compiled library ema_cuda._C could not be imported ({exc}); rebuild it with `{fix}`"


def _load_backend() -> None:
    global _C, _fallback_reason
    choice = os.environ.get(_BACKEND_ENV, "auto").strip().lower()
    if choice not in ("auto", "compiled", "fallback"):
        raise ValueError(f"{_BACKEND_ENV} must be 'auto', 'compiled' or 'fallback', got {choice!r}")
    if choice != "fallback":
        try:
            from ema_cuda import _C as compiled  # registers torch.ops.ema_cuda.*
        except ImportError as exc:
            reason = _why_compiled_library_failed(exc)
            if choice == "compiled":
                # The reason quotes the loader's message where it tells anything; the
                # chained error would only add "cannot import name '_C' from partially
                # initialized module ... (most likely due to a circular import)".
                raise ImportError(f"{_BACKEND_ENV}=compiled but {reason}") from None
            _fallback_reason = reason
        else:
            _C = compiled
            return
    else:
        _fallback_reason = f"{_BACKEND_ENV}=fallback"
    warnings.warn(
        f"ema_cuda is using its pure-PyTorch fallback because {_fallback_reason}. Updates are correct "
        "but run one launch per tensor group instead of one fused kernel.",
        RuntimeWarning,
        stacklevel=3,
    )
    _define_fallback_ops()


def backend() -> str:
    """``"compiled"`` when the C++/CUDA library is in use, else ``"fallback"``."""
    return "compiled" if _C is not None else "fallback"


def fallback_reason() -> Optional[str]:
    """Why the fallback is in use, or ``None`` when the compiled library is."""
    return _fallback_reason


def cuda_kernel_available() -> bool:
    """True when the compiled library contains the CUDA kernel."""
    return _C is not None and bool(_C.cuda_compiled())


# --------------------------------------------------------------------------- validation
# Mirrors the C++ checks (csrc/ema_update.cpp) so both backends reject the
# same input with the same message, before anything is written.

_DTYPE_LIST = "torch.float32, torch.float64, torch.bfloat16, torch.float16"


def _check_lists(op: str, ema: Sequence[torch.Tensor], model: Sequence[torch.Tensor]) -> None:
    if len(ema) != len(model):
        raise RuntimeError(f"{op}: got {len(ema)} ema tensors but {len(model)} model tensors")
    if ema:
        _check_pairs(op, "ema", "model", ema, model, ema[0].device, "ema[0]", averaged=True)


def _check_copy_lists(
    op: str, ema: Sequence[torch.Tensor], copy_ema: Sequence[torch.Tensor], copy_model: Sequence[torch.Tensor]
) -> None:
    """The copied pairs: any dtype, one per pair, on the device of ``ema[0]`` (else ``copy_ema[0]``)."""
    if len(copy_ema) != len(copy_model):
        raise RuntimeError(f"{op}: got {len(copy_ema)} copy_ema tensors but {len(copy_model)} copy_model tensors")
    if not copy_ema:
        return
    if ema:
        device, ref = ema[0].device, "ema[0]"
    else:
        device, ref = _tensor_or_raise(op, "copy_ema", 0, copy_ema[0]).device, "copy_ema[0]"
    _check_pairs(op, "copy_ema", "copy_model", copy_ema, copy_model, device, ref, averaged=False)


def _tensor_or_raise(op: str, side: str, i: int, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {side}[{i}] is a {type(t).__name__}, not a tensor")
    return t


def _check_pairs(
    op: str,
    ema_side: str,
    model_side: str,
    ema: Sequence[torch.Tensor],
    model: Sequence[torch.Tensor],
    device: torch.device,
    device_ref: str,
    averaged: bool,
) -> None:
    grad = torch.is_grad_enabled()
    for i, (e, m) in enumerate(zip(ema, model)):
        for side, t in ((ema_side, e), (model_side, m)):
            _tensor_or_raise(op, side, i, t)
            if t.layout != torch.strided:
                raise RuntimeError(f"{op}: {side}[{i}] has layout {t.layout}; only strided tensors are supported")
            if averaged and t.dtype not in SUPPORTED_DTYPES:
                raise RuntimeError(f"{op}: {side}[{i}] has dtype {t.dtype}; expected one of {_DTYPE_LIST}")
            if t.device != device:
                raise RuntimeError(
                    f"{op}: {side}[{i}] is on {t.device} but {device_ref} is on {device}; all tensors must be on one "
                    "device"
                )
            if not is_dense(t):
                raise RuntimeError(
                    f"{op}: {side}[{i}] with shape {list(t.shape)} and strides {list(t.stride())} is not dense "
                    "or overlaps itself; pass a contiguous tensor"
                )
        if not averaged and e.dtype != m.dtype:
            raise RuntimeError(
                f"{op}: {ema_side}[{i}] has dtype {e.dtype} but {model_side}[{i}] has dtype {m.dtype}; a copied pair "
                "must share one dtype"
            )
        if e.shape != m.shape:
            raise RuntimeError(
                f"{op}: {ema_side}[{i}] has shape {list(e.shape)} but {model_side}[{i}] has shape {list(m.shape)}"
            )
        if not same_layout(e, m):
            raise RuntimeError(
                f"{op}: {ema_side}[{i}] has strides {list(e.stride())} but {model_side}[{i}] has strides "
                f"{list(m.stride())}; both tensors of a pair must share one memory layout"
            )
        if grad and e.requires_grad:
            raise RuntimeError(
                f"{op}: {ema_side}[{i}] requires grad; EMA tensors are updated in place and must not require grad "
                "(or call under torch.no_grad())"
            )


def same_layout(e: torch.Tensor, m: torch.Tensor) -> bool:
    """The layout rule of one pair: same strides, or both contiguous (strides
    of size-1 dimensions do not matter then).  Mirrors ``same_layout`` in
    csrc/ema_update.h."""
    return (e.is_contiguous() and m.is_contiguous()) or e.stride() == m.stride()


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t`` covers exactly ``numel`` consecutive elements in some
    dimension order (contiguous, or a permutation of a contiguous tensor)."""
    if t.is_contiguous() or t.numel() <= 1:
        return True
    # Sort dims by stride and expect a contiguous walk.
    dims = sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _check_no_overlap(
    op: str,
    ema: Sequence[torch.Tensor],
    model: Sequence[torch.Tensor],
    copy_ema: Sequence[torch.Tensor] = (),
    copy_model: Sequence[torch.Tensor] = (),
) -> None:
    n = len(ema)

    def name(side: str, row: int) -> str:
        return f"{side}[{row}]" if row < n else f"copy_{side}[{row - n}]"

    all_ema, all_model = list(ema) + list(copy_ema), list(model) + list(copy_model)
    spans = sorted(
        (e.data_ptr(), e.data_ptr() + e.numel() * e.element_size(), i) for i, e in enumerate(all_ema) if e.numel()
    )
    for (lo0, hi0, i0), (lo1, _, i1) in zip(spans, spans[1:]):
        if lo1 < hi0:
            raise RuntimeError(
                f"{op}: {name('ema', i0)} and {name('ema', i1)} overlap in memory (tied or aliased tensors); pass "
                "each storage once"
            )
    for j, m in enumerate(all_model):
        if not m.numel():
            continue
        lo, hi = m.data_ptr(), m.data_ptr() + m.numel() * m.element_size()
        for elo, ehi, i in spans:
            if elo < hi and lo < ehi and not (i == j and elo == lo and ehi == hi):
                raise RuntimeError(
                    f"{op}: {name('model', j)} overlaps {name('ema', i)} in memory; the EMA must not alias the model"
                )


def _check_decay(op: str, decay: float) -> None:
    if not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
        raise RuntimeError(f"{op}: decay must be a finite number in [0, 1], got {decay}")


def _check_decay_tensor(op: str, decay: torch.Tensor, ema: Sequence[torch.Tensor]) -> None:
    if decay.dim() != 0:
        raise RuntimeError(f"{op}: a decay tensor must be 0-dim, got shape {list(decay.shape)}")
    if decay.dtype not in (torch.float32, torch.float64):
        why = (
            "; decays near 1 are not representable in 16 bits (0.9999 rounds to 1.0 in bfloat16, which would "
            "freeze the EMA)"
            if decay.dtype in (torch.bfloat16, torch.float16)
            else ""
        )
        raise RuntimeError(f"{op}: a decay tensor must be torch.float32 or torch.float64, got dtype {decay.dtype}{why}")
    if ema and decay.device != ema[0].device:
        raise RuntimeError(
            f"{op}: the decay tensor is on {decay.device} but the tensors are on {ema[0].device}; "
            "it is read on the tensors' device (no host sync)"
        )


# --------------------------------------------------------------------------- fallback


def _acc_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def _fallback_apply(ema: List[torch.Tensor], model: List[torch.Tensor], decay: Union[float, torch.Tensor]) -> None:
    """``ema = ema * d + model * w`` with ``w = 1 - decay``, grouped by (device, dtypes).

    The compiled kernels compute ``fma(ema, d, model * w)`` in the accumulation
    dtype (NOTE [update arithmetic] in csrc/multi_tensor.h); PyTorch has no
    fused multiply-add, so here ``ema * d`` is rounded once more.  The two
    backends therefore agree to within one rounding of ``ema * d``: in the
    accumulation dtype with unit roundoff u (2**-24 for fp32 math, 2**-53 for
    fp64), ``|fallback - compiled| <= 2 u (|ema| d + |model| w)``, plus one unit
    in the last place of the EMA dtype where it is narrower (bf16, fp16).  The
    same ``d`` and ``w`` are used: ``1 - decay`` in float64, then rounded to the
    accumulation dtype.  Like the kernels (and unlike ``ema + w * (model -
    ema)``) this cannot overflow where the operands are finite.
    """
    groups: Dict[Tuple[torch.device, torch.dtype, torch.dtype], Tuple[list, list]] = defaultdict(lambda: ([], []))
    for e, m in zip(ema, model):
        if e.numel():
            g = groups[(e.device, e.dtype, m.dtype)]
            g[0].append(e)
            g[1].append(m)
    weights: Dict[torch.dtype, Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]]] = {}

    def weights_in(acc: torch.dtype):
        # (d, w) in the accumulation dtype, once per dtype.  A Python float
        # multiplies an fp32 tensor as an fp32 value: rounded as the kernels
        # round it.
        if acc not in weights:
            if isinstance(decay, torch.Tensor):
                decay64 = decay.detach().to(torch.float64)
                weights[acc] = (decay64.to(acc), (1.0 - decay64).to(acc))
            else:
                weights[acc] = (decay, 1.0 - decay)
        return weights[acc]

    with torch.no_grad():
        for (_, edt, mdt), (es, ms) in groups.items():
            acc = _acc_dtype(edt, mdt)
            e_acc = es if edt == acc else [e.to(acc) for e in es]
            m_acc = ms if mdt == acc else [m.to(acc) for m in ms]
            d, w = weights_in(acc)
            products = torch._foreach_mul(m_acc, w)
            torch._foreach_mul_(e_acc, d)
            torch._foreach_add_(e_acc, products)
            if edt != acc:
                torch._foreach_copy_(es, e_acc)


def _fallback_update(ema: List[torch.Tensor], model: List[torch.Tensor], decay: float) -> None:
    _check_lists(OP_NAME, ema, model)
    _check_decay(OP_NAME, decay)
    _check_no_overlap(OP_NAME, ema, model)
    _fallback_apply(ema, model, decay)


def _fallback_update_tensor(ema: List[torch.Tensor], model: List[torch.Tensor], decay: torch.Tensor) -> None:
    _check_lists(OP_NAME, ema, model)
    _check_decay_tensor(OP_NAME, decay, ema)
    if decay.device.type == "cpu":
        _check_decay(OP_NAME, float(decay))
    _check_no_overlap(OP_NAME, ema, model)
    _fallback_apply(ema, model, decay)


_fallback_lib = None


def _define_fallback_ops() -> None:
    """Registers the fallback under the same schemas as the compiled library."""
    global _fallback_lib
    lib = torch.library.Library("ema_cuda", "DEF")
    # The Tensor overload first, as in the compiled library: calls through
    # torch.ops try the overloads in this order.
    lib.define("ema_update_.Tensor(Tensor(a!)[] ema, Tensor[] model, Tensor decay) -> ()")
    lib.define("ema_update_(Tensor(a!)[] ema, Tensor[] model, float decay) -> ()")
    lib.impl("ema_update_", _fallback_update, "CompositeExplicitAutograd")
    lib.impl("ema_update_.Tensor", _fallback_update_tensor, "CompositeExplicitAutograd")
    # Like the compiled library: autograd has nothing to record (EMA tensors
    # must not require grad, which the kernels check).
    lib.impl("ema_update_", torch.library.fallthrough_kernel, "Autograd")
    lib.impl("ema_update_.Tensor", torch.library.fallthrough_kernel, "Autograd")
    _fallback_lib = lib


_load_backend()


# Fake (meta) kernels: the op writes in place and allocates nothing, but the
# checks that need no data run here too, so a traced program rejects the same
# input as eager does.
@torch.library.register_fake("ema_cuda::ema_update_")
def _ema_update_fake(ema, model, decay):
    _check_lists(OP_NAME, ema, model)
    _check_decay(OP_NAME, decay)


@torch.library.register_fake("ema_cuda::ema_update_.Tensor")
def _ema_update_tensor_fake(ema, model, decay):
    _check_lists(OP_NAME, ema, model)
    _check_decay_tensor(OP_NAME, decay, ema)


# --------------------------------------------------------------------------- public API


def ema_update_(
    ema: Sequence[torch.Tensor],
    model: Sequence[torch.Tensor],
    decay: Union[float, torch.Tensor],
) -> None:
    """Updates every EMA tensor in place: ``ema[i] = ema[i] * decay + model[i] * (1 - decay)``.

    Args:
        ema: tensors to update, in float32, float64, bfloat16 or float16.
        model: tensors to average in, one per EMA tensor, same shape and
            memory layout, any of the same dtypes (an fp32 EMA of a bf16 model
            is fine).  Math runs in fp32, or fp64 when either side is fp64.
        decay: a Python float in ``[0, 1]``, or a 0-dim floating tensor on the
            tensors' device.  A CUDA tensor is read by the kernel (no host
            sync; capturable in a CUDA graph, and ``torch.compile`` does not
            recompile as its value changes); its range is therefore not
            checked.

    All tensors must be on one device, dense (contiguous or one permutation),
    and no EMA tensor may overlap another tensor.  Every check runs before any
    write: a rejected call leaves every EMA tensor unchanged.

    With the compiled backend the update is one kernel launch (CUDA) or one
    parallel region (CPU) whatever the number of tensors; the chunk table is
    cached per ``(data_ptr, numel, dtype, device)`` signature of the lists.
    For a per-step update of the same lists, :class:`FusedUpdater` also skips
    passing the lists through the dispatcher.
    """
    ema = list(ema)
    model = list(model)
    if not ema and not model and not isinstance(decay, torch.Tensor):
        # No tensor to dispatch on (torch's foreach ops reject empty lists);
        # an empty update is still a checked no-op here.
        _check_decay(OP_NAME, float(decay))
        return
    if isinstance(decay, torch.Tensor):
        torch.ops.ema_cuda.ema_update_.Tensor(ema, model, decay)
    else:
        torch.ops.ema_cuda.ema_update_.default(ema, model, float(decay))


class FusedUpdater:
    """Holds two tensor lists and updates one from the other, step after step.

    ``FusedUpdater(ema, model).update(decay)`` does what
    ``ema_update_(ema, model, decay)`` does, but the lists are validated and the
    chunk table built once, here; each ``update`` then only compares the live
    tensors' addresses with the table (a tensor whose storage was replaced, by
    ``p.data = ...`` or ``module.to()``, triggers a full re-validation and a
    new table) and launches the kernel.  This is the hot path
    :class:`ema_cuda.ModelEMA` uses.  With the fallback backend it calls the
    fallback op (and ``torch._foreach_copy_`` for the copies).

    ``copy_ema[j] := copy_model[j]`` is done in the same launch: pairs that
    follow the model instead of being averaged, such as BatchNorm's integer
    ``num_batches_tracked``.  A copied pair may have any dtype, but one dtype
    for both tensors (no casts), one shape and one memory layout; it is on
    the device of the other tensors, and like an averaged EMA tensor must not
    overlap another tensor.  Every check of every pair runs before any write.
    """

    def __init__(
        self,
        ema: Sequence[torch.Tensor],
        model: Sequence[torch.Tensor],
        copy_ema: Sequence[torch.Tensor] = (),
        copy_model: Sequence[torch.Tensor] = (),
    ):
        self.ema = list(ema)
        self.model = list(model)
        self.copy_ema = list(copy_ema)
        self.copy_model = list(copy_model)
        if _C is not None:
            self._impl = _C.ListUpdater(self.ema, self.model, self.copy_ema, self.copy_model)
        else:
            self._check_fallback()
            self._impl = None

    def _check_fallback(self, averaged: bool = True) -> None:
        op = "ema_cuda.FusedUpdater"
        if averaged:
            _check_lists(op, self.ema, self.model)
        _check_copy_lists(op, self.ema, self.copy_ema, self.copy_model)
        _check_no_overlap(op, self.ema, self.model, self.copy_ema, self.copy_model)

    def ready(self) -> bool:
        """True when :meth:`update` would run now; False when the lists can no longer be updated.

        A tensor whose storage was replaced by one of the same shape, dtype,
        device and layout is taken (the table is rebuilt here, once).  One
        moved to another device, shape or memory layout makes this False,
        with nothing written: the owner rebuilds its lists (ModelEMA relays
        its EMA out like the model) instead of catching the update's error.
        """
        if self._impl is not None:
            return bool(self._impl.ready())
        try:
            self._check_fallback()
        except (RuntimeError, TypeError):
            return False
        return True

    def update(self, decay: Union[float, torch.Tensor]) -> None:
        """One EMA step with ``decay`` (a float, or a 0-dim tensor on the tensors' device)."""
        if self._impl is None:
            if self.copy_ema:
                # Checked again every call, before either writes (the op
                # checks the averaged pairs itself).
                self._check_fallback(averaged=False)
                if isinstance(decay, torch.Tensor):
                    _check_decay_tensor(OP_NAME, decay, self.ema or self.copy_ema)
            ema_update_(self.ema, self.model, decay)
            if self.copy_ema:
                with torch.no_grad():
                    torch._foreach_copy_(self.copy_ema, self.copy_model)
        elif isinstance(decay, torch.Tensor):
            self._impl.update_tensor(decay)
        else:
            self._impl.update(float(decay))

    def __len__(self) -> int:
        return len(self.ema)


def entries_unchanged(owners: tuple, keys: tuple, objects: tuple, registries: tuple, sizes: tuple) -> bool:
    """True while ``owners[i].get(keys[i]) is objects[i]`` for every i and ``len(registries[j]) == sizes[j]`` for every j.

    The per-step test that a module tree still holds the tensors and children
    a cached plan was built from (owners and registries are the modules'
    ``_parameters``, ``_buffers`` and ``_modules`` dicts).  Compiled, it costs
    about 10 ns per entry; the fallback runs the same test through ``map``.
    """
    if _C is not None:
        return bool(_C.watched_entries_unchanged(owners, keys, objects, registries, sizes))
    return all(map(operator.is_, map(dict.get, owners, keys), objects)) and tuple(map(len, registries)) == tuple(sizes)


def release_captured_plans() -> int:
    """Lets go of the chunk tables held for captured CUDA graphs; returns how many.

    A CUDA graph that captured an update replays it with the addresses of that
    update's chunk table, and nothing tells ema_cuda when the graph is
    destroyed.  So the table is owned by the process-wide plan cache from the
    moment of capture, whoever held it before (a :class:`FusedUpdater`, a
    :class:`ema_cuda.ModelEMA`, the op's cache), and lives until this call or
    the end of the process.  Call it only after every graph that captured an
    update has been destroyed (replaying one afterwards would read freed
    memory).  At most 1024 such tables are held: capturing more raises an
    error that points here.  With the fallback backend there are none.
    """
    if _C is None:
        return 0
    return int(torch.ops.ema_cuda._release_captured_plans())
