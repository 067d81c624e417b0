"""A drop-in for diffusers' ``EMAModel`` (``diffusers.training_utils.EMAModel``, diffusers 0.3x-0.4x) whose
update is one fused call.

Change ``from diffusers.training_utils import EMAModel`` to
``from ema_cuda.compat.diffusers import EMAModel``; nothing else changes.
diffusers itself is not imported (``save_pretrained`` and
``from_pretrained`` only call the ``model_cls`` you pass).
"""
from __future__ import annotations

import copy
import operator
import sys
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ema_cuda.compat._fused import FusedPairs
from ema_cuda.ema.storage import flat_views
from ema_cuda.ops import is_dense, same_layout

__all__ = ["EMAModel"]


class EMAModel:
    """An exponential moving average of a list of parameters: diffusers' ``EMAModel``, fused.

    Construct it from ``model.parameters()``; call :meth:`step` with the
    same parameters after every optimizer step; evaluate with
    :meth:`store`, :meth:`copy_to`, then :meth:`restore`.  The constructor
    arguments, attributes (``shadow_params``, ``optimization_step``,
    ``cur_decay_value``, ...), methods and ``state_dict`` keys are
    diffusers', so accelerate's checkpoint hooks and checkpoints written by
    either class work with the other.

    The decay is diffusers': with ``s = optimization_step -
    update_after_step - 1``, 0 while ``s <= 0`` (the update copies the
    parameters), else ``(1 + s) / (10 + s)``, or with ``use_ema_warmup``
    ``1 - (1 + s / inv_gamma) ** -power``, clamped to ``[min_decay, decay]``.
    Parameters with ``requires_grad=True`` are averaged, the others copied.
    The deprecated forms diffusers still accepts (an ``nn.Module`` instead of
    its parameters, ``max_value``, ``min_value``, ``device``) work and warn.

    What the fused update does instead of diffusers' per-tensor or foreach
    ops (see docs/dropins.md):

    * all parameters in one call, from a plan cached while :meth:`step`
      receives the same parameter objects (same ``requires_grad``) and the
      shadow tensors are the same; a different list rebuilds it.  The shadow
      parameters live in one flat buffer per (device, dtype).  ``foreach``
      is kept as an attribute and changes nothing;
    * the arithmetic is ``shadow * d + param * (1 - d)`` in fp32 (fp64 for
      fp64 tensors), diffusers' is ``shadow - (1 - d) * (shadow - param)`` in
      the tensors' dtype: they differ by rounding, a few units in the last
      place per step (the tests hold them to ``rtol=1e-5, atol=1e-6`` in fp32
      after 300 steps).  Shadow and parameters may differ in dtype (an fp32
      EMA of a bf16 model: ``ema.to(dtype=torch.float32)``);
    * a parameter list of another length than the shadow list raises
      (diffusers truncates to the shorter);
    * DeepSpeed ZeRO-3 (parameters gathered around the update) raises
      ``NotImplementedError``.
    """

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: float | int = 1.0,
        power: float | int = 2 / 3,
        foreach: bool = False,
        model_cls: Optional[Any] = None,
        model_config: Optional[Dict[str, Any]] = None,
        **kwargs,
    ):
        if isinstance(parameters, nn.Module):
            _deprecated("passing a torch.nn.Module to EMAModel is deprecated; pass its parameters() instead")
            parameters = parameters.parameters()
            use_ema_warmup = True  # as diffusers, for checkpoints of the old interface
        if kwargs.get("max_value", None) is not None:
            _deprecated("EMAModel(max_value=...) is deprecated; use decay")
            decay = kwargs["max_value"]
        if kwargs.get("min_value", None) is not None:
            _deprecated("EMAModel(min_value=...) is deprecated; use min_decay")
            min_decay = kwargs["min_value"]

        parameters = list(parameters)
        self.shadow_params: List[torch.Tensor] = _packed([p.detach() for p in parameters])
        if kwargs.get("device", None) is not None:
            _deprecated("EMAModel(device=...) is deprecated; use EMAModel.to(device)")
            self.to(device=kwargs["device"])

        self.temp_stored_params: Optional[List[torch.Tensor]] = None
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_ema_warmup = use_ema_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.optimization_step = 0
        self.cur_decay_value: Optional[float] = None  # set by step()
        self.foreach = foreach
        self.model_cls = model_cls
        self.model_config = model_config
        self._plan: Optional[_Plan] = None

    # ------------------------------------------------------------------ pretrained folders

    @classmethod
    def from_pretrained(cls, path, model_cls, foreach: bool = False) -> "EMAModel":
        """An EMA of the weights saved by :meth:`save_pretrained` in ``path`` (diffusers' format)."""
        _, ema_kwargs = model_cls.from_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema_model = cls(model.parameters(), model_cls=model_cls, model_config=model.config, foreach=foreach)
        ema_model.load_state_dict(ema_kwargs)
        return ema_model

    def save_pretrained(self, path) -> None:
        """Saves a ``model_cls`` holding the EMA weights, with the EMA's settings in its config."""
        if self.model_cls is None:
            raise ValueError("EMAModel.save_pretrained: `model_cls` was not given at construction")
        if self.model_config is None:
            raise ValueError("EMAModel.save_pretrained: `model_config` was not given at construction")
        model = self.model_cls.from_config(self.model_config)
        state_dict = self.state_dict()
        state_dict.pop("shadow_params", None)
        model.register_to_config(**state_dict)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    # ------------------------------------------------------------------ the update

    def get_decay(self, optimization_step: int) -> float:
        """The decay of the update at ``optimization_step`` (diffusers' formula, see the class docs)."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            cur_decay_value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            cur_decay_value = (1 + step) / (10 + step)
        cur_decay_value = min(cur_decay_value, self.decay)
        return max(cur_decay_value, self.min_decay)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Counts an optimization step and moves the shadow parameters towards ``parameters`` in one fused call.

        Raises before writing anything (the counter included) when the
        parameters do not pair with the shadow parameters.
        """
        if isinstance(parameters, nn.Module):
            _deprecated("passing a torch.nn.Module to EMAModel.step is deprecated; pass its parameters() instead")
            parameters = parameters.parameters()
        parameters = list(parameters)
        plan = self._current_plan(parameters)
        decay = self.get_decay(self.optimization_step + 1)
        plan.pairs.update(decay)
        self.optimization_step += 1
        self.cur_decay_value = decay

    def _current_plan(self, parameters: List[torch.Tensor]) -> "_Plan":
        plan = self._plan
        if plan is None or not plan.valid_for(parameters, self.shadow_params):
            self._plan = None  # a failed build leaves no stale plan behind
            if len(parameters) == len(self.shadow_params) and not all(
                    same_layout(s, p) for s, p in zip(self.shadow_params, parameters)
                    if is_dense(p) and s.shape == p.shape):
                # The model changed memory layout (channels_last) after the EMA was made: the fused
                # update needs both sides laid out alike, so the shadows are copied into its layout.
                self.shadow_params = _packed(self.shadow_params, like=parameters)
            plan = _Plan(parameters, self.shadow_params)
            self._plan = plan
        return plan

    # ------------------------------------------------------------------ evaluation

    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Copies the averaged values into ``parameters`` (in place: Parameter objects and storage stay)."""
        parameters = list(parameters)
        _check_count("copy_to", len(self.shadow_params), len(parameters))
        with torch.no_grad():
            targets = [p.data for p in parameters]
            if targets:
                torch._foreach_copy_(targets, [s.to(p.device) for s, p in zip(self.shadow_params, parameters)])

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Keeps a CPU copy of ``parameters`` for :meth:`restore`."""
        self.temp_stored_params = [param.detach().cpu().clone() for param in parameters]

    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Writes the values kept by :meth:`store` back into ``parameters``, then forgets them."""
        if self.temp_stored_params is None:
            raise RuntimeError("EMAModel.restore: there are no weights kept by store() to restore")
        parameters = list(parameters)
        _check_count("restore", len(self.temp_stored_params), len(parameters), what="stored tensors")
        with torch.no_grad():
            targets = [p.data for p in parameters]
            if targets:
                torch._foreach_copy_(targets, [c.data for c in self.temp_stored_params])
        self.temp_stored_params = None

    # ------------------------------------------------------------------ placement

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> None:
        """Moves the shadow parameters to ``device`` and floating ones to ``dtype`` (either may be None)."""
        target = None if device is None else torch.device(device)
        specs = [
            (p.device if target is None else target, dtype if dtype is not None and p.is_floating_point() else p.dtype)
            for p in self.shadow_params
        ]
        if all(p.device == d and p.dtype == dt for p, (d, dt) in zip(self.shadow_params, specs)):
            self.shadow_params = list(self.shadow_params)
            return
        self.shadow_params = _packed(self.shadow_params, specs, non_blocking)

    def pin_memory(self) -> None:
        """Moves the shadow parameters to pinned host memory (for non-blocking copies to and from a GPU)."""
        self.shadow_params = [p.pin_memory() for p in self.shadow_params]

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """The settings, the step counter and the shadow parameters (references, not copies), under diffusers'
        keys."""
        return {
            "decay": self.decay,
            "min_decay": self.min_decay,
            "optimization_step": self.optimization_step,
            "update_after_step": self.update_after_step,
            "use_ema_warmup": self.use_ema_warmup,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "shadow_params": self.shadow_params,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` of this class or of diffusers' ``EMAModel`` (a deep copy of it).

        Checked as diffusers checks it (a value of the wrong type is a
        ``ValueError`` naming it), but every check runs before anything is
        set.  Missing keys keep their current values.
        """
        state_dict = copy.deepcopy(state_dict)
        new = {k: state_dict.get(k, getattr(self, k)) for k in _SETTINGS}
        if not 0.0 <= new["decay"] <= 1.0:
            raise ValueError(f"EMAModel.load_state_dict: decay must be between 0 and 1, got {new['decay']!r}")
        for key, types in _SETTINGS.items():
            if types is not None and not isinstance(new[key], types):
                raise ValueError(f"EMAModel.load_state_dict: invalid {key} {new[key]!r}")
        shadow_params = state_dict.get("shadow_params", None)
        if shadow_params is not None:
            if not isinstance(shadow_params, list):
                raise ValueError("EMAModel.load_state_dict: shadow_params must be a list")
            bad = next((i for i, p in enumerate(shadow_params) if not isinstance(p, torch.Tensor)), None)
            if bad is not None:
                raise ValueError(f"EMAModel.load_state_dict: shadow_params[{bad}] is a "
                                 f"{type(shadow_params[bad]).__name__}, not a Tensor")
        for key, value in new.items():
            setattr(self, key, value)
        if shadow_params is not None:
            self.shadow_params = _packed(shadow_params)

    def __getstate__(self) -> Dict[str, Any]:
        # The plan holds the compiled updater (not picklable) and the parameters; a copy builds its own.
        state = self.__dict__.copy()
        state["_plan"] = None
        return state


