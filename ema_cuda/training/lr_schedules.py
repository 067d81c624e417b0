"""Learning-rate schedules, set per batch from the global batch index.

The rate is a pure function of the 0-based global batch index ``b = epoch *
len(train_loader) + batch_idx``, so resuming needs nothing but the index
(and the base rates, which :meth:`LRScheduler.state_dict` keeps).  With
``batch_accumulate > 1`` the optimizer step uses the rate set for the last
batch of its window.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["LRScheduler"]


class LRScheduler:
    """Sets ``lr`` of every parameter group of ``optimizer`` before each batch.

    ``base_lrs`` are the per-group target rates (the optimizer's current rates
    when omitted).  ``mode`` is ``"constant"``, ``"step"`` or ``"cosine"``;
    a linear warm-up over ``warmup_batches`` batches from
    ``warmup_initial_lr`` (a rate for the first group; the others scale with
    their base rates; default a tenth of the base rate) comes first.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        mode: str,
        batches_per_epoch: int,
        max_epochs: int,
        base_lrs: Optional[Sequence[float]] = None,
        lr_updates: Sequence[int] = (),
        lr_decay_factor: float = 0.1,
        cosine_final_lr_ratio: float = 0.01,
        warmup_batches: int = 0,
        warmup_initial_lr: Optional[float] = None,
    ):
        if mode not in ("constant", "step", "cosine"):
            raise ValueError(f"LRScheduler: unknown mode {mode!r}; known modes: constant, step, cosine")
        self.optimizer = optimizer
        self.mode = mode
        self.batches_per_epoch = int(batches_per_epoch)
        self.total_batches = int(batches_per_epoch) * int(max_epochs)
        self.base_lrs: List[float] = (
            [float(b) for b in base_lrs] if base_lrs is not None else [float(g["lr"]) for g in optimizer.param_groups]
        )
        if len(self.base_lrs) != len(optimizer.param_groups):
            raise ValueError(
                f"LRScheduler: {len(self.base_lrs)} base rates for {len(optimizer.param_groups)} parameter groups"
            )
        self.lr_updates = tuple(lr_updates)
        self.lr_decay_factor = float(lr_decay_factor)
        self.cosine_final_lr_ratio = float(cosine_final_lr_ratio)
        self.warmup_batches = int(warmup_batches)
        if warmup_initial_lr is None:
            self.warmup_start_ratio = 0.1
        else:
            ref = self.base_lrs[0] if self.base_lrs and self.base_lrs[0] > 0 else 1.0
            self.warmup_start_ratio = float(warmup_initial_lr) / ref
        self.last_batch = -1

    def factor(self, batch: int) -> float:
        """The multiplier of the base rates at 0-based global batch ``batch``."""
        if batch < self.warmup_batches:
            t = batch / self.warmup_batches
            return self.warmup_start_ratio + (1.0 - self.warmup_start_ratio) * t
        if self.mode == "constant":
            return 1.0
        if self.mode == "step":
            epoch = batch // max(self.batches_per_epoch, 1)
            return self.lr_decay_factor ** sum(1 for e in self.lr_updates if epoch >= e)
        # cosine, over the batches after warm-up, reaching the final ratio at the last batch
        span = max(self.total_batches - 1 - self.warmup_batches, 1)
        t = min(max((batch - self.warmup_batches) / span, 0.0), 1.0)
        final = self.cosine_final_lr_ratio
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))

    def lrs_at(self, batch: int) -> List[float]:
        f = self.factor(batch)
        return [b * f for b in self.base_lrs]

    def set_batch(self, batch: int) -> None:
        """Set every group's rate for 0-based global batch ``batch``."""
        for group, lr in zip(self.optimizer.param_groups, self.lrs_at(batch)):
            group["lr"] = lr
        self.last_batch = batch

    def state_dict(self) -> Dict[str, Any]:
        return {"mode": self.mode, "base_lrs": list(self.base_lrs), "last_batch": self.last_batch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(
                f"LRScheduler: checkpoint was written with lr_mode {state.get('mode')!r}, this run uses {self.mode!r}"
            )
        if len(state["base_lrs"]) != len(self.base_lrs):
            raise ValueError(
                f"LRScheduler: checkpoint has {len(state['base_lrs'])} base rates, the optimizer has "
                f"{len(self.base_lrs)} parameter groups"
            )
        self.base_lrs = [float(b) for b in state["base_lrs"]]
        self.last_batch = int(state["last_batch"])
        if self.last_batch >= 0:
            self.set_batch(self.last_batch)
