"""What the drop-ins share: splitting (EMA, model) pairs into one fused call, and the per-step test that
the module trees a plan was built from still hold the same objects."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from ema_cuda import ops
from ema_cuda.ops import FusedUpdater, is_dense, same_layout

__all__ = ["FusedPairs", "TreeIdentity"]


class FusedPairs:
    """Averaged pairs and copied pairs, updated by one :class:`~ema_cuda.ops.FusedUpdater` call.

    A copied pair rides in the fused launch when both sides share dtype and
    memory layout; one that casts (an EMA kept in another dtype) or changes
    layout is copied by one foreach copy after it.
    """

    __slots__ = ("updater", "cast_ema", "cast_model", "cast_shapes")

    def __init__(self, averaged: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                 copied: Sequence[Tuple[torch.Tensor, torch.Tensor]]):
        fused = [e.dtype == m.dtype and is_dense(e) and is_dense(m) and same_layout(e, m) for e, m in copied]
        fused_copies = [c for c, f in zip(copied, fused) if f]
        cast = [c for c, f in zip(copied, fused) if not f]
        for e, m in cast:
            # copy_ would broadcast a smaller source silently.
            if e.shape != m.shape:
                raise RuntimeError(f"cannot copy a tensor of shape {list(m.shape)} into one of shape {list(e.shape)}")
        self.cast_ema = [e for e, _ in cast]
        self.cast_model = [m for _, m in cast]
        self.cast_shapes = tuple(m.shape for m in self.cast_model)
        self.updater = FusedUpdater([e for e, _ in averaged], [m for _, m in averaged],
                                    [e for e, _ in fused_copies], [m for _, m in fused_copies])

    def ready(self) -> bool:
        """True while the pairs can be updated as planned (see :meth:`ema_cuda.ops.FusedUpdater.ready`)."""
        return self.updater.ready() and tuple(m.shape for m in self.cast_model) == self.cast_shapes

    def update(self, decay: float) -> None:
        self.updater.update(decay)
        if self.cast_ema:
            with torch.no_grad():
                torch._foreach_copy_(self.cast_ema, self.cast_model)


class TreeIdentity:
    """Whether module trees still register the same parameters, buffers and children as when this was made.

    Every registry entry of every module (persistent buffers or not) is
    watched, and every registry's size, through
    :func:`ema_cuda.ops.entries_unchanged` (pointer compares): a tensor
    replaced in its module (``load_state_dict(assign=True)``, a new child)
    makes a cached plan stale.  A tensor whose storage alone was replaced
    (``p.data = ...``, ``module.to()``) keeps its object: the plan's
    :class:`~ema_cuda.ops.FusedUpdater` notices that.
    """

    __slots__ = ("args",)

    def __init__(self, *roots: nn.Module):
        owners: List[dict] = []
        keys: List[str] = []
        objects: List[object] = []
        registries: List[dict] = []
        sizes: List[int] = []
        for root in roots:
            for module in root.modules():
                for registry in (module._parameters, module._buffers, module._modules):
                    registries.append(registry)
                    sizes.append(len(registry))
                    for name, obj in registry.items():
                        owners.append(registry)
                        keys.append(name)
                        objects.append(obj)
        self.args = (tuple(owners), tuple(keys), tuple(objects), tuple(registries), tuple(sizes))

    def unchanged(self) -> bool:
        return ops.entries_unchanged(*self.args)
