"""The pure-PyTorch backend: the op and FusedUpdater's lists without the compiled library.

:func:`define_ops` registers :func:`update` and :func:`update_tensor` under
the compiled library's schema (``torch.ops.ema_cuda.ema_update_``), and
:class:`ListUpdater` stands in for ``ema_cuda._C.ListUpdater``.  They run the
checks of :mod:`ema_cuda._checks` in the compiled code's order, so both
backends reject the same input with the same error before anything is
written; then :func:`apply` does the arithmetic with foreach ops.  All of it is
callable directly, whatever backend is loaded: the tests use it as the
reference.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Sequence, Tuple, Union

import torch

from ema_cuda._checks import (
    check_copy_lists,
    check_decay,
    check_decay_tensor,
    check_decays,
    check_decays_tensor,
    check_lists,
    MAX_PROFILES,
    check_multi_lists,
    check_no_overlap,
)

OP_NAME = "ema_cuda::ema_update_"
UPDATER_NAME = "ema_cuda.FusedUpdater"
MULTI_OP_NAME = "ema_cuda::multi_ema_update_"
MULTI_UPDATER_NAME = "ema_cuda.MultiFusedUpdater"


def _acc_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def apply(ema: List[torch.Tensor], model: List[torch.Tensor], decay: Union[float, torch.Tensor]) -> None:
    """``ema = ema * d + model * w`` with ``w = 1 - decay``, grouped by (device, dtypes).  No checks.

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


def _decay_tensor_value(op: str, decay: torch.Tensor, ema: Sequence[torch.Tensor]) -> None:
    """The decay tensor's checks; off CUDA its value is read anyway, so its range is checked too."""
    check_decay_tensor(op, decay, ema)
    if not decay.is_cuda:
        check_decay(op, float(decay))


def update(ema: List[torch.Tensor], model: List[torch.Tensor], decay: float) -> None:
    """``ema_cuda::ema_update_`` with a float decay: every check, then :func:`apply`."""
    check_decay(OP_NAME, decay)
    check_lists(OP_NAME, ema, model)
    check_no_overlap(OP_NAME, ema, model)
    apply(ema, model, decay)


def update_tensor(ema: List[torch.Tensor], model: List[torch.Tensor], decay: torch.Tensor) -> None:
    """``ema_cuda::ema_update_.Tensor``: every check, then :func:`apply`."""
    _decay_tensor_value(OP_NAME, decay, ema)
    check_lists(OP_NAME, ema, model)
    check_no_overlap(OP_NAME, ema, model)
    apply(ema, model, decay)


def _decays_tensor_values(op: str, decays: torch.Tensor, ema: Sequence[torch.Tensor], expected=None) -> None:
    """The decays tensor's checks; off CUDA its values are read anyway, so their range is checked too."""
    check_decays_tensor(op, decays, ema, expected)
    if not decays.is_cuda:
        check_decays(op, decays.tolist())


def apply_multi(ema: List[torch.Tensor], model: List[torch.Tensor], decays) -> None:
    """Profile k's EMAs ``ema[k * n:(k + 1) * n]`` from ``model`` with ``decays[k]``: :func:`apply` once per
    profile, so the result is that of one single-op update per profile, bit for bit.  No checks."""
    n = len(model)
    for k in range(len(decays)):
        apply(ema[k * n : (k + 1) * n], model, decays[k])


def multi_update(ema: List[torch.Tensor], model: List[torch.Tensor], decays: List[float]) -> None:
    """``ema_cuda::multi_ema_update_`` with float decays: every check, then :func:`apply_multi`."""
    check_decays(MULTI_OP_NAME, decays)
    check_multi_lists(MULTI_OP_NAME, ema, model, len(decays))
    check_no_overlap(MULTI_OP_NAME, ema, model, profiles=len(decays))
    apply_multi(ema, model, decays)


def multi_update_tensor(ema: List[torch.Tensor], model: List[torch.Tensor], decays: torch.Tensor) -> None:
    """``ema_cuda::multi_ema_update_.Tensor``: every check, then :func:`apply_multi`."""
    _decays_tensor_values(MULTI_OP_NAME, decays, ema)
    check_multi_lists(MULTI_OP_NAME, ema, model, decays.numel())
    check_no_overlap(MULTI_OP_NAME, ema, model, profiles=decays.numel())
    apply_multi(ema, model, decays)


class _CheckedLists:
    """What the two updaters share: ``ready()`` is their ``_check()`` of the lists, as a bool."""

    def _check(self) -> None:
        raise NotImplementedError

    def ready(self) -> bool:
        try:
            self._check()
        except (RuntimeError, TypeError):
            return False
        return True


