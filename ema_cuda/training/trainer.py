"""The training loop, with an optional exponential moving average of the weights.

It follows SuperGradients' ``Trainer`` where EMA is concerned (see
``docs/training.md``):

* the :class:`~ema_cuda.ema.ModelEMA` is created after the model is on its
  device, and updated once per optimizer step, right after
  ``optimizer.step()`` and ``optimizer.zero_grad()``, with
  ``step = epoch * len(train_loader) + batch_idx + 1`` (1-based, counting
  batches; with ``batch_accumulate > 1`` it is the index of the batch that
  completes the accumulation window, so the steps an EMA schedule sees are
  ``k, 2k, ...``) and ``total_steps = len(train_loader) * max_epochs``;
* validation runs on the EMA weights, so ``ckpt_best.pth`` follows the EMA's
  metrics; the raw weights are validated too and logged as ``valid_raw_*``;
* checkpoints hold the raw weights as ``net`` and the EMA weights as
  ``ema_net``.

Distributed data parallel: launched with ``WORLD_SIZE > 1`` (``torchrun``),
the trainer initialises the process group from the environment (unless it
exists), wraps the model in ``DistributedDataParallel`` and builds the EMA from
the wrapped model, so every rank keeps an identical EMA with no communication
per update.  Each rank iterates over its own train loader: give it a
``DistributedSampler`` (a warning says so otherwise), whose epoch is set
before every epoch.  Losses and accuracies are summed over the ranks, EMA
buffers (BatchNorm statistics) are broadcast from rank 0 once per epoch,
checkpoints and the metrics log are written by rank 0 only, and at the end
the trainer checks that all ranks hold the same EMA.  See
``docs/distributed.md``.

Where we differ from SuperGradients: at the end of training the model holds
the EMA weights (copied in place, so the same model and optimizer can train
again); :meth:`Trainer.test` evaluates the EMA weights when there are any;
accumulation windows end at epoch boundaries, and gradients of a window are
averaged, not summed.

The pieces: ``params.py`` checks the training params, ``builders.py`` turns
them into the run's objects, ``task.py`` says how a batch goes through the
model (``kd.py`` for distillation), ``loop.py`` runs the batches,
``run_checkpoints.py`` writes checkpoints and resumes from them, ``logs.py``
and ``metrics.py`` record what happened.  :class:`Trainer` below is the
outline of a run that ties them together.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from ema_cuda import distributed as dist_utils
from ema_cuda.training import builders, logs
from ema_cuda.training.loop import BatchLoop
from ema_cuda.training.lr_schedules import LRScheduler
from ema_cuda.training.metrics import find_watched_key, is_improvement
from ema_cuda.training.params import TrainingParams, parse_training_params
from ema_cuda.training.rng import restore_rng_state, seed_everything
from ema_cuda.training.run_checkpoints import (
    CKPT_BEST,
    CKPT_LATEST,
    refuse_to_overwrite_an_earlier_run,
    resume_run,
    save_epoch_checkpoints,
)
from ema_cuda.training.task import ClassificationTask

__all__ = ["Trainer", "CKPT_LATEST", "CKPT_BEST"]


class Trainer:
    """Trains a classifier, with checkpoints, metrics logs and (optionally) an EMA of its weights.

    ``Trainer(experiment_name, ckpt_root_dir)`` keeps everything of one run
    under ``ckpt_root_dir/experiment_name/``: ``ckpt_latest.pth`` (written
    each epoch), ``ckpt_best.pth`` (written when the watched validation
    metric improves) and ``metrics.jsonl`` (one line per epoch).  A new run
    refuses to start where an earlier run left any of them, unless it
    resumes that run (``"resume": True``) or replaces it
    (``"overwrite": True``).

    The model may be wrapped (``torch.compile``, DataParallel, DDP):
    checkpoints always hold the plain model's keys.

    After :meth:`train`, the trainer exposes ``net`` (the trained model),
    ``ema`` (the :class:`~ema_cuda.ema.ModelEMA`, or ``None``),
    ``optimizer``, ``history`` (the per-epoch metrics) and ``best_metric``.

    Subclasses can override :meth:`on_epoch_end` to act after every epoch
    (after the checkpoints are written).
    """

    #: How a batch goes through the model and which module holds the weights
    #: (:class:`~ema_cuda.training.kd.KDTrainer` sets a distillation task).
    task: ClassificationTask = ClassificationTask()

    def __init__(self, experiment_name: str, ckpt_root_dir: Union[str, Path] = "checkpoints"):
        if not isinstance(experiment_name, str) or not experiment_name:
            raise ValueError(f"Trainer: experiment_name must be a non-empty string, got {experiment_name!r}")
        self.experiment_name = experiment_name
        self.ckpt_root_dir = Path(ckpt_root_dir)
        self.net: Optional[nn.Module] = None
        self.ema = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scaler = None
        self.lr_scheduler: Optional[LRScheduler] = None
        self.loss_fn: Optional[Callable[..., torch.Tensor]] = None
        self.training_params: Optional[TrainingParams] = None
        self.device: Optional[torch.device] = None
        self.history: List[Dict[str, Any]] = []
        self.best_metric: Optional[float] = None
        self.valid_loader = None
        self._amp_dtype: Optional[torch.dtype] = None
        self._distributed = False
        self._tensorboard: Optional[logs.TensorBoardLog] = None

    @property
    def checkpoints_dir(self) -> Path:
        """``ckpt_root_dir / experiment_name``."""
        return self.ckpt_root_dir / self.experiment_name

    @property
    def metrics_log_path(self) -> Path:
        return self.checkpoints_dir / logs.METRICS_LOG_NAME

    @property
    def is_main_process(self) -> bool:
        """True on rank 0 of a distributed run, and always in a single-process run."""
        return not self._distributed or dist_utils.get_rank() == 0

    def on_epoch_end(self, epoch: int, metrics: Dict[str, Any]) -> None:
        """Called after each epoch with the number of completed epochs and that epoch's metrics."""

    # ------------------------------------------------------------ training

    def train(
        self,
        model: nn.Module,
        training_params: Optional[Mapping[str, Any]] = None,
        train_loader: Optional[Any] = None,
        valid_loader: Optional[Any] = None,
    ) -> List[Dict[str, Any]]:
        """Train ``model`` in place and return the per-epoch metrics (also in ``self.history``).

        ``training_params`` is a dict of the keys documented in
        :class:`~ema_cuda.training.params.TrainingParams`; unknown keys are an
        error.  ``train_loader`` and ``valid_loader`` yield ``(inputs,
        targets)`` batches and must have a length.

        With ``"ema": True`` the model holds the EMA weights when this
        returns (raw weights remain in ``ckpt_latest.pth`` under ``net``).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"Trainer.train: model must be an nn.Module, got {type(model).__name__}")
        if train_loader is None or valid_loader is None:
            raise ValueError("Trainer.train: train_loader and valid_loader are required")
        if isinstance(training_params, TrainingParams):
            training_params = {k: getattr(training_params, k) for k in TrainingParams.known_keys()}
        params = dict(self.task.default_params())
        params.update(dict(training_params or {}))
        p = parse_training_params(params)
        # NOTE [warning frames]: a run's warnings point at the line that called
        # train(), where the user can act on them.  The helpers that warn
        # (check_distributed_loader, resume_run) are called from _run itself,
        # and their stacklevel 4 counts helper -> _run -> train -> caller.
        try:
            return self._run(model, p, train_loader, valid_loader)
        finally:
            if self._tensorboard is not None:  # also when training failed: what it logged helps to see why
                self._tensorboard.close()
                self._tensorboard = None

    def _run(self, model: nn.Module, p: TrainingParams, train_loader: Any, valid_loader: Any):
        batches_per_epoch = builders.batches_per_epoch(train_loader)
        builders.refuse_sharded_model(model)
        self._distributed = dist_utils.init_from_env()
        if self._distributed:
            builders.check_distributed_loader(train_loader, batches_per_epoch)  # NOTE [warning frames]
        if not p.resume and not p.overwrite:
            refuse_to_overwrite_an_earlier_run(self.checkpoints_dir, self.experiment_name, self.is_main_process)
        if p.seed is not None:
            seed_everything(p.seed)
        self.device = device = builders.resolve_device(model, p, self._distributed)
        self.training_params = p
        p.ema_params = builders.resolve_ema_params(
            p.ema_params, self.checkpoints_dir, self.is_main_process,
            samples_per_step=builders.samples_per_step(train_loader))
        self.valid_loader = valid_loader
        self._amp_dtype = builders.resolve_amp_dtype(p, device)
        was_training = model.training

        # The EMA must be built from the model on its final device (its copy
        # lives there), so the move comes first.
        self.net = net = builders.prepare_model(model, device, self._distributed)
        self.loss_fn = builders.build_loss(p, device, self.task)
        self.optimizer, base_lrs = builders.build_optimizer(p, net, self.task)
        self.lr_scheduler = builders.build_lr_scheduler(self.optimizer, p, base_lrs, batches_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self._amp_dtype == torch.float16)
        self.history, self.best_metric, self.ema = [], None, None
        metrics_log = logs.MetricsLog(self.checkpoints_dir) if self.is_main_process else None
        start_epoch, rng_state = 0, None
        if p.resume:
            path = Path(p.resume_path) if p.resume_path is not None else self.checkpoints_dir / CKPT_LATEST
            resumed = resume_run(  # NOTE [warning frames]
                path, net=net, task=self.task, p=p, optimizer=self.optimizer, scaler=self.scaler,
                lr_scheduler=self.lr_scheduler, metrics_log=metrics_log, checkpoints_dir=self.checkpoints_dir,
                batches_per_epoch=batches_per_epoch,
            )
            start_epoch, rng_state = resumed.start_epoch, resumed.rng_state
            self.ema, self.best_metric, self.history = resumed.ema, resumed.best_metric, resumed.history
        else:
            if p.ema:
                self.ema = self.task.build_ema(net, p.ema_params)
            if metrics_log is not None:
                metrics_log.reset()

        if self.is_main_process:
            self._tensorboard = logs.TensorBoardLog.open(
                p.tensorboard, self.checkpoints_dir, self.ema is not None,
                purge_step=start_epoch * batches_per_epoch + 1 if p.resume else None)
        loop = BatchLoop(self.task, self.loss_fn, device, self._amp_dtype)
        use_bar = p.progress_bar and self.is_main_process
        watched_key: Optional[str] = None
        if rng_state is not None:
            # Restored last, right before the first epoch, so that nothing in
            # the set-up above shifts the random streams of the resumed run.
            restore_rng_state(rng_state, train_loader)
        epochs = logs.progress(
            range(start_epoch, p.max_epochs), use_bar, desc=self.experiment_name, total=p.max_epochs - start_epoch,
            unit="epoch",
        )
        for epoch in epochs:
            for sampler in builders.loader_samplers(train_loader):
                if hasattr(sampler, "set_epoch"):  # DistributedSampler reshuffles per epoch
                    sampler.set_epoch(epoch)
            train_metrics = loop.train_epoch(
                net, train_loader, epoch=epoch, p=p, optimizer=self.optimizer, scaler=self.scaler,
                lr_scheduler=self.lr_scheduler, ema=self.ema, total_steps=batches_per_epoch * p.max_epochs,
                use_bar=use_bar, tensorboard=self._tensorboard,
            )
            if self._distributed and self.ema is not None:
                # BatchNorm statistics come from each rank's own batches; make
                # the EMA's agree before it is validated and saved.
                dist_utils.broadcast_ema_buffers(self.ema)
            record: Dict[str, Any] = {"epoch": epoch + 1, "lr": float(self.optimizer.param_groups[0]["lr"])}
            record.update({f"train_{k}": v for k, v in train_metrics.items()})
            record.update(loop.validate(net, valid_loader, self.ema, p.validate_raw_weights, use_bar))
            watched_key = watched_key or find_watched_key(record, p.metric_to_watch)
            watched = float(record[watched_key])
            is_best = is_improvement(watched, self.best_metric, p.greater_is_better)
            if is_best:
                self.best_metric = watched
            self.history.append(record)
            if metrics_log is not None:
                metrics_log.append(record)
            if self._tensorboard is not None:
                self._tensorboard.add_epoch((epoch + 1) * batches_per_epoch, record, self.ema is not None)
            if not p.silent_mode and self.is_main_process:
                logs.emit(logs.format_epoch_summary(record, p.max_epochs, self.ema is not None, is_best), use_bar)
            if p.save_model:
                save_epoch_checkpoints(self, epoch=epoch + 1, record=record, watched=watched, watched_key=watched_key,
                                       is_best=is_best, train_loader=train_loader,
                                       batches_per_epoch=batches_per_epoch)
            self.on_epoch_end(epoch + 1, record)

        if self.ema is not None and self._distributed:
            dist_utils.check_ema_synchronized(self.ema)
        if self.ema is not None:
            # The trained model carries the EMA weights from here on (the raw
            # ones stay in ckpt_latest.pth as 'net').  copy_to writes into the
            # existing tensors, so the optimizer stays attached and a second
            # train() call continues with the same objects.
            self.ema.copy_to(net)
        net.train(was_training)
        return self.history

    # ---------------------------------------------------------------- test

    def test(
        self,
        test_loader: Optional[Any] = None,
        model: Optional[nn.Module] = None,
        *,
        use_ema: Optional[bool] = None,
        loss: Optional[Callable[..., torch.Tensor]] = None,
        progress_bar: bool = False,
    ) -> Dict[str, float]:
        """Evaluate and return ``{"loss": ..., "accuracy": ...}``.

        Without arguments it evaluates the trained model on the validation
        loader of the last :meth:`train` call.  When that run had EMA on, the
        EMA weights are evaluated (``use_ema=False`` evaluates the model's own
        current weights instead).  ``model`` evaluates another model as it is.
        """
        loader = test_loader if test_loader is not None else self.valid_loader
        if loader is None:
            raise ValueError("Trainer.test: pass test_loader (there is no validation loader from a train() call)")
        net = model if model is not None else self.net
        if net is None:
            raise ValueError("Trainer.test: pass model, or call train() first")
        if use_ema is None:
            use_ema = self.ema is not None and net is self.net
        if use_ema and self.ema is None:
            raise ValueError("Trainer.test: use_ema=True but this trainer has no EMA (train with 'ema': True)")
        if self.device is None:
            first = next(iter(net.parameters()), None)
            self.device = first.device if first is not None else torch.device("cpu")
        if loss is None:
            loss = self.loss_fn
        if loss is None:
            loss = self.task.build_named_loss(self.task.default_params().get("loss", "cross_entropy"), {})
        loop = BatchLoop(self.task, loss, self.device, self._amp_dtype)
        if use_ema:
            with self.ema.swapped(net):
                return loop.evaluate(net, loader, "test (EMA)", progress_bar)
        return loop.evaluate(net, loader, "test", progress_bar)
