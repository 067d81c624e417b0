"""The options of an EMA: one frozen dataclass, validated in one place, and its configuration front-ends.

Every way an option reaches an EMA goes through :class:`EMAOptions`: the
constructor, ``ModelEMA.from_params`` (which first splits its keyword
arguments between the EMA and the decay schedule, see
:func:`from_params_arguments`), :func:`check_ema_params` (the same split,
without building anything) and ``load_state_dict`` (:meth:`EMAOptions.from_saved`).
A value is checked once, when the options are made; an EMA holds only
options that passed.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import numbers
import warnings
from dataclasses import InitVar, dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ema_cuda.ema_decay_schedules import EMA_DECAY_FUNCTIONS, IDecayFunction, decay_function_name
# Registers "half_life" with the other schedules before any configuration can name it.
from ema_cuda import schedules_time  # noqa: F401
from ema_cuda.ops import SUPPORTED_DTYPES

__all__ = ["EMAOptions", "OPTION_NAMES", "check_ema_params", "from_params_arguments", "option_property"]

#: The EMA options ``from_params`` takes out of its keyword arguments before the schedule's.
OPTION_NAMES = ("buffers", "ema_dtype", "update_every", "skip_nonfinite", "capturable", "total_steps", "async_update")
# Every keyword from_params takes itself (the schedule's own come on top).
FROM_PARAMS_KEYS = ("decay", "decay_type", "exp_activation") + OPTION_NAMES


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _parse_dtype(where: str, ema_dtype: Any) -> Optional[torch.dtype]:
    if ema_dtype is None:
        return None
    dtype = getattr(torch, ema_dtype.replace("torch.", ""), None) if isinstance(ema_dtype, str) else ema_dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{where}: ema_dtype must be None or one of {[str(d) for d in SUPPORTED_DTYPES]}, got {ema_dtype!r}"
        )
    return dtype


@dataclass(frozen=True)
class EMAOptions:
    """What an EMA was asked to do; see :class:`~ema_cuda.ema.ModelEMA` for each option's meaning.

    ``where`` names the caller in error messages (``"ModelEMA"``,
    ``"ModelEMA.load_state_dict"``).  Values are normalised here: ``ema_dtype``
    given as a string becomes a ``torch.dtype``, integers become ``int``.
    """

    decay: float
    decay_function: Any
    buffers: str = "average"
    ema_dtype: Optional[torch.dtype] = None
    update_every: int = 1
    skip_nonfinite: bool = False
    capturable: bool = False
    total_steps: Optional[int] = None
    async_update: bool = False
    where: InitVar[str] = "ModelEMA"

    def __post_init__(self, where: str) -> None:
        normalise = object.__setattr__  # the dataclass is frozen once this returns
        decay = self.decay
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not (0.0 < float(decay) < 1.0):
            raise ValueError(f"{where}: decay must be a number in (0, 1), e.g. 0.9999; got {decay!r}")
        normalise(self, "decay", float(decay))
        if not callable(self.decay_function):
            raise TypeError(f"{where}: decay_function must be callable, got {self.decay_function!r}")
        if self.buffers not in ("average", "copy"):
            raise ValueError(f"{where}: buffers must be 'average' or 'copy', got {self.buffers!r}")
        if not _is_int(self.update_every) or self.update_every < 1:
            raise ValueError(f"{where}: update_every must be an integer >= 1, got {self.update_every!r}")
        normalise(self, "update_every", int(self.update_every))
        normalise(self, "ema_dtype", _parse_dtype(where, self.ema_dtype))
        for flag in ("skip_nonfinite", "capturable", "async_update"):
            normalise(self, flag, bool(getattr(self, flag)))
        if self.total_steps is not None:
            if not _is_int(self.total_steps) or self.total_steps < 1:
                raise ValueError(f"{where}: total_steps must be None or an integer >= 1, got {self.total_steps!r}")
            normalise(self, "total_steps", int(self.total_steps))
        if self.capturable:
            self._check_capturable(where)

    def _check_capturable(self, where: str) -> None:
        fn = self.decay_function
        if not (isinstance(fn, IDecayFunction) and fn.has_tensor_value()):
            raise ValueError(
                f"{where}: capturable=True needs a decay schedule with a tensor form (IDecayFunction.tensor_value); "
                f"{fn!r} has none"
            )
        if self.update_every != 1:
            raise ValueError(
                f"{where}: capturable=True needs update_every=1 (got {self.update_every}); skipping steps would "
                "need a host decision per step"
            )
        if self.skip_nonfinite:
            raise ValueError(
                f"{where}: capturable=True cannot be combined with skip_nonfinite=True, whose check reads a value "
                "back to the host at every update"
            )
        if self.async_update:
            raise ValueError(
                f"{where}: async_update and capturable are exclusive (a captured graph orders the update itself)"
            )

    def replace(self, where: str, **changes: Any) -> "EMAOptions":
        """New options with ``changes``, validated as a whole (errors are prefixed with ``where``)."""
        return dataclasses.replace(self, where=where, **changes)

    def as_dict(self) -> Dict[str, Any]:
        """The options as a plain dict (what a pickled EMA keeps)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def from_saved(self, where: str, state: Mapping[str, Any]) -> Tuple["EMAOptions", Optional[str]]:
        """These options with what a saved state holds (decay, schedule, ``buffers``, ``update_every``,
        ``skip_nonfinite``), and the warning to give once the whole state is known to load, or None.

        The other options (``ema_dtype``, ``capturable``, ``async_update``,
        ``total_steps``) describe how this EMA is built and stay.  A saved
        schedule that differs from the current one is rebuilt from
        ``EMA_DECAY_FUNCTIONS``, or the current one kept when its name is not
        registered; either way with a warning.
        """
        skip = state.get("skip_nonfinite", self.skip_nonfinite)
        if not isinstance(skip, bool):  # a saved flag is a real bool: "yes" is a damaged state, not True
            raise ValueError(f"{where}: skip_nonfinite must be True or False, got {skip!r}")
        fn, warning = _saved_schedule(where, state.get("decay_function"), self.decay_function)
        changes = {k: state[k] for k in ("buffers", "update_every") if k in state}
        return self.replace(where, decay=state["decay"], decay_function=fn, skip_nonfinite=skip, **changes), warning

    def largest_decay(self, total_steps: Any) -> Optional[float]:
        """The largest decay the schedule reaches in a run of ``total_steps``: ``decay`` (the cap) unless the
        schedule says otherwise (IDecayFunction.largest_decay); None when it cannot say."""
        hook = getattr(self.decay_function, "largest_decay", None)
        return hook(self.decay, total_steps) if callable(hook) else self.decay

    def horizon_warning(self, where: str, total_steps: Any) -> Optional[str]:
        """The warning for a run shorter than the ``1 / (1 - decay)`` steps the EMA averages over, or None."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Real) or not total_steps > 0:
            return None
        decay = self.largest_decay(total_steps)
        if decay is None or decay >= 1.0:
            return None
        horizon = 1.0 / (1.0 - decay)
        # The tolerance keeps 1/(1-0.9) = 10.000000000000002 from exceeding a 10-step run.
        if horizon <= total_steps * (1 + 1e-9):
            return None
        hint = f"; decay={1 - 10 / total_steps:.4g} averages over the last tenth of it" if total_steps > 10 else ""
        return (
            f"{where}: decay={decay} averages over about 1/(1-decay) = {horizon:.0f} steps, more than the "
            f"planned total_steps={total_steps}: at the end of the run the EMA still weighs the initial weights "
            f"heavily{hint}"
        )

    def stall_warning(self, where: str, example_keys: Mapping[torch.dtype, str]) -> Optional[str]:
        """The warning for EMA dtypes (with a key of each) in which ``1 + (1 - decay)`` rounds to 1, or None."""
        decay = self.largest_decay(self.total_steps)
        if decay is None:
            return None
        stalled = {dtype: key for dtype, key in example_keys.items() if _rounds_to_one(decay, dtype)}
        if not stalled:
            return None
        step = 1 - decay
        listed = ", ".join(f"{dtype} (e.g. {key!r})" for dtype, key in stalled.items())
        return (
            f"{where}: with decay={decay} the EMA moves by 1 - decay = {step:.3g} of the difference per "
            f"update, but 1 + {step:.3g} rounds to 1 in {listed}: updates are lost to rounding and those entries "
            "stall near their initial values; keep the EMA in float32 (ema_dtype=torch.float32) or use a smaller "
            "decay"
        )

    def decay_at(self, where: str, step: int, total_steps: Any, elapsed: Optional[int] = None) -> float:
        """The schedule's decay at ``step``, checked to be a finite number in [0, 1].

        A schedule defined per elapsed step gets ``elapsed``, the steps since
        the last update (``update_every`` when None); the others are called as
        ``schedule(decay, step, total_steps)`` (NOTE [elapsed steps] in
        :mod:`ema_cuda.schedules_time`).
        """
        over = getattr(self.decay_function, "decay_over", None)
        if callable(over):
            value = over(self.decay, step, total_steps, self.update_every if elapsed is None else elapsed)
        else:
            value = self.decay_function(self.decay, step, total_steps)
        try:
            d = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"{where}: the decay schedule {self.decay_function!r} returned {value!r} at step {step} of "
                f"{total_steps}; expected a number"
            ) from None
        if not (math.isfinite(d) and 0.0 <= d <= 1.0):
            raise ValueError(
                f"{where}: the decay schedule {self.decay_function!r} returned {d} at step {step} of "
                f"{total_steps}; a decay must be a finite number in [0, 1]"
            )
        return d


def _rounds_to_one(decay: float, dtype: torch.dtype) -> bool:
    """True when ``1 + (1 - decay)`` rounds to 1 in ``dtype``: an EMA kept in it cannot move by ``1 - decay``."""
    return bool(torch.tensor(1.0 + (1.0 - decay), dtype=torch.float64).to(dtype) == 1)


def option_property(name: str, settable: bool = True) -> property:
    """An EMA attribute that reads ``name`` from its options; setting it validates new options.

    Options that fix how the EMA is built (its dtype, its executor) are read-only.
    """

    def get(ema: Any) -> Any:
        return getattr(ema._options, name)

    def set_(ema: Any, value: Any) -> None:
        if not settable:
            raise AttributeError(f"{type(ema).__name__}.{name} is fixed at construction; build a new EMA to change it")
        ema._options = ema._options.replace(type(ema).__name__, **{name: value})

    return property(get, set_, doc=f"The ``{name}`` option (see the class docstring).")


# ---------------------------------------------------------------------- schedules from configuration values


def _schedule_signature(decay_cls: Any) -> Tuple[List[str], bool]:
    """The keyword parameters a schedule's constructor names, and whether it also takes ``**kwargs``."""
    try:
        params = inspect.signature(decay_cls).parameters.values()
    except (TypeError, ValueError):  # a constructor Python cannot inspect: let it have everything
        return [], True
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def _split_schedule_kwargs(
    where: str, decay_type: str, decay_cls: Any, kwargs: Dict[str, Any]
) -> Tuple[Dict[str, Any], Dict[str, List[str]]]:
    """Splits the keywords left after the EMA's own: arguments for the schedule, and misplaced ones.

    A key the schedule names goes to it.  A key another registered schedule
    names (``beta`` beside ``decay_type="threshold"``: a SuperGradients
    recipe that switched schedules) is misplaced: returned with the
    schedules that take it, for a warning, and not passed on.  A custom
    schedule whose constructor takes ``**kwargs`` receives every other key.
    Any other key is a typo (``ema_dtyp``, ``decya``): a ValueError naming
    it and the closest valid key.  The built-in schedules take ``**kwargs``
    only to ignore SuperGradients' extras, so they get no unknown keys.
    """
    named, var_kw = _schedule_signature(decay_cls)
    passthrough = var_kw and getattr(decay_cls, "__module__", None) != IDecayFunction.__module__
    others: Dict[str, List[str]] = {}
    for name, other in EMA_DECAY_FUNCTIONS.items():
        if other is not decay_cls:
            for key in _schedule_signature(other)[0]:
                others.setdefault(key, []).append(name)
    to_schedule: Dict[str, Any] = {}
    misplaced: Dict[str, List[str]] = {}
    unknown: List[str] = []
    for key, value in kwargs.items():
        if key in named or passthrough:
            to_schedule[key] = value
        elif key in others:
            misplaced[key] = others[key]
        else:
            unknown.append(key)
    if unknown:
        valid = sorted(set(FROM_PARAMS_KEYS) | set(named) | set(others))
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"{where}: unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; valid ones are the "
            f"ModelEMA options {list(FROM_PARAMS_KEYS)}, the parameters of decay_type {decay_type!r} "
            f"({named or 'none'}) and those of the other registered schedules ({sorted(others) or 'none'})"
        )
    return to_schedule, misplaced


