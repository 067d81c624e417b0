"""A training run's checkpoints: what each epoch writes, and how a later run resumes from them.

A run keeps ``ckpt_latest.pth`` (every epoch), ``ckpt_best.pth`` (when the
watched metric improves) and the metrics log in its experiment directory.
The entries are documented in :mod:`ema_cuda.checkpoint`; this module decides
what goes into them (:func:`epoch_checkpoint`), writes them
(:func:`save_epoch_checkpoints`), puts a run back where a checkpoint left it
(:func:`resume_run`), and refuses to start a new run over an earlier one's
files (:func:`refuse_to_overwrite_an_earlier_run`).

Distributed runs: every function here is called on every rank; rank 0 alone
reads the directory's listing and writes files, and the others wait for it.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

import torch
from torch import nn

from ema_cuda import checkpoint as ckpt_io
from ema_cuda import distributed as dist_utils
from ema_cuda.training import logs
from ema_cuda.training.lr_schedules import LRScheduler
from ema_cuda.training.params import TrainingParams
from ema_cuda.training.rng import capture_rng_state
from ema_cuda.training.task import ClassificationTask

__all__ = [
    "CKPT_LATEST",
    "CKPT_BEST",
    "refuse_to_overwrite_an_earlier_run",
    "epoch_checkpoint",
    "save_epoch_checkpoints",
    "Resumed",
    "resume_run",
]

CKPT_LATEST = "ckpt_latest.pth"
CKPT_BEST = "ckpt_best.pth"


def refuse_to_overwrite_an_earlier_run(directory: Path, experiment_name: str, is_main_process: bool) -> None:
    """Raises when ``directory`` holds files of an earlier run that a new run would replace.

    Rank 0 writes the files, so its view decides, on every rank (no rank
    is left waiting in a collective for one that raised).
    """
    names = (CKPT_LATEST, CKPT_BEST, logs.METRICS_LOG_NAME)
    mine = [n for n in names if (directory / n).exists()] if is_main_process else []
    found = dist_utils.all_gather_objects(mine)[0]
    if found:
        raise FileExistsError(
            f"Trainer.train: {str(directory)!r} already holds {', '.join(found)} of an earlier run of "
            f"experiment {experiment_name!r}, which this run would overwrite; pass 'resume': True to "
            "continue that run, 'overwrite': True to replace it, or choose another experiment_name"
        )


def epoch_checkpoint(trainer: Any, *, epoch: int, record: Dict[str, Any], watched: float, watched_key: str,
                     batches_per_epoch: int, rng_states: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The checkpoint of ``trainer`` after ``epoch`` completed epochs, ``record`` being that epoch's metrics.

    Reads the trainer's public state: ``net``, ``ema``, ``task``,
    ``optimizer``, ``scaler``, ``lr_scheduler``, ``training_params`` and
    ``best_metric``.
    """
    from ema_cuda import __version__

    p = trainer.training_params
    state: Dict[str, Any] = {
        ckpt_io.NET_KEY: trainer.task.weights_module(trainer.net).state_dict(),
        "epoch": epoch,
        "acc": watched,
        "metric_to_watch": watched_key,
        "best_metric": trainer.best_metric,
        "metrics": dict(record),
        "optimizer_state_dict": trainer.optimizer.state_dict(),
        "scaler_state_dict": trainer.scaler.state_dict(),
        "scheduler_state_dict": trainer.lr_scheduler.state_dict(),
        "rng_state": rng_states[0],
        "rng_states": rng_states,
        "max_epochs": p.max_epochs,
        "batches_per_epoch": batches_per_epoch,
        "training_params": p.to_log_dict(),
        "ema_cuda_version": __version__,
    }
    if trainer.ema is not None:
        state[ckpt_io.EMA_NET_KEY] = trainer.task.ema_weights_module(trainer.ema).state_dict()
        state["ema_state"] = trainer.ema.state_dict()
    return state


