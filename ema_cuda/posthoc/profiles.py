"""Power-function EMA profiles (Karras et al., EDM2, arXiv 2312.02696): the width relation and the schedule.

A power-function average with exponent ``gamma`` weighs the weights seen at
time ``tau`` in ``[0, t]`` by the density::

    p(tau) = (gamma + 1) * tau**gamma / t**(gamma + 1)

Unlike an EMA with a fixed decay, its width grows with ``t``: it always
covers the same fraction of training.  That fraction is ``sigma_rel``, the
standard deviation of ``p`` divided by ``t``; see NOTE [sigma_rel of a
power-function profile] for the relation and its inverse.

One update per step with ``beta(t) = (1 - 1/t) ** (gamma + 1)`` (``t`` the
1-based update index, so the first update copies the model) gives exactly
the discrete form of ``p``: the model after update ``tau`` gets the weight
``(tau**(gamma+1) - (tau-1)**(gamma+1)) / t**(gamma+1)``, the integral of
``p`` over ``[tau - 1, tau]`` (the product of the later factors telescopes
to ``(tau / t) ** (gamma + 1)``).  An update ``k`` steps after the last one
applies the product of the ``k`` factors it stands for, which telescopes
the same way to ``((t - k) / t) ** (gamma + 1)``, so the profile holds under
``update_every`` too (NOTE [elapsed steps] in :mod:`ema_cuda.schedules_time`).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch

from ema_cuda.ema_decay_schedules import EMA_DECAY_FUNCTIONS
from ema_cuda.schedules_time import ElapsedStepsDecay

__all__ = ["GAMMA_MIN", "SIGMA_REL_MAX", "PowerFunctionDecay", "gamma_to_sigma_rel", "sigma_rel_to_gamma"]

# NOTE [sigma_rel of a power-function profile]
# With t = 1 the density is p(x) = (g+1) x^g on [0, 1]; its moments are
# E[x] = (g+1)/(g+2) and E[x^2] = (g+1)/(g+3), so
#     sigma_rel^2 = E[x^2] - E[x]^2 = (g+1) / ((g+2)^2 (g+3)).
# As a function of g this rises from 0 at g = -1 to a maximum and then falls
# towards 0 like 1/g.  Setting its derivative to zero gives, with u = g + 1,
# u^2 + u - 1 = 0: the maximum is at g = (sqrt(5) - 3)/2 ~ -0.382, where
# sigma_rel ~ 0.3003.  Only the branch g >= that point is used: there the
# relation is one-to-one (each sigma_rel names one profile) and the profile
# has a finite L2 norm (that needs g > -1/2), which reconstruction relies on.
# The inverse is the largest real root of
#     g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0
# (the relation with denominators cleared); it is found here by bisection on
# the monotone branch, which needs no cubic formula and no numpy.

#: The smallest exponent used: where sigma_rel is largest (NOTE [sigma_rel of a power-function profile]).
GAMMA_MIN = (math.sqrt(5.0) - 3.0) / 2.0


def _sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


#: The largest relative width a power-function profile has.
SIGMA_REL_MAX = _sigma_rel(GAMMA_MIN)


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-function profile with exponent ``gamma``.

    ``sqrt((gamma+1) / ((gamma+2)**2 * (gamma+3)))``; ``gamma`` must be at
    least :data:`GAMMA_MIN` (about -0.382), the branch on which the relation
    is one-to-one (NOTE [sigma_rel of a power-function profile]).
    """
    g = _real("gamma_to_sigma_rel: gamma", gamma)
    if g < GAMMA_MIN:
        raise ValueError(
            f"gamma_to_sigma_rel: gamma must be >= {GAMMA_MIN:.6f} (where sigma_rel peaks at "
            f"{SIGMA_REL_MAX:.6f}), got {gamma!r}"
        )
    return _sigma_rel(g)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma`` of the power-function profile of relative width ``sigma_rel``.

    The inverse of :func:`gamma_to_sigma_rel`: ``sigma_rel`` must be in
    ``(0, SIGMA_REL_MAX]`` (about 0.3003).  ``0.10`` gives about 6.94,
    ``0.05`` about 16.97.
    """
    s = _real("sigma_rel_to_gamma: sigma_rel", sigma_rel)
    if not 0.0 < s <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel_to_gamma: sigma_rel must be in (0, {SIGMA_REL_MAX:.6f}], got {sigma_rel!r}")
    if s == SIGMA_REL_MAX:
        return GAMMA_MIN
    lo, hi = GAMMA_MIN, 1.0
    while _sigma_rel(hi) > s:  # sigma_rel ~ 1/gamma for large gamma: a few doublings
        lo, hi = hi, hi * 2.0
    for _ in range(200):  # on [lo, hi] sigma_rel falls monotonically; stop when the bracket is one ulp
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _sigma_rel(mid) > s:
            lo = mid
        else:
            hi = mid
    return lo if abs(_sigma_rel(lo) - s) <= abs(_sigma_rel(hi) - s) else hi


def _clamp_low(x: Any, low: float) -> Any:
    # The tensor form of max(x, low) (NOTE [one formula, two forms] in ema_cuda.ema_decay_schedules).
    return torch.clamp(x, min=low) if isinstance(x, torch.Tensor) else max(x, low)


class PowerFunctionDecay(ElapsedStepsDecay):
    """EDM2's power-function profile: ``d = min(decay, (1 - 1/step) ** (gamma + 1))``.

    Give exactly one of ``gamma`` (>= about -0.382) and ``sigma_rel`` (in
    ``(0, 0.3003]``; converted with :func:`sigma_rel_to_gamma`).  The EMA
    after ``t`` updates is then the power-function average of all the models
    seen so far (see :mod:`ema_cuda.posthoc.profiles`): its width is a fixed
    fraction ``sigma_rel`` of the run, e.g. 0.05 to 0.10 for diffusion models.
    Steps are 1-based: step 1 gives 0 (the EMA copies the model), and so does
    any step below 1.

    ``decay`` (ModelEMA's) is a cap, as for the other schedules: the profile
    is followed exactly while ``(1 - 1/step) ** (gamma + 1) <= decay``, i.e.
    up to about ``step = (gamma + 1) / (1 - decay)`` (79,000 steps for
    ``sigma_rel=0.10`` and ``decay=0.9999``); after that the EMA becomes a
    plain EMA with that decay.  For a profile to reconstruct from later
    (:func:`ema_cuda.posthoc.reconstruct`), pass a decay close enough to 1
    that the cap is never reached (``decay=1 - 1e-9``).  An update ``k``
    steps after the last one applies ``min(decay ** k, ((step - k) / step) **
    (gamma + 1))``, the product of the ``k`` per-step factors, so the profile
    is the same under ``update_every`` (NOTE [elapsed steps] in
    :mod:`ema_cuda.schedules_time`).  ``total_steps`` is not used.

    ``get_params()`` reports ``gamma`` only (``sigma_rel`` is a property), so
    a saved EMA rebuilds the same schedule.
    """

    def __init__(self, gamma: Optional[float] = None, sigma_rel: Optional[float] = None, **kwargs):
        if (gamma is None) == (sigma_rel is None):
            raise TypeError(
                f"PowerFunctionDecay takes exactly one of gamma and sigma_rel, got gamma={gamma!r}, "
                f"sigma_rel={sigma_rel!r}"
            )
        if gamma is None:
            gamma = sigma_rel_to_gamma(sigma_rel)
        else:
            gamma_to_sigma_rel(gamma)  # checks the range
        self.gamma = float(gamma)

    @property
    def sigma_rel(self) -> float:
        """The relative width of the profile."""
        return gamma_to_sigma_rel(self.gamma)

    def _formula(self, decay: Any, step: Any, elapsed: Any) -> Any:
        # One expression for both forms (NOTE [one formula, two forms] in ema_cuda.ema_decay_schedules):
        # below step 1 the base is clamped to 0, which makes the first update a copy.
        base = _clamp_low(1.0 - elapsed / _clamp_low(step, 1.0), 0.0)
        power = base ** (self.gamma + 1.0)
        if isinstance(elapsed, torch.Tensor):
            return torch.minimum(power, torch.pow(decay, elapsed))
        return min(power, decay ** elapsed)

    def decay_over(self, decay: float, step: int, total_steps: Optional[int], elapsed: int) -> float:
        if isinstance(elapsed, bool) or not isinstance(elapsed, numbers.Real) or not elapsed >= 0:
            raise ValueError(f"PowerFunctionDecay: elapsed must be a number of steps >= 0, got {elapsed!r}")
        return self._formula(decay, float(step), float(elapsed))

    def largest_decay(self, decay: float, total_steps: Optional[int]) -> Optional[float]:
        # The decay grows with the step and reaches the cap only after about
        # (gamma + 1) / (1 - decay) steps: the configuration warnings judge
        # the value at the last step, and nothing without one.
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Real) or not total_steps >= 1:
            return None
        return self._formula(decay, float(total_steps), 1.0)

    def tensor_decay_over(self, decay: float, step: torch.Tensor, total_steps: Optional[int],
                          elapsed: torch.Tensor) -> torch.Tensor:
        for name, value in (("step", step), ("elapsed", elapsed)):
            if not isinstance(value, torch.Tensor) or value.dim() != 0 or value.is_complex() \
                    or value.dtype == torch.bool:
                raise ValueError(f"PowerFunctionDecay.tensor_value: {name} must be a 0-dim real tensor, got {value!r}")
        return self._formula(float(decay), step.to(torch.float64), elapsed.to(torch.float64))


# Registered here rather than in ema_decay_schedules.py, which this module imports; ``import ema_cuda``
# imports this module, so the name is there before any configuration can ask for it.
EMA_DECAY_FUNCTIONS.setdefault("power_function", PowerFunctionDecay)
