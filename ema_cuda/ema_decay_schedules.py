"""Decay schedules for :class:`ema_cuda.ModelEMA`.

A schedule turns the user's maximum decay, the current step and the planned
number of steps into the decay used for one update::

    d = schedule(decay, step, total_steps)
    ema = ema * d + model * (1 - d)

A small decay early in training lets the average forget the random initialisation
quickly; the schedule then climbs towards ``decay``.  The first three schedules
reproduce SuperGradients' values (``constant``, ``threshold``, ``exp``); ``power`` is
timm's and diffusers' warmup, ``ramp`` ultralytics'.  ``power_function`` (EDM2,
:mod:`ema_cuda.posthoc.profiles`) and ``half_life`` (:mod:`ema_cuda.schedules_time`) are per elapsed step.

Steps follow SuperGradients' Trainer: 1-based batch indices
(``epoch * len(loader) + batch_idx + 1``), so the first update of a run is
``step=1`` and ``total_steps = len(loader) * max_epochs``.  With gradient
accumulation the Trainer updates once per optimizer step but still passes the
batch index of the batch that completed it (e.g. 2, 4, 6, ... for two batches
per step).

Register your own schedule by adding a class to :data:`EMA_DECAY_FUNCTIONS`;
``ModelEMA.from_params(model, decay_type=name, **kwargs)`` then builds it from
``kwargs``: the arguments its ``__init__`` names, or all of them when it
takes ``**kwargs`` (as here).  For the built-in schedules, whose ``**kwargs``
only absorb SuperGradients' extras, a parameter of another registered
schedule (``beta`` beside ``"threshold"``) is ignored with a warning and any
other unknown argument is an error naming the closest valid one::

    class LinearDecay(IDecayFunction):
        def __init__(self, **kwargs):
            pass

        def __call__(self, decay: float, step: int, total_steps: int) -> float:
            return decay * (step / total_steps)

    EMA_DECAY_FUNCTIONS["linear"] = LinearDecay

``ModelEMA`` checks every value a schedule returns: a value outside ``[0, 1]``
or a non-finite one is an error, not an update.

Tensor form.  ``ModelEMA(..., capturable=True)`` (for ``torch.compile`` and
CUDA graphs) keeps the step in a device tensor and evaluates the schedule
with :meth:`IDecayFunction.tensor_value`.  Every built-in schedule
evaluates the formula of its float value there with tensor operations in
float64: the result equals the float value (bit for bit, except where
``exp``/``pow`` of the device's math library differ from the host's in the
last place), and neither reading nor changing the step synchronises with
the host.  A schedule of your own needs ``tensor_value`` to be used that way.

``python -m ema_cuda.ema_decay_schedules`` prints the built-in schedules'
values; ``python -m ema_cuda.ema_decay_schedules out.png`` also plots them
(needs matplotlib).
"""
from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import Any, Dict, Optional, Type

import torch

try:  # SuperGradients evaluates ExpDecay with numpy's exp, which may differ from libm's in the last bit.
    from numpy import exp as _numpy_exp

    def _sg_exp(x: float) -> float:
        return float(_numpy_exp(x))

except ImportError:  # pragma: no cover - numpy comes with torch in practice
    _sg_exp = math.exp

__all__ = [
    "IDecayFunction",
    "ConstantDecay",
    "ThresholdDecay",
    "ExpDecay",
    "PowerWarmupDecay",
    "RampDecay",
    "EMA_DECAY_FUNCTIONS",
    "decay_function_name",
]


