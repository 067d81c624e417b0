"""The EMA as a Lightning callback: :class:`EMACallback`.

Add it to a ``lightning.Trainer`` and the fused EMA follows training::

    from ema_cuda.integrations.lightning import EMACallback

    trainer = lightning.Trainer(callbacks=[EMACallback(decay=0.9999)], ...)
    trainer.fit(module, data)

It replaces Lightning's ``EMAWeightAveraging``; ``EMACallback(decay=d,
decay_type="power", min_decay=d)`` averages exactly as
``EMAWeightAveraging(decay=d)`` does (the first update copies the model,
every later one uses ``d``), and reads checkpoints written by it.
"""
from __future__ import annotations

import math
import warnings
from contextlib import ExitStack
from typing import Any, Dict, Optional, Union

import torch
from lightning.pytorch.callbacks import Callback

from ema_cuda.ema import ModelEMA
from ema_cuda.ema.options import OPTION_NAMES, EMAOptions, from_params_arguments
from ema_cuda.ema.trees import is_dtensor
from ema_cuda.ema_decay_schedules import IDecayFunction

__all__ = ["EMACallback"]

# Checkpoint keys shared with Lightning's WeightAveraging (NOTE [checkpoint layout]).
_STATE_DICT = "state_dict"
_CURRENT = "current_model_state"

# NOTE [checkpoint layout]
# A checkpoint holds the EMA weights under "state_dict" and the training
# weights under "current_model_state", the layout of Lightning's own
# WeightAveraging: `Module.load_from_checkpoint`, `trainer.test(ckpt_path=)`
# and the "best" checkpoint that ModelCheckpoint picks (on metrics of the EMA
# weights) then all give the EMA model, which is what one ships.  A resumed
# fit puts "current_model_state" back into the model.  The callback's own
# entry holds the rest of `ModelEMA.state_dict()` (schedule, counters) and the
# step of the last update, but not the weights a second time.  Where the EMA's
# keys are not those of the checkpoint's "state_dict" (a strategy that
# renames or shards them, ShardedModelEMA's DTensors) the weights go into the
# callback's entry instead and "state_dict" is left alone.
#
# A ShardedModelEMA (FSDP2) leaves "state_dict" to the training weights: a
# sharded strategy loads it into the model itself, before any callback sees
# the checkpoint (Lightning's ModelParallelStrategy even drops it from the
# dictionary the callbacks get).  When the strategy writes a distributed
# checkpoint ("state_dict" holds DTensors, saved by DCP on every rank), the
# EMA's DTensors join them under _SHARDS + key, so each rank writes its own
# shards, and a resumed fit reads them back with DCP from trainer.ckpt_path;
# when it writes one file, the EMA is gathered into full tensors in the
# callback's entry and cut into shards again on load.
_SHARDS = "ema_cuda.ema/"


