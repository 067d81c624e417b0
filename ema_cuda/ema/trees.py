"""Tree adapters: what an EMA averages in the module it is given, how it copies it, and how it swaps.

An EMA class picks one adapter; everything else (options, storage, plans,
executors, state) is shared.

* :class:`ReplicatedTree`: a whole model on this process (plain, DataParallel
  or DDP, compiled: :func:`~ema_cuda._modules.unwrap_model` removes the
  wrappers).  The EMA is a packed deep copy; swapping points the model's
  tensors at the EMA's memory.
* :class:`StudentTree`: the ``student`` of a distillation module.  Only the
  student is copied; ``ema.ema`` is a shell of the distillation module around
  the EMA student and the model's own teacher (shared, never written).
* :class:`ShardedTree`: a model whose entries are DTensors (FSDP2
  ``fully_shard``, tensor parallelism).  The EMA keeps this rank's local
  shards in a plain module tree; ranks agree on skipping a non-finite step
  through one all-reduce; swapping copies (FSDP owns the shards' storage).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ema_cuda._modules import state_entries, unwrap_model
from ema_cuda.ema.storage import check_initialised, check_packable, flat_views, packed_copy

__all__ = ["ReplicatedTree", "StudentTree", "ShardedTree", "is_dtensor", "local_shard"]

Pairs = Sequence[Tuple[torch.Tensor, torch.Tensor]]


def is_dtensor(t: Any) -> bool:
    # Checked by attribute so that torch.distributed is imported only when used.
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor object it holds, not an alias), else ``t``."""
    if not is_dtensor(t):
        return t
    local = getattr(t, "_local_tensor", None)
    if local is None:
        with torch.no_grad():
            local = t.to_local()
    return local


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class ReplicatedTree:
    """A model held whole by this process (see the module docstring)."""

    #: The tensor a model entry is averaged with.
    map_tensor = staticmethod(_identity)

    def __init__(self, where: str):
        self.where = where

    def source(self, model: nn.Module) -> nn.Module:
        """The module whose state the EMA averages."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.where}: expected an nn.Module, got {type(model).__name__}")
        return unwrap_model(model)

    def copy(self, src: nn.Module, ema_dtype: Optional[torch.dtype]) -> nn.Module:
        """The EMA's own module tree, in flat buffers."""
        for key, _, _, t, _ in state_entries(src)[0]:
            if is_dtensor(t):
                raise TypeError(
                    f"{self.where}: model entry {key!r} is a DTensor (a model sharded with FSDP2 fully_shard or "
                    "tensor parallelism); use ema_cuda.ShardedModelEMA, which keeps each rank's shard"
                )
        return packed_copy(self.where, src, ema_dtype)

    def wrap(self, model: nn.Module, covered: nn.Module) -> nn.Module:
        """The module exposed as ``ema.ema`` around the averaged copy."""
        return covered

    def agree(self, finite: bool, plan: Any) -> bool:
        """Whether to apply a step the local non-finite check judged ``finite`` (ranks may need to agree)."""
        return finite

    @contextmanager
    def swap(self, pairs: Pairs) -> Iterator[None]:
        """Points each model tensor at its EMA tensor's memory for the block, then back (no copies).

        Where the dtypes differ (``ema_dtype``) the model gets a cast copy for
        the block.  Parameter objects, their storage and the optimizer state
        attached to them are untouched.
        """
        saved = []
        try:
            with torch.no_grad():
                for m, e in pairs:
                    saved.append((m, m.data))
                    m.data = e if e.dtype == m.dtype else e.to(dtype=m.dtype)
            yield
        finally:
            for m, data in reversed(saved):
                m.data = data


class StudentTree(ReplicatedTree):
    """The student of a distillation module (see the module docstring)."""

    def source(self, model: nn.Module) -> nn.Module:
        kd = super().source(model)
        student = kd._modules.get("student")
        if not isinstance(student, nn.Module) or not isinstance(kd._modules.get("teacher"), nn.Module):
            raise TypeError(
                f"{self.where}: expected a distillation module with `student` and `teacher` submodules, got "
                f"{type(kd).__name__} with children {list(kd._modules)}"
            )
        # The student itself may be compiled: the EMA averages the module inside.
        return unwrap_model(student)

    def wrap(self, model: nn.Module, covered: nn.Module) -> nn.Module:
        shell = copy.copy(unwrap_model(model))
        # copy.copy shares the registries (dicts of modules, parameters, hooks)
        # with the training module; give the shell its own before editing it.
        for k, v in list(shell.__dict__.items()):
            if isinstance(v, (dict, set)):
                shell.__dict__[k] = copy.copy(v)
        shell._modules["student"] = covered
        # Not shell.eval(): that would also switch the shared teacher.
        shell.__dict__["training"] = False
        return shell