def _registered(where: str, decay_type: Any) -> Any:
    try:
        return EMA_DECAY_FUNCTIONS[decay_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"{where}: unknown decay_type {decay_type!r}; registered types: {list(EMA_DECAY_FUNCTIONS)}"
        ) from None


def from_params_arguments(
    where: str, decay_type: Optional[str], decay: Optional[float], kwargs: Dict[str, Any], stacklevel: int
) -> Tuple[float, Any, Dict[str, Any]]:
    """``(decay, decay_function, options)`` for ``ModelEMA.from_params`` (see its docstring for the rules).

    Warnings point ``stacklevel`` frames up, at the caller of ``from_params``.
    """
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
    if decay is None:
        warnings.warn(
            "ModelEMA.from_params: `decay` is not specified; defaulting to decay=0.9999. "
            "Set it explicitly (e.g. ema_params: {decay: 0.9999, decay_type: exp, beta: 15}).",
            UserWarning,
            stacklevel=stacklevel,
        )
        decay = 0.9999
    if "exp_activation" in kwargs:
        exp_activation = bool(kwargs.pop("exp_activation"))
        decay_type = "exp" if exp_activation else "constant"
        warnings.warn(
            "ModelEMA.from_params: `exp_activation` is deprecated; use "
            f"decay_type={decay_type!r} instead (exp_activation=True is decay_type='exp', "
            "exp_activation=False is decay_type='constant').",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        if exp_activation:
            kwargs.setdefault("beta", 15)
    if decay_type is None:
        warnings.warn(
            "ModelEMA.from_params: `decay_type` is not specified; defaulting to decay_type='exp' with beta=15. "
            f"Set it explicitly (one of {list(EMA_DECAY_FUNCTIONS)}).",
            UserWarning,
            stacklevel=stacklevel,
        )
        decay_type = "exp"
        kwargs.setdefault("beta", 15)
    decay_cls = _registered("ModelEMA.from_params", decay_type)
    schedule_kwargs, misplaced = _split_schedule_kwargs(where, decay_type, decay_cls, kwargs)
    if misplaced:
        listed = ", ".join(
            f"{k}={kwargs[k]!r} (a parameter of {' / '.join(map(repr, v))})" for k, v in misplaced.items()
        )
        pronoun = "them" if len(misplaced) > 1 else "it"
        warnings.warn(
            f"{where}: ignoring {listed}: decay_type {decay_type!r} does not take {pronoun}",
            UserWarning,
            stacklevel=stacklevel,
        )
    return decay, decay_cls(**schedule_kwargs), options


def check_ema_params(params: Dict[str, Any], where: str = "ema_params") -> None:
    """Raises the error :meth:`ModelEMA.from_params` would raise for an unknown key of ``params``, building nothing.

    Lets a configuration (the Trainer's ``ema_params``) be checked before
    any work starts.  Warnings (defaults, misplaced keys) are left to
    ``from_params`` so that they fire once.
    """
    kwargs = {k: v for k, v in params.items() if k not in OPTION_NAMES and k != "decay"}
    decay_type = kwargs.pop("decay_type", None)
    if "exp_activation" in kwargs:
        decay_type = "exp" if bool(kwargs.pop("exp_activation")) else "constant"
    if decay_type is None:
        decay_type = "exp"
    _split_schedule_kwargs(where, decay_type, _registered(where, decay_type), kwargs)


def _saved_schedule(where: str, info: Optional[Mapping[str, Any]], current: Any) -> Tuple[Any, Optional[str]]:
    """The schedule a saved state names (``{"name", "params"}``), and the warning its replacing gives, or None."""
    if not info:
        return current, None
    saved_name, saved_params = info.get("name"), dict(info.get("params") or {})
    params = current.get_params() if isinstance(current, IDecayFunction) else {}
    if saved_name == decay_function_name(current) and saved_params == params:
        return current, None
    if saved_name in EMA_DECAY_FUNCTIONS:
        rebuilt = EMA_DECAY_FUNCTIONS[saved_name](**saved_params)
        return rebuilt, (
            f"{where}: the saved decay schedule {saved_name!r} {saved_params} replaces the current {current!r}"
        )
    return current, (
        f"{where}: the saved decay schedule {saved_name!r} is not registered in EMA_DECAY_FUNCTIONS; keeping the "
        f"current {current!r}"
    )
