"""The batch loops: one epoch of training with its EMA updates, and evaluation (of the EMA weights too).

A :class:`BatchLoop` knows how a batch goes through the model (to the device,
under autocast, through the task's forward and loss); its methods run the
loops over a loader and return the epoch's metrics, summed over the ranks of
a distributed run.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ema_cuda.training import logs
from ema_cuda.training.lr_schedules import LRScheduler
from ema_cuda.training.metrics import MetricTracker
from ema_cuda.training.params import TrainingParams
from ema_cuda.training.task import ClassificationTask

__all__ = ["BatchLoop", "to_device"]


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (nested in lists, tuples, named tuples, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        moved = [to_device(o, device) for o in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class BatchLoop:
    """Runs ``(inputs, targets)`` batches through a model for ``task`` with ``loss_fn`` on ``device``.

    ``amp_dtype`` is the autocast dtype (``None``: no autocast).
    """

    def __init__(self, task: ClassificationTask, loss_fn: Callable[..., Any], device: torch.device,
                 amp_dtype: Optional[torch.dtype] = None):
        self.task = task
        self.loss_fn = loss_fn
        self.device = device
        self.amp_dtype = amp_dtype

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def split_batch(self, batch: Any) -> Tuple[Any, torch.Tensor]:
        if isinstance(batch, Mapping):
            raise TypeError("Trainer: batches must be (inputs, targets) sequences, got a mapping")
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise TypeError(f"Trainer: batches must be (inputs, targets) sequences, got {type(batch).__name__}")
        return to_device(batch[0], self.device), to_device(batch[1], self.device)

    def _forward_and_loss(self, net: nn.Module, inputs: Any, targets: torch.Tensor):
        with self.autocast():
            outputs = self.task.forward(net, inputs)
            loss = self.task.compute_loss(self.loss_fn, outputs, targets)
        return outputs, loss

    def train_epoch(self, net: nn.Module, loader: Any, *, epoch: int, p: TrainingParams,
                    optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler", lr_scheduler: LRScheduler,
                    ema: Any, total_steps: int, use_bar: bool,
                    tensorboard: Optional[logs.TensorBoardLog] = None) -> Dict[str, float]:
        """One epoch (0-based ``epoch``) of training, with one EMA update after every optimizer step.

        ``tensorboard`` gets each batch's loss and learning rate and each EMA update's decay.
        """
        net.train()
        n = len(loader)
        k = p.batch_accumulate
        tracker = MetricTracker()
        optimizer.zero_grad(set_to_none=True)
        bar = logs.progress(loader, use_bar, desc=f"train {epoch + 1}/{p.max_epochs}", total=n, leave=False,
                            unit="batch")
        for batch_idx, batch in enumerate(bar):
            global_batch = epoch * n + batch_idx  # 0-based
            lr_scheduler.set_batch(global_batch)
            inputs, targets = self.split_batch(batch)
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
                outputs, loss = self._forward_and_loss(net, inputs, targets)
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
                    updates = None if ema.capturable else ema.num_updates
                    # SuperGradients' step: the 1-based global index of the
                    # batch that completed this optimizer step.
                    ema.update(net, step=global_batch + 1, total_steps=total_steps)
                    # A PostHocEMA has one decay per profile and no last_decay: nothing to log.
                    if tensorboard is not None and hasattr(ema, "last_decay") and (
                            updates is None or ema.num_updates != updates):
                        # A device tensor in capturable mode: read back once per epoch, not per step.
                        decay = ema.decay_tensor.clone() if ema.capturable else ema.last_decay
                        tensorboard.add_decay(global_batch + 1, decay)
            if tensorboard is not None:
                tensorboard.add_step(global_batch + 1, loss, optimizer.param_groups[0]["lr"])
            tracker.update(loss, self.task.logits(outputs), targets)
            if bar is not loader and (batch_idx % 20 == 0 or batch_idx == n - 1):
                bar.set_postfix(loss=f"{tracker.running_loss():.4f}", refresh=False)
        tracker.all_reduce_(self.device)
        if tensorboard is not None:
            tensorboard.flush_steps()
        return tracker.compute()

    @torch.no_grad()
    def evaluate(self, net: nn.Module, loader: Any, desc: str, use_bar: bool) -> Dict[str, float]:
        """``{"loss": ..., "accuracy": ...}`` of ``net`` as it is, in eval mode (its mode is restored after)."""
        was_training = net.training
        net.eval()
        tracker = MetricTracker()
        try:
            for batch in logs.progress(loader, use_bar, desc=desc, leave=False, unit="batch"):
                inputs, targets = self.split_batch(batch)
                outputs, loss = self._forward_and_loss(net, inputs, targets)
                tracker.update(loss, self.task.logits(outputs), targets)
        finally:
            net.train(was_training)
        tracker.all_reduce_(self.device)
        return tracker.compute()

    def validate(self, net: nn.Module, loader: Any, ema: Any, validate_raw: bool, use_bar: bool) -> Dict[str, float]:
        """``valid_*`` metrics: of the EMA weights when there is an EMA (and ``valid_raw_*`` of the raw ones)."""
        out: Dict[str, float] = {}
        if ema is None:
            out.update({f"valid_{k}": v for k, v in self.evaluate(net, loader, "valid", use_bar).items()})
            return out
        if validate_raw:
            raw = self.evaluate(net, loader, "valid (raw)", use_bar)
            out.update({f"valid_raw_{k}": v for k, v in raw.items()})
        # The model temporarily holds the EMA weights; leaving the block puts
        # the training weights back exactly (storages are exchanged, not copied).
        with ema.swapped(net):
            ema_metrics = self.evaluate(net, loader, "valid (EMA)", use_bar)
        out.update({f"valid_{k}": v for k, v in ema_metrics.items()})
        return out
