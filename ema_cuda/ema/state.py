"""An EMA's saved forms: its ``state_dict`` (checked whole before any write on load) and its pickled layout.

The ``state_dict`` holds only tensors, numbers, strings, lists and dicts, so
``torch.load(..., weights_only=True)`` reads it; its keys are unchanged
since version 1.  A pickled EMA (``torch.save(ema)``, ``copy.deepcopy``)
keeps a plain dict of its parts (:func:`pickled`), and unpickling also reads
the attribute layout of the single-module EMA that came before
(:func:`unpickled`).
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, Mapping, NamedTuple, Optional

import torch

from ema_cuda.ema.options import EMAOptions
from ema_cuda.ema_decay_schedules import IDecayFunction, decay_function_name

__all__ = ["STATE_VERSION", "LoadedState", "make_state", "parse_state", "pickled", "unpickled"]

STATE_VERSION = 1
PICKLE_FORMAT = 2


def make_state(options: EMAOptions, weights: Dict[str, torch.Tensor], num_updates: int, num_skipped: int,
               step: Optional[int]) -> Dict[str, Any]:
    fn = options.decay_function
    params = fn.get_params() if isinstance(fn, IDecayFunction) else {}
    return {
        "version": STATE_VERSION,
        "ema": weights,
        "decay": options.decay,
        "decay_function": {"name": decay_function_name(fn), "params": dict(params)},
        "buffers": options.buffers,
        "ema_dtype": None if options.ema_dtype is None else str(options.ema_dtype),
        "update_every": options.update_every,
        "skip_nonfinite": options.skip_nonfinite,
        "async_update": options.async_update,
        "num_updates": num_updates,
        "num_skipped": num_skipped,
        "step": step,
    }


def _names(keys: list, limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _count(where: str, key: str, value: Any) -> int:
    """A counter of a saved state (``num_updates``, ``num_skipped``, ``step``): an integer >= 0."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{where}: {key} must be an integer >= 0, got {value!r}")
    return int(value)


class LoadedState(NamedTuple):
    """A saved state that passed every check: what ``load_state_dict`` then writes."""

    weights: Mapping[str, torch.Tensor]
    options: EMAOptions
    num_updates: int
    num_skipped: int
    step: Optional[int]
    warning: Optional[str]  # to give once the state is applied (a replaced schedule)


def parse_state(where: str, name: str, state: Any, current: Mapping[str, torch.Tensor],
                options: EMAOptions) -> LoadedState:
    """Checks a saved state against the EMA's tensors ``current`` (by key) and ``options``; writes nothing.

    ``where`` prefixes the messages (``"ModelEMA.load_state_dict"``), ``name``
    is the EMA's class.  The weights must match by name and shape; the
    counters must be integers >= 0 (a bad one found while writing would leave
    new weights with old counters); the options must be valid together with
    this EMA's fixed ones (a capturable EMA cannot take ``update_every=3``).
    """
    if not isinstance(state, dict) or "ema" not in state or "decay" not in state:
        raise ValueError(f"{where}: expected a dict from {name}.state_dict() with 'ema' and 'decay'")
    weights = state["ema"]
    missing = [k for k in current if k not in weights]
    unexpected = [k for k in weights if k not in current]
    if missing or unexpected:
        raise RuntimeError(
            f"{where}: the saved EMA does not match (missing: {_names(missing) or 'none'}; "
            f"unexpected: {_names(unexpected) or 'none'})"
        )
    for key, t in current.items():
        v = weights[key]
        if not isinstance(v, torch.Tensor) or v.shape != t.shape:
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise RuntimeError(f"{where}: entry {key!r} is {got} in the state but {list(t.shape)} in the EMA")
        if v.is_complex() or v.is_meta:
            raise RuntimeError(
                f"{where}: entry {key!r} is a {v.dtype} tensor on {v.device}; expected real values to copy into the "
                f"EMA's {t.dtype} tensor"
            )
    num_updates = _count(where, "num_updates", state.get("num_updates", 0))
    num_skipped = _count(where, "num_skipped", state.get("num_skipped", 0))
    step = state.get("step")
    step = None if step is None else _count(where, "step", step)
    new_options, warning = options.from_saved(where, state)
    return LoadedState(weights, new_options, num_updates, num_skipped, step, warning)


# ---------------------------------------------------------------------- pickling


def pickled(options: EMAOptions, ema: Any, covered: Any, counters: Dict[str, Any],
            extra: Dict[str, Any]) -> Dict[str, Any]:
    """The pickled form of an EMA: plain values and its modules (no plan, executor or stream: those are
    rebuilt on load, and the new EMA packs its tensors again).  ``counters`` are ``num_updates`` and the
    capturable mode's ``device_counters`` (step, decay, count tensors) or None."""
    return {"format": PICKLE_FORMAT, "options": options.as_dict(), "ema": ema, "covered": covered,
            **counters, **extra}


_OLD_OPTIONS = {"buffers": "average", "ema_dtype": None, "update_every": 1, "skip_nonfinite": False,
                "capturable": False, "total_steps": None, "async_update": False}


def unpickled(state: Mapping[str, Any]) -> Dict[str, Any]:
    """A pickled EMA's parts in the current form, from the current layout or the old one (the attributes of
    the single-module ``ModelEMA``, whose options, counters and modules sat in its ``__dict__``)."""
    if state.get("format") == PICKLE_FORMAT:
        return dict(state)
    options = {"decay": state["decay"], "decay_function": state["decay_function"]}
    options.update({k: state.get(k, default) for k, default in _OLD_OPTIONS.items()})
    counters = (state.get("step_tensor"), state.get("decay_tensor"), state.get("_num_updates_t"))
    return {
        "format": PICKLE_FORMAT,
        "options": options,
        "ema": state["ema"],
        "covered": state.get("_covered", state["ema"]),
        # num_updates was a plain attribute before it became a property.
        "num_updates": state.get("_num_updates", state.get("num_updates", 0)),
        "num_skipped": state.get("num_skipped", 0),
        "device_counters": counters if counters[0] is not None else None,
        "include_attributes": state.get("include_attributes", []),
        "exclude_attributes": state.get("exclude_attributes", []),
        "warned": state.get("_warned", set()),
        "horizon_checked": state.get("_horizon_checked"),
    }
