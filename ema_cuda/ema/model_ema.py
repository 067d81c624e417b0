"""The EMA facade: :class:`ModelEMA`, over the parts of this package.

A ``ModelEMA`` holds its options (:mod:`.options`), its tensors
(:mod:`.storage`), its plan cache (:mod:`.plan`), one executor
(:mod:`.executors`) and one tree adapter (:mod:`.trees`), and says in what
order they act; each part knows nothing of the others' insides.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ema_cuda._modules import unwrap_model
from ema_cuda.ema.executors import integer_step, make_executor, recompiles_warning
from ema_cuda.ema.files import load_ema_safetensors, save_ema_safetensors
from ema_cuda.ema.options import EMAOptions, from_params_arguments, option_property
from ema_cuda.ema.plan import PlanCache
from ema_cuda.ema.state import make_state, parse_state, pickled, unpickled
from ema_cuda.ema.storage import EMAStorage
from ema_cuda.ema.trees import ReplicatedTree
from ema_cuda.ema_decay_schedules import IDecayFunction

__all__ = ["ModelEMA"]


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
            ``"half_life"`` and ``"power_function"`` apply the decay of the
            steps since the last update (NOTE [elapsed steps] in
            :mod:`ema_cuda.schedules_time`); the other schedules one step's
            per update, so they average over ``update_every`` times more steps.
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

    # NOTE [pickled path]: the EMA classes say they live in ema_cuda.ema (see
    # the end of this file), so pickles name that public path, as those of
    # the single-module EMA did, whatever module of the package defines them.
    #: The tree adapter: what part of a model is averaged, how it is copied and swapped.
    _tree_type = ReplicatedTree

    decay = option_property("decay")
    decay_function = option_property("decay_function")
    buffers = option_property("buffers")
    ema_dtype = option_property("ema_dtype", settable=False)
    update_every = option_property("update_every")
    skip_nonfinite = option_property("skip_nonfinite")
    capturable = option_property("capturable", settable=False)
    total_steps = option_property("total_steps")
    async_update = option_property("async_update", settable=False)

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
        name = type(self).__name__
        self._options = EMAOptions(decay, decay_function, buffers, ema_dtype, update_every, skip_nonfinite,
                                   capturable, total_steps, async_update, where=name)
        self._tree = self._tree_type(name)
        src = self._tree.source(model)
        covered = self._tree.copy(src, self._options.ema_dtype)
        # SuperGradients' SgModule declares which attributes update_attr copies.
        attrs = unwrap_model(model)
        self._assemble(self._tree.wrap(model, covered), covered, {
            "include_attributes": list(_call_or(attrs, "get_include_attributes", [])),
            "exclude_attributes": list(_call_or(attrs, "get_exclude_attributes", [])),
        })
        self._warn_once("dtype", self._options.stall_warning(name, self._storage.dtype_examples()))
        if self.total_steps is not None:
            self._warn_if_horizon_exceeds(self.total_steps)
        if self.capturable:
            # Built now so that the first update can already be compiled or
            # captured (neither can build it: it validates and allocates).
            self._plans.get(src, self.buffers)

    def _assemble(self, ema: nn.Module, covered: nn.Module, parts: Dict[str, Any]) -> None:
        """Sets up everything but the options and the tree adapter, from ``parts`` (see :func:`.state.pickled`)."""
        name = type(self).__name__
        self.ema = ema
        self._storage = EMAStorage(covered)
        self._swap_depth = 0
        #: Updates skipped by the non-finite guard.
        self.num_skipped = int(parts.get("num_skipped", 0))
        # Warnings about the configuration fire once per EMA, not per step.
        self._warned = set(parts.get("warned", ()))
        self._horizon_checked = parts.get("horizon_checked")
        self.include_attributes = list(parts.get("include_attributes", []))
        self.exclude_attributes = list(parts.get("exclude_attributes", []))
        self._executor = make_executor(name, self._options, self._storage, ema, parts)
        self._plans = PlanCache(name, self._storage, self._tree, self._executor)

    def _warn_once(self, key: str, message: Optional[str], stacklevel: int = 3) -> None:
        if message is not None and key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=stacklevel)

    def _warn_if_horizon_exceeds(self, total_steps: Any) -> None:
        # Called on every update: a run's total_steps rarely changes, so the
        # check itself runs once per (decay, total_steps).
        if self._horizon_checked != (self.decay, total_steps):
            self._horizon_checked = (self.decay, total_steps)
            self._warn_once("horizon", self._options.horizon_warning(type(self).__name__, total_steps), 4)

    def wait(self) -> None:
        """Makes the current stream wait for an asynchronous update still in flight (``async_update``).

        Called automatically before every read of the EMA in this class, by
        a forward pass of ``ema.ema`` and before every ``optimizer.step()``;
        call it yourself before reading the EMA's tensors directly or writing
        the model's parameters outside an optimizer.  It does not block the
        host, and does nothing when no update is in flight.
        """
        self._executor.wait()

    @property
    def num_updates(self) -> int:
        """The number of updates applied (read from the device in capturable mode)."""
        return self._executor.count()

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self._executor.set_count(int(value))

    step_tensor = property(lambda self: self._executor.step_tensor,
                           doc="The step of the last update, a 0-dim int64 tensor on the EMA's device (capturable "
                               "mode; else None).")
    decay_tensor = property(lambda self: self._executor.decay_tensor,
                            doc="Its decay, a 0-dim float64 tensor on the EMA's device (capturable mode; else None).")
    last_decay = property(lambda self: self._executor.decay_used(),
                          doc="The decay the last update applied, None before the first (read from the device in "
                              "capturable mode).")
    averaged_module = property(lambda self: self._storage.module,
                               doc="The module whose parameters and buffers the EMA holds: ``ema.ema``, or the EMA "
                                   "student inside it (KDModelEMA).")

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
        decay, decay_function, options = from_params_arguments(
            f"{cls.__name__}.from_params", decay_type, decay, kwargs, stacklevel=3
        )
        return cls(model, decay, decay_function, **options)

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
        name = type(self).__name__
        if self._swap_depth:
            raise RuntimeError(f"{name}.update: called inside swapped(); the model holds the EMA weights there")
        if self.capturable:
            self._executor.update(name, self._plans, self._tree.source(model), self._options, step, total_steps,
                                  self._warn_if_horizon_exceeds)
            return
        if torch.compiler.is_compiling():
            self._warn_once("compile", recompiles_warning(name))
        if step is None or total_steps is None:
            raise TypeError(
                f"{name}.update: step and total_steps are required (they may be left out only with "
                "capturable=True, where the step is counted on the device)"
            )
        step = integer_step(name, step)
        self._warn_if_horizon_exceeds(total_steps)
        if step % self.update_every:
            return
        d = self.decay_at(step, total_steps)
        plan = self._plans.get(self._tree.source(model), self.buffers)
        if self.skip_nonfinite and not self._tree.agree(plan.model_is_finite(), plan):
            # The step is not recorded: the next update counts these steps too (NOTE [elapsed steps]).
            self.num_skipped += 1
            return
        self._executor.run(plan, d, step)

    def decay_at(self, step: int, total_steps: int) -> float:
        """The decay an update at ``step`` would use, checked to be a finite number in [0, 1].
        A schedule defined per elapsed step gets the steps since the last update (NOTE [elapsed steps])."""
        elapsed = self._executor.elapsed(step, self.update_every)
        return self._options.decay_at(type(self).__name__, step, total_steps, elapsed)

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
        plan = self._plans.get(self._tree.source(model), self.buffers)
        self._swap_depth += 1
        try:
            with self._tree.swap(plan.pairs):
                yield model
        finally:
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
        plan = self._plans.get(self._tree.source(model), self.buffers)
        if plan.pairs:
            with torch.no_grad():
                torch._foreach_copy_([m for m, _ in plan.pairs], [e for _, e in plan.pairs])

    def update_attr(
        self, model: nn.Module, include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None
    ) -> None:
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
        return self._storage.memory_bytes()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """The EMA weights, the decay, the schedule (name and parameters), the options and the counters.

        ``step`` is the step of the last update where the next one depends on
        it (capturable mode, a schedule defined per elapsed step), else None.

        Holds only tensors, numbers, strings, lists and dicts, so
        ``torch.load(..., weights_only=True)`` reads it back.  The tensors
        share memory with the EMA (like ``nn.Module.state_dict``): save or
        clone them before further updates if you keep the dictionary.
        """
        self.wait()
        weights = {e.key: e.tensor.detach() for e in self._storage.entries()}
        step = self._executor.saved_step(self._options)
        return make_state(self._options, weights, self.num_updates, self.num_skipped, step)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved, so that a resumed run continues bit-exactly.

        Everything is checked before anything is written: the weights must
        match the EMA by name and shape.  When the saved schedule differs from
        the current one it is rebuilt from ``EMA_DECAY_FUNCTIONS`` (with a
        warning), or kept with a warning when its name is not registered.
        """
        name = type(self).__name__
        current = {e.key: e.tensor for e in self._storage.entries()}
        loaded = parse_state(f"{name}.load_state_dict", name, state, current, self._options)
        self.wait()
        with torch.no_grad():
            for key, t in current.items():
                t.copy_(loaded.weights[key])
        self._options = loaded.options
        self.num_updates = loaded.num_updates
        self.num_skipped = loaded.num_skipped
        if self.step_tensor is not None and loaded.step is not None:
            self.step_tensor.fill_(loaded.step)
        # None (a state saved without it): unknown (NOTE [elapsed steps] in ema_cuda.schedules_time).
        self._executor.last_step = loaded.step
        if loaded.warning is not None:
            warnings.warn(loaded.warning, UserWarning, stacklevel=2)
        plan = self._plans.current
        if self.capturable and plan is not None:
            # The options may have changed what is averaged, and the next
            # update may be compiled: the plan is checked (and rebuilt) now.
            self._plans.get(plan.src, self.buffers)

    def save_safetensors(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """Writes the EMA weights to ``path`` as a safetensors file (atomically), the rest of
        :meth:`state_dict` in its metadata; returns the path.

        ``safetensors.torch.load_file`` reads the weights under the model's
        ``state_dict`` keys (a tied weight under each of its keys), ready for
        ``model.load_state_dict``.  The format: :mod:`ema_cuda.ema.files`.
        """
        return save_ema_safetensors(self, path)

    def load_safetensors(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Restores a file of :meth:`save_safetensors` through :meth:`load_state_dict`.

        A file that is not one, or whose metadata lacks or garbles an entry,
        is a ``ValueError`` naming the file and the entry; everything is
        checked before anything is written.
        """
        load_ema_safetensors(self, path)

    def __getstate__(self) -> Dict[str, Any]:
        return pickled(self._options, self.ema, self._storage.module, self._executor.counters(), {
            "num_skipped": self.num_skipped, "include_attributes": self.include_attributes,
            "exclude_attributes": self.exclude_attributes, "warned": self._warned,
            "horizon_checked": self._horizon_checked,
        })

    def __setstate__(self, state: Dict[str, Any]) -> None:
        parts = unpickled(state)
        name = type(self).__name__
        self._options = EMAOptions(**parts["options"], where=name)
        self._tree = self._tree_type(name)
        self._assemble(parts["ema"], parts["covered"], parts)
        # Copying or unpickling clones every tensor on its own: pack them again (NOTE [flat storage]).
        self._storage.relayout()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(decay={self.decay}, decay_function={self.decay_function!r}, "
            f"buffers={self.buffers!r}, ema_dtype={self.ema_dtype}, update_every={self.update_every}, "
            f"skip_nonfinite={self.skip_nonfinite}, capturable={self.capturable}, num_updates={self.num_updates})"
        )


def _call_or(obj: Any, method: str, default: Any) -> Any:
    fn = getattr(obj, method, None)
    return fn() if callable(fn) else default


ModelEMA.__module__ = "ema_cuda.ema"  # NOTE [pickled path]
