"""Decay schedules defined per elapsed step: a half-life in steps or in training samples.

The schedules of :mod:`ema_cuda.ema_decay_schedules` give the decay of one
update, whatever happened since the last one: with ``update_every=k`` the
EMA applies a per-step decay once every ``k`` steps and so averages over
``k`` times more steps than asked.  A schedule here instead gives the decay
for the steps that really elapsed since the EMA's last update (NOTE
[elapsed steps]), so the EMA's length in steps, or in samples, is the one
configured under any ``update_every``, gradient accumulation, skipped
update or irregular call.

NOTE [elapsed steps]
A schedule that has a method ``decay_over(decay, step, total_steps,
elapsed)`` is defined per elapsed step: ``ModelEMA`` calls it with
``elapsed``, the steps since its last update, instead of
``schedule(decay, step, total_steps)``; in capturable mode it calls
``tensor_decay_over`` with ``elapsed`` as a 0-dim tensor.  A schedule without
it (every SuperGradients-compatible one) is called as before, so its values
are unchanged under ``update_every``.  The count:

* ``elapsed = step - last_step``, the steps since the last update that was
  applied.  A skipped update (``skip_nonfinite``) or a step ``update()`` was
  not called at is thus counted in the next update.
* A new EMA counts from step 0, the start of the run (the EMA holds the
  model's initial weights), so the first update at step ``s`` covers ``s``
  steps: with SuperGradients' 1-based steps that is ``update_every`` steps,
  or the batches of the first accumulation window.  An EMA built in the
  middle of a run holds that moment's weights, and its first update, which
  counts from step 0, nearly copies the model: the same weights.
* When there is no earlier step to count from (a state saved without one,
  or a step not greater than the last one: the count restarted), the update
  counts ``update_every`` steps, what one update stands for nominally.

Over ``k`` steps a per-step decay ``d`` becomes ``d ** k``; the power
function's factor telescopes to ``((t - k) / t) ** (gamma + 1)``.  ``decay``
(ModelEMA's) caps the per-step decay as for the other schedules, so over
``k`` steps the cap is ``decay ** k``.
"""
from __future__ import annotations

import math
import numbers
import sys
from abc import abstractmethod
from typing import Any, Optional

import torch

from ema_cuda.ema_decay_schedules import EMA_DECAY_FUNCTIONS, IDecayFunction

__all__ = ["ElapsedStepsDecay", "HalfLifeDecay"]

_TINY = sys.float_info.min


