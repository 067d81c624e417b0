"""Running metrics (mean loss and top-k accuracy), and the watched metric that picks the best checkpoint.

Totals stay on the device as tensors and are read once per epoch, so the
training loop does not synchronise with the GPU after every batch.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

__all__ = ["MetricTracker", "topk_correct", "find_watched_key", "is_improvement"]


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Number of rows whose target is among the ``k`` largest logits (a 0-dim tensor).

    ``targets`` may be class indices ``(N,)`` or one-hot / soft labels
    ``(N, C)`` (their argmax is the class).
    """
    if targets.dim() == logits.dim() and targets.shape == logits.shape:
        targets = targets.argmax(dim=-1)
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == targets.unsqueeze(-1)).any(dim=-1).sum()


class MetricTracker:
    """Accumulates the sample-weighted mean loss and top-k accuracies over an epoch."""

    def __init__(self, topk: Sequence[int] = (1,)):
        self.topk = tuple(topk)
        self.reset()

    def reset(self) -> None:
        self._loss_sum: Optional[torch.Tensor] = None
        self._correct: Dict[int, torch.Tensor] = {}
        self.count = 0

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        n = int(logits.shape[0])
        weighted = loss.detach().float() * n
        self._loss_sum = weighted if self._loss_sum is None else self._loss_sum + weighted
        logits = logits.detach()
        for k in self.topk:
            c = topk_correct(logits, targets, k)
            self._correct[k] = c if k not in self._correct else self._correct[k] + c
        self.count += n

    def all_reduce_(self, device: torch.device) -> None:
        """Sums the totals over all ranks of a distributed run, so that :meth:`compute` gives the global metrics.

        Call it on every rank (it is a collective); ``device`` is where the
        reduction runs (the training device: CUDA for NCCL).  Nothing happens
        when the run is not distributed.
        """
        from ema_cuda import distributed

        if not distributed.is_distributed():
            return
        values = [float(self._loss_sum.item()) if self._loss_sum is not None else 0.0, float(self.count)]
        values += [float(self._correct[k].item()) if k in self._correct else 0.0 for k in self.topk]
        total = distributed.reduce_sums(values, device)
        self._loss_sum = torch.tensor(total[0], dtype=torch.float64)
        self.count = int(total[1])
        self._correct = {k: torch.tensor(total[2 + i], dtype=torch.float64) for i, k in enumerate(self.topk)}

    def running_loss(self) -> float:
        return float(self._loss_sum.item()) / self.count if self.count else float("nan")

    def compute(self) -> Dict[str, float]:
        """``{"loss": ..., "accuracy": ...}`` (plus ``"top{k}"`` for other k); NaN when empty."""
        if not self.count:
            out = {"loss": float("nan"), "accuracy": float("nan")}
        else:
            out = {"loss": float(self._loss_sum.item()) / self.count}
            for k in self.topk:
                name = "accuracy" if k == 1 else f"top{k}"
                out[name] = float(self._correct[k].item()) / self.count
        return out


def find_watched_key(record: Mapping[str, Any], metric_to_watch: str) -> str:
    """The key of an epoch's ``record`` that ``metric_to_watch`` names: itself, or ``valid_<metric_to_watch>``."""
    for key in (metric_to_watch, f"valid_{metric_to_watch}"):
        if key in record:
            return key
    raise ValueError(
        f"training param 'metric_to_watch': {metric_to_watch!r} is not a metric of this run; "
        f"known metrics: {sorted(k[len('valid_'):] for k in record if k.startswith('valid_') and not k.startswith('valid_raw_'))} "
        f"or any of {sorted(record)}"
    )


def is_improvement(value: float, best: Optional[float], greater_is_better: bool) -> bool:
    """Whether ``value`` beats ``best``: a non-finite value never does, and anything finite beats no (or a non-finite) best."""
    if not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value > best if greater_is_better else value < best