class EMACallback(Callback):
    """Keeps an exponential moving average of the LightningModule's weights with one fused update per step.

    The EMA (a :class:`~ema_cuda.ema.ModelEMA`, or a
    :class:`~ema_cuda.sharded.ShardedModelEMA` when the parameters are
    DTensors, as under FSDP2) is built when ``fit`` starts, from the model as
    the strategy set it up, and is then ``.ema``.  What it does in a run:

    * **Updates** after every optimizer step, with ``step =
      trainer.global_step`` (1 after the first optimizer step: it counts
      optimizer steps, so ``accumulate_grad_batches=N`` gives one update per
      N batches) and ``total_steps = trainer.estimated_stepping_batches``
      (or the ``total_steps`` option).  ``update_every=k`` updates at steps
      k, 2k, ...
    * **Validates and tests on the EMA weights** (``evaluate_with_ema``):
      the model holds them from the start to the end of each validation and
      test epoch, then gets its training weights back exactly
      (:meth:`ModelEMA.swapped`: nothing is copied).  So ``ModelCheckpoint``
      and early stopping judge the EMA.
    * **At the end of fit** copies the EMA into the model
      (``copy_to_model_at_end``), so the trained module is the averaged one.
    * **Checkpoints** (NOTE [checkpoint layout]): the EMA weights are the
      checkpoint's ``state_dict`` and the training weights its
      ``current_model_state``; ``trainer.fit(ckpt_path=...)`` restores both
      and the run continues bit-identically.  A checkpoint of Lightning's
      ``EMAWeightAveraging`` resumes too (its EMA weights, counting from its
      ``global_step``); one without any EMA starts the EMA from the resumed
      model, with a warning.

    Under DDP every rank keeps its own EMA of the (identical) parameters;
    floating buffers such as BatchNorm statistics follow each rank's batches.
    Under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) each rank
    keeps the EMA of its own shards; its checkpoints keep the training
    weights as ``state_dict`` and store the EMA beside them, each rank's
    shards through DCP when the strategy saves a distributed checkpoint.

    Args:
        decay: the maximum decay, in (0, 1).
        decay_type: the schedule: a name in
            :data:`~ema_cuda.ema_decay_schedules.EMA_DECAY_FUNCTIONS` (its
            parameters go in ``ema_options``), or a schedule object.  The
            default ``"constant"`` uses ``decay`` at every step; ``"power"``
            with ``min_decay=decay`` is Lightning's ``EMAWeightAveraging``.
        evaluate_with_ema: run validation and test epochs on the EMA weights.
        copy_to_model_at_end: copy the EMA into the model when fit ends.
        ema_options: the :class:`~ema_cuda.ema.ModelEMA` options
            (``buffers``, ``ema_dtype``, ``update_every``,
            ``skip_nonfinite``, ``async_update``, ``total_steps``,
            ``capturable``) and the schedule's parameters (``beta``,
            ``min_decay``, ...).  Everything is checked here, at
            construction: an unknown name is an error naming it.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        decay_type: Union[str, IDecayFunction] = "constant",
        *,
        evaluate_with_ema: bool = True,
        copy_to_model_at_end: bool = True,
        **ema_options: Any,
    ):
        where = type(self).__name__
        if isinstance(decay_type, str):
            decay, schedule, options = from_params_arguments(where, decay_type, decay, ema_options, stacklevel=3)
        elif callable(decay_type):
            options = {k: ema_options.pop(k) for k in OPTION_NAMES if k in ema_options}
            if ema_options:
                raise TypeError(
                    f"{where}: {sorted(ema_options)} are neither ModelEMA options ({', '.join(OPTION_NAMES)}) nor "
                    "used with a schedule object (give its parameters to the schedule itself)"
                )
            schedule = decay_type
        else:
            raise TypeError(f"{where}: decay_type must be a schedule name or a schedule object, got {decay_type!r}")
        EMAOptions(decay, schedule, **options, where=where)  # raises now rather than when fit starts
        self._decay, self._schedule, self._options = decay, schedule, options
        self.evaluate_with_ema = bool(evaluate_with_ema)
        self.copy_to_model_at_end = bool(copy_to_model_at_end)
        self._ema: Optional[ModelEMA] = None
        self._total_steps: Any = None
        # The trainer.global_step of the last update: the update hook runs
        # after every batch, an optimizer step happens only every N of them.
        self._last_step = 0
        self._swap: Optional[ExitStack] = None
        self._pending: Optional[Dict[str, Any]] = None  # what a checkpoint restored before the EMA existed

    @property
    def ema(self) -> Optional[ModelEMA]:
        """The EMA (a :class:`~ema_cuda.ema.ModelEMA`) once fit has started, else None."""
        return self._ema

    # ------------------------------------------------------------------ fit

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Builds the EMA from the model as the strategy set it up, and applies a restored checkpoint."""
        where = type(self).__name__
        if type(trainer.strategy).__name__ == "FSDPStrategy":
            raise RuntimeError(
                f"{where}: Lightning's FSDPStrategy (FSDP1) flattens the parameters into shards this EMA cannot "
                "pair with the model's; use ModelParallelStrategy (FSDP2 fully_shard, whose DTensor parameters "
                "ShardedModelEMA averages shard by shard)"
            )
        self._total_steps = self._run_length(trainer)
        sharded = any(is_dtensor(p) for p in pl_module.parameters())
        if sharded:
            from ema_cuda.sharded import ShardedModelEMA

            cls = ShardedModelEMA
        else:
            cls = ModelEMA
        self._ema = cls(pl_module, self._decay, self._schedule, **self._options)
        self._last_step = trainer.global_step
        if self._pending is not None:
            self._restore(trainer, self._pending)
            self._pending = None

    def _run_length(self, trainer: Any) -> Any:
        total = self._options.get("total_steps")
        if total is not None:
            return total
        total = trainer.estimated_stepping_batches
        if math.isfinite(total):
            return int(total)
        try:  # a schedule that reads total_steps refuses None
            self._schedule(self._decay, 1, None)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{type(self).__name__}: the run's length is unknown (trainer.estimated_stepping_batches is "
                f"{total}: no max_steps and a loader without a length), and the schedule {self._schedule!r} needs "
                "it; give EMACallback(total_steps=...)"
            ) from exc
        return total  # infinite: the schedule does not read it

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Updates the EMA when an optimizer step was taken since the last update."""
        step = trainer.global_step
        if self._ema is None or step <= self._last_step:
            return
        self._ema.update(pl_module, step=step, total_steps=self._total_steps)
        self._last_step = step

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Copies the EMA into the model (``copy_to_model_at_end``)."""
        if self._ema is not None and self.copy_to_model_at_end:
            self._ema.copy_to(pl_module)

    # ------------------------------------------------------------------ evaluation on the EMA weights

    def _swap_in(self, pl_module: Any) -> None:
        if self._ema is not None and self.evaluate_with_ema and self._swap is None:
            stack = ExitStack()
            stack.enter_context(self._ema.swapped(pl_module))
            self._swap = stack

    def _swap_out(self) -> None:
        if self._swap is not None:
            stack, self._swap = self._swap, None
            stack.close()

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._swap_in(pl_module)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._swap_out()

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._swap_in(pl_module)

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._swap_out()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # An epoch that raised never reaches its end hook: give the model its training weights back.
        self._swap_out()

    # ------------------------------------------------------------------ checkpoints (NOTE [checkpoint layout])

    def state_dict(self) -> Dict[str, Any]:
        """The callback's entry of a checkpoint: the EMA's state (weights only where NOTE [checkpoint layout]
        says) and the step of its last update; empty before fit."""
        if self._ema is None:
            return {}
        return {"ema": self._ema.state_dict(), "last_step": self._last_step}

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        """Puts the EMA weights under ``state_dict`` and the training weights under ``current_model_state``
        (a sharded EMA, or one whose keys differ from the checkpoint's: see NOTE [checkpoint layout])."""
        if self._ema is None:
            return
        if self._swap is not None:
            raise RuntimeError(
                f"{type(self).__name__}: a checkpoint saved during a validation or test epoch would hold the EMA "
                "weights as the training weights; save it outside the epoch (ModelCheckpoint does)"
            )
        entry = checkpoint.get("callbacks", {}).get(self.state_key)
        model_state = checkpoint.get(_STATE_DICT)
        if entry is None or model_state is None:
            return
        weights = entry["ema"]["ema"]
        if any(is_dtensor(t) for t in weights.values()):
            self._save_shards(checkpoint, entry, weights)
            return
        if weights.keys() != model_state.keys():
            return  # the weights stay in the callback's entry
        ema_state = dict(entry["ema"])
        checkpoint[_CURRENT] = model_state
        checkpoint[_STATE_DICT] = ema_state.pop("ema")
        entry["ema"] = ema_state

    def _save_shards(self, checkpoint: Dict[str, Any], entry: Dict[str, Any], weights: Dict[str, Any]) -> None:
        model_state = checkpoint.get(_STATE_DICT) or {}
        if any(is_dtensor(t) for t in model_state.values()):  # a distributed checkpoint
            model_state.update({_SHARDS + k: t for k, t in weights.items()})
            entry["ema"] = {k: v for k, v in entry["ema"].items() if k != "ema"}
            entry["shards"] = _SHARDS
        else:  # one file (written by rank 0); every rank takes part in the gathering
            entry["ema"] = dict(entry["ema"], ema={k: t.full_tensor() if is_dtensor(t) else t
                                                   for k, t in weights.items()})

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        """On a resumed fit: the training weights back into the model, the EMA restored (now, or when it is
        built); outside fit nothing happens, so evaluation from a checkpoint uses its EMA weights."""
        if trainer.state.fn != "fit":
            return
        if _CURRENT in checkpoint:
            trainer.strategy.load_model_state_dict({_STATE_DICT: checkpoint[_CURRENT]},
                                                   strict=getattr(pl_module, "strict_loading", True))
        saved = {
            "entry": checkpoint.get("callbacks", {}).get(self.state_key),
            "ema_weights": checkpoint.get(_STATE_DICT) if _CURRENT in checkpoint else None,
            "global_step": checkpoint.get("global_step", 0),
        }
        if self._ema is None:  # the usual order: checkpoints load before on_fit_start
            self._pending = saved
        else:  # strategies that restore after setup
            self._restore(trainer, saved)

    def _load_shards(self, trainer: Any, prefix: str) -> Dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        # DCP reads each rank's shards in place into these DTensors, which share memory with the EMA.
        weights = self._ema.state_dict()["ema"]
        wanted = {prefix + k: t for k, t in weights.items()}
        dcp.load({_STATE_DICT: wanted}, checkpoint_id=trainer.ckpt_path)
        return {k: wanted[prefix + k] for k in weights}

    def _restore(self, trainer: Any, saved: Dict[str, Any]) -> None:
        where = type(self).__name__
        entry, weights = saved["entry"], saved["ema_weights"]
        if entry is not None:
            state = dict(entry["ema"])
            if "shards" in entry:
                state["ema"] = self._load_shards(trainer, entry["shards"])
            if "ema" not in state:
                if weights is None:
                    raise ValueError(f"{where}: the checkpoint has this callback's state but no EMA weights "
                                     f"(neither '{_STATE_DICT}' beside '{_CURRENT}' nor in the callback's entry)")
                state["ema"] = weights
            self._ema.load_state_dict(state)
            self._last_step = int(entry.get("last_step", saved["global_step"]))
        elif weights is not None:
            # Written by Lightning's WeightAveraging: its EMA weights, with this callback's schedule.
            state = self._ema.state_dict()
            state["ema"] = {k: weights[k] for k in state["ema"]} if state["ema"].keys() <= weights.keys() else weights
            self._ema.load_state_dict(state)
            self._last_step = int(saved["global_step"])
        else:
            warnings.warn(
                f"{where}: the checkpoint holds no EMA (it was saved without an EMA callback); the EMA starts "
                "from the resumed model",
                UserWarning,
                stacklevel=2,
            )
