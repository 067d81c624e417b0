"""EMA of a model sharded with FSDP2, kept shard by shard, and its distributed checkpoints.

A model sharded with ``torch.distributed.fsdp.fully_shard`` holds its
parameters as DTensors: each rank owns one shard of every parameter.  A
``deepcopy`` of such a module, or an EMA that gathers the full parameters at
every step, defeats the point of sharding.  :class:`ShardedModelEMA` keeps,
on each rank, the moving average of that rank's shards only (memory per rank
= the shard size, not the model size) and updates it with the same fused
kernel as :class:`~ema_cuda.ema.ModelEMA`, with no gathering and no
communication.

Its :meth:`~ShardedModelEMA.state_dict` presents the shards as DTensors laid
out like the model's parameters, so :func:`torch.distributed.checkpoint`
(DCP) saves them in parallel and reshards on load: a checkpoint written on 2
ranks loads on 1, on 2, or into a plain :class:`~ema_cuda.ema.ModelEMA` of
the unsharded model.  :func:`save_sharded_checkpoint` writes such a checkpoint
so that a crash while saving never damages the previous one, and
:func:`ema_cuda.checkpoint.load_dcp_weights` (used by ``models.get``) reads the
consolidated EMA weights in a single process.
"""
from __future__ import annotations

import numbers
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
from torch import nn

from ema_cuda._fs import atomic_write
from ema_cuda.ema import ModelEMA
from ema_cuda.ema.trees import ShardSpec, ShardedTree, is_dtensor, local_shard

__all__ = [
    "ShardedModelEMA",
    "save_sharded_checkpoint",
    "load_sharded_checkpoint",
    "latest_checkpoint",
    "LATEST_NAME",
]

#: The file, inside a checkpoint root directory, naming the complete checkpoint to load.
LATEST_NAME = "LATEST"
# step-N, or step-N-K for the K-th save of one step (K >= 2).
_TAG_RE = re.compile(r"^step-(\d+)(?:-(\d+))?$")

PathLike = Union[str, "os.PathLike[str]"]


