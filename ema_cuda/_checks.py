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
from typing import Callable, Optional, Sequence, Tuple

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
        device = _tensor_or_raise(op, "ema[0]", ema[0]).device
        _check_pairs(op, _single_names("ema", "model"), ema, model, device, "ema[0]", averaged=True)


def check_multi_lists(op: str, ema: Sequence[torch.Tensor], model: Sequence[torch.Tensor], profiles: int) -> None:
    """:func:`check_lists` for ``profiles`` EMAs of each model tensor, profile-major:
    ``ema[k * n + i]`` (named ``ema[k][i]``) pairs with ``model[i]``, ``n = len(model)``."""
    n = len(model)
    if len(ema) != profiles * n:
        raise RuntimeError(
            f"{op}: got {len(ema)} ema tensors for {profiles} decays and {n} model tensors; expected {profiles} x "
            f"{n} = {profiles * n} (profile-major: ema[k * {n} + i] is profile k's EMA of model[i])"
        )
    if ema:
        device = _tensor_or_raise(op, "ema[0][0]", ema[0]).device
        names = lambda r: (f"ema[{r // n}][{r % n}]", f"model[{r % n}]")  # noqa: E731
        _check_pairs(op, names, ema, [model[r % n] for r in range(len(ema))], device, "ema[0][0]", averaged=True)


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
        device, ref = _tensor_or_raise(op, "copy_ema[0]", copy_ema[0]).device, "copy_ema[0]"
    _check_pairs(op, _single_names("copy_ema", "copy_model"), copy_ema, copy_model, device, ref, averaged=False)


def _single_names(ema_side: str, model_side: str) -> Callable[[int], Tuple[str, str]]:
    return lambda i: (f"{ema_side}[{i}]", f"{model_side}[{i}]")


def _tensor_or_raise(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} is a {type(t).__name__}, not a tensor")
    return t


def _check_pairs(
    op: str,
    names: Callable[[int], Tuple[str, str]],
    ema: Sequence[torch.Tensor],
    model: Sequence[torch.Tensor],
    device: torch.device,
    device_ref: str,
    averaged: bool,
) -> None:
    """Every check of each pair, in csrc/checks.cpp's order (``check_row``); ``names(i)`` says how the
    messages name pair i's two tensors."""
    grad = torch.is_grad_enabled()
    for i, (e, m) in enumerate(zip(ema, model)):
        ema_name, model_name = names(i)
        for name, t in ((ema_name, e), (model_name, m)):
            _tensor_or_raise(op, name, t)
            if t.layout != torch.strided:
                raise RuntimeError(f"{op}: {name} has layout {t.layout}; only strided tensors are supported")
            if averaged and t.dtype not in SUPPORTED_DTYPES:
                raise RuntimeError(f"{op}: {name} has dtype {t.dtype}; expected one of {_DTYPE_LIST}")
            if t.device != device:
                raise RuntimeError(
                    f"{op}: {name} is on {t.device} but {device_ref} is on {device}; all tensors must be on one "
                    "device"
                )
            if not is_dense(t):
                raise RuntimeError(
                    f"{op}: {name} with shape {list(t.shape)} and strides {list(t.stride())} is not dense "
                    "or overlaps itself; pass a contiguous tensor"
                )
        if not averaged and e.dtype != m.dtype:
            raise RuntimeError(
                f"{op}: {ema_name} has dtype {e.dtype} but {model_name} has dtype {m.dtype}; a copied pair "
                "must share one dtype"
            )
        if e.shape != m.shape:
            raise RuntimeError(
                f"{op}: {ema_name} has shape {list(e.shape)} but {model_name} has shape {list(m.shape)}"
            )
        if not same_layout(e, m):
            raise RuntimeError(
                f"{op}: {ema_name} has strides {list(e.stride())} but {model_name} has strides "
                f"{list(m.stride())}; both tensors of a pair must share one memory layout"
            )
        if grad and e.requires_grad:
            raise RuntimeError(
                f"{op}: {ema_name} requires grad; EMA tensors are updated in place and must not require grad "
                "(or call under torch.no_grad())"
            )