# The settings in state_dict besides the weights, with the types diffusers' load_state_dict accepts.
_SETTINGS: Dict[str, Optional[tuple]] = {
    "decay": None,  # range-checked instead
    "min_decay": (float,),
    "optimization_step": (int,),
    "update_after_step": (int,),
    "use_ema_warmup": (bool,),
    "inv_gamma": (float, int),
    "power": (float, int),
}


class _Plan:
    """The fused pairs of one parameter list, and the objects that must stay for them to hold."""

    __slots__ = ("params", "shadow", "grads", "pairs")

    def __init__(self, parameters: List[torch.Tensor], shadow_params: List[torch.Tensor]):
        _check_count("step", len(shadow_params), len(parameters))
        _refuse_zero3()
        averaged: List[Tuple[torch.Tensor, torch.Tensor]] = []
        copied: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for i, (s, p) in enumerate(zip(shadow_params, parameters)):
            if s.shape != p.shape:
                raise RuntimeError(
                    f"EMAModel.step: parameter #{i} has shape {list(p.shape)} but its shadow {list(s.shape)}"
                )
            (averaged if p.requires_grad else copied).append((s, p.detach()))
        self.params = tuple(parameters)
        self.shadow = tuple(shadow_params)
        self.grads = tuple(map(_requires_grad, parameters))
        self.pairs = FusedPairs(averaged, copied)

    def valid_for(self, parameters: List[torch.Tensor], shadow_params: List[torch.Tensor]) -> bool:
        # Identity, not equality: a Parameter compared with == would compare values.
        return (len(parameters) == len(self.params) and len(shadow_params) == len(self.shadow)
                and all(map(operator.is_, parameters, self.params))
                and all(map(operator.is_, shadow_params, self.shadow))
                # Reading requires_grad costs about as much as the rest of this check: once per parameter.
                and tuple(map(_requires_grad, parameters)) == self.grads
                and self.pairs.ready())


