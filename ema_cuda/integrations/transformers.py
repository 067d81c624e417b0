"""An EMA of a model trained by ``transformers.Trainer``: :class:`EMACallback` and :func:`save_ema_pretrained`.

::

    from ema_cuda.integrations.transformers import EMACallback

    ema_cb = EMACallback(decay=0.999, decay_type="threshold", evaluate_with_ema=True)
    trainer = Trainer(model=model, args=args, train_dataset=..., eval_dataset=..., callbacks=[ema_cb])
    trainer.train()                        # or trainer.train(resume_from_checkpoint=True)
    ema_cb.save_pretrained("model-ema")    # AutoModel...from_pretrained("model-ema") loads the EMA

The callback keeps a :class:`~ema_cuda.ModelEMA` of ``trainer.model``,
updates it after every optimizer step (once per ``gradient_accumulation_steps``
batches: the Trainer calls ``on_step_end`` only after an optimizer step), with
SuperGradients' step (``state.global_step``, from 1) and ``state.max_steps``
as the schedule's total.  Beside each checkpoint it writes the EMA as
``checkpoint-N/ema.safetensors`` (:meth:`ModelEMA.save_safetensors`); a
resumed run reads it back, so that it continues bit-identically.

A model prepared by ``accelerate`` needs nothing special: on one process
``Accelerator.prepare`` returns the module itself (under mixed precision with
its ``forward`` wrapped in autocast, a wrapper the EMA's copy keeps, bound to
the copy), and across processes a ``DistributedDataParallel`` wrapper that
:func:`~ema_cuda._modules.unwrap_model` removes.

Supported: transformers 4.46 and later (the release the package's ``make
test`` pins as its floor; every hook and argument used here exists there),
tested with 5.24.  transformers is imported with this module.
"""
from __future__ import annotations

import os
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import torch
from torch import nn
from transformers import TrainerCallback

from ema_cuda._modules import unwrap_model
from ema_cuda.ema import ModelEMA, check_ema_params

__all__ = ["EMACallback", "save_ema_pretrained", "EMA_FILENAME"]

#: The name of the EMA's file inside each ``checkpoint-N`` folder.
EMA_FILENAME = "ema.safetensors"

PathLike = Union[str, "os.PathLike[str]"]


def save_ema_pretrained(model: nn.Module, ema: ModelEMA, save_directory: PathLike, **kwargs: Any) -> None:
    """Writes ``ema``'s weights through ``model.save_pretrained``, so ``from_pretrained(save_directory)`` loads them.

    ``model`` is the model the EMA averages (possibly wrapped); its own
    ``save_pretrained`` writes the folder (configuration, generation
    configuration, weights as safetensors, shards), given a state dict that
    holds the EMA's values instead of the model's.  Each tensor is a copy on
    the CPU in the model's dtype (an fp32 EMA of a bf16 model is saved in
    bf16, as the configuration says), so the model itself is not touched and
    the device needs no extra memory.  Tied weights stay tied: keys that
    share one model tensor share one copy.  Other keyword arguments go to
    ``save_pretrained`` (``max_shard_size``, ``push_to_hub``, ...).
    """
    src = unwrap_model(model)
    where = f"save_ema_pretrained({str(save_directory)!r})"
    if not callable(getattr(src, "save_pretrained", None)):
        raise TypeError(f"{where}: {type(src).__name__} has no save_pretrained (a transformers PreTrainedModel has)")
    if "state_dict" in kwargs:
        raise TypeError(f"{where}: state_dict is what this function provides; pass the EMA instead")
    weights = ema.state_dict()["ema"]
    model_state = src.state_dict()
    missing = [k for k in model_state if k not in weights]
    if missing:
        raise ValueError(f"{where}: the EMA holds no entry for the model's keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; was it made from this model?")
    state: Dict[str, torch.Tensor] = {}
    copies: Dict[Any, torch.Tensor] = {}
    with torch.no_grad():
        for key, t in model_state.items():
            e = weights[key]
            if e.shape != t.shape:
                raise ValueError(f"{where}: EMA entry {key!r} has shape {tuple(e.shape)}, the model's {tuple(t.shape)}")
            # One copy per model tensor: transformers recognises tied weights by shared storage.
            tied = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
            if tied not in copies:
                copies[tied] = e.to(device="cpu", dtype=t.dtype, copy=True)
            state[key] = copies[tied]
    src.save_pretrained(save_directory, state_dict=state, **kwargs)