def _positive(cls: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{cls}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_step(cls: str, step: Any) -> None:
    if step < 0:
        raise ValueError(f"{cls}: step must be >= 0, got {step}")


def _check_total(cls: str, total_steps: Any, tensor_form: bool) -> None:
    if tensor_form and isinstance(total_steps, torch.Tensor):
        raise TypeError(f"{cls}.tensor_value: total_steps must be a Python number (it is fixed for a run), got a tensor")
    if total_steps is None or isinstance(total_steps, bool) or not total_steps > 0:
        raise ValueError(f"{cls}: total_steps must be > 0, got {total_steps}")


def _step_f64(cls: str, step: Any) -> torch.Tensor:
    """``step`` as a 0-dim float64 tensor (on its own device when it is a tensor)."""
    if isinstance(step, torch.Tensor):
        if step.dim() != 0:
            raise ValueError(f"{cls}.tensor_value: step must be a 0-dim tensor, got shape {list(step.shape)}")
        if step.is_complex() or step.dtype == torch.bool:
            raise ValueError(f"{cls}.tensor_value: step must be an integer or floating tensor, got {step.dtype}")
        return step.to(torch.float64)
    return torch.tensor(float(step), dtype=torch.float64)


# NOTE [one formula, two forms]
# A built-in schedule writes its formula once, ``_formula(decay, step,
# total_steps, m)``, with arithmetic and the few functions of a namespace
# ``m``.  ``__call__`` passes the Python step and Python's functions (math,
# min, max), so it returns the float the formula written with them gives;
# ``tensor_value`` passes the step as a 0-dim float64 tensor and torch's
# functions, so nothing reads the step back to the host (torch.compile traces
# it, a CUDA graph captures it).  ``decay`` and the parameters stay Python
# numbers in both forms: in the tensor form one operand of ``minimum`` and
# ``maximum`` is a tensor and the other a bound, hence ``clamp``.


class _FloatMath:
    """The formula operations for a Python number step (NOTE [one formula, two forms])."""

    exp = staticmethod(math.exp)
    minimum = staticmethod(min)
    maximum = staticmethod(max)

    @staticmethod
    def where(condition: bool, a: Any, b: Any) -> Any:
        return a if condition else b


class _SuperGradientsMath(_FloatMath):
    """:class:`_FloatMath` with the exp SuperGradients' ExpDecay calls."""

    exp = staticmethod(_sg_exp)


class _TensorMath:
    """The formula operations for a 0-dim float64 tensor step (NOTE [one formula, two forms])."""

    exp = staticmethod(torch.exp)

    @staticmethod
    def minimum(a: Any, b: Any) -> torch.Tensor:
        x, bound = (a, b) if isinstance(a, torch.Tensor) else (b, a)
        return torch.clamp(x, max=bound)

    @staticmethod
    def maximum(a: Any, b: Any) -> torch.Tensor:
        x, bound = (a, b) if isinstance(a, torch.Tensor) else (b, a)
        return torch.clamp(x, min=bound)

    @staticmethod
    def where(condition: torch.Tensor, a: Any, b: torch.Tensor) -> torch.Tensor:
        return torch.where(condition, a if isinstance(a, torch.Tensor) else torch.full_like(b, a), b)


class IDecayFunction(ABC):
    """The interface of a decay schedule: ``schedule(decay, step, total_steps) -> float``.

    ``decay`` is the maximum decay the user configured, ``step`` the current
    (1-based) training step and ``total_steps`` the number of steps the run
    plans; ``step / total_steps`` is the fraction of training done.

    Subclass it to write your own schedule.  Public attributes holding plain
    numbers or strings are what :meth:`get_params` reports and what
    ``ModelEMA.state_dict()`` records, so keep a schedule's parameters there.
    """

    @abstractmethod
    def __call__(self, decay: float, step: int, total_steps: int) -> float:
        """The decay for one update at ``step`` of ``total_steps``, at most ``decay``."""

    def tensor_value(self, decay: float, step: torch.Tensor, total_steps: Optional[int]) -> torch.Tensor:
        """The same value as a 0-dim float64 tensor on ``step``'s device, computed without host synchronisation.

        ``step`` is a 0-dim tensor (integer or floating); ``decay`` and
        ``total_steps`` are Python numbers, fixed for a run.  Used by
        ``ModelEMA(..., capturable=True)``, where the step lives on the device
        so that a compiled or graph-captured training step sees a new value
        every step without recompiling or re-capturing.  Override it with
        tensor operations that mirror :meth:`__call__`; the default raises
        ``NotImplementedError``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no tensor form: implement tensor_value(decay, step, total_steps) with "
            "tensor operations (see ema_cuda.ema_decay_schedules) to use it with ModelEMA(capturable=True)"
        )

    def largest_decay(self, decay: float, total_steps: Optional[int]) -> Optional[float]:
        """The largest decay a run of ``total_steps`` (None: unknown) reaches; None when it cannot say.
        ModelEMA's configuration warnings (horizon, dtype stall) read it; the default is the cap ``decay``."""
        return decay

    @classmethod
    def has_tensor_value(cls) -> bool:
        """True when the class implements :meth:`tensor_value`."""
        return cls.tensor_value is not IDecayFunction.tensor_value

    def get_params(self) -> Dict[str, Any]:
        """The schedule's parameters: its public attributes that are numbers, strings or None.

        ``EMA_DECAY_FUNCTIONS[name](**schedule.get_params())`` rebuilds an equal
        schedule; ``ModelEMA.state_dict()`` stores this dictionary.
        """
        return {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class _Formula(IDecayFunction):
    """A schedule whose :meth:`_formula` gives both forms (NOTE [one formula, two forms]).

    Only a Python step is checked: checking a tensor step would read it back to the host.
    """

    _needs_total_steps = False
    _needs_nonnegative_step = False
    _float_math: Type[_FloatMath] = _FloatMath

    @abstractmethod
    def _formula(self, decay: Any, step: Any, total_steps: Any, m: Any) -> Any:
        """The decay at ``step``, written with ``m.exp``, ``m.minimum``, ``m.maximum``, ``m.where`` and arithmetic."""

    def __call__(self, decay: float, step: int, total_steps: int) -> float:
        name = type(self).__name__
        if self._needs_total_steps:
            _check_total(name, total_steps, tensor_form=False)
        if self._needs_nonnegative_step:
            _check_step(name, step)
        return self._formula(decay, step, total_steps, self._float_math)

    def tensor_value(self, decay: float, step: torch.Tensor, total_steps: Optional[int]) -> torch.Tensor:
        name = type(self).__name__
        if self._needs_total_steps:
            _check_total(name, total_steps, tensor_form=True)
        s = _step_f64(name, step)
        value = self._formula(float(decay), s, total_steps, _TensorMath)
        # A formula that ignores the step (ConstantDecay) gives a number.
        return value if isinstance(value, torch.Tensor) else torch.full_like(s, value)


class ConstantDecay(_Formula):
    """The same decay at every step: ``d = decay``.

    Use it when the EMA starts from weights that are already good (fine-tuning,
    a resumed run) so that there is no random initialisation to forget.

    ====== =====================
    step   d (decay=0.9999)
    ====== =====================
    any    0.9999
    ====== =====================
    """

    def __init__(self, **kwargs):
        pass

    def _formula(self, decay, step, total_steps, m):
        return decay


class ThresholdDecay(_Formula):
    """``d = min(decay, (1 + step) / (10 + step))``: starts at 0.1 and follows 1 - 9 / (10 + step).

    The schedule of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``
    (and, one step later, of diffusers' ``EMAModel`` without warmup).  It does
    not look at ``total_steps``, so it suits runs whose length is not known in
    advance.  The decay reaches 0.999 at step 8,990 and 0.9999 at step 89,990:
    with a high ``decay`` on a short run the average stays close to the
    recent weights.

    ======= ======================
    step    d (decay=0.9999)
    ======= ======================
    0       0.1
    1       0.18181818181818182
    10      0.55
    100     0.9181818181818182
    1000    0.9910891089108911
    10000   0.999100899100899
    100000  0.9999
    ======= ======================

    ``step`` must be >= 0.
    """

    _needs_nonnegative_step = True

    def __init__(self, **kwargs):
        pass

    def _formula(self, decay, step, total_steps, m):
        return m.minimum(decay, (1 + step) / (10 + step))


class ExpDecay(_Formula):
    """``d = decay * (1 - exp(-beta * step / total_steps))``: a ramp over the fraction of training done.

    SuperGradients' default (with ``beta=15``).  The decay is 0 at step 0,
    ``decay * (1 - 1/e)`` at ``step = total_steps / beta`` and, for ``beta=15``,
    99.75% of ``decay`` after 40% of training.  Because it scales
    with ``total_steps`` the ramp has the same shape for a run of 1,000 steps
    and one of 1,000,000; a larger ``beta`` reaches the plateau sooner.

    ========== ========================= ========================
    step/total d (decay=0.9999, beta=15) d (decay=0.9999, beta=5)
    ========== ========================= ========================
    0          0.0                       0.0
    0.01       0.1392780943725847        0.048765698441736054
    0.05       0.5275806839142594        0.22117709700690227
    0.1        0.7767921528675851        0.39342999335333784
    0.2        0.9501179103389729        0.6320573467726748
    0.5        0.9993469709382893        0.9178232098759636
    1.0        0.9998996941282697        0.9931627267956145
    ========== ========================= ========================

    ``total_steps`` must be > 0 and ``step`` >= 0.  A ``step`` past
    ``total_steps`` (a run extended beyond its plan) is clamped to
    ``total_steps``: the decay stays at its final value instead of rising
    further as SuperGradients' formula would (by at most ``decay * exp(-beta)``, 3e-7 for beta=15).
    """

    _needs_total_steps = True
    _needs_nonnegative_step = True
    _float_math = _SuperGradientsMath

    def __init__(self, beta: float = None, **kwargs):
        if beta is None:
            raise TypeError("ExpDecay needs `beta`, the ramp's steepness (SuperGradients' default is beta=15)")
        self.beta = _positive("ExpDecay", "beta", beta)

    def _formula(self, decay, step, total_steps, m):
        x = m.minimum(step, total_steps) / total_steps
        return decay * (1 - m.exp(-x * self.beta))


class PowerWarmupDecay(_Formula):
    """timm's and diffusers' warmup: ``d = clamp(1 - (1 + s / inv_gamma) ** -power, min_decay, decay)``.

    Here ``s = step - update_after_step - 1``; while ``s <= 0`` the decay is 0,
    so the EMA copies the model (the first update of a run, and every update
    during the first ``update_after_step`` steps).  The values match timm's
    ``ModelEmaV3(use_warmup=True)`` and diffusers' ``EMAModel(use_ema_warmup=True)``
    called with the same 1-based step, so a recipe tuned with either library
    carries over.  ``power=2/3`` suits long runs (the decay reaches 0.999 at
    about 31,600 steps, 0.9999 at 1,000,000); ``power=3/4`` shorter ones
    (0.999 at about 10,000 steps, 0.9999 at 215,000).  ``total_steps`` is not
    used.

    ======= ========================== ==========================
    step    d (decay=0.9999, power=2/3) d (decay=0.9999, power=3/4)
    ======= ========================== ==========================
    1       0.0                        0.0
    2       0.3700394750525634         0.4053964424986395
    10      0.7845565309968117         0.8221720589961077
    100     0.9535841116638722         0.9683772233983162
    1000    0.99                       0.9943765867480965
    10000   0.9978455653099682         0.999
    100000  0.9995358411166387         0.9998221720589962
    ======= ========================== ==========================

    Args:
        inv_gamma: inverse multiplicative factor of the step (default 1).
        power: exponent of the warmup (default 2/3).
        min_decay: lower clamp of the decay once ``s > 0`` (default 0).
        update_after_step: number of steps during which the EMA only copies
            the model (default 0).
    """

    def __init__(
        self,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        **kwargs,
    ):
        self.inv_gamma = _positive("PowerWarmupDecay", "inv_gamma", inv_gamma)
        self.power = _positive("PowerWarmupDecay", "power", power)
        if isinstance(min_decay, bool) or not isinstance(min_decay, numbers.Real) or not 0.0 <= min_decay <= 1.0:
            raise ValueError(f"PowerWarmupDecay: min_decay must be a number in [0, 1], got {min_decay!r}")
        self.min_decay = float(min_decay)
        if isinstance(update_after_step, bool) or not isinstance(update_after_step, numbers.Integral) or update_after_step < 0:
            raise ValueError(f"PowerWarmupDecay: update_after_step must be an integer >= 0, got {update_after_step!r}")
        self.update_after_step = int(update_after_step)

    def _formula(self, decay, step, total_steps, m):
        s = m.maximum(step - self.update_after_step - 1, 0)
        d = 1 - (1 + s / self.inv_gamma) ** -self.power
        # At s = 0 the formula gives 1 - 1 = 0, which min_decay would raise: the copy is explicit.
        return m.where(s <= 0, 0.0, m.maximum(m.minimum(d, decay), self.min_decay))


class RampDecay(_Formula):
    """ultralytics' ramp: ``d = decay * (1 - exp(-step / tau))``.

    The decay climbs with a time constant of ``tau`` steps, whatever the length
    of the run: it is 63% of ``decay`` at ``step = tau`` and within 0.01% of
    it after ``9.2 * tau`` steps.  ultralytics (YOLOv5/v8) uses
    ``decay=0.9999, tau=2000``.  ``total_steps`` is not used.

    ======== ==========================
    step     d (decay=0.9999, tau=2000)
    ======== ==========================
    0        0.0
    1        0.000499825033328626
    100      0.048765698441736054
    1000     0.39342999335333784
    2000     0.6320573467726748
    10000    0.9931627267956145
    20000    0.9998546046102305
    ======== ==========================
    """

    _needs_nonnegative_step = True

    def __init__(self, tau: float = 2000, **kwargs):
        self.tau = _positive("RampDecay", "tau", tau)

    def _formula(self, decay, step, total_steps, m):
        return decay * (1 - m.exp(-step / self.tau))


#: Schedules by name, for ``ModelEMA.from_params(decay_type=...)``.  Add your own.
EMA_DECAY_FUNCTIONS: Dict[str, Type[IDecayFunction]] = {
    "constant": ConstantDecay,
    "threshold": ThresholdDecay,
    "exp": ExpDecay,
    "power": PowerWarmupDecay,
    "ramp": RampDecay,
}


def decay_function_name(decay_function: IDecayFunction) -> str:
    """The registry name of a schedule's class, or its qualified class name when it is not registered."""
    cls = type(decay_function)
    for name, registered in EMA_DECAY_FUNCTIONS.items():
        if registered is cls:
            return name
    return f"{cls.__module__}.{cls.__qualname__}"


def _builtin_examples() -> Dict[str, IDecayFunction]:
    return {
        "constant": ConstantDecay(),
        "threshold": ThresholdDecay(),
        "exp(beta=15)": ExpDecay(beta=15),
        "power(2/3)": PowerWarmupDecay(power=2 / 3),
        "power(3/4)": PowerWarmupDecay(power=3 / 4),
        "ramp(tau=2000)": RampDecay(tau=2000),
    }


def _table(decay: float = 0.9999, total: int = 100_000) -> str:
    steps = [1, 10, 100, 1_000, 5_000, 10_000, 40_000, total]
    names = list(_builtin_examples())
    lines = ["step      " + "".join(f"{n:>16}" for n in names)]
    for s in steps:
        fns = _builtin_examples().values()
        lines.append(f"{s:<10}" + "".join(f"{fn(decay, s, total):>16.8f}" for fn in fns))
    return "\n".join(lines)


def _plot(path: str, decay: float = 0.9999, total: int = 100_000) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(0, total + 1, 100)
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, fn in _builtin_examples().items():
        ax.plot(list(steps), [fn(decay, s, total) for s in steps], label=label)
    ax.set_xlabel(f"step (total_steps={total})")
    ax.set_ylabel("decay")
    ax.set_ylim(0.9, 1.0)
    ax.set_title(f"EMA decay schedules, decay={decay}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    import sys

    print(f"decay=0.9999, total_steps=100000\n{_table()}")
    if len(sys.argv) > 1:
        try:
            _plot(sys.argv[1])
        except ImportError:
            sys.exit("plotting needs matplotlib (pip install matplotlib)")
        print(f"wrote {sys.argv[1]}")
