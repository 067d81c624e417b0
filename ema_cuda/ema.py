"""Exponential moving average of a model's weights: :class:`ModelEMA` and :class:`KDModelEMA`.

Keeping a moving average of the weights during training gives a model that
often evaluates better than the final weights, and does so without a separate
fine-tuning phase.  It helps most with strong augmentation, large learning
rates and long schedules (ImageNet classifiers, detectors, diffusion models).

Create the :class:`ModelEMA` after the model is on its device and before
wrapping it for distributed training (wrapping afterwards is fine too: the
wrapper is removed), then call :meth:`ModelEMA.update` after every optimizer
step::

    ema = ModelEMA.from_params(model, decay=0.9999, decay_type="threshold")
    for step, batch in enumerate(loader, start=1):
        ...; optimizer.step(); optimizer.zero_grad()
        ema.update(model, step=step, total_steps=total)
    with ema.swapped(model):        # model temporarily holds the EMA weights
        evaluate(model)
    ema.copy_to(model)              # end of training: model keeps the EMA weights

The semantics are SuperGradients' (3.7.1) with a few deliberate differences,
each noted where it applies: the decay is checked, entries are paired by name
and shape, integer buffers follow the model, and a distillation teacher is
never written.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import math
import numbers
import operator
import warnings
import weakref
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ema_cuda._modules import unwrap_model
from ema_cuda.ema_decay_schedules import EMA_DECAY_FUNCTIONS, IDecayFunction, decay_function_name
from ema_cuda import ops as _ops
from ema_cuda.ops import SUPPORTED_DTYPES, FusedUpdater, ema_update_
from ema_cuda.ops import is_dense as _is_dense
from ema_cuda.ops import same_layout as _same_layout

__all__ = ["ModelEMA", "KDModelEMA", "unwrap_model", "check_ema_params"]

_STATE_VERSION = 1
_OPTIONS = ("buffers", "ema_dtype", "update_every", "skip_nonfinite", "capturable", "total_steps", "async_update")
# Every keyword from_params takes itself (the schedule's own come on top).
_FROM_PARAMS_KEYS = ("decay", "decay_type", "exp_activation") + _OPTIONS
# Each packed tensor starts on a 64-byte boundary of its flat buffer: a cache
# line on CPUs, and aligned for the CUDA kernel's 16-byte vector loads.
_ALIGN_BYTES = 64


# A state entry: (key, owning dict, name in that dict, tensor, is_parameter).
_Entry = Tuple[str, Dict[str, Any], str, torch.Tensor, bool]


def _state_entries(root: nn.Module) -> Tuple[List[_Entry], List[nn.Module]]:
    """The tensors of ``root.state_dict()`` with their keys and owners, and the modules visited.

    Walks the module tree the way ``state_dict`` does (parameters, persistent
    buffers, children; shared modules and tied tensors appear under every
    name), but returns the live objects and where they are registered, so
    that a later step can check cheaply that nothing was replaced.
    """
    entries: List[_Entry] = []
    modules: List[nn.Module] = []

    def visit(module: nn.Module, prefix: str) -> None:
        modules.append(module)
        for name, p in module._parameters.items():
            if p is not None:
                entries.append((prefix + name, module._parameters, name, p, True))
        skip = module._non_persistent_buffers_set
        for name, b in module._buffers.items():
            if b is not None and name not in skip:
                entries.append((prefix + name, module._buffers, name, b, False))
        for name, child in module._modules.items():
            if child is not None:
                visit(child, prefix + name + ".")

    visit(root, "")
    return entries, modules


def _coaligned_shift(esize: int, model: Optional[torch.Tensor]) -> int:
    """Elements to add to an offset whose byte address is 16-byte aligned so
    that the EMA tensor there and ``model`` reach a 16-byte
    boundary at the same element: the CUDA kernel's vector loads need both
    sides aligned together, and a pair that never is runs scalar at a fraction
    of the bandwidth.  Model tensors inside flat or offset storages may start
    anywhere; 0 when the model itself never reaches a boundary."""
    if model is None or model.numel() == 0:
        return 0
    address, msize = model.data_ptr(), model.element_size()
    head = next((h for h in range(16) if (address + h * msize) % 16 == 0), None)
    if head is None:
        return 0
    per_vector = max(1, 16 // esize)
    return (-head) % per_vector


def _flat_views(
    specs: Sequence[Tuple[torch.Size, Tuple[int, ...], torch.dtype, torch.device]],
    models: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> List[torch.Tensor]:
    """Uninitialised tensors with the given (shape, strides, dtype, device), views into one buffer per (device, dtype).

    Consecutive tensors lie next to each other in memory, so an update that
    walks them in order streams through one allocation instead of restarting
    the hardware prefetcher at every tensor.  With ``models`` (the model
    tensor each one will be averaged with), each view starts where it is
    16-byte co-aligned with its model tensor (see :func:`_coaligned_shift`).
    """
    ends: Dict[Tuple[torch.device, torch.dtype], int] = {}
    offsets = []
    for i, (shape, _, dtype, device) in enumerate(specs):
        esize = torch.empty((), dtype=dtype).element_size()
        align = max(1, _ALIGN_BYTES // esize)
        start = -(-ends.get((device, dtype), 0) // align) * align
        start += _coaligned_shift(esize, models[i] if models is not None else None)
        offsets.append(start)
        ends[(device, dtype)] = start + math.prod(shape)
    flats = {key: torch.empty(end, dtype=key[1], device=key[0]) for key, end in ends.items()}
    return [
        flats[(device, dtype)].as_strided(shape, stride, offset)
        for (shape, stride, dtype, device), offset in zip(specs, offsets)
    ]


def _parse_dtype(ema_dtype: Any) -> Optional[torch.dtype]:
    if ema_dtype is None:
        return None
    if isinstance(ema_dtype, str):
        dtype = getattr(torch, ema_dtype.replace("torch.", ""), None)
    else:
        dtype = ema_dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"ModelEMA: ema_dtype must be None or one of {[str(d) for d in SUPPORTED_DTYPES]}, got {ema_dtype!r}"
        )
    return dtype


def _check_decay(decay: Any) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not (0.0 < float(decay) < 1.0):
        raise ValueError(f"ModelEMA: decay must be a number in (0, 1), e.g. 0.9999; got {decay!r}")
    return float(decay)


def _integer_step(cls: str, step: Any) -> int:
    """``step`` as a Python int: ints, numpy integers and 0-dim integer tensors; anything else is an error."""
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
            raise TypeError(
                f"{cls}.update: step must be an integer (an int, a numpy integer or a 0-dim integer tensor), got a "
                f"tensor of shape {list(step.shape)} and dtype {step.dtype}"
            )
        return int(step)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(
            f"{cls}.update: step must be an integer (an int, a numpy integer or a 0-dim integer tensor), got "
            f"{step!r} ({type(step).__name__}); schedules and update_every count whole optimizer steps"
        )
    return int(step)


def _rounds_to_one(decay: float, dtype: torch.dtype) -> bool:
    """True when ``1 + (1 - decay)`` rounds to 1 in ``dtype``: an EMA kept in it cannot move by ``1 - decay``."""
    return bool(torch.tensor(1.0 + (1.0 - decay), dtype=torch.float64).to(dtype) == 1)


def _schedule_signature(decay_cls: Any) -> Tuple[List[str], bool]:
    """The keyword parameters a schedule's constructor names, and whether it also takes ``**kwargs``."""
    try:
        params = inspect.signature(decay_cls).parameters.values()
    except (TypeError, ValueError):  # a constructor Python cannot inspect: let it have everything
        return [], True
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def _schedule_kwargs(
    where: str, decay_type: str, decay_cls: Any, kwargs: Dict[str, Any]
) -> Tuple[Dict[str, Any], Dict[str, List[str]]]:
    """Splits what ``from_params`` has left after its own keys: arguments for the schedule, and misplaced ones.

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
        valid = sorted(set(_FROM_PARAMS_KEYS) | set(named) | set(others))
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"{where}: unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; valid ones are the "
            f"ModelEMA options {list(_FROM_PARAMS_KEYS)}, the parameters of decay_type {decay_type!r} "
            f"({named or 'none'}) and those of the other registered schedules ({sorted(others) or 'none'})"
        )
    return to_schedule, misplaced


def check_ema_params(params: Dict[str, Any], where: str = "ema_params") -> None:
    """Raises the error :meth:`ModelEMA.from_params` would raise for an unknown key of ``params``, without building anything.

    Lets a configuration (the Trainer's ``ema_params``) be checked before
    any work starts.  Warnings (defaults, misplaced keys) are left to
    ``from_params`` so that they fire once.
    """
    kwargs = {k: v for k, v in params.items() if k not in _OPTIONS and k != "decay"}
    decay_type = kwargs.pop("decay_type", None)
    if "exp_activation" in kwargs:
        decay_type = "exp" if bool(kwargs.pop("exp_activation")) else "constant"
    if decay_type is None:
        decay_type = "exp"
    try:
        decay_cls = EMA_DECAY_FUNCTIONS[decay_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"{where}: unknown decay_type {decay_type!r}; registered types: {list(EMA_DECAY_FUNCTIONS)}"
        ) from None
    _schedule_kwargs(where, decay_type, decay_cls, kwargs)


def _state_count(cls: str, key: str, value: Any) -> int:
    """A counter of a saved state (``num_updates``, ``num_skipped``, ``step``): an integer >= 0."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() and not value.is_complex() \
            and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{cls}.load_state_dict: {key} must be an integer >= 0, got {value!r}")
    return int(value)