def check_no_overlap(
    op: str,
    ema: Sequence[torch.Tensor],
    model: Sequence[torch.Tensor],
    copy_ema: Sequence[torch.Tensor] = (),
    copy_model: Sequence[torch.Tensor] = (),
    profiles: Optional[int] = None,
) -> None:
    """No EMA tensor overlaps another EMA tensor, or a model tensor other than
    its own pair's (the same range, read in place).  The same walk as
    csrc/checks.cpp, so that an input with several overlaps is reported
    alike: EMA spans sorted by (start, end, row), then each model tensor
    checked against the spans that start below its end, nearest first.
    With ``profiles`` (a multi-EMA update, :func:`check_multi_lists`'s
    lists), each model tensor is checked once and may not alias any EMA."""
    n = len(ema)
    stride = len(model)

    def name(side: str, row: int) -> str:
        if row >= n:
            return f"copy_{side}[{row - n}]"
        if profiles is None:
            return f"{side}[{row}]"
        return f"ema[{row // stride}][{row % stride}]" if side == "ema" else f"model[{row % stride}]"

    all_ema = list(ema) + list(copy_ema)
    # A multi-EMA model tensor i is looked at once, as row i (profile 0's).
    model_rows = list(enumerate(model)) + [(n + j, m) for j, m in enumerate(copy_model)]
    spans = byte_spans(all_ema)
    for (_, hi0, i0), (lo1, _, i1) in zip(spans, spans[1:]):
        if lo1 < hi0:
            raise RuntimeError(
                f"{op}: {name('ema', i0)} and {name('ema', i1)} overlap in memory (tied or aliased tensors); pass "
                "each storage once"
            )
    starts = [lo for lo, _, _ in spans]
    in_place_ok = profiles is None or profiles == 1
    for j, m in model_rows:
        if not m.numel():
            continue
        lo, hi = m.data_ptr(), m.data_ptr() + m.numel() * m.element_size()
        # Spans below index k start below `hi`; the spans are disjoint, so
        # walking back stops at the first that ends at or before `lo`.
        for k in range(bisect.bisect_left(starts, hi) - 1, -1, -1):
            elo, ehi, i = spans[k]
            if ehi <= lo:
                break
            if not (in_place_ok and i == j and elo == lo and ehi == hi):
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
    _check_decay_tensor_kind(op, "decay tensor", decay, ema)


def check_decays(op: str, decays: Sequence[float], expected: Optional[int] = None) -> None:
    """The multi-EMA op's decays: 1 to MAX_PROFILES of them (``expected`` of them when given), each a finite
    number in [0, 1]."""
    _check_profile_count(op, len(decays), expected)
    for k, d in enumerate(decays):
        if not (math.isfinite(d) and 0.0 <= d <= 1.0):
            raise RuntimeError(f"{op}: decays[{k}] must be a finite number in [0, 1], got {d}")


def check_decays_tensor(
    op: str, decays: torch.Tensor, ema: Sequence[torch.Tensor], expected: Optional[int] = None
) -> None:
    """A 1-dim float32/float64 tensor of the decays on the device of ``ema[0]`` (values not read here)."""
    if decays.dim() != 1:
        raise RuntimeError(
            f"{op}: a decays tensor must be 1-dim (one decay per profile), got shape {list(decays.shape)}"
        )
    _check_profile_count(op, decays.numel(), expected)
    _check_decay_tensor_kind(op, "decays tensor", decays, ema)


# Most EMA profiles one multi-EMA update takes (kMaxProfiles in csrc/multi_tensor.h).
MAX_PROFILES = 16


def _check_profile_count(op: str, k: int, expected: Optional[int]) -> None:
    if not 1 <= k <= MAX_PROFILES:
        raise RuntimeError(f"{op}: got {k} decays; one multi-EMA update takes 1 to {MAX_PROFILES} profiles")
    if expected is not None and k != expected:
        raise RuntimeError(f"{op}: got {k} decays for {expected} EMA profiles")


def _check_decay_tensor_kind(op: str, what: str, decay: torch.Tensor, ema: Sequence[torch.Tensor]) -> None:
    if decay.dtype not in (torch.float32, torch.float64):
        why = (
            "; decays near 1 are not representable in 16 bits (0.9999 rounds to 1.0 in bfloat16, which would "
            "freeze the EMA)"
            if decay.dtype in (torch.bfloat16, torch.float16)
            else ""
        )
        raise RuntimeError(f"{op}: a {what} must be torch.float32 or torch.float64, got dtype {decay.dtype}{why}")
    if ema and decay.device != ema[0].device:
        raise RuntimeError(
            f"{op}: the {what} is on {decay.device} but the tensors are on {ema[0].device}; "
            "it is read on the tensors' device (no host sync)"
        )