class EMACallback(TrainerCallback):
    """A ``TrainerCallback`` that keeps an EMA of the model, evaluates with it when asked and checkpoints it.

    Args:
        ema: an EMA of the trainer's model to use; by default one is made
            from ``ema_params`` at the start of every training run
            (``model_init`` may give each run a new model), and a resumed
            run then loads the checkpoint's.
        evaluate_with_ema: evaluations during training (``eval_strategy``)
            run with the EMA weights in the model, so the logged ``eval_*``
            metrics, ``metric_for_best_model`` and early stopping judge the
            EMA (see NOTE [evaluation hooks] for how, and its limits).
            ``trainer.evaluate()`` called outside ``train()`` uses the
            training weights; wrap it in :meth:`swapped` for the EMA's.
        save_with_checkpoints: write ``ema.safetensors`` into every
            checkpoint folder the Trainer writes (on the main process).  A
            run resumed from such a folder restores the EMA from it; one
            resumed from a folder without it is an error.  With ``False``
            a resumed run starts a new EMA from the resumed weights (with a
            warning) unless ``resume_from`` is given.
        copy_to_model_at_end: at the end of training write the EMA weights
            into the model (in place), so that ``trainer.save_model()`` and
            whatever uses ``trainer.model`` afterwards get the EMA.
        resume_from: the checkpoint folder to restore the EMA from when a run
            resumes (a folder other than ``output_dir/checkpoint-<step>``).
        **ema_params: the arguments of :meth:`ModelEMA.from_params`
            (``decay``, ``decay_type``, the schedule's parameters and the
            options such as ``ema_dtype``); checked here, so a misspelt name
            fails before training starts.

    After ``on_train_begin``, ``callback.ema`` is the :class:`ModelEMA`.
    """

    def __init__(
        self,
        *,
        ema: Optional[ModelEMA] = None,
        evaluate_with_ema: bool = False,
        save_with_checkpoints: bool = True,
        copy_to_model_at_end: bool = False,
        resume_from: Optional[PathLike] = None,
        **ema_params: Any,
    ):
        if ema is not None and ema_params:
            raise TypeError(f"EMACallback: pass either ema or EMA parameters, not both (got {sorted(ema_params)})")
        if ema is not None and not isinstance(ema, ModelEMA):
            raise TypeError(f"EMACallback: ema must be a ModelEMA, got {type(ema).__name__}")
        check_ema_params(ema_params, where="EMACallback")
        self.ema = ema
        self._own_ema = ema is None
        self.ema_params = dict(ema_params)
        self.evaluate_with_ema = bool(evaluate_with_ema)
        self.save_with_checkpoints = bool(save_with_checkpoints)
        self.copy_to_model_at_end = bool(copy_to_model_at_end)
        self.resume_from = resume_from
        self._model: Optional[nn.Module] = None
        self._swap = ExitStack()
        self._swapped = False

    # ------------------------------------------------------------------ the Trainer's hooks

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = _require_model(model, "on_train_begin")
        self._end_swap()
        if self._own_ema:
            self.ema = ModelEMA.from_params(self._model, **self.ema_params)
        if state.global_step == 0:
            return
        if self.save_with_checkpoints or self.resume_from is not None:
            self.ema.load_safetensors(self._resume_file(args, state))
        else:
            warnings.warn(f"EMACallback.on_train_begin: the run resumes at step {state.global_step} with "
                          "save_with_checkpoints=False; the EMA starts anew from the resumed weights",
                          UserWarning, stacklevel=2)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # A swap still open here means an evaluation raised before on_evaluate (the caller went on regardless).
        self._end_swap()
        model = _require_model(model, "on_step_end")
        self.ema.update(model, step=state.global_step, total_steps=state.max_steps)
        self._begin_swap_if_evaluating(control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._begin_swap_if_evaluating(control, _require_model(model, "on_epoch_end"))

    def on_evaluate(self, args, state, control, **kwargs):
        self._end_swap()

    def on_save(self, args, state, control, **kwargs):
        if not (self.save_with_checkpoints and args.should_save):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            # A hyperparameter search saves under output_dir/run-<id>/, which callbacks are not told.
            warnings.warn(f"EMACallback.on_save: no checkpoint folder {str(folder)!r}; the EMA is not saved with "
                          "this checkpoint", UserWarning, stacklevel=2)
            return
        self.ema.save_safetensors(folder / EMA_FILENAME)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._end_swap()
        if self.copy_to_model_at_end:
            self.ema.copy_to(_require_model(model, "on_train_end"))

    # ------------------------------------------------------------------ for the user

    @contextmanager
    def swapped(self, model: Optional[nn.Module] = None) -> Iterator[nn.Module]:
        """The model (by default the trainer's) holding the EMA weights for a ``with`` block: ``ModelEMA.swapped``.

        ``with ema_cb.swapped(): trainer.evaluate()`` evaluates the EMA
        outside ``train()``.
        """
        model = self._known_model(model, "swapped")
        with self._ready("swapped").swapped(model) as m:
            yield m

    def save_pretrained(self, save_directory: PathLike, model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        """The EMA as a ``save_pretrained`` folder: :func:`save_ema_pretrained` with the trainer's model."""
        save_ema_pretrained(self._known_model(model, "save_pretrained"), self._ready("save_pretrained"),
                            save_directory, **kwargs)

    # ------------------------------------------------------------------ helpers

    def _ready(self, method: str) -> ModelEMA:
        if self.ema is None:
            raise RuntimeError(f"EMACallback.{method}: there is no EMA yet; it is made when training begins")
        return self.ema

    def _known_model(self, model: Optional[nn.Module], method: str) -> nn.Module:
        model = self._model if model is None else model
        if model is None:
            raise RuntimeError(f"EMACallback.{method}: no model yet; pass one or call it after trainer.train()")
        return model

    def _resume_file(self, args, state) -> Path:
        """The EMA file of the checkpoint a run resumes from (see NOTE [resume folder])."""
        if self.resume_from is not None:
            candidates = [Path(self.resume_from)]
        else:
            candidates = [Path(args.output_dir) / f"checkpoint-{state.global_step}"]
            if isinstance(getattr(args, "resume_from_checkpoint", None), str):
                candidates.append(Path(args.resume_from_checkpoint))
        for folder in candidates:
            if (folder / EMA_FILENAME).is_file():
                return folder / EMA_FILENAME
        raise FileNotFoundError(
            f"EMACallback.on_train_begin: the run resumes at step {state.global_step} but no "
            f"{EMA_FILENAME} is in {', '.join(repr(str(c)) for c in candidates)}; pass "
            "EMACallback(resume_from=<the checkpoint folder>) when it is elsewhere"
        )

    # NOTE [evaluation hooks]: transformers has no hook before an evaluation
    # (no on_evaluate_begin, up to 5.24 at least).  In the training loop the
    # Trainer runs every callback's on_step_end (on_epoch_end at an epoch's
    # end), then evaluates if control.should_evaluate, then calls
    # on_evaluate, then saves.  DefaultFlowCallback, always first in the
    # list, sets should_evaluate from eval_strategy before this callback's
    # hook runs, so the swap begins here when it is set and ends in
    # on_evaluate, before the checkpoint is written: checkpoints hold the
    # training weights.  A should_evaluate set by a callback that runs after
    # this one is not seen (the evaluation then uses the training weights);
    # an evaluation that raises leaves the swap open until the next hook.
    def _begin_swap_if_evaluating(self, control, model: nn.Module) -> None:
        if self.evaluate_with_ema and control.should_evaluate and not self._swapped:
            self._swap.enter_context(self.ema.swapped(model))
            self._swapped = True

    def _end_swap(self) -> None:
        if self._swapped:
            self._swapped = False
            self._swap.close()


# NOTE [resume folder]: callbacks are not told the folder given to
# trainer.train(resume_from_checkpoint=...).  The step they see at
# on_train_begin is the checkpoint's (state.global_step, loaded from its
# trainer_state.json), and the Trainer names its checkpoints
# output_dir/checkpoint-<step>, so that folder is looked in first, then
# TrainingArguments.resume_from_checkpoint, or only the callback's
# resume_from when given.


def _require_model(model: Optional[nn.Module], hook: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"EMACallback.{hook}: the Trainer passed no model (got {type(model).__name__})")
    return model