def _names(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class _Plan:
    """What one update needs, built once per (model, EMA) structure and reused every step."""

    __slots__ = (
        "src",
        "buffers",
        "watch",
        "watch_len",
        "copy_shapes",
        "updater",
        "copy_ema",
        "copy_model",
        "foreach_copy_ema",
        "foreach_copy_model",
        "pairs",
        "finite_check",
        "local_watch",
        "side_updater",
    )


class _CudaStreams:
    """The stream operations of the asynchronous update, in one place (tests substitute a recording fake)."""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def side_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def stream(self, stream: Any) -> Any:
        return torch.cuda.stream(stream)

    def new_event(self) -> Any:
        return torch.cuda.Event()

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)


_STREAMS = _CudaStreams()
# Asynchronous EMAs with an update in flight; every optimizer step waits for them.
_PENDING: "weakref.WeakSet[ModelEMA]" = weakref.WeakSet()
_OPTIMIZER_HOOK = None


def _wait_before_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    # The step writes the parameters that a side-stream update may still be reading.
    for ema in list(_PENDING):
        ema.wait()


def _install_optimizer_hook() -> None:
    global _OPTIMIZER_HOOK
    if _OPTIMIZER_HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _OPTIMIZER_HOOK = register_optimizer_step_pre_hook(_wait_before_optimizer_step)


class _WaitHook:
    """Forward pre-hook of ``ema.ema``: a forward pass reads the EMA, so it waits for an update in flight."""

    def __init__(self, ema: Optional["ModelEMA"]):
        self.ref = weakref.ref(ema) if ema is not None else None

    def __call__(self, module: nn.Module, args: Any) -> None:
        ema = self.ref() if self.ref is not None else None
        if ema is not None:
            ema.wait()

    def __reduce__(self):
        # A copied module gets an inert hook; the copied EMA installs its own.
        return (_WaitHook, (None,))


