"""The op's input checks in Python: csrc/checks.cpp, check for check.

The fallback backend (:mod:`ema_cuda._fallback`) and the fake kernels
(:mod:`ema_cuda.ops`) run these; the compiled library runs its own.  Both
check in the same order and raise the same error class with the same message,
before anything is written; tests/test_check_parity.py feeds both the same bad
inputs and holds them to it.  Plain functions of tensor lists, callable
whatever backend is loaded.
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch

from ema_cuda._overlap import byte_spans

# The averaged dtypes, in the order of the dtype table (csrc/dtypes.h): a new
# floating dtype is one line there and one here.
SUPPORTED_DTYPES = (
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
)
_DTYPE_LIST = ", ".join(str(d) for d in SUPPORTED_DTYPES)


def same_layout(e: torch.Tensor, m: torch.Tensor) -> bool:
    """The layout rule of one pair: same strides, or both contiguous (strides
    of size-1 dimensions do not matter then).  Mirrors ``same_layout`` in
    csrc/checks.h."""
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


def check_lists(op: str, ema: Sequence[torch.Tensor], model: Sequence[torch.Tensor]) -> None:
    """Lengths, then per pair: layout, dtype, device, density, shape, shared layout, grad."""
    if len(ema) != len(model):
        raise RuntimeError(f"{op}: got {len(ema)} ema tensors but {len(model)} model tensors")
    if ema:
        device = _tensor_or_raise(op, "ema", 0, ema[0]).device
        _check_pairs(op, "ema", "model", ema, model, device, "ema[0]", averaged=True)


def check_copy_lists(
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


def check_no_overlap(
    op: str,
    ema: Sequence[torch.Tensor],
    model: Sequence[torch.Tensor],
    copy_ema: Sequence[torch.Tensor] = (),
    copy_model: Sequence[torch.Tensor] = (),
) -> None:
    """No EMA tensor overlaps another EMA tensor, or a model tensor other than
    its own pair's (the same range, read in place).  The same walk as
    csrc/checks.cpp, so that an input with several overlaps is reported
    alike: EMA spans sorted by (start, end, row), then each model tensor
    checked against the spans that start below its end, nearest first."""
    n = len(ema)

    def name(side: str, row: int) -> str:
        return f"{side}[{row}]" if row < n else f"copy_{side}[{row - n}]"

    all_ema, all_model = list(ema) + list(copy_ema), list(model) + list(copy_model)
    spans = byte_spans(all_ema)
    for (_, hi0, i0), (lo1, _, i1) in zip(spans, spans[1:]):
        if lo1 < hi0:
            raise RuntimeError(
                f"{op}: {name('ema', i0)} and {name('ema', i1)} overlap in memory (tied or aliased tensors); pass "
                "each storage once"
            )
    starts = [lo for lo, _, _ in spans]
    for j, m in enumerate(all_model):
        if not m.numel():
            continue
        lo, hi = m.data_ptr(), m.data_ptr() + m.numel() * m.element_size()
        # Spans below index k start below `hi`; the spans are disjoint, so
        # walking back stops at the first that ends at or before `lo`.
        for k in range(bisect.bisect_left(starts, hi) - 1, -1, -1):
            elo, ehi, i = spans[k]
            if ehi <= lo:
                break
            if not (i == j and elo == lo and ehi == hi):
                raise RuntimeError(
                    f"{op}: {name('model', j)} overlaps {name('ema', i)} in memory; the EMA must not alias the model"
                )


def check_decay(op: str, decay: float) -> None:
    if not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
        raise RuntimeError(f"{op}: decay must be a finite number in [0, 1], got {decay}")


def check_decay_tensor(op: str, decay: torch.Tensor, ema: Sequence[torch.Tensor]) -> None:
    """A 0-dim float32/float64 tensor on the device of ``ema[0]`` (its value is not read here)."""
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
