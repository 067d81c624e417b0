"""A drop-in for timm's ``ModelEmaV3`` (``timm.utils.ModelEmaV3``, timm 1.0) whose update is one fused call.

Change ``from timm.utils import ModelEmaV3`` to
``from ema_cuda.compat.timm import ModelEmaV3``; nothing else changes.
timm itself is not imported.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ema_cuda._modules import state_entries
from ema_cuda.compat._fused import FusedPairs, TreeIdentity
from ema_cuda.ema.storage import EMAStorage
from ema_cuda.ops import is_dense, same_layout

__all__ = ["ModelEmaV3"]


class _Plan:
    """The pairs of one (model, ``exclude_buffers``) and what tells that they still hold."""

    __slots__ = ("model", "exclude_buffers", "trees", "pairs", "staged", "sources")

    def valid_for(self, model: nn.Module, exclude_buffers: bool) -> bool:
        return (self.model is model and self.exclude_buffers == exclude_buffers and self.trees.unchanged()
                and all(s.device == t.device and s.shape == t.shape for s, t in zip(self.staged, self.sources))
                and self.pairs.ready())


class ModelEmaV3(nn.Module):
    """An exponential moving average of everything in a model's ``state_dict``: timm's ``ModelEmaV3``, fused.

    Construct it after the model is on its device and before wrapping it
    for distributed training; call :meth:`update` after every optimizer step
    (with ``step`` to use ``update_after_step`` and the warmup), evaluate
    with ``ema.module`` (or ``ema(x)``).  ``ema.module`` is a deep copy of the
    model in eval mode; ``state_dict()`` has timm's keys (``module.<key>``), so
    checkpoints move between this class and timm's in both directions.

    The arguments, attributes and decay are timm's:
    ``get_decay(step)`` is ``decay`` without a step; with one, 0 until
    ``step > update_after_step + 1`` (the update then copies the model), then
    ``decay``, or with ``use_warmup`` ``1 - (1 + s / warmup_gamma) **
    -warmup_power`` clamped to ``[min_decay, decay]``, where ``s = step -
    update_after_step - 1``.  Floating entries are averaged and the others
    copied, paired by position in ``state_dict`` order; with
    ``exclude_buffers`` the parameters are averaged and every buffer
    (persistent or not) copied.  ``device`` keeps the EMA on another device
    (each model tensor is copied there before the update, into a buffer kept
    for the purpose); ``dtype`` converts the EMA's floating tensors (an fp32
    EMA of a bf16 model needs no other option).

    What the fused update does instead of timm's foreach ops (see
    docs/dropins.md):

    * all averaged and copied tensors in one call, from a plan built at the
      first update and reused while the model and the EMA keep their
      tensors; the EMA's floating tensors live in one flat buffer per dtype.
      ``foreach`` is kept as an attribute and changes nothing;
    * the arithmetic is ``ema * d + model * (1 - d)`` in fp32 (fp64 for fp64
      tensors), timm's ``lerp`` is ``ema + (1 - d) * (model - ema)``: the two
      differ by rounding, a few units in the last place per update (the
      tests hold them to ``rtol=1e-5, atol=1e-6`` in fp32 after 300 updates);
    * a weight tied under several keys is averaged once per update (timm's
      foreach path averages it once per key);
    * entries that do not pair up (a different count, shape, or a floating
      entry against an integer one) raise instead of being truncated or
      broadcast;
    * stochastic rounding of bf16 EMA tensors is not implemented: a bf16 EMA
      with ``stochastic_rounding=True`` (timm's default) raises
      ``NotImplementedError``; pass ``dtype=torch.float32`` (recommended)
      or ``stochastic_rounding=False``.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = True,
        stochastic_rounding_seed: int = 0,
        foreach: bool = True,
        exclude_buffers: bool = False,
    ):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.foreach = foreach
        self.device = device
        self.dtype = dtype
        self.stochastic_rounding = stochastic_rounding
        self.stochastic_rounding_seed = stochastic_rounding_seed
        self.exclude_buffers = exclude_buffers
        if device is not None and device != next(model.parameters()).device:
            self.foreach = False  # as timm: its per-tensor path is the one that moves tensors across devices
            self.module.to(device=device)
        if dtype is not None:
            self.module.to(dtype=dtype)
        self._check_rounding()
        # NOTE [flat storage] (ema_cuda/ema/storage.py): the update then streams through one allocation.
        EMAStorage(self.module).relayout()
        self._plan: Optional[_Plan] = None

    def _check_rounding(self) -> None:
        if not self.stochastic_rounding:
            return
        for key, _, _, t, _ in state_entries(self.module)[0]:
            if t.dtype == torch.bfloat16:
                raise NotImplementedError(
                    f"ModelEmaV3: stochastic_rounding=True with a bfloat16 EMA (entry {key!r}) is not implemented by "
                    "the fused update; pass dtype=torch.float32 to keep the EMA of the bf16 model in fp32 "
                    "(recommended), or stochastic_rounding=False to round to nearest (with a decay near 1 a bf16 "
                    "EMA then stops moving)"
                )

    def get_decay(self, step: Optional[int] = None) -> float:
        """The decay of an update at ``step`` (timm's formula; ``decay`` when ``step`` is None)."""
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
            decay = max(min(decay, self.decay), self.min_decay)
        else:
            decay = self.decay
        return decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """Moves the EMA towards ``model`` with ``get_decay(step)``, in one fused call.

        Raises before writing anything when the model's entries do not pair
        with the EMA's.
        """
        self._current_plan(model).pairs.update(self.get_decay(step))

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copies every ``state_dict`` entry of ``model`` into the EMA (by position, as timm)."""
        ema_items, model_items = _state_items(self.module), _state_items(model)
        _check_count("set", len(ema_items), len(model_items), "state_dict entries")
        for (_, e), (_, m) in zip(ema_items, model_items):
            e.copy_(m.to(device=e.device))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # ------------------------------------------------------------------ the plan

    def _current_plan(self, model: nn.Module) -> _Plan:
        plan = self._plan
        if plan is None or not plan.valid_for(model, self.exclude_buffers):
            self._plan = None  # a failed build leaves no stale plan behind
            plan = self._build_plan(model)
            self._plan = plan
        return plan

    def _build_plan(self, model: nn.Module) -> _Plan:
        self._check_rounding()
        if self.exclude_buffers:
            groups = [(list(self.module.named_parameters()), list(model.named_parameters()), "parameters", True),
                      (list(self.module.named_buffers()), list(model.named_buffers()), "buffers", False)]
        else:
            groups = [(_state_items(self.module), _state_items(model), "state_dict entries", None)]
        averaged: List[Tuple[torch.Tensor, torch.Tensor]] = []
        copied: List[Tuple[torch.Tensor, torch.Tensor]] = []
        staged: List[torch.Tensor] = []
        sources: List[torch.Tensor] = []
        seen = set()
        for ema_items, model_items, what, average in groups:
            _check_count("update", len(ema_items), len(model_items), what)
            for (key, e), (model_key, m) in zip(ema_items, model_items):
                if id(e) in seen:  # a tied weight: averaged once
                    continue
                seen.add(id(e))
                if e.shape != m.shape:
                    raise RuntimeError(
                        f"ModelEmaV3.update: EMA entry {key!r} has shape {list(e.shape)} but the model entry it pairs "
                        f"with by position, {model_key!r}, has {list(m.shape)}"
                    )
                if m.device != e.device:
                    # Copied to the EMA's device each update, into a buffer kept for that.
                    stage = torch.empty_like(m, device=e.device)
                    staged.append(stage)
                    sources.append(m)
                    m = stage
                avg = e.is_floating_point() if average is None else average
                if avg and not (e.is_floating_point() and m.is_floating_point()):
                    raise RuntimeError(
                        f"ModelEmaV3.update: EMA entry {key!r} ({e.dtype}) pairs by position with model entry "
                        f"{model_key!r} ({m.dtype}); only floating tensors can be averaged"
                    )
                (averaged if avg else copied).append((e, m))
        if not all(same_layout(e, m) for e, m in averaged if is_dense(m)):
            # The model changed memory layout (channels_last) after the EMA was made: the fused update
            # needs both sides laid out alike, so the EMA's tensors move (values unchanged; objects kept).
            EMAStorage(self.module).relayout({id(e): m for e, m in averaged})
        plan = _Plan()
        plan.model, plan.exclude_buffers = model, self.exclude_buffers
        plan.trees = TreeIdentity(model, self.module)
        plan.staged, plan.sources = staged, sources
        plan.pairs = _StagedPairs(FusedPairs(averaged, copied), staged, sources)
        return plan

    # ------------------------------------------------------------------ copies and pickles

    def __getstate__(self) -> Dict[str, Any]:
        # The plan holds the compiled updater (not picklable) and the model; the copy builds its own.
        state = self.__dict__.copy()
        state["_plan"] = None
        return state


class _StagedPairs:
    """The fused pairs, after copying model tensors that live on another device to the EMA's."""

    __slots__ = ("fused", "staged", "sources")

    def __init__(self, fused: FusedPairs, staged: List[torch.Tensor], sources: List[torch.Tensor]):
        self.fused, self.staged, self.sources = fused, staged, sources

    def ready(self) -> bool:
        return self.fused.ready()

    def update(self, decay: float) -> None:
        if self.staged:
            for stage, source in zip(self.staged, self.sources):
                stage.copy_(source)
        self.fused.update(decay)


def _state_items(module: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """``module.state_dict().items()`` with the live tensors (without building the dict's detached aliases)."""
    return [(e.key, e.tensor) for e in state_entries(module)[0]]


def _check_count(method: str, n_ema: int, n_model: int, what: str) -> None:
    if n_ema != n_model:
        raise RuntimeError(
            f"ModelEmaV3.{method}: the model has {n_model} {what} and the EMA {n_ema}; they are paired by position "
            "and must match"
        )