class ModelEMA:
    """An exponential moving average of a model's parameters and buffers.

    ``ema.ema`` is a copy of the model (with DataParallel, DDP and
    ``torch.compile`` wrappers removed) in eval mode whose parameters do not
    require grad.  After each optimizer step, :meth:`update` moves every
    floating entry of its ``state_dict`` towards the model's::

        d = decay_function(decay, step, total_steps)
        ema = ema * d + model * (1 - d)

    Use it whenever the averaged weights should be what you validate, keep
    and ship.  Evaluate with :meth:`swapped` (the training model temporarily
    holds the EMA weights; nothing is copied) or by calling ``ema.ema``
    directly, and finish with :meth:`copy_to`.

    The update is one fused kernel (CUDA) or one parallel loop (CPU) over all
    tensors, from a plan built on the first update and reused while the model
    keeps its tensors; it allocates nothing proportional to the model.  The
    EMA's floating tensors live in one flat buffer per dtype, in model order,
    so the update streams through memory.

    Args:
        model: the model being trained (possibly wrapped).
        decay: the maximum decay, in (0, 1): 0.9999 for runs of hundreds of
            thousands of steps, 0.999 for tens of thousands.
        decay_function: the schedule (see :mod:`ema_cuda.ema_decay_schedules`).
        buffers: ``"average"`` (default, SuperGradients' behaviour) averages
            floating buffers such as BatchNorm running statistics like the
            parameters; ``"copy"`` takes them from the model at every update,
            which keeps statistics that match the current weights.  Integer
            buffers (``num_batches_tracked``) are always copied.
        ema_dtype: dtype of the EMA's floating tensors; ``None`` keeps the
            model's.  Use ``torch.float32`` for a bf16 or fp16 model: with a
            decay of 0.9999 the per-step increment is below bf16 resolution
            and a bf16 EMA stops moving.
        update_every: update only at steps divisible by this (default 1).
            The decay applies per update, so a schedule tuned for every step
            averages over ``update_every`` times more steps.
        skip_nonfinite: skip an update (and count it in ``num_skipped``) when
            a model tensor holds NaN or Inf, so one bad step cannot poison the
            average.  It costs one extra read of every model tensor (a max-abs
            reduction) and a host synchronisation per update.
        capturable: keep the step, the decay and the update counter in 0-dim
            tensors on the EMA's device (``step_tensor``, ``decay_tensor``)
            and evaluate the schedule there
            (:meth:`~ema_cuda.ema_decay_schedules.IDecayFunction.tensor_value`),
            so that an update involves no host value that changes from step to
            step.  That is what a training step compiled with
            ``torch.compile(fullgraph=True)`` (no recompilation as the decay
            changes) or captured in a CUDA graph (replayed with a new step
            each time) needs; see :meth:`update`.  The plan is built here, at
            construction, so the first update may already be compiled or
            captured.  Needs a schedule with a tensor form (all built-in ones
            have one), ``update_every=1`` and ``skip_nonfinite=False`` (both
            would need a host decision per step).  On a CUDA device the
            schedule's value is not range-checked per step (that would
            synchronise); the built-in schedules stay in [0, 1] by
            construction.
        total_steps: the run's planned number of steps, used by
            :meth:`update` when it is called without ``total_steps``
            (capturable mode).
        async_update: on CUDA, run the averaging of the parameters on a side
            stream, so that it overlaps with the next forward pass (it only
            reads the parameters, which nothing writes until the next
            optimizer step).  The side stream waits for the current one
            before each update; the current stream waits for the update
            before the next ``optimizer.step()`` of any ``torch.optim``
            optimizer (a global step pre-hook) and before every read of the
            EMA here: :meth:`swapped`, :meth:`copy_to`, :meth:`state_dict`,
            :meth:`load_state_dict`, a forward pass of ``ema.ema``.  Buffers
            (which the forward pass writes) are updated on the current stream.
            Code that writes the model's parameters by other means, or reads
            the EMA's tensors directly, calls :meth:`wait` first.  Needs the
            EMA on one CUDA device; not combinable with ``capturable``.

    Differences from SuperGradients: ``decay`` outside (0, 1) and a schedule
    value outside [0, 1] are errors; entries are paired by name with shape
    checks (SuperGradients zips the values and silently truncates); integer
    buffers are copied from the model (SuperGradients freezes them at their
    initial value).

    Configuration mistakes that would train without error but give a useless
    average warn once per EMA, naming the values: an EMA dtype in which
    ``1 + (1 - decay)`` rounds to 1 (a bf16 EMA with decay 0.9999 never
    moves), checked here; a ``total_steps`` shorter than ``1 / (1 - decay)``,
    checked here when ``total_steps`` is given and at the first update
    otherwise; a non-capturable update inside ``torch.compile``.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        decay_function: IDecayFunction,
        *,
        buffers: str = "average",
        ema_dtype: Optional[torch.dtype] = None,
        update_every: int = 1,
        skip_nonfinite: bool = False,
        capturable: bool = False,
        total_steps: Optional[int] = None,
        async_update: bool = False,
    ):
        self.decay = _check_decay(decay)
        if not callable(decay_function):
            raise TypeError(f"ModelEMA: decay_function must be callable, got {decay_function!r}")
        if buffers not in ("average", "copy"):
            raise ValueError(f"ModelEMA: buffers must be 'average' or 'copy', got {buffers!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, numbers.Integral) or update_every < 1:
            raise ValueError(f"ModelEMA: update_every must be an integer >= 1, got {update_every!r}")
        self.decay_function = decay_function
        self.buffers = buffers
        self.ema_dtype = _parse_dtype(ema_dtype)
        self.update_every = int(update_every)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.capturable = bool(capturable)
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1
        ):
            raise ValueError(f"ModelEMA: total_steps must be None or an integer >= 1, got {total_steps!r}")
        self.total_steps = None if total_steps is None else int(total_steps)
        if self.capturable:
            self._check_capturable_options()
        self.async_update = bool(async_update)
        if self.async_update and self.capturable:
            raise ValueError(
                f"{type(self).__name__}: async_update and capturable are exclusive (a captured graph orders the "
                "update itself)"
            )
        self._streams: Optional[Any] = None  # None: the CUDA streams (a test may substitute a fake)
        self._side_stream: Optional[Any] = None
        self._pending: Optional[Any] = None
        #: Device tensors of the capturable mode (None otherwise): the step of
        #: the last update, its decay (float64) and the number of updates.
        self.step_tensor: Optional[torch.Tensor] = None
        self.decay_tensor: Optional[torch.Tensor] = None
        self._num_updates_t: Optional[torch.Tensor] = None
        #: Updates applied, and updates skipped by the non-finite guard.
        self.num_updates = 0
        self.num_skipped = 0
        # Warnings about the configuration fire once per EMA, not per step.
        self._warned: set = set()

        src = self._source(model)
        self._covered = self._copy_module(src)
        self.ema = self._wrap_ema(model, self._covered)
        self._warn_if_dtype_stalls()
        if self.total_steps is not None:
            self._warn_if_horizon_exceeds(self.total_steps)

        # SuperGradients' SgModule declares which attributes update_attr copies.
        attr_src = unwrap_model(model)
        self.include_attributes = list(_call_or(attr_src, "get_include_attributes", []))
        self.exclude_attributes = list(_call_or(attr_src, "get_exclude_attributes", []))

        self._plan: Optional[_Plan] = None
        self._swap_depth = 0
        if self.async_update:
            device = self._state_device()
            if not self._stream_ops().supports(device):
                raise ValueError(
                    f"{type(self).__name__}: async_update needs the EMA on a CUDA device, it is on {device}"
                )
            self._async_device = device
            self._install_wait_hook()
            _install_optimizer_hook()
        if self.capturable:
            device = self._state_device()
            self.step_tensor = torch.zeros((), dtype=torch.int64, device=device)
            self.decay_tensor = torch.zeros((), dtype=torch.float64, device=device)
            self._num_updates_t = torch.zeros((), dtype=torch.int64, device=device)
            # Built now so that the first update can already be compiled or
            # captured (neither can build it: it validates and allocates).
            self._plan = self._build_plan(src)

    def _warn_once(self, key: str, message: str) -> None:
        warned = self.__dict__.setdefault("_warned", set())
        if key not in warned:
            warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)

    def _warn_if_dtype_stalls(self) -> None:
        """Warns when an EMA dtype cannot represent a step of ``1 - decay`` (the average would stop moving)."""
        stalled: Dict[torch.dtype, str] = {}
        for key, _, _, t, _ in _state_entries(self._covered)[0]:
            if t.is_floating_point() and t.dtype not in stalled and _rounds_to_one(self.decay, t.dtype):
                stalled[t.dtype] = key
        if stalled:
            where = ", ".join(f"{dtype} (e.g. {key!r})" for dtype, key in stalled.items())
            self._warn_once(
                "dtype",
                f"{type(self).__name__}: with decay={self.decay} the EMA moves by 1 - decay = {1 - self.decay:.3g} of "
                f"the difference per update, but 1 + {1 - self.decay:.3g} rounds to 1 in {where}: updates are lost to "
                "rounding and those entries stall near their initial values; keep the EMA in float32 "
                "(ema_dtype=torch.float32) or use a smaller decay",
            )

    def _warn_if_horizon_exceeds(self, total_steps: Any) -> None:
        """Warns when ``1 / (1 - decay)``, the number of steps the EMA averages over, exceeds the planned run."""
        # Called on every update: a run's total_steps rarely changes, so the
        # check itself runs once per (decay, total_steps).
        key = (self.decay, total_steps)
        if self.__dict__.get("_horizon_checked") == key:
            return
        self._horizon_checked = key
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Real) or not total_steps > 0:
            return
        horizon = 1.0 / (1.0 - self.decay)
        # The tolerance keeps 1/(1-0.9) = 10.000000000000002 from exceeding a 10-step run.
        if horizon > total_steps * (1 + 1e-9):
            hint = f"; decay={1 - 10 / total_steps:.4g} averages over the last tenth of it" if total_steps > 10 else ""
            self._warn_once(
                "horizon",
                f"{type(self).__name__}: decay={self.decay} averages over about 1/(1-decay) = {horizon:.0f} steps, "
                f"more than the planned total_steps={total_steps}: at the end of the run the EMA still weighs the "
                f"initial weights heavily{hint}",
            )

    def _check_capturable_options(self) -> None:
        name = type(self).__name__
        fn = self.decay_function
        if not (isinstance(fn, IDecayFunction) and fn.has_tensor_value()):
            raise ValueError(
                f"{name}: capturable=True needs a decay schedule with a tensor form (IDecayFunction.tensor_value); "
                f"{fn!r} has none"
            )
        if self.update_every != 1:
            raise ValueError(
                f"{name}: capturable=True needs update_every=1 (got {self.update_every}); skipping steps would "
                "need a host decision per step"
            )
        if self.skip_nonfinite:
            raise ValueError(
                f"{name}: capturable=True cannot be combined with skip_nonfinite=True, whose check reads a value "
                "back to the host at every update"
            )

    def _state_device(self) -> torch.device:
        """The one device of the EMA's floating tensors (where the capturable step and decay live)."""
        devices = {t.device for _, _, _, t, _ in _state_entries(self._covered)[0] if t.is_floating_point()}
        if len(devices) > 1:
            raise ValueError(
                f"{type(self).__name__}: capturable=True needs the EMA on one device, found "
                f"{sorted(str(d) for d in devices)}"
            )
        return devices.pop() if devices else torch.device("cpu")

    def _stream_ops(self) -> Any:
        return self._streams if self._streams is not None else _STREAMS

    def _install_wait_hook(self) -> None:
        hooks = self.ema._forward_pre_hooks
        for key in [k for k, h in hooks.items() if isinstance(h, _WaitHook)]:
            del hooks[key]
        self.ema.register_forward_pre_hook(_WaitHook(self))

    def wait(self) -> None:
        """Makes the current stream wait for an asynchronous update still in flight (``async_update``).

        Called automatically before every read of the EMA in this class, by
        a forward pass of ``ema.ema`` and before every ``optimizer.step()``;
        call it yourself before reading the EMA's tensors directly or writing
        the model's parameters outside an optimizer.  It does not block the
        host, and does nothing when no update is in flight.
        """
        event = self._pending
        if event is not None:
            self._stream_ops().current_stream(self._async_device).wait_event(event)
            self._pending = None
            _PENDING.discard(self)

    def _update_on_side_stream(self, updater: FusedUpdater, decay: Any) -> None:
        ops = self._stream_ops()
        device = self._async_device
        if self._side_stream is None:
            self._side_stream = ops.side_stream(device)
        side = self._side_stream
        # The parameters were written on the current stream (optimizer.step).
        side.wait_stream(ops.current_stream(device))
        with ops.stream(side):
            updater.update(decay)
        event = ops.new_event()
        event.record(side)
        self._pending = event
        _PENDING.add(self)

    @property
    def num_updates(self) -> int:
        """The number of updates applied (read from the device in capturable mode)."""
        t = self.__dict__.get("_num_updates_t")
        return int(t) if t is not None else self._num_updates

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        t = self.__dict__.get("_num_updates_t")
        if t is not None:
            t.fill_(int(value))
        self._num_updates = int(value)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_params(cls, model: nn.Module, decay_type: Optional[str] = None, decay: Optional[float] = None, **kwargs):
        """Builds an EMA from configuration values, the way SuperGradients' ``ema_params`` do.

        ``decay_type`` names a schedule in ``EMA_DECAY_FUNCTIONS``; the
        remaining keyword arguments go to the schedule's constructor, except
        the :class:`ModelEMA` options ``buffers``, ``ema_dtype``,
        ``update_every``, ``skip_nonfinite``, ``capturable``, ``total_steps``
        and ``async_update``, which are taken out first.

        An argument that neither this method, nor the schedule, nor any other
        registered schedule takes is a ``ValueError`` naming it and the
        closest valid name (a misspelt ``ema_dtyp=`` or ``decya=`` would
        otherwise be dropped silently).  A parameter of another registered
        schedule (``beta`` beside ``decay_type="threshold"``, as
        SuperGradients recipes that switched schedules have) is ignored with
        a warning.  A custom schedule whose constructor takes ``**kwargs``
        receives every other argument.

        Defaults with a warning, as SuperGradients: ``decay=0.9999``, and
        ``decay_type="exp"`` with ``beta=15``.  The legacy ``exp_activation``
        flag maps to ``"exp"`` (True; with ``beta=15`` unless given, as the
        legacy constructor had) or ``"constant"`` (False), with a
        ``DeprecationWarning``.  An unknown ``decay_type`` is an error listing
        the registered ones.
        """
        options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
        if decay is None:
            warnings.warn(
                "ModelEMA.from_params: `decay` is not specified; defaulting to decay=0.9999. "
                "Set it explicitly (e.g. ema_params: {decay: 0.9999, decay_type: exp, beta: 15}).",
                UserWarning,
                stacklevel=2,
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
                stacklevel=2,
            )
            if exp_activation:
                kwargs.setdefault("beta", 15)
        if decay_type is None:
            warnings.warn(
                "ModelEMA.from_params: `decay_type` is not specified; defaulting to decay_type='exp' with beta=15. "
                f"Set it explicitly (one of {list(EMA_DECAY_FUNCTIONS)}).",
                UserWarning,
                stacklevel=2,
            )
            decay_type = "exp"
            kwargs.setdefault("beta", 15)
        try:
            decay_cls = EMA_DECAY_FUNCTIONS[decay_type]
        except (KeyError, TypeError):
            raise ValueError(
                f"ModelEMA.from_params: unknown decay_type {decay_type!r}; registered types: {list(EMA_DECAY_FUNCTIONS)}"
            ) from None
        schedule_kwargs, misplaced = _schedule_kwargs(f"{cls.__name__}.from_params", decay_type, decay_cls, kwargs)
        if misplaced:
            listed = ", ".join(f"{k}={kwargs[k]!r} (a parameter of {' / '.join(map(repr, v))})" for k, v in misplaced.items())
            warnings.warn(
                f"{cls.__name__}.from_params: ignoring {listed}: decay_type {decay_type!r} does not take "
                f"{'them' if len(misplaced) > 1 else 'it'}",
                UserWarning,
                stacklevel=2,
            )
        return cls(model, decay, decay_cls(**schedule_kwargs), **options)

    def _source(self, model: nn.Module) -> nn.Module:
        """The module whose state this EMA averages."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: expected an nn.Module, got {type(model).__name__}")
        return unwrap_model(model)

    def _wrap_ema(self, model: nn.Module, covered: nn.Module) -> nn.Module:
        """The module exposed as ``self.ema`` around the averaged copy."""
        return covered

    def _copy_module(self, src: nn.Module) -> nn.Module:
        """A deep copy of ``src`` whose floating state lives in flat buffers, cast to ``ema_dtype``.

        The flat views are created first and handed to ``deepcopy`` through
        its memo, so the model is copied once, straight into its final place.
        """
        entries, _ = _state_entries(src)
        packed: List[torch.Tensor] = []
        seen = set()
        for key, _, _, t, _ in entries:
            if _is_dtensor(t):
                raise TypeError(
                    f"{type(self).__name__}: model entry {key!r} is a DTensor (a model sharded with FSDP2 "
                    "fully_shard or tensor parallelism); use ema_cuda.ShardedModelEMA, which keeps each rank's shard"
                )
            if isinstance(t, nn.parameter.UninitializedTensorMixin):
                raise ValueError(
                    f"{type(self).__name__}: model entry {key!r} is not initialised yet (a lazy module); "
                    "run one forward pass before creating the EMA"
                )
            if id(t) in seen or not t.is_floating_point():
                continue
            seen.add(id(t))
            if not _is_dense(t):
                raise ValueError(
                    f"{type(self).__name__}: model entry {key!r} with shape {list(t.shape)} and strides "
                    f"{list(t.stride())} is not dense; the fused update needs contiguous (or permuted dense) tensors"
                )
            if t.dtype not in SUPPORTED_DTYPES:
                raise ValueError(
                    f"{type(self).__name__}: model entry {key!r} has dtype {t.dtype}; the fused update supports "
                    f"{[str(d) for d in SUPPORTED_DTYPES]}"
                )
            packed.append(t)
        _check_no_shared_storage(type(self).__name__, entries, packed)

        views = _flat_views([(t.shape, t.stride(), self.ema_dtype or t.dtype, t.device) for t in packed], packed)
        memo: Dict[int, Any] = {}
        with torch.no_grad():
            for t, view in zip(packed, views):
                view.copy_(t)
                memo[id(t)] = nn.Parameter(view, requires_grad=False) if isinstance(t, nn.Parameter) else view
            if self.ema_dtype is not None:
                # Non-persistent floating buffers (not averaged) follow the EMA's
                # dtype too, so that the copy runs in one precision.
                for module in src.modules():
                    for name in module._non_persistent_buffers_set:
                        b = module._buffers.get(name)
                        if b is not None and b.is_floating_point() and id(b) not in memo:
                            memo[id(b)] = b.detach().to(self.ema_dtype, copy=True)
            ema = copy.deepcopy(src, memo)
        ema.eval()
        for p in ema.parameters():
            p.requires_grad_(False)
            p.grad = None
        return ema

    # ------------------------------------------------------------------ the update

    def update(self, model: nn.Module, step: Any = None, total_steps: Optional[int] = None) -> None:
        """Moves the EMA towards ``model``: ``ema = ema * d + model * (1 - d)``.

        ``d = decay_function(decay, step, total_steps)``; call it once per
        optimizer step, after ``optimizer.step()``, with SuperGradients'
        1-based step.  Floating parameters and buffers are averaged and
        integer buffers copied in one fused call (one kernel launch on CUDA,
        two with ``async_update``); with ``buffers="copy"`` floating buffers
        are copied too, in the same call unless the EMA keeps them in another
        dtype (``ema_dtype``), which takes a separate cast.

        ``step`` is an integer: an ``int``, a numpy integer or a 0-dim
        integer tensor; anything else (``5.5``, ``5.0``, a string) is a
        ``TypeError``.  The first update with a ``total_steps`` shorter than
        the decay's horizon ``1 / (1 - decay)`` warns once: such an average
        still weighs the initial weights heavily at the end of the run.
        Called inside ``torch.compile`` without ``capturable=True`` it warns
        once that every step recompiles.

        Raises before writing anything (the EMA stays bit-identical) when the
        step is not an integer, when the schedule returns a value outside
        [0, 1] or a non-finite one, or when the model's entries no longer
        match the EMA's by name and shape.

        With ``capturable=True`` the step is a device tensor: leave ``step``
        out (``None``) and the EMA counts on the device (``step_tensor`` goes
        up by one, so the first update is step 1), or pass a 0-dim tensor.
        ``total_steps`` defaults to the one given at construction.  Inside
        ``torch.compile`` or a CUDA graph capture a Python int ``step`` is an
        error (it would be baked into the compiled code or the graph); in
        eager code it sets the counter.  Such an update can be part of a
        ``torch.compile(fullgraph=True)`` function (it then calls the list
        op, whose decay is read from ``decay_tensor``) or of a captured CUDA
        graph; the model must keep its tensors between steps there (the
        structure check that adapts to replaced tensors runs in eager calls
        only).
        """
        if self._swap_depth:
            raise RuntimeError(
                f"{type(self).__name__}.update: called inside swapped(); the model holds the EMA weights there"
            )
        if self.capturable:
            self._update_capturable(model, step, total_steps)
            return
        if torch.compiler.is_compiling():
            # The step and the decay reach the compiled code as Python
            # numbers, so every step is a new constant: a recompilation per
            # step until the cache limit, then eager execution.
            self._warn_once(
                "compile",
                f"{type(self).__name__}.update runs inside torch.compile with capturable=False: the step and the "
                "decay are new Python numbers at every call, so the function recompiles every step; build the EMA "
                "with capturable=True (ModelEMA(..., capturable=True, total_steps=...)) to keep them in device tensors",
            )
        if step is None or total_steps is None:
            raise TypeError(
                f"{type(self).__name__}.update: step and total_steps are required (they may be left out only "
                "with capturable=True, where the step is counted on the device)"
            )
        step = _integer_step(type(self).__name__, step)
        self._warn_if_horizon_exceeds(total_steps)
        if step % self.update_every:
            return
        d = self.decay_at(step, total_steps)
        plan = self._ensure_plan(self._source(model))
        if self.skip_nonfinite and not self._model_is_finite(plan):
            self.num_skipped += 1
            return
        if not all(u.ready() for u in (plan.updater, plan.side_updater) if u is not None):
            # A model tensor's storage was replaced by one the updaters cannot
            # take (another device, shape or memory layout): rebuilding the
            # plan either adapts (the EMA is laid out like the model) or
            # raises naming the entry.  Nothing has been written yet.
            self._plan = None
            plan = self._ensure_plan(plan.src)
        with torch.no_grad():
            if plan.side_updater is not None:
                self._update_on_side_stream(plan.side_updater, d)
            if plan.updater is not None:
                plan.updater.update(d)
            if plan.foreach_copy_ema:
                torch._foreach_copy_(plan.foreach_copy_ema, plan.foreach_copy_model)
        self.num_updates += 1

    def _update_capturable(self, model: nn.Module, step: Any, total_steps: Optional[int]) -> None:
        name = type(self).__name__
        compiling = torch.compiler.is_compiling()
        capturing = self.step_tensor.is_cuda and torch.cuda.is_current_stream_capturing()
        src = self._source(model)
        if compiling or capturing:
            # Neither a trace nor a capture can build a plan (it validates on
            # the host and allocates); it exists since construction unless the
            # model was swapped for another one.
            plan = self._plan
            if plan is None or plan.src is not src:
                raise RuntimeError(
                    f"{name}.update: no update plan for this model inside torch.compile or a CUDA graph capture; "
                    "call update() once eagerly with this model first"
                )
        else:
            plan = self._ensure_plan(src)

        # The new step and its decay are computed before anything is written,
        # so that a failing schedule leaves the counter and the EMA as they were.
        if step is None:
            new_step = self.step_tensor + 1
        elif isinstance(step, torch.Tensor):
            if step.dim() != 0 or step.device != self.step_tensor.device:
                raise ValueError(
                    f"{name}.update: a step tensor must be 0-dim and on {self.step_tensor.device}, got shape "
                    f"{list(step.shape)} on {step.device}"
                )
            if step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
                # Checked on the dtype, without reading the value: a float
                # step would be truncated silently into the int64 counter.
                raise TypeError(f"{name}.update: a step tensor must have an integer dtype, got {step.dtype}")
            new_step = step
        elif compiling or capturing:
            raise TypeError(
                f"{name}.update: got the Python int step={step!r} inside torch.compile or a CUDA graph capture, "
                "where it would be frozen into the compiled code or the graph; leave step out (the EMA counts "
                "steps on the device) or pass a 0-dim tensor"
            )
        else:
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
                raise ValueError(f"{name}.update: step must be an integer >= 0 or a 0-dim tensor, got {step!r}")
            new_step = torch.full_like(self.step_tensor, int(step))
        total = self.total_steps if total_steps is None else total_steps
        if not (compiling or capturing):
            self._warn_if_horizon_exceeds(total)

        with torch.no_grad():
            decay = self.decay_function.tensor_value(self.decay, new_step, total)
            self.step_tensor.copy_(new_step)
            # Item assignment, not copy_: torch.compile of torch 2.11 and 2.13
            # (not 2.14) drops a copy_ into a 0-dim float64 CPU tensor when
            # it restarts its analysis (tensorify_python_scalars): the decay
            # tensor then stayed 0 and the EMA copied the model.
            self.decay_tensor[()] = decay
            if plan.updater is not None:
                if compiling:
                    # The list op is what torch.compile can trace; the
                    # updater object is opaque to it.
                    if plan.updater.ema:
                        ema_update_(plan.updater.ema, plan.updater.model, self.decay_tensor)
                    if plan.updater.copy_ema:
                        torch._foreach_copy_(plan.updater.copy_ema, plan.updater.copy_model)
                else:
                    plan.updater.update(self.decay_tensor)
            if plan.foreach_copy_ema:
                torch._foreach_copy_(plan.foreach_copy_ema, plan.foreach_copy_model)
            self._num_updates_t.add_(1)

    def decay_at(self, step: int, total_steps: int) -> float:
        """The decay an update at ``step`` would use, checked to be a finite number in [0, 1]."""
        value = self.decay_function(self.decay, step, total_steps)
        try:
            d = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"{type(self).__name__}: the decay schedule {self.decay_function!r} returned {value!r} at step "
                f"{step} of {total_steps}; expected a number"
            ) from None
        if not (math.isfinite(d) and 0.0 <= d <= 1.0):
            raise ValueError(
                f"{type(self).__name__}: the decay schedule {self.decay_function!r} returned {d} at step {step} "
                f"of {total_steps}; a decay must be a finite number in [0, 1]"
            )
        return d

    def _model_is_finite(self, plan: _Plan) -> bool:
        # One max-abs reduction per tensor: finite iff no NaN/Inf, and unlike a
        # sum or a 2-norm it cannot overflow on large finite values.
        if not plan.finite_check:
            return True
        maxima = torch._foreach_norm(plan.finite_check, ord=float("inf"))
        return bool(torch.stack(maxima).isfinite().all())

    # ------------------------------------------------------------------ the plan

    def _ensure_plan(self, src: nn.Module) -> _Plan:
        plan = self._plan
        if plan is not None and plan.src is src and plan.buffers == self.buffers and _unchanged(plan):
            return plan
        self._plan = None
        self._plan = self._build_plan(src)
        return self._plan

    def _model_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor of a model entry that the EMA pairs with (this rank's shard for a sharded EMA)."""
        return t

    def _build_plan(self, src: nn.Module) -> _Plan:
        """Pairs the model's entries with the EMA's by name, checks them, and caches the lists.

        Nothing is written here except, when the model's memory layout
        changed (e.g. to channels_last), moving EMA values into a buffer laid
        out like the model; their values are unchanged.
        """
        name = type(self).__name__
        m_entries, m_modules = _state_entries(src)
        e_entries, e_modules = _state_entries(self._covered)
        model_by_key = {e[0]: e for e in m_entries}
        ema_by_key = {e[0]: e for e in e_entries}
        missing = [k for k in ema_by_key if k not in model_by_key]
        unexpected = [k for k in model_by_key if k not in ema_by_key]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing from the model: {_names(missing)}")
            if unexpected:
                parts.append(f"not in the EMA: {_names(unexpected)}")
            raise RuntimeError(
                f"{name}: the model does not match the EMA ({'; '.join(parts)}); entries are paired by name"
            )

        # Group keys by EMA tensor: tied weights are one tensor under several names.
        groups: Dict[int, Tuple[torch.Tensor, List[str], bool]] = {}
        for key, _, _, e, is_param in e_entries:
            m = self._model_tensor(model_by_key[key][3])
            if m.shape != e.shape:
                raise RuntimeError(
                    f"{name}: entry {key!r} has shape {list(m.shape)} in the model but {list(e.shape)} in the EMA"
                )
            if m.is_floating_point() != e.is_floating_point():
                raise RuntimeError(f"{name}: entry {key!r} has dtype {m.dtype} in the model but {e.dtype} in the EMA")
            if m.device != e.device:
                raise RuntimeError(
                    f"{name}: entry {key!r} is on {m.device} in the model but on {e.device} in the EMA; "
                    f"create the EMA after moving the model, or move it with `ema.ema.to({str(m.device)!r})`"
                )
            if e.is_floating_point() and not _is_dense(m):
                raise RuntimeError(
                    f"{name}: model entry {key!r} with shape {list(m.shape)} and strides {list(m.stride())} is not dense"
                )
            if id(e) in groups:
                groups[id(e)][1].append(key)
            else:
                groups[id(e)] = (e, [key], is_param)

        avg_ema, avg_model, copy_ema, copy_model, pairs = [], [], [], [], []
        avg_is_param = []
        seen_model = set()
        for e, keys, is_param in groups.values():
            ms = [self._model_tensor(model_by_key[k][3]) for k in keys]
            if any(m is not ms[0] for m in ms[1:]):
                raise RuntimeError(f"{name}: entries {_names(keys)} share one tensor in the EMA but not in the model")
            m = ms[0]
            if e.is_floating_point() and (is_param or self.buffers == "average"):
                avg_ema.append(e)
                avg_model.append(m)
                avg_is_param.append(is_param)
            else:
                copy_ema.append(e)
                copy_model.append(m)
            if id(m) not in seen_model:
                seen_model.add(id(m))
                pairs.append((m, e))

        if not all(map(_same_layout, avg_ema, avg_model)):
            self._relayout(avg_ema, avg_model)

        plan = _Plan()
        plan.src = src
        plan.buffers = self.buffers
        plan.side_updater = None
        if self.async_update:
            # Parameters on the side stream (nothing writes them before the
            # next optimizer step); buffers, which the next forward pass
            # writes, on the current one.
            side = [i for i, p in enumerate(avg_is_param) if p]
            main = [i for i, p in enumerate(avg_is_param) if not p]
            if side:
                plan.side_updater = FusedUpdater([avg_ema[i] for i in side], [avg_model[i] for i in side])
                ops = self._stream_ops()
                if self._side_stream is None:
                    self._side_stream = ops.side_stream(self._async_device)
                # The caching allocator must not hand these blocks out again
                # while the side stream may still use them.
                for t in plan.side_updater.ema + plan.side_updater.model:
                    ops.record_stream(t, self._side_stream)
            avg_ema, avg_model = [avg_ema[i] for i in main], [avg_model[i] for i in main]
        # Copies of one dtype and layout (integer buffers; floating buffers
        # with buffers="copy") ride in the fused launch; the others, which
        # cast or change layout, are a separate foreach copy.
        fused = [
            e.dtype == m.dtype and _is_dense(e) and _is_dense(m) and _same_layout(e, m)
            for e, m in zip(copy_ema, copy_model)
        ]
        fused_ema = [e for e, f in zip(copy_ema, fused) if f]
        fused_model = [m for m, f in zip(copy_model, fused) if f]
        plan.foreach_copy_ema = [e for e, f in zip(copy_ema, fused) if not f]
        plan.foreach_copy_model = [m for m, f in zip(copy_model, fused) if not f]
        plan.updater = FusedUpdater(avg_ema, avg_model, fused_ema, fused_model) if avg_ema or fused_ema else None
        plan.copy_ema, plan.copy_model, plan.pairs = copy_ema, copy_model, pairs
        plan.finite_check = [m for m, e in pairs if m.is_floating_point() and m.numel() > 0]
        dtensors = [t for _, _, _, t, _ in m_entries if _is_dtensor(t)]
        plan.local_watch = (tuple(dtensors), tuple(map(_local_shard, dtensors))) if dtensors else None
        # Every registered tensor and child of both module trees, and the size
        # of every registry: comparing them is the per-step check that the
        # plan still describes the modules.  Shapes are compared only for the
        # copied entries; a replaced storage of an averaged tensor is caught
        # by the fused op's own check, which then triggers a rebuild here.
        owners, locals_, objects, sizes = [], [], [], []
        for _, owner, local, t, _ in m_entries + e_entries:
            owners.append(owner)
            locals_.append(local)
            objects.append(t)
        for module in m_modules + e_modules:
            for registry in (module._parameters, module._buffers, module._modules):
                sizes.append((registry, len(registry)))
            for local, child in module._modules.items():
                owners.append(module._modules)
                locals_.append(local)
                objects.append(child)
        plan.watch = (tuple(owners), tuple(locals_), tuple(objects))
        plan.watch_len = (tuple(r for r, _ in sizes), tuple(n for _, n in sizes))
        plan.copy_shapes = tuple(m.shape for m in copy_model)
        return plan

    def _relayout(self, ema: Sequence[torch.Tensor] = (), model: Sequence[torch.Tensor] = ()) -> None:
        """Moves the EMA's floating tensors into a new flat buffer, values unchanged.

        Each tensor in ``ema`` is laid out like its partner in ``model``; the
        others keep their strides.
        """
        floating = []
        seen = set()
        for _, _, _, t, _ in _state_entries(self._covered)[0]:
            if t.is_floating_point() and id(t) not in seen:
                seen.add(id(t))
                floating.append(t)
        like = {id(e): m for e, m in zip(ema, model)}
        specs = []
        for t in floating:
            ref = like.get(id(t), t)
            specs.append((t.shape, ref.stride() if _is_dense(ref) else t.contiguous().stride(), t.dtype, t.device))
        partners = [like.get(id(t)) for t in floating]
        with torch.no_grad():
            for t, view in zip(floating, _flat_views(specs, partners)):
                view.copy_(t)
                t.data = view

    # ------------------------------------------------------------------ evaluation and the end of training

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Lets ``model`` hold the EMA weights inside a ``with`` block, then restores it exactly.

        Use it to validate or test with the EMA weights through the training
        model (its wrappers, hooks, compiled graph).  No weights are copied:
        each model tensor is pointed at the EMA's memory and pointed back on
        exit, also when the block raises, so the model's Parameter objects,
        their storage and the optimizer state attached to them are untouched.
        Where the EMA's dtype differs from the model's (``ema_dtype``) the
        model gets a cast copy of the EMA tensor for the block.

        The model writes into the EMA inside the block (e.g. BatchNorm in
        training mode): evaluate in eval mode.  :meth:`update` refuses to run
        inside the block.
        """
        self.wait()
        plan = self._ensure_plan(self._source(model))
        saved = []
        self._swap_depth += 1
        try:
            with torch.no_grad():
                for m, e in plan.pairs:
                    saved.append((m, m.data))
                    if e.dtype == m.dtype:
                        m.data = e
                    else:
                        m.data = e.to(dtype=m.dtype)
            yield model
        finally:
            for m, data in reversed(saved):
                m.data = data
            self._swap_depth -= 1

    def copy_to(self, model: nn.Module) -> None:
        """Writes the EMA values into ``model``'s tensors in place.

        Use it at the end of training so that the model (and whatever holds
        it: the optimizer, a scheduler, a second ``train()`` call) continues
        with the EMA weights.  Parameter objects and their storage stay the
        same, so the optimizer state remains attached.  Integer buffers are
        copied as well.
        """
        if self._swap_depth:
            raise RuntimeError(f"{type(self).__name__}.copy_to: called inside swapped()")
        self.wait()
        plan = self._ensure_plan(self._source(model))
        if plan.pairs:
            with torch.no_grad():
                torch._foreach_copy_([m for m, _ in plan.pairs], [e for _, e in plan.pairs])

    def update_attr(self, model: nn.Module, include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None) -> None:
        """Copies the model's plain attributes (not weights or buffers) onto ``ema.ema``.

        Detection models keep state such as anchors, strides or class names in
        attributes that the EMA copy must follow.  As in SuperGradients, every
        attribute in the (unwrapped) model's ``__dict__`` whose name does not
        start with ``_`` is copied by reference, restricted to ``include`` when
        it is non-empty and skipping ``exclude``; both default to the model's
        ``get_include_attributes()`` / ``get_exclude_attributes()`` when it
        has them (SuperGradients' ``SgModule``), else to empty lists.  Unlike
        SuperGradients, ``training`` is never copied: the EMA stays in eval mode.
        """
        src = unwrap_model(model)
        include = self.include_attributes if include is None else list(include)
        exclude = self.exclude_attributes if exclude is None else list(exclude)
        for k, v in src.__dict__.items():
            if (include and k not in include) or k.startswith("_") or k in exclude or k == "training":
                continue
            setattr(self.ema, k, v)

    def memory_bytes(self) -> int:
        """Bytes of memory the EMA's own tensors occupy (its flat buffers and copied buffers, each storage once)."""
        seen = set()
        total = 0
        for _, _, _, t, _ in _state_entries(self._covered)[0]:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen or storage.nbytes() == 0:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """The EMA weights, the decay, the schedule (name and parameters), the options and the counters.

        Holds only tensors, numbers, strings, lists and dicts, so
        ``torch.load(..., weights_only=True)`` reads it back.  The tensors
        share memory with the EMA (like ``nn.Module.state_dict``): save or
        clone them before further updates if you keep the dictionary.
        """
        self.wait()
        fn = self.decay_function
        params = fn.get_params() if isinstance(fn, IDecayFunction) else {}
        return {
            "version": _STATE_VERSION,
            "ema": {key: t.detach() for key, _, _, t, _ in _state_entries(self._covered)[0]},
            "decay": self.decay,
            "decay_function": {"name": decay_function_name(fn), "params": dict(params)},
            "buffers": self.buffers,
            "ema_dtype": None if self.ema_dtype is None else str(self.ema_dtype),
            "update_every": self.update_every,
            "skip_nonfinite": self.skip_nonfinite,
            "async_update": self.async_update,
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "step": None if self.step_tensor is None else int(self.step_tensor),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved, so that a resumed run continues bit-exactly.

        Everything is checked before anything is written: the weights must
        match the EMA by name and shape.  When the saved schedule differs from
        the current one it is rebuilt from ``EMA_DECAY_FUNCTIONS`` (with a
        warning), or kept with a warning when its name is not registered.
        """
        name = type(self).__name__
        if not isinstance(state, dict) or "ema" not in state or "decay" not in state:
            raise ValueError(f"{name}.load_state_dict: expected a dict from {name}.state_dict() with 'ema' and 'decay'")
        weights = state["ema"]
        current = {key: t for key, _, _, t, _ in _state_entries(self._covered)[0]}
        missing = [k for k in current if k not in weights]
        unexpected = [k for k in weights if k not in current]
        if missing or unexpected:
            raise RuntimeError(
                f"{name}.load_state_dict: the saved EMA does not match (missing: {_names(missing) or 'none'}; "
                f"unexpected: {_names(unexpected) or 'none'})"
            )
        for key, t in current.items():
            v = weights[key]
            if not isinstance(v, torch.Tensor) or v.shape != t.shape:
                got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise RuntimeError(f"{name}.load_state_dict: entry {key!r} is {got} in the state but {list(t.shape)} in the EMA")
            if v.is_complex() or v.is_meta:
                raise RuntimeError(
                    f"{name}.load_state_dict: entry {key!r} is a {v.dtype} tensor on {v.device}; expected real values "
                    f"to copy into the EMA's {t.dtype} tensor"
                )
        decay = _check_decay(state["decay"])
        options = {k: state[k] for k in ("buffers", "update_every", "skip_nonfinite") if k in state}
        if options.get("buffers", "average") not in ("average", "copy"):
            raise ValueError(f"{name}.load_state_dict: buffers must be 'average' or 'copy', got {options['buffers']!r}")
        every = options.get("update_every", 1)
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"{name}.load_state_dict: update_every must be an integer >= 1, got {every!r}")
        if not isinstance(options.get("skip_nonfinite", False), bool):
            raise ValueError(
                f"{name}.load_state_dict: skip_nonfinite must be True or False, got {options['skip_nonfinite']!r}"
            )
        # The counters are checked here too: a bad one found while writing
        # would leave new weights with old counters (a half-loaded state).
        num_updates = _state_count(name, "num_updates", state.get("num_updates", 0))
        num_skipped = _state_count(name, "num_skipped", state.get("num_skipped", 0))
        saved_step = state.get("step")
        saved_step = None if saved_step is None else _state_count(name, "step", saved_step)
        decay_function = self._saved_decay_function(state.get("decay_function"))
        if self.capturable:
            fn_ok = isinstance(decay_function, IDecayFunction) and decay_function.has_tensor_value()
            if not fn_ok or every != 1 or options.get("skip_nonfinite", False):
                raise ValueError(
                    f"{name}.load_state_dict: the saved state (schedule {decay_function!r}, update_every={every}, "
                    f"skip_nonfinite={options.get('skip_nonfinite', False)}) cannot run with capturable=True"
                )

        self.wait()
        with torch.no_grad():
            for key, t in current.items():
                t.copy_(weights[key])
        self.decay = decay
        self.decay_function = decay_function
        for k, v in options.items():
            setattr(self, k, v)
        self.num_updates = num_updates
        self.num_skipped = num_skipped
        if self.step_tensor is not None and saved_step is not None:
            self.step_tensor.fill_(saved_step)
        # The options may have changed what is averaged.  A capturable EMA
        # rebuilds its plan now, so that the next update may be compiled.
        src = self._plan.src if self._plan is not None else None
        self._plan = None
        if self.capturable and src is not None:
            self._plan = self._build_plan(src)

    def _saved_decay_function(self, info: Optional[Dict[str, Any]]) -> IDecayFunction:
        current = self.decay_function
        if not info:
            return current
        saved_name, saved_params = info.get("name"), dict(info.get("params") or {})
        params = current.get_params() if isinstance(current, IDecayFunction) else {}
        if saved_name == decay_function_name(current) and saved_params == params:
            return current
        if saved_name in EMA_DECAY_FUNCTIONS:
            rebuilt = EMA_DECAY_FUNCTIONS[saved_name](**saved_params)
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: the saved decay schedule {saved_name!r} {saved_params} "
                f"replaces the current {current!r}",
                UserWarning,
                stacklevel=3,
            )
            return rebuilt
        warnings.warn(
            f"{type(self).__name__}.load_state_dict: the saved decay schedule {saved_name!r} is not registered in "
            f"EMA_DECAY_FUNCTIONS; keeping the current {current!r}",
            UserWarning,
            stacklevel=3,
        )
        return current

    def __getstate__(self) -> Dict[str, Any]:
        # The plan holds the compiled updater (not picklable) and references to
        # the training model; a copy of the EMA builds its own on first use.
        state = dict(self.__dict__)
        state["_plan"] = None
        # CUDA streams and events belong to this process and this object.
        state["_side_stream"] = None
        state["_pending"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        if "num_updates" in state:  # pickled before num_updates became a property
            state["_num_updates"] = state.pop("num_updates")
        for key, default in (("capturable", False), ("total_steps", None), ("step_tensor", None),
                             ("decay_tensor", None), ("_num_updates_t", None), ("async_update", False),
                             ("_streams", None), ("_side_stream", None), ("_pending", None), ("_warned", set())):
            state.setdefault(key, default)
        self.__dict__.update(state)
        # Copying or unpickling clones every parameter on its own; put them
        # back into one flat buffer.
        self._relayout()
        if self.__dict__.get("async_update"):
            self._install_wait_hook()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(decay={self.decay}, decay_function={self.decay_function!r}, "
            f"buffers={self.buffers!r}, ema_dtype={self.ema_dtype}, update_every={self.update_every}, "
            f"skip_nonfinite={self.skip_nonfinite}, capturable={self.capturable}, num_updates={self.num_updates})"
        )


class KDModelEMA(ModelEMA):
    """EMA of the student of a knowledge-distillation module (one with ``.student`` and ``.teacher``).

    Use it in place of :class:`ModelEMA` when training a student against a
    frozen teacher: only the student is copied and averaged.  ``ema.ema`` is a
    shallow copy of the distillation module whose ``student`` is the EMA
    student and whose ``teacher`` is the model's own teacher (shared, not
    copied), so it runs like the training module.  :meth:`update`,
    :meth:`swapped` and :meth:`copy_to` pass the distillation module (possibly
    wrapped) and touch its student only; the teacher's tensors are never
    written (SuperGradients rewrites them with ``t * d + t * (1 - d)`` at every
    update, which drifts by rounding).
    """

    def _source(self, model: nn.Module) -> nn.Module:
        kd = super()._source(model)
        student = kd._modules.get("student")
        if not isinstance(student, nn.Module) or not isinstance(kd._modules.get("teacher"), nn.Module):
            raise TypeError(
                f"KDModelEMA: expected a distillation module with `student` and `teacher` submodules, got "
                f"{type(kd).__name__} with children {list(kd._modules)}"
            )
        # The student itself may be compiled: the EMA averages the module inside.
        return unwrap_model(student)

    def _wrap_ema(self, model: nn.Module, covered: nn.Module) -> nn.Module:
        kd = unwrap_model(model)
        shell = copy.copy(kd)
        # copy.copy shares the registries (dicts of modules, parameters, hooks)
        # with the training module; give the shell its own before editing it.
        for k, v in list(shell.__dict__.items()):
            if isinstance(v, (dict, set)):
                shell.__dict__[k] = copy.copy(v)
        shell._modules["student"] = covered
        # Not shell.eval(): that would also switch the shared teacher.
        shell.__dict__["training"] = False
        return shell


def _call_or(obj: Any, method: str, default: Any) -> Any:
    fn = getattr(obj, method, None)
    return fn() if callable(fn) else default


def _unchanged(plan: _Plan) -> bool:
    """True while every watched registry holds the same objects and sizes (and copied tensors their shapes).

    The entry and size tests are :func:`ema_cuda.ops.entries_unchanged`
    (about 10 ns per entry compiled; ResNet-50's two trees, 940 entries and
    906 registries, take 27 us).
    """
    if not _ops.entries_unchanged(*plan.watch, *plan.watch_len):
        return False
    if plan.local_watch is not None:
        # Sharded parameters: each DTensor must still hold the same local shard.
        dtensors, shards = plan.local_watch
        if not all(map(operator.is_, map(_local_shard, dtensors), shards)):
            return False
    return tuple(t.shape for t in plan.copy_model) == plan.copy_shapes


def _is_dtensor(t: Any) -> bool:
    # Checked by attribute so that torch.distributed is imported only when used.
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def _local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor object it holds, not an alias), else ``t``."""
    if not _is_dtensor(t):
        return t
    local = getattr(t, "_local_tensor", None)
    if local is None:
        with torch.no_grad():
            local = t.to_local()
    return local


def _check_no_shared_storage(cls: str, entries: List[_Entry], tensors: List[torch.Tensor]) -> None:
    """Distinct tensors that overlap in memory (views of one another) cannot be packed separately."""
    keys = {}
    for key, _, _, t, _ in entries:
        keys.setdefault(id(t), key)
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), keys[id(t)])
        for t in tensors
        if t.numel() and t.device.type != "meta"
    )
    for (lo0, hi0, k0), (lo1, _, k1) in zip(spans, spans[1:]):
        if lo1 < hi0:
            raise ValueError(
                f"{cls}: model entries {k0!r} and {k1!r} are different tensors that overlap in memory; "
                "tie weights by sharing one Parameter instead"
            )
