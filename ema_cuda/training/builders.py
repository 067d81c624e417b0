"""The objects a training run is made of, built from its :class:`~ema_cuda.training.TrainingParams`.

Each function turns checked params into one object (the device, the autocast
dtype, the loss, the optimizer, the learning-rate schedule, the model on its
device and wrapped for DDP) and raises :class:`ValueError` naming the training
param when they do not fit together.  Params are validated on their own in
``params.py``; what is checked here needs the model, the device or the loader.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ema_cuda import distributed as dist_utils
from ema_cuda.training.lr_schedules import LRScheduler
from ema_cuda.training.params import TrainingParams
from ema_cuda.training.task import ClassificationTask

__all__ = [
    "batches_per_epoch",
    "is_sharded",
    "refuse_sharded_model",
    "loader_samplers",
    "check_distributed_loader",
    "resolve_device",
    "resolve_amp_dtype",
    "prepare_model",
    "build_loss",
    "build_optimizer",
    "build_lr_scheduler",
    "POSTHOC_SUBDIR",
    "resolve_ema_params",
    "samples_per_step",
    "build_ema",
]

#: Where a post-hoc EMA's snapshots go in a run's checkpoint directory, unless ``snapshot_dir`` says otherwise.
POSTHOC_SUBDIR = "posthoc"


def batches_per_epoch(train_loader: Any) -> int:
    try:
        n = len(train_loader)
    except TypeError:
        raise TypeError("Trainer.train: train_loader must have a length (len(train_loader))") from None
    if n == 0:
        raise ValueError("Trainer.train: train_loader is empty")
    return n


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are DTensors (FSDP2 / tensor parallel), which DDP cannot wrap."""
    return any(hasattr(p, "device_mesh") and hasattr(p, "to_local") for p in model.parameters())


def refuse_sharded_model(model: nn.Module) -> None:
    if is_sharded(model):
        raise ValueError(
            "Trainer.train: the model's parameters are DTensors (sharded with FSDP2 fully_shard or tensor "
            "parallelism); the Trainer drives DDP only. Keep an EMA of a sharded model with "
            "ema_cuda.ShardedModelEMA in your own loop (see docs/distributed.md)"
        )


def loader_samplers(loader: Any) -> List[Any]:
    """The loader's sampler and its batch sampler's sampler (where a ``DistributedSampler`` may sit)."""
    return [s for s in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
            if s is not None]


def check_distributed_loader(train_loader: Any, batches_per_epoch: int) -> None:
    """Every rank must make the same number of steps; a loader without a DistributedSampler is a warning.

    A collective: call it on every rank.  Its warning points at the caller
    of ``Trainer.train`` (see NOTE [warning frames] in ``trainer.py``).
    """
    lengths = dist_utils.all_gather_objects(batches_per_epoch)
    if len(set(lengths)) > 1:
        raise ValueError(
            f"Trainer.train: the train loaders of the ranks have different lengths {lengths}; every rank must "
            "make the same number of steps (DistributedSampler pads the data set so that they do)"
        )
    from torch.utils.data import DataLoader, DistributedSampler

    if isinstance(train_loader, DataLoader) and not isinstance(train_loader.dataset, torch.utils.data.IterableDataset):
        if not any(isinstance(s, DistributedSampler) for s in loader_samplers(train_loader)):
            warnings.warn(
                f"Trainer.train: distributed over {dist_utils.get_world_size()} ranks but the train loader has no "
                "DistributedSampler, so every rank iterates over the whole data set (the same batches, the "
                "same result, world-size times the work); use DataLoader(..., sampler=DistributedSampler(dataset))",
                RuntimeWarning,
                stacklevel=4,
            )


