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
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ema_cuda import checkpoint as ckpt_io
from ema_cuda._modules import unwrap_model
from ema_cuda import distributed as dist_utils
from ema_cuda.training import logs
from ema_cuda.training.lr_schedules import LRScheduler
from ema_cuda.training.metrics import MetricTracker
from ema_cuda.training.params import TrainingParams, parse_training_params
from ema_cuda.training.rng import capture_rng_state, restore_rng_state, seed_everything

__all__ = ["Trainer", "CKPT_LATEST", "CKPT_BEST"]

CKPT_LATEST = "ckpt_latest.pth"
CKPT_BEST = "ckpt_best.pth"


def _is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are DTensors (FSDP2 / tensor parallel), which DDP cannot wrap."""
    return any(hasattr(p, "device_mesh") and hasattr(p, "to_local") for p in model.parameters())


def _samplers(loader: Any) -> List[Any]:
    return [s for s in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
            if s is not None]


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        moved = [_to_device(o, device) for o in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


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
        self._watched_key: Optional[str] = None
        self._distributed = False

    # ------------------------------------------------------------------ paths

    @property
    def checkpoints_dir(self) -> Path:
        """``ckpt_root_dir / experiment_name``."""
        return self.ckpt_root_dir / self.experiment_name

    @property
    def metrics_log_path(self) -> Path:
        return self.checkpoints_dir / logs.METRICS_LOG_NAME

    # ------------------------------------------------- hooks for KDTrainer

    def _default_params(self) -> Dict[str, Any]:
        return {}

    def _weights_module(self, net: nn.Module) -> nn.Module:
        """The module whose weights are checkpointed as ``net`` (and loaded by ``models.get``).

        Every wrapper is removed (DDP, DataParallel, ``torch.compile``), so
        the checkpoint's keys are the plain model's: no ``module.`` or
        ``_orig_mod.`` prefix that ``models.get`` and a resume would trip on.
        """
        return unwrap_model(net)

    def _ema_weights_module(self) -> nn.Module:
        """The module holding the EMA weights that are checkpointed as ``ema_net``."""
        return self.ema.ema

    def _trainable_parameters(self, net: nn.Module) -> List[nn.Parameter]:
        return [p for p in net.parameters() if p.requires_grad]

    def _build_ema(self, net: nn.Module, ema_params: Mapping[str, Any]):
        from ema_cuda.ema import ModelEMA

        return ModelEMA.from_params(net, **dict(ema_params))

    def _forward(self, net: nn.Module, inputs: Any) -> Any:
        return net(inputs)

    def _logits(self, outputs: Any) -> torch.Tensor:
        return outputs

    def _build_named_loss(self, name: str, loss_params: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
        if name == "cross_entropy":
            return nn.CrossEntropyLoss(**loss_params)
        raise ValueError(f"training param 'loss': {name!r} needs KDTrainer; Trainer supports 'cross_entropy'")

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
        params = dict(self._default_params())
        params.update(dict(training_params or {}))
        p = parse_training_params(params)
        return self._run(model, p, train_loader, valid_loader)

    def _resolve_device(self, model: nn.Module, p: TrainingParams) -> torch.device:
        if p.device is not None:
            return torch.device(p.device)
        first = next(iter(model.parameters()), None)
        if first is not None and first.device.type != "cpu":
            return first.device
        if torch.cuda.is_available():
            if self._distributed:
                return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
            return torch.device("cuda")
        return torch.device("cpu")

    @property
    def is_main_process(self) -> bool:
        """True on rank 0 of a distributed run, and always in a single-process run."""
        return not self._distributed or dist_utils.get_rank() == 0

    def _resolve_amp(self, p: TrainingParams, device: torch.device) -> Optional[torch.dtype]:
        mp = p.mixed_precision
        if mp is False:
            return None
        if mp is True:
            return torch.float16 if device.type == "cuda" else torch.bfloat16
        if mp == "bf16":
            return torch.bfloat16
        if device.type != "cuda":
            raise ValueError(f"training param 'mixed_precision': 'fp16' needs a CUDA device, training is on {device}")
        return torch.float16

    def _autocast(self):
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._amp_dtype)

    def _build_loss(self, p: TrainingParams, device: torch.device) -> Callable[..., torch.Tensor]:
        if isinstance(p.loss, str):
            try:
                loss = self._build_named_loss(p.loss, p.loss_params)
            except TypeError as exc:
                raise ValueError(f"training param 'loss_params' {dict(p.loss_params)!r} do not fit loss {p.loss!r}: {exc}") from exc
        else:
            if p.loss_params:
                raise ValueError("training param 'loss_params' only applies when 'loss' is a name; got a loss object")
            loss = p.loss
        if isinstance(loss, nn.Module):
            loss = loss.to(device)
        return loss

    def _build_optimizer(self, p: TrainingParams, net: nn.Module) -> Tuple[torch.optim.Optimizer, List[float]]:
        if isinstance(p.optimizer, torch.optim.Optimizer):
            opt = p.optimizer
            if p.optimizer_params:
                raise ValueError("training param 'optimizer_params' only applies when 'optimizer' is a name")
            own = {id(t) for t in net.parameters()}
            foreign = [i for g in opt.param_groups for i, t in enumerate(g["params"]) if id(t) not in own]
            if foreign:
                raise ValueError(
                    f"training param 'optimizer': the optimizer instance holds {len(foreign)} tensors that are not "
                    "parameters of the model being trained; build it on model.parameters()"
                )
            base_lrs = []
            for g in opt.param_groups:
                if p.initial_lr is not None:
                    g["initial_lr"] = float(p.initial_lr)
                # 'initial_lr' (as torch's schedulers keep it) survives a previous run that left a decayed 'lr'.
                base_lrs.append(float(g.setdefault("initial_lr", g["lr"])))
            return opt, base_lrs
        cls = getattr(torch.optim, p.optimizer)
        params = self._trainable_parameters(net)
        if not params:
            raise ValueError("Trainer.train: the model has no parameters with requires_grad=True")
        try:
            opt = cls(params, lr=float(p.initial_lr), **dict(p.optimizer_params))
        except TypeError as exc:
            raise ValueError(
                f"training param 'optimizer_params' {dict(p.optimizer_params)!r} do not fit optimizer "
                f"{p.optimizer!r}: {exc}"
            ) from exc
        return opt, [float(p.initial_lr)] * len(opt.param_groups)

    def _prepare_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        model = model.to(device)
        if self._distributed and not isinstance(model, nn.parallel.DistributedDataParallel) and not _is_sharded(model):
            # DDP broadcasts rank 0's weights and buffers here, so the EMA
            # built from the wrapped model afterwards is the same on all ranks.
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" and device.index is not None else None
            )
        return model

    def _check_distributed_loader(self, train_loader: Any, batches_per_epoch: int) -> None:
        lengths = dist_utils.all_gather_objects(batches_per_epoch)
        if len(set(lengths)) > 1:
            raise ValueError(
                f"Trainer.train: the train loaders of the ranks have different lengths {lengths}; every rank must "
                "make the same number of steps (DistributedSampler pads the data set so that they do)"
            )
        from torch.utils.data import DataLoader, DistributedSampler

        if isinstance(train_loader, DataLoader) and not isinstance(train_loader.dataset, torch.utils.data.IterableDataset):
            if not any(isinstance(s, DistributedSampler) for s in _samplers(train_loader)):
                warnings.warn(
                    f"Trainer.train: distributed over {dist_utils.get_world_size()} ranks but the train loader has no "
                    "DistributedSampler, so every rank iterates over the whole data set (the same batches, the "
                    "same result, world-size times the work); use DataLoader(..., sampler=DistributedSampler(dataset))",
                    RuntimeWarning,
                    stacklevel=4,
                )

    def _refuse_to_overwrite_an_earlier_run(self) -> None:
        """Raises when the experiment directory holds files of an earlier run that this one would replace.

        Rank 0 writes the files, so its view decides, on every rank (no rank
        is left waiting in a collective for one that raised).
        """
        names = (CKPT_LATEST, CKPT_BEST, logs.METRICS_LOG_NAME)
        mine = [n for n in names if (self.checkpoints_dir / n).exists()] if self.is_main_process else []
        found = dist_utils.all_gather_objects(mine)[0]
        if found:
            raise FileExistsError(
                f"Trainer.train: {str(self.checkpoints_dir)!r} already holds {', '.join(found)} of an earlier run of "
                f"experiment {self.experiment_name!r}, which this run would overwrite; pass 'resume': True to "
                "continue that run, 'overwrite': True to replace it, or choose another experiment_name"
            )

    def _run(self, model: nn.Module, p: TrainingParams, train_loader: Any, valid_loader: Any):
        try:
            batches_per_epoch = len(train_loader)
        except TypeError:
            raise TypeError("Trainer.train: train_loader must have a length (len(train_loader))") from None
        if batches_per_epoch == 0:
            raise ValueError("Trainer.train: train_loader is empty")
        if _is_sharded(model):
            raise ValueError(
                "Trainer.train: the model's parameters are DTensors (sharded with FSDP2 fully_shard or tensor "
                "parallelism); the Trainer drives DDP only. Keep an EMA of a sharded model with "
                "ema_cuda.ShardedModelEMA in your own loop (see docs/distributed.md)"
            )
        self._distributed = dist_utils.init_from_env()
        if self._distributed:
            self._check_distributed_loader(train_loader, batches_per_epoch)
        if not p.resume and not p.overwrite:
            self._refuse_to_overwrite_an_earlier_run()
        if p.seed is not None:
            seed_everything(p.seed)
        device = self._resolve_device(model, p)
        self.device = device
        self.training_params = p
        self.valid_loader = valid_loader
        self._amp_dtype = self._resolve_amp(p, device)
        was_training = model.training

        # The EMA must be built from the model on its final device (its copy
        # lives there), so the move comes first.
        net = self._prepare_model(model, device)
        self.net = net
        self.loss_fn = self._build_loss(p, device)
        optimizer, base_lrs = self._build_optimizer(p, net)
        self.optimizer = optimizer
        warmup = p.lr_warmup_steps or p.lr_warmup_epochs * batches_per_epoch
        warmup_initial = p.warmup_initial_lr
        if warmup_initial is not None and p.initial_lr is None:
            raise ValueError("training param 'warmup_initial_lr' needs 'initial_lr'")
        self.lr_scheduler = LRScheduler(
            optimizer,
            mode=p.lr_mode,
            batches_per_epoch=batches_per_epoch,
            max_epochs=p.max_epochs,
            base_lrs=base_lrs,
            lr_updates=p.lr_updates,
            lr_decay_factor=p.lr_decay_factor,
            cosine_final_lr_ratio=p.cosine_final_lr_ratio,
            warmup_batches=warmup,
            warmup_initial_lr=warmup_initial,
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self._amp_dtype == torch.float16)
        self.history = []
        self.best_metric = None
        main = self.is_main_process
        metrics_log = logs.MetricsLog(self.checkpoints_dir) if main else None

        start_epoch = 0
        rng_state = None
        self.ema = None
        if p.resume:
            start_epoch, rng_state = self._resume(net, p, metrics_log, batches_per_epoch)
        else:
            if p.ema:
                self.ema = self._build_ema(net, p.ema_params)
            if main:
                metrics_log.reset()

        total_steps = batches_per_epoch * p.max_epochs
        use_bar = p.progress_bar and main
        self._watched_key = None
        if rng_state is not None:
            # Restored last, right before the first epoch, so that nothing in
            # the set-up above shifts the random streams of the resumed run.
            restore_rng_state(rng_state, train_loader)
        epochs = logs.progress(
            range(start_epoch, p.max_epochs), use_bar, desc=self.experiment_name, total=p.max_epochs - start_epoch,
            unit="epoch",
        )
        for epoch in epochs:
            for sampler in _samplers(train_loader):
                if hasattr(sampler, "set_epoch"):  # DistributedSampler reshuffles per epoch
                    sampler.set_epoch(epoch)
            train_metrics = self._train_one_epoch(epoch, net, train_loader, p, total_steps, use_bar)
            if self._distributed and self.ema is not None:
                # BatchNorm statistics come from each rank's own batches; make
                # the EMA's agree before it is validated and saved.
                dist_utils.broadcast_ema_buffers(self.ema)
            record: Dict[str, Any] = {"epoch": epoch + 1, "lr": float(optimizer.param_groups[0]["lr"])}
            record.update({f"train_{k}": v for k, v in train_metrics.items()})
            record.update(self._validate(net, valid_loader, p, use_bar))
            watched = self._watched_value(record, p)
            is_best = self._is_improvement(watched, p)
            if is_best:
                self.best_metric = watched
            self.history.append(record)
            if main:
                metrics_log.append(record)
            if not p.silent_mode and main:
                logs.emit(logs.format_epoch_summary(record, p.max_epochs, self.ema is not None, is_best), use_bar)
            if p.save_model:
                self._save_checkpoints(epoch + 1, record, watched, is_best, train_loader, batches_per_epoch)
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

    def _resume(self, net: nn.Module, p: TrainingParams, metrics_log: Optional["logs.MetricsLog"],
                batches_per_epoch: int):
        path = Path(p.resume_path) if p.resume_path is not None else self.checkpoints_dir / CKPT_LATEST
        ckpt = ckpt_io.load_checkpoint(path, map_location="cpu")
        for key in (ckpt_io.NET_KEY, "epoch", "optimizer_state_dict"):
            if key not in ckpt:
                raise ckpt_io.CheckpointError(
                    f"cannot resume from checkpoint file {str(path)!r}: it has no {key!r} entry "
                    f"(its entries are {sorted(ckpt)})"
                )
        ckpt_io.load_state_dict_into_model(
            self._weights_module(net), ckpt[ckpt_io.NET_KEY], source=f"checkpoint file {str(path)!r}, entry 'net'"
        )
        if ckpt.get("max_epochs") not in (None, p.max_epochs) or ckpt.get("batches_per_epoch") not in (
            None, batches_per_epoch
        ):
            warnings.warn(
                f"resuming from {str(path)!r}, written by a run with max_epochs={ckpt.get('max_epochs')} and "
                f"{ckpt.get('batches_per_epoch')} batches per epoch; this run has max_epochs={p.max_epochs} and "
                f"{batches_per_epoch}: the EMA schedule's total_steps and the lr schedule change accordingly",
                RuntimeWarning,
                stacklevel=4,
            )
        try:
            self.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        except (ValueError, KeyError) as exc:
            raise ckpt_io.CheckpointError(
                f"checkpoint file {str(path)!r}, entry 'optimizer_state_dict' does not fit the optimizer: {exc}"
            ) from exc
        if ckpt.get("scaler_state_dict"):
            self.scaler.load_state_dict(ckpt["scaler_state_dict"])
        if ckpt.get("scheduler_state_dict") is not None:
            self.lr_scheduler.load_state_dict(ckpt["scheduler_state_dict"])

        if p.ema:
            # Built after 'net' is loaded, so that an EMA re-created from the
            # raw weights (no 'ema_net' in the file) starts from them.
            self.ema = self._build_ema(net, p.ema_params)
            if ckpt.get("ema_state") is not None:
                self.ema.load_state_dict(ckpt["ema_state"])
            elif ckpt.get(ckpt_io.EMA_NET_KEY) is not None:
                ckpt_io.load_state_dict_into_model(
                    self._ema_weights_module(), ckpt[ckpt_io.EMA_NET_KEY],
                    source=f"checkpoint file {str(path)!r}, entry 'ema_net'",
                )
            else:
                warnings.warn(
                    f"resuming with EMA on from checkpoint file {str(path)!r}, which has no 'ema_net' entry "
                    "(EMA was off in that run): the EMA is re-created from the checkpoint's 'net' weights",
                    RuntimeWarning,
                    stacklevel=4,
                )
        start_epoch = int(ckpt["epoch"])
        if start_epoch > p.max_epochs:
            warnings.warn(
                f"checkpoint file {str(path)!r} has {start_epoch} completed epochs, more than max_epochs="
                f"{p.max_epochs}: nothing left to train",
                RuntimeWarning,
                stacklevel=4,
            )
        best = ckpt.get("best_metric")
        self.best_metric = None if best is None else float(best)
        if metrics_log is not None:
            metrics_log.truncate_after(start_epoch)
        dist_utils.barrier()  # the log is truncated before any rank reads it
        self.history = logs.MetricsLog(self.checkpoints_dir).read()
        rng_state = ckpt.get("rng_state")
        per_rank = ckpt.get("rng_states")
        if self._distributed:
            if per_rank is not None and len(per_rank) == dist_utils.get_world_size():
                rng_state = per_rank[dist_utils.get_rank()]
            else:
                warnings.warn(
                    f"resuming from {str(path)!r} on {dist_utils.get_world_size()} ranks, but it holds the random "
                    f"states of {len(per_rank) if per_rank is not None else 1}: every rank restores rank 0's",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return start_epoch, rng_state

    def _train_one_epoch(self, epoch: int, net: nn.Module, loader: Any, p: TrainingParams, total_steps: int,
                         use_bar: bool) -> Dict[str, float]:
        net.train()
        optimizer, scaler, ema = self.optimizer, self.scaler, self.ema
        n = len(loader)
        k = p.batch_accumulate
        tracker = MetricTracker()
        optimizer.zero_grad(set_to_none=True)
        bar = logs.progress(loader, use_bar, desc=f"train {epoch + 1}/{p.max_epochs}", total=n, leave=False,
                            unit="batch")
        for batch_idx, batch in enumerate(bar):
            global_batch = epoch * n + batch_idx  # 0-based
            self.lr_scheduler.set_batch(global_batch)
            inputs, targets = self._split_batch(batch)
            # Windows of k batches that never cross an epoch boundary: the last
            # one may be shorter, and still makes a step, so no gradient is
            # carried through validation and checkpointing into the next epoch.
            window_start = (batch_idx // k) * k
            window_len = min(k, n - window_start)
            last_of_window = batch_idx == window_start + window_len - 1
            # Under DDP, gradients are averaged over the ranks only on the
            # window's last backward; the others accumulate locally.
            sync = contextlib.nullcontext() if last_of_window or not isinstance(
                net, nn.parallel.DistributedDataParallel) else net.no_sync()
            with sync:
                with self._autocast():
                    outputs = self._forward(net, inputs)
                    loss = self._compute_loss(outputs, targets)
                scaled = loss / window_len if window_len > 1 else loss
                scaler.scale(scaled).backward()
            if last_of_window:
                if p.clip_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(
                        [q for g in optimizer.param_groups for q in g["params"]], p.clip_grad_norm
                    )
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    # SuperGradients' step: the 1-based global index of the
                    # batch that completed this optimizer step.
                    ema.update(net, step=global_batch + 1, total_steps=total_steps)
            tracker.update(loss, self._logits(outputs), targets)
            if bar is not loader and (batch_idx % 20 == 0 or batch_idx == n - 1):
                bar.set_postfix(loss=f"{tracker.running_loss():.4f}", refresh=False)
        tracker.all_reduce_(self.device)
        return tracker.compute()

    def _split_batch(self, batch: Any) -> Tuple[Any, torch.Tensor]:
        if isinstance(batch, Mapping):
            raise TypeError("Trainer: batches must be (inputs, targets) sequences, got a mapping")
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise TypeError(f"Trainer: batches must be (inputs, targets) sequences, got {type(batch).__name__}")
        return _to_device(batch[0], self.device), _to_device(batch[1], self.device)

    def _compute_loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(outputs, targets)
        if isinstance(loss, (tuple, list)):  # losses that also return items to log
            loss = loss[0]
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(
                f"Trainer: the loss {type(self.loss_fn).__name__} must return a scalar tensor, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        return loss

    @torch.no_grad()
    def _evaluate(self, net: nn.Module, loader: Any, desc: str, use_bar: bool) -> Dict[str, float]:
        was_training = net.training
        net.eval()
        tracker = MetricTracker()
        try:
            for batch in logs.progress(loader, use_bar, desc=desc, leave=False, unit="batch"):
                inputs, targets = self._split_batch(batch)
                with self._autocast():
                    outputs = self._forward(net, inputs)
                    loss = self._compute_loss(outputs, targets)
                tracker.update(loss, self._logits(outputs), targets)
        finally:
            net.train(was_training)
        tracker.all_reduce_(self.device)
        return tracker.compute()

    def _validate(self, net: nn.Module, loader: Any, p: TrainingParams, use_bar: bool) -> Dict[str, float]:
        out: Dict[str, float] = {}
        if self.ema is None:
            out.update({f"valid_{k}": v for k, v in self._evaluate(net, loader, "valid", use_bar).items()})
            return out
        if p.validate_raw_weights:
            raw = self._evaluate(net, loader, "valid (raw)", use_bar)
            out.update({f"valid_raw_{k}": v for k, v in raw.items()})
        # The model temporarily holds the EMA weights; leaving the block puts
        # the training weights back exactly (storages are exchanged, not copied).
        with self.ema.swapped(net):
            ema_metrics = self._evaluate(net, loader, "valid (EMA)", use_bar)
        out.update({f"valid_{k}": v for k, v in ema_metrics.items()})
        return out

    def _watched_value(self, record: Dict[str, Any], p: TrainingParams) -> float:
        if self._watched_key is None:
            for key in (p.metric_to_watch, f"valid_{p.metric_to_watch}"):
                if key in record:
                    self._watched_key = key
                    break
            else:
                raise ValueError(
                    f"training param 'metric_to_watch': {p.metric_to_watch!r} is not a metric of this run; "
                    f"known metrics: {sorted(k[len('valid_'):] for k in record if k.startswith('valid_') and not k.startswith('valid_raw_'))} "
                    f"or any of {sorted(record)}"
                )
        return float(record[self._watched_key])

    def _is_improvement(self, value: float, p: TrainingParams) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_metric is None or not math.isfinite(self.best_metric):
            return True
        return value > self.best_metric if p.greater_is_better else value < self.best_metric

    def _checkpoint_state(self, epoch: int, record: Dict[str, Any], watched: float, train_loader: Any,
                          batches_per_epoch: int, rng_states: List[Dict[str, Any]]) -> Dict[str, Any]:
        from ema_cuda import __version__

        p = self.training_params
        state: Dict[str, Any] = {
            ckpt_io.NET_KEY: self._weights_module(self.net).state_dict(),
            "epoch": epoch,
            "acc": watched,
            "metric_to_watch": self._watched_key,
            "best_metric": self.best_metric,
            "metrics": dict(record),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
            "scheduler_state_dict": self.lr_scheduler.state_dict(),
            "rng_state": rng_states[0],
            "rng_states": rng_states,
            "max_epochs": p.max_epochs,
            "batches_per_epoch": batches_per_epoch,
            "training_params": p.to_log_dict(),
            "ema_cuda_version": __version__,
        }
        if self.ema is not None:
            state[ckpt_io.EMA_NET_KEY] = self._ema_weights_module().state_dict()
            state["ema_state"] = self.ema.state_dict()
        return state

    def _save_checkpoints(self, epoch: int, record: Dict[str, Any], watched: float, is_best: bool,
                          train_loader: Any, batches_per_epoch: int) -> None:
        # Every rank's random state goes into the checkpoint (a collective),
        # so that a resumed distributed run replays each rank's own stream.
        rng_states = dist_utils.all_gather_objects(capture_rng_state(train_loader))
        if self.is_main_process:
            state = self._checkpoint_state(epoch, record, watched, train_loader, batches_per_epoch, rng_states)
            ckpt_io.save_checkpoint(state, self.checkpoints_dir / CKPT_LATEST)
            if is_best:
                ckpt_io.save_checkpoint(state, self.checkpoints_dir / CKPT_BEST)
        dist_utils.barrier()  # no rank runs ahead of a checkpoint it might resume from

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
        saved_loss = self.loss_fn
        if loss is not None:
            self.loss_fn = loss
        elif self.loss_fn is None:
            self.loss_fn = self._build_named_loss(self._default_params().get("loss", "cross_entropy"), {})
        try:
            if use_ema:
                with self.ema.swapped(net):
                    return self._evaluate(net, loader, "test (EMA)", progress_bar)
            return self._evaluate(net, loader, "test", progress_bar)
        finally:
            self.loss_fn = saved_loss