class ListUpdater(_CheckedLists):
    """What ``ema_cuda._C.ListUpdater`` does, in Python: the fallback side of :class:`ema_cuda.FusedUpdater`.

    The lists are checked when constructed, and again on every update (there
    is no plan whose validity could be checked more cheaply); the copies are
    written after the averaged pairs, only once every check has passed.
    """

    def __init__(
        self,
        ema: Sequence[torch.Tensor],
        model: Sequence[torch.Tensor],
        copy_ema: Sequence[torch.Tensor] = (),
        copy_model: Sequence[torch.Tensor] = (),
    ):
        # Copies of the lists, as the C++ object holds its own vectors.
        self._ema, self._model = list(ema), list(model)
        self._copy_ema, self._copy_model = list(copy_ema), list(copy_model)
        self._check()

    def _check(self) -> None:
        check_lists(UPDATER_NAME, self._ema, self._model)
        check_copy_lists(UPDATER_NAME, self._ema, self._copy_ema, self._copy_model)
        check_no_overlap(UPDATER_NAME, self._ema, self._model, self._copy_ema, self._copy_model)

    def update(self, decay: float) -> None:
        check_decay(UPDATER_NAME, decay)
        self._check()
        self._run(decay)

    def update_tensor(self, decay: torch.Tensor) -> None:
        _decay_tensor_value(UPDATER_NAME, decay, self._ema or self._copy_ema)
        self._check()
        self._run(decay)

    def _run(self, decay: Union[float, torch.Tensor]) -> None:
        apply(self._ema, self._model, decay)
        if self._copy_ema:
            with torch.no_grad():
                torch._foreach_copy_(self._copy_ema, self._copy_model)

    @property
    def num_tensors(self) -> int:
        return len(self._ema)

    @property
    def num_copies(self) -> int:
        return len(self._copy_ema)


class MultiListUpdater(_CheckedLists):
    """What ``ema_cuda._C.MultiListUpdater`` does, in Python: the fallback side of
    :class:`ema_cuda.ops.MultiFusedUpdater` (``profiles`` EMAs of each model tensor, ``ema`` profile-major)."""

    def __init__(self, ema: Sequence[torch.Tensor], model: Sequence[torch.Tensor], profiles: int):
        if not 1 <= profiles <= MAX_PROFILES:
            raise RuntimeError(
                f"{MULTI_UPDATER_NAME}: got {profiles} EMA profiles; one multi-EMA update takes 1 to {MAX_PROFILES} "
                "profiles"
            )
        self._ema, self._model, self.profiles = list(ema), list(model), profiles
        self._check()

    def _check(self) -> None:
        check_multi_lists(MULTI_UPDATER_NAME, self._ema, self._model, self.profiles)
        check_no_overlap(MULTI_UPDATER_NAME, self._ema, self._model, profiles=self.profiles)

    def update(self, decays: List[float]) -> None:
        check_decays(MULTI_UPDATER_NAME, decays, self.profiles)
        self._check()
        apply_multi(self._ema, self._model, decays)

    def update_tensor(self, decays: torch.Tensor) -> None:
        _decays_tensor_values(MULTI_UPDATER_NAME, decays, self._ema, self.profiles)
        self._check()
        apply_multi(self._ema, self._model, decays)

    @property
    def num_tensors(self) -> int:
        return len(self._ema)


_library = None


def define_ops() -> None:
    """Registers the single and multi-EMA ops (:func:`update`, :func:`multi_update` and their tensor-decay forms) under the compiled library's schema (csrc/schema.cpp)."""
    global _library
    lib = torch.library.Library("ema_cuda", "DEF")
    # Each op's Tensor overload first, as in the compiled library: calls
    # through torch.ops try the overloads in this order.  Like the compiled
    # library, autograd falls through: it has nothing to record (EMA tensors
    # must not require grad, which the checks enforce).
    schemas = (
        ("ema_update_.Tensor(Tensor(a!)[] ema, Tensor[] model, Tensor decay) -> ()", update_tensor),
        ("ema_update_(Tensor(a!)[] ema, Tensor[] model, float decay) -> ()", update),
        ("multi_ema_update_.Tensor(Tensor(a!)[] ema, Tensor[] model, Tensor decays) -> ()", multi_update_tensor),
        ("multi_ema_update_(Tensor(a!)[] ema, Tensor[] model, float[] decays) -> ()", multi_update),
    )
    for schema, kernel in schemas:
        name = schema.split("(", 1)[0]
        lib.define(schema)
        lib.impl(name, kernel, "CompositeExplicitAutograd")
        lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
    _library = lib