def resolve_device(model: nn.Module, p: TrainingParams, distributed: bool) -> torch.device:
    """``device`` when given, else where the model already is (if not the CPU), else CUDA if there is one."""
    if p.device is not None:
        return torch.device(p.device)
    first = next(iter(model.parameters()), None)
    if first is not None and first.device.type != "cpu":
        return first.device
    if torch.cuda.is_available():
        if distributed:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_amp_dtype(p: TrainingParams, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype ``mixed_precision`` asks for on ``device`` (``None``: no autocast)."""
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


def prepare_model(model: nn.Module, device: torch.device, distributed: bool) -> nn.Module:
    """The model on ``device``, wrapped in DDP in a distributed run (unless it is already, or is sharded)."""
    model = model.to(device)
    if distributed and not isinstance(model, nn.parallel.DistributedDataParallel) and not is_sharded(model):
        # DDP broadcasts rank 0's weights and buffers here, so the EMA
        # built from the wrapped model afterwards is the same on all ranks.
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" and device.index is not None else None
        )
    return model


def build_loss(p: TrainingParams, device: torch.device, task: ClassificationTask) -> Callable[..., torch.Tensor]:
    if isinstance(p.loss, str):
        try:
            loss = task.build_named_loss(p.loss, p.loss_params)
        except TypeError as exc:
            raise ValueError(f"training param 'loss_params' {dict(p.loss_params)!r} do not fit loss {p.loss!r}: {exc}") from exc
    else:
        if p.loss_params:
            raise ValueError("training param 'loss_params' only applies when 'loss' is a name; got a loss object")
        loss = p.loss
    if isinstance(loss, nn.Module):
        loss = loss.to(device)
    return loss


def build_optimizer(p: TrainingParams, net: nn.Module,
                    task: ClassificationTask) -> Tuple[torch.optim.Optimizer, List[float]]:
    """The optimizer (``p.optimizer`` itself when it is an instance) and each parameter group's base rate."""
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
    params = task.trainable_parameters(net)
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


def build_lr_scheduler(optimizer: torch.optim.Optimizer, p: TrainingParams, base_lrs: List[float],
                       batches_per_epoch: int) -> LRScheduler:
    if p.warmup_initial_lr is not None and p.initial_lr is None:
        raise ValueError("training param 'warmup_initial_lr' needs 'initial_lr'")
    return LRScheduler(
        optimizer,
        mode=p.lr_mode,
        batches_per_epoch=batches_per_epoch,
        max_epochs=p.max_epochs,
        base_lrs=base_lrs,
        lr_updates=p.lr_updates,
        lr_decay_factor=p.lr_decay_factor,
        cosine_final_lr_ratio=p.cosine_final_lr_ratio,
        warmup_batches=p.lr_warmup_steps or p.lr_warmup_epochs * batches_per_epoch,
        warmup_initial_lr=p.warmup_initial_lr,
    )


def samples_per_step(train_loader: Any) -> Optional[int]:
    """Training samples per step of the EMA's schedule, all ranks together: the Trainer's steps count batches
    (SuperGradients' ``step``; under ``batch_accumulate`` the schedule sees the batches between updates), so the
    loader's batch size x the number of ranks.  None for a loader without a fixed ``batch_size`` (a batch
    sampler)."""
    batch_size = getattr(train_loader, "batch_size", None)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        return None
    return batch_size * dist_utils.get_world_size()


def resolve_ema_params(ema_params: Mapping[str, Any], checkpoints_dir: Path, is_main_process: bool,
                       samples_per_step: Optional[int] = None) -> Dict[str, Any]:
    """``ema_params`` as this process builds its EMA from them.

    A half-life in training samples (``decay_type="half_life"`` with
    ``half_life_samples``) without ``samples_per_step`` gets the run's
    ``samples_per_step`` (:func:`samples_per_step`; a loader without a batch
    size leaves it to the user, and the schedule's error says so).  A
    post-hoc EMA (``decay_type="posthoc"``) with ``snapshot_every`` and no
    ``snapshot_dir`` snapshots into ``<checkpoints_dir>/posthoc``; in a
    distributed run only the main process writes snapshots (the ranks' EMAs
    are equal), the others keep the profiles without snapshots.
    """
    params = dict(ema_params)
    if (params.get("decay_type") == "half_life" and params.get("half_life_samples") is not None
            and params.get("samples_per_step") is None and samples_per_step is not None):
        params["samples_per_step"] = samples_per_step
    if params.get("decay_type") != "posthoc":
        return params
    if not is_main_process:
        params.pop("snapshot_every", None)
        params.pop("snapshot_dir", None)
    elif params.get("snapshot_every") is not None and params.get("snapshot_dir") is None:
        params["snapshot_dir"] = str(Path(checkpoints_dir) / POSTHOC_SUBDIR)
    return params


def build_ema(net: nn.Module, ema_params: Mapping[str, Any]) -> Any:
    """The EMA that ``ema_params`` describe: a :class:`~ema_cuda.PostHocEMA` for ``decay_type="posthoc"``, else a
    :class:`~ema_cuda.ModelEMA` (:meth:`~ema_cuda.ModelEMA.from_params`)."""
    if ema_params.get("decay_type") == "posthoc":
        from ema_cuda.posthoc import PostHocEMA

        return PostHocEMA.from_params(net, **dict(ema_params))
    from ema_cuda.ema import ModelEMA

    return ModelEMA.from_params(net, **dict(ema_params))