def save_epoch_checkpoints(trainer: Any, *, epoch: int, record: Dict[str, Any], watched: float, watched_key: str,
                           is_best: bool, train_loader: Any, batches_per_epoch: int) -> None:
    """Writes ``ckpt_latest.pth`` (and ``ckpt_best.pth`` when ``is_best``) into ``trainer.checkpoints_dir``."""
    # Every rank's random state goes into the checkpoint (a collective),
    # so that a resumed distributed run replays each rank's own stream.
    rng_states = dist_utils.all_gather_objects(capture_rng_state(train_loader))
    if trainer.is_main_process:
        state = epoch_checkpoint(trainer, epoch=epoch, record=record, watched=watched, watched_key=watched_key,
                                 batches_per_epoch=batches_per_epoch, rng_states=rng_states)
        ckpt_io.save_checkpoint(state, trainer.checkpoints_dir / CKPT_LATEST)
        if is_best:
            ckpt_io.save_checkpoint(state, trainer.checkpoints_dir / CKPT_BEST)
    dist_utils.barrier()  # no rank runs ahead of a checkpoint it might resume from


class Resumed(NamedTuple):
    """Where a resumed run continues: the objects :func:`resume_run` loaded into are not repeated here."""

    start_epoch: int
    ema: Any
    best_metric: Optional[float]
    history: List[Dict[str, Any]]
    rng_state: Optional[Dict[str, Any]]


def resume_run(path: Path, *, net: nn.Module, task: ClassificationTask, p: TrainingParams,
               optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler", lr_scheduler: LRScheduler,
               metrics_log: Optional[logs.MetricsLog], checkpoints_dir: Path, batches_per_epoch: int) -> Resumed:
    """Loads checkpoint ``path`` into the run's model, optimizer, scaler and schedule, and rebuilds its EMA.

    The metrics log loses the lines of epochs after the checkpoint's (written
    before a crash that came ahead of their checkpoint).  The random state is
    returned, not restored: the caller restores it right before the first
    epoch.  Warnings point at the caller of ``Trainer.train`` (see NOTE
    [warning frames] in ``trainer.py``).
    """
    ckpt = ckpt_io.load_checkpoint(path, map_location="cpu")
    for key in (ckpt_io.NET_KEY, "epoch", "optimizer_state_dict"):
        if key not in ckpt:
            raise ckpt_io.CheckpointError(
                f"cannot resume from checkpoint file {str(path)!r}: it has no {key!r} entry "
                f"(its entries are {sorted(ckpt)})"
            )
    ckpt_io.load_state_dict_into_model(
        task.weights_module(net), ckpt[ckpt_io.NET_KEY], source=f"checkpoint file {str(path)!r}, entry 'net'"
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
        optimizer.load_state_dict(ckpt["optimizer_state_dict"])
    except (ValueError, KeyError) as exc:
        raise ckpt_io.CheckpointError(
            f"checkpoint file {str(path)!r}, entry 'optimizer_state_dict' does not fit the optimizer: {exc}"
        ) from exc
    if ckpt.get("scaler_state_dict"):
        scaler.load_state_dict(ckpt["scaler_state_dict"])
    if ckpt.get("scheduler_state_dict") is not None:
        lr_scheduler.load_state_dict(ckpt["scheduler_state_dict"])

    ema = None
    if p.ema:
        # Built after 'net' is loaded, so that an EMA re-created from the
        # raw weights (no 'ema_net' in the file) starts from them.
        ema = task.build_ema(net, p.ema_params)
        if ckpt.get("ema_state") is not None:
            ema.load_state_dict(ckpt["ema_state"])
        elif ckpt.get(ckpt_io.EMA_NET_KEY) is not None:
            ckpt_io.load_state_dict_into_model(
                task.ema_weights_module(ema), ckpt[ckpt_io.EMA_NET_KEY],
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
    if metrics_log is not None:
        metrics_log.truncate_after(start_epoch)
    dist_utils.barrier()  # the log is truncated before any rank reads it
    history = logs.MetricsLog(checkpoints_dir).read()
    rng_state = ckpt.get("rng_state")
    per_rank = ckpt.get("rng_states")
    if dist_utils.is_distributed():
        if per_rank is not None and len(per_rank) == dist_utils.get_world_size():
            rng_state = per_rank[dist_utils.get_rank()]
        else:
            warnings.warn(
                f"resuming from {str(path)!r} on {dist_utils.get_world_size()} ranks, but it holds the random "
                f"states of {len(per_rank) if per_rank is not None else 1}: every rank restores rank 0's",
                RuntimeWarning,
                stacklevel=4,
            )
    return Resumed(start_epoch=start_epoch, ema=ema, best_metric=None if best is None else float(best),
                   history=history, rng_state=rng_state)