# (device mesh, placements, global shape, global strides) of a sharded entry.
ShardSpec = Tuple[Any, Any, torch.Size, Tuple[int, ...]]


class ShardedTree(ReplicatedTree):
    """This rank's shards of a DTensor model (see the module docstring).  ``specs`` holds each sharded
    entry's DTensor layout, for presenting the state as DTensors again."""

    map_tensor = staticmethod(local_shard)

    def __init__(self, where: str):
        super().__init__(where)
        self.specs: Dict[str, ShardSpec] = {}

    def copy(self, src: nn.Module, ema_dtype: Optional[torch.dtype]) -> nn.Module:
        shards: Dict[int, torch.Tensor] = {}
        floating: List[Tuple[int, torch.Tensor]] = []
        for key, _, _, t, _ in state_entries(src)[0]:
            check_initialised(self.where, key, t)
            if is_dtensor(t):
                self.specs[key] = (t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()))
            if id(t) in shards:
                continue
            local = shards[id(t)] = local_shard(t)
            check_packable(self.where, key, local, "the local shard of model entry")
            if local.is_floating_point():
                floating.append((id(t), local))
        if not self.specs:
            raise TypeError(
                f"{self.where}: the model has no DTensor parameters or buffers (it is not sharded); use ModelEMA"
            )
        locals_ = [t for _, t in floating]
        views = flat_views([(t.shape, t.stride(), ema_dtype or t.dtype, t.device) for t in locals_], locals_)
        copies: Dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for (ident, local), view in zip(floating, views):
                view.copy_(local)
                copies[ident] = view
            for ident, local in shards.items():
                if ident not in copies:  # integer buffers
                    copies[ident] = local.detach().clone()
        return _mirror(src, copies).eval()

    def agree(self, finite: bool, plan: Any) -> bool:
        # Each rank sees only its shards: the ranks agree on skipping through
        # one 1-element all-reduce (the only communication of an update, and
        # only with skip_nonfinite=True), else their EMAs would drift apart.
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return finite
        device = plan.finite_check[0].device if plan.finite_check else torch.device("cpu")
        if dist.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([0 if finite else 1], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not bool(flag.item())

    @contextmanager
    def swap(self, pairs: Pairs) -> Iterator[None]:
        """Copies the EMA values into the model's shards for the block and the training values back after.

        FSDP owns the storage of the shards, so nothing can be re-pointed; the
        copy needs a temporary of this rank's shard size.
        """
        model_side = [m for m, _ in pairs]
        with torch.no_grad():
            saved = [m.clone() for m in model_side]
            torch._foreach_copy_(model_side, [e for _, e in pairs])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(model_side, saved)


def _mirror(root: nn.Module, copies: Dict[int, torch.Tensor]) -> nn.Module:
    """A tree of plain modules with the names of ``root``'s, holding ``copies`` (by id of the model tensor);
    shared modules and tied tensors stay shared."""
    mirrors: Dict[int, nn.Module] = {}
    params: Dict[int, nn.Parameter] = {}

    def mirror(module: nn.Module) -> nn.Module:
        if id(module) in mirrors:
            return mirrors[id(module)]
        m = mirrors[id(module)] = nn.Module()
        for name, p in module._parameters.items():
            if p is not None:
                if id(p) not in params:  # a parameter tied in the model is one Parameter here too
                    params[id(p)] = nn.Parameter(copies[id(p)], requires_grad=False)
                m._parameters[name] = params[id(p)]
        skip = module._non_persistent_buffers_set
        for name, b in module._buffers.items():
            if b is not None and name not in skip:
                m._buffers[name] = copies[id(b)]
        for name, child in module._modules.items():
            if child is not None:
                m._modules[name] = mirror(child)
        return m

    return mirror(root)