_requires_grad = operator.attrgetter("requires_grad")


def _packed(tensors: List[torch.Tensor], specs: Optional[List[Tuple[torch.device, torch.dtype]]] = None,
            non_blocking: bool = False, like: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    """Copies of ``tensors`` (on the (device, dtype) of ``specs`` when given), the floating ones as views into
    one flat buffer per (device, dtype) (NOTE [flat storage] in ema_cuda/ema/storage.py: the update then
    streams through one allocation), each with the strides of its tensor in ``like`` when given and dense."""
    if specs is None:
        specs = [(t.device, t.dtype) for t in tensors]
    if like is None:
        like = tensors
    floating = [(t, spec, ref if is_dense(ref) and ref.shape == t.shape else t)
                for t, spec, ref in zip(tensors, specs, like) if t.is_floating_point()]
    same_device = [ref if ref.device == d else None for _, (d, _), ref in floating]
    views = iter(flat_views([(t.shape, _dense_strides(t, ref), dt, d) for t, (d, dt), ref in floating], same_device))
    out = []
    with torch.no_grad():
        for t, (d, dt) in zip(tensors, specs):
            if t.is_floating_point():
                view = next(views)
                view.copy_(t, non_blocking=non_blocking)
                out.append(view)
            else:
                out.append(t.detach().to(device=d, non_blocking=non_blocking, copy=True))
    return out


def _dense_strides(t: torch.Tensor, ref: torch.Tensor) -> Tuple[int, ...]:
    return ref.stride() if is_dense(ref) else torch.empty(t.shape, device="meta").stride()


def _refuse_zero3() -> None:
    # Only where transformers is already loaded: importing it here would cost seconds.
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return
    if is_deepspeed_zero3_enabled():
        raise NotImplementedError(
            "EMAModel.step: DeepSpeed ZeRO-3 (parameters partitioned across ranks) is not supported by the fused "
            "update; use diffusers' EMAModel there"
        )


def _check_count(method: str, n_ema: int, n_given: int, what: str = "shadow parameters") -> None:
    if n_ema != n_given:
        raise RuntimeError(
            f"EMAModel.{method}: got {n_given} parameters for {n_ema} {what}; they are paired by position and "
            "must match"
        )


def _deprecated(message: str) -> None:
    warnings.warn(message, FutureWarning, stacklevel=3)