class ShardedModelEMA(ModelEMA):
    """An EMA of an FSDP2-sharded model that keeps only this rank's shards.

    Use it instead of :class:`~ema_cuda.ema.ModelEMA` when the model was
    sharded with ``fully_shard`` (or its parameters are DTensors for another
    reason, such as tensor parallelism).  Build it on every rank after
    sharding; then :meth:`update` after every optimizer step, on every rank,
    exactly as with :class:`ModelEMA` (same decay, schedules and options,
    including ``capturable``).  Each update is one fused call over the local
    shards (``DTensor`` local tensors) and involves no communication.

    ``ema.ema`` is a plain module tree with the model's names holding this
    rank's shards (buffers, which FSDP does not shard, in full); it cannot run
    a forward pass.  To evaluate with the EMA weights use :meth:`swapped`,
    which copies them into the model's shards for the block and restores the
    training weights exactly on exit (it needs a temporary buffer of the shard
    size), or :meth:`copy_to` at the end of training.

    Buffers such as BatchNorm statistics are not sharded by FSDP and are
    updated from each rank's own batch, so their averages differ between
    ranks; :func:`ema_cuda.distributed.broadcast_ema_buffers` makes them agree.
    """

    _tree_type = ShardedTree

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Lets ``model`` hold the EMA weights inside a ``with`` block, then restores it exactly.

        FSDP owns the storage of the shards, so the EMA values are copied into
        it (through a temporary of this rank's shard size) and the training
        values copied back on exit, also when the block raises.  Call it on
        every rank, like the forward passes inside it.
        """
        with super().swapped(model) as m:
            yield m

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """Like :meth:`ModelEMA.state_dict`, with each sharded entry a DTensor laid out like the model's.

        The DTensors share memory with the EMA.  Pass the dictionary (inside
        the state given) to :func:`save_sharded_checkpoint` or
        ``torch.distributed.checkpoint.save`` on every rank; DCP writes each
        rank's shards and records the global shapes, so the checkpoint can be
        loaded with another number of ranks.
        """
        from torch.distributed.tensor import DTensor

        state = super().state_dict()
        weights = {}
        for key, t in state["ema"].items():
            spec = self._tree.specs.get(key)
            if spec is None:
                weights[key] = t
            else:
                mesh, placements, shape, stride = spec
                weights[key] = DTensor.from_local(t, mesh, placements, run_check=False, shape=shape, stride=stride)
        state["ema"] = weights
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a state from :meth:`state_dict` (possibly filled by a DCP load), or from a plain ModelEMA.

        Entries may be DTensors (their local shard is taken) or full tensors
        of the model's global shape, e.g. the state of a :class:`ModelEMA` of
        the unsharded model, from which this rank's shard is cut.  Everything
        is checked before anything is written.
        """
        if isinstance(state, dict) and isinstance(state.get("ema"), dict):
            weights = {}
            for key, v in state["ema"].items():
                spec = self._tree.specs.get(key)
                if is_dtensor(v):
                    v = local_shard(v)
                elif spec is not None and isinstance(v, torch.Tensor) and v.shape == spec[2]:
                    v = _cut_shard(v, spec)
                weights[key] = v
            state = dict(state, ema=weights)
        super().load_state_dict(state)

    def __getstate__(self) -> Dict[str, Any]:
        raise TypeError(
            "ShardedModelEMA cannot be pickled or deep-copied (it refers to a device mesh); save it with "
            "save_sharded_checkpoint or torch.distributed.checkpoint"
        )


def _cut_shard(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's piece of a full tensor, for a DTensor layout ``spec``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements, shape, _ = spec
    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    piece = full
    for dim, (start, length) in enumerate(zip(offset, local_shape)):
        piece = piece.narrow(dim, start, length)
    return piece


# ---------------------------------------------------------------------- DCP checkpoints


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def latest_checkpoint(root: PathLike) -> Optional[Path]:
    """The complete checkpoint directory ``root/LATEST`` names, or ``None`` when there is none yet."""
    root = Path(root)
    pointer = root / LATEST_NAME
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{str(pointer)!r} names {name!r}, but {str(path)!r} holds no DCP checkpoint")
    return path


def _write_pointer(root: Path, name: str) -> None:
    with atomic_write(root / LATEST_NAME, "w") as f:
        f.write(name + "\n")


def _tag_key(name: str) -> Optional[Tuple[int, int]]:
    """(N, K) of a ``step-N`` (K = 0) or ``step-N-K`` directory name, in save order; None for other names."""
    m = _TAG_RE.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def _optimizer_step(step: Any, state: Dict[str, Any]) -> Optional[int]:
    """The step a save is named after: ``step``, else an integer ``state["step"]``, else None."""
    from_state = step is None
    if from_state:
        step = state.get("step") if isinstance(state, dict) else None
        if step is None:
            return None
    if isinstance(step, torch.Tensor) and step.dim() == 0 and not step.is_floating_point() and step.dtype != torch.bool:
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        where = "state['step']" if from_state else "step"
        raise ValueError(f"save_sharded_checkpoint: {where} must be the optimizer step, an integer >= 0; got {step!r}")
    return int(step)


def save_sharded_checkpoint(state: Dict[str, Any], root: PathLike, *, step: Optional[int] = None, keep: int = 1,
                            process_group: Optional[Any] = None) -> Path:
    """Saves ``state`` with ``torch.distributed.checkpoint`` under ``root`` without ever damaging the previous save.

    Call it on every rank with the same structure, e.g.
    ``{"model": model.state_dict(), "ema": ema.state_dict(), "step": step}``
    (the keys ``"model"`` and ``"ema"`` are what
    :func:`ema_cuda.checkpoint.load_dcp_weights` and ``models.get`` look for).
    Each save goes to a new directory ``root/step-N``, where N is the
    optimizer step: ``step`` when given, else ``state["step"]`` when the
    state holds an integer there.  A second save of the same step goes to
    ``step-N-2`` (then ``-3``, ...), never into the directory of a complete
    checkpoint.  Without a step, N numbers the saves in ``root`` (1, 2, ...).
    Only when every rank has written its part and DCP has written the
    metadata does rank 0 point ``root/LATEST`` at the new directory (an
    atomic rename), and then removes the older ones except the ``keep - 1``
    newest complete checkpoints.  A rank that dies mid-save leaves an
    incomplete directory that ``LATEST`` never names, so the previous
    checkpoint stays the one that loads.  Returns the new directory.
    """
    import torch.distributed.checkpoint as dcp

    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"save_sharded_checkpoint: keep must be an integer >= 1, got {keep!r}")
    optimizer_step = _optimizer_step(step, state)
    dist = _dist()
    root = Path(root)
    rank = dist.get_rank(process_group) if dist else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if optimizer_step is None:
            numbers = [key[0] for p in root.iterdir() if (key := _tag_key(p.name))]
            name = [f"step-{max(numbers, default=0) + 1}"]
        else:
            # A directory of this step may exist: the checkpoint LATEST names
            # (a run resumed from it saves the same step again) or debris of
            # a crashed save.  Writing into either could tear a checkpoint.
            candidate, k = f"step-{optimizer_step}", 2
            while (root / candidate).exists():
                candidate, k = f"step-{optimizer_step}-{k}", k + 1
            name = [candidate]
    else:
        name = [None]
    if dist:
        dist.broadcast_object_list(name, src=dist.get_global_rank(process_group, 0) if process_group else 0,
                                   group=process_group)
    path = root / name[0]
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=path, process_group=process_group, no_dist=dist is None)
    if dist:
        dist.barrier(group=process_group)
    if rank == 0:
        _write_pointer(root, path.name)
        new_key = _tag_key(path.name)
        complete = sorted(
            (key, p) for p in root.iterdir() if (key := _tag_key(p.name)) is not None and p != path and key < new_key
        )
        # Older directories go, complete or not (an incomplete one is a
        # crashed save); the `keep - 1` newest complete ones stay.
        kept = [p for _, p in complete if (p / ".metadata").is_file()][-(keep - 1):] if keep > 1 else []
        for _, p in complete:
            if p not in kept:
                shutil.rmtree(p, ignore_errors=True)
    if dist:
        dist.barrier(group=process_group)
    return path


def load_sharded_checkpoint(state: Dict[str, Any], root: PathLike, *, process_group: Optional[Any] = None) -> Path:
    """Loads the checkpoint ``root/LATEST`` names into ``state`` in place (DCP) and returns its directory.

    ``state`` has the structure that was saved, filled with tensors to load
    into: ``{"ema": ema.state_dict()}`` (DTensors of a sharded EMA, or the
    plain tensors of a :class:`ModelEMA` of the unsharded model: DCP reshards
    to whatever layout they have, on any number of ranks).  Then call
    ``ema.load_state_dict(state["ema"])`` to restore the decay, the schedule
    and the counters.  Without a process group it loads in this process alone.
    ``root`` may also be a checkpoint directory itself.
    """
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    path = root if (root / ".metadata").is_file() else latest_checkpoint(root)
    if path is None:
        raise FileNotFoundError(f"no complete DCP checkpoint under {str(root)!r} (no {LATEST_NAME} file)")
    dist = _dist()
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, process_group=process_group, no_dist=dist is None)
    return path


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns that it assumes a single process whenever no process group
    # exists, even when no_dist=True says so explicitly.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process")
        yield