def _real_tensor(cls: str, name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{cls}.tensor_decay_over: {name} must be a 0-dim real tensor, got {value!r}")
    return value.to(torch.float64)


def _check_elapsed(cls: str, elapsed: Any) -> None:
    if isinstance(elapsed, bool) or not isinstance(elapsed, numbers.Real) or not elapsed >= 0:
        raise ValueError(f"{cls}: elapsed must be a number of steps >= 0, got {elapsed!r}")


class ElapsedStepsDecay(IDecayFunction):
    """A schedule defined per elapsed step (NOTE [elapsed steps]).

    Subclasses implement :meth:`decay_over` and, for capturable mode,
    :meth:`tensor_decay_over`; calling the schedule as any other
    (``schedule(decay, step, total_steps)``) gives the decay of one step.
    """

    @abstractmethod
    def decay_over(self, decay: float, step: int, total_steps: Optional[int], elapsed: int) -> float:
        """The decay to apply at ``step`` for the ``elapsed`` steps since the last update."""

    def tensor_decay_over(self, decay: float, step: torch.Tensor, total_steps: Optional[int],
                          elapsed: torch.Tensor) -> torch.Tensor:
        """The same as a 0-dim float64 tensor, from 0-dim tensors ``step`` and ``elapsed`` (no host sync)."""
        raise NotImplementedError(f"{type(self).__name__} has no tensor form (tensor_decay_over)")

    def __call__(self, decay: float, step: int, total_steps: Optional[int]) -> float:
        return self.decay_over(decay, step, total_steps, 1)

    def tensor_value(self, decay: float, step: torch.Tensor, total_steps: Optional[int]) -> torch.Tensor:
        one = torch.ones((), dtype=torch.float64, device=step.device) if isinstance(step, torch.Tensor) else 1.0
        return self.tensor_decay_over(decay, step, total_steps, one)


def _positive_or_none(name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"HalfLifeDecay: {name} must be None or a finite number > 0, got {value!r}")
    return float(value)


class HalfLifeDecay(ElapsedStepsDecay):
    """An EMA whose weights halve every ``half_life`` steps: ``d = 0.5 ** (elapsed / half_life)``.

    The length is fixed in steps (``half_life``) or in training samples
    (``half_life_samples`` with ``samples_per_step``), and stays right under
    ``update_every``, gradient accumulation and skipped updates: an update
    ``elapsed`` steps after the last one applies the decay of those steps
    (NOTE [elapsed steps]).  The per-step decay is ``0.5 ** (1 / half_life)``
    (``half_life=693`` is about ``decay=0.999``; ``6931`` about ``0.9999``).

    Give exactly one of:

    * ``half_life``: in units of the ``step`` passed to ``ModelEMA.update``.
      Called with optimizer steps, it is in optimizer steps; under the
      Trainer, whose step counts batches (SuperGradients' step), it is in
      batches.
    * ``half_life_samples`` with ``samples_per_step``, the number of training
      samples per unit of that step: ``batch_size * accumulation *
      world_size`` when ``update`` gets optimizer steps, ``batch_size *
      world_size`` under the Trainer (which counts batches, so accumulation
      is already in the elapsed count).  ``half_life = half_life_samples /
      samples_per_step``.  Use it to keep an EMA's length when the batch
      size or the number of devices changes (EDM2's ``ema_halflife_kimg``).

    ``rampup`` (optional, e.g. 0.05): the half-life is at most ``rampup *
    step`` (in the same unit), so that early in training the average forgets
    the initial weights quickly, as EDM2's ``ema_rampup_ratio``.

    ``decay`` (ModelEMA's) caps the per-step decay as for the other
    schedules: pass one close to 1 (e.g. 0.99999) to let the half-life rule.
    ``total_steps`` is not used, except by the configuration warnings.

    ========== ================================
    elapsed    d (half_life=1000, decay=0.9999)
    ========== ================================
    1          0.9993070929904525
    4          0.9972312513520695
    1000       0.5
    ========== ================================
    """

    def __init__(self, half_life: Optional[float] = None, half_life_samples: Optional[float] = None,
                 samples_per_step: Optional[float] = None, rampup: Optional[float] = None):
        self.half_life = _positive_or_none("half_life", half_life)
        self.half_life_samples = _positive_or_none("half_life_samples", half_life_samples)
        self.samples_per_step = _positive_or_none("samples_per_step", samples_per_step)
        self.rampup = _positive_or_none("rampup", rampup)
        if (self.half_life is None) == (self.half_life_samples is None):
            raise TypeError(
                f"HalfLifeDecay takes exactly one of half_life (steps) and half_life_samples (samples), got "
                f"half_life={half_life!r}, half_life_samples={half_life_samples!r}"
            )
        if self.half_life_samples is not None and self.samples_per_step is None:
            raise TypeError(
                "HalfLifeDecay: half_life_samples needs samples_per_step, the training samples per step passed to "
                "update (batch_size * accumulation * world_size for optimizer steps; batch_size * world_size under "
                "the Trainer, which counts batches)"
            )
        if self.half_life is not None and self.samples_per_step is not None:
            raise TypeError("HalfLifeDecay: samples_per_step goes with half_life_samples, not with half_life")

    @property
    def half_life_steps(self) -> float:
        """The half-life in steps (before ``rampup``)."""
        if self.half_life is not None:
            return self.half_life
        return self.half_life_samples / self.samples_per_step

    def _formula(self, decay: Any, step: Any, elapsed: Any, tensor: bool) -> Any:
        # One expression for both forms (NOTE [one formula, two forms] in ema_cuda.ema_decay_schedules).
        h = self.half_life_steps
        if self.rampup is not None:
            h = torch.clamp(step * self.rampup, max=h) if tensor else min(step * self.rampup, h)
        # At step 0 with rampup the half-life is 0 (a copy); the smallest
        # float keeps 0 / h a 0 where no step elapsed, instead of a NaN.
        h = torch.clamp(h, min=_TINY) if isinstance(h, torch.Tensor) else max(h, _TINY)
        if tensor:
            return torch.minimum(torch.pow(0.5, elapsed / h), torch.pow(decay, elapsed))
        return min(0.5 ** (elapsed / h), decay ** elapsed)

    def decay_over(self, decay: float, step: int, total_steps: Optional[int], elapsed: int) -> float:
        _check_elapsed("HalfLifeDecay", elapsed)
        if step < 0:
            raise ValueError(f"HalfLifeDecay: step must be >= 0, got {step}")
        return float(self._formula(decay, float(step), float(elapsed), tensor=False))

    def tensor_decay_over(self, decay: float, step: torch.Tensor, total_steps: Optional[int],
                          elapsed: torch.Tensor) -> torch.Tensor:
        s = _real_tensor("HalfLifeDecay", "step", step)
        k = _real_tensor("HalfLifeDecay", "elapsed", elapsed)
        return self._formula(float(decay), s, k, tensor=True)

    def largest_decay(self, decay: float, total_steps: Optional[int]) -> Optional[float]:
        # The per-step decay grows with the step only under rampup; without a
        # known last step the largest is the un-ramped one.
        if self.rampup is None or isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Real) \
                or not total_steps > 0:
            return self.decay_over(decay, 0 if self.rampup is None else math.inf, total_steps, 1)
        return self.decay_over(decay, total_steps, total_steps, 1)


EMA_DECAY_FUNCTIONS.setdefault("half_life", HalfLifeDecay)
