"""EMA in distributed training: process-group set-up, keeping every rank's EMA in agreement.

With DDP every rank holds the whole model and, after each optimizer step,
identical parameters (gradients are averaged before the step), so a
:class:`~ema_cuda.ema.ModelEMA` built on each rank from the DDP-wrapped model
stays identical on every rank without any communication per update.  Two
things need care:

* build the EMA *after* wrapping the model in DDP (the wrapper broadcasts
  rank 0's weights at construction; an EMA copied before that starts from
  each rank's own initialisation unless all ranks were seeded alike);
* buffers such as BatchNorm running statistics are updated from each rank's
  own batch in the forward pass, so their average differs from rank to rank.
  :func:`broadcast_ema_buffers` makes them agree again (the Trainer calls it
  once per epoch, before validation and checkpointing), and
  :func:`check_ema_synchronized` verifies bit for bit that all ranks hold the
  same EMA.

For a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) use
:class:`ema_cuda.sharded.ShardedModelEMA`, which keeps only each rank's shard.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "env_world_size",
    "init_from_env",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "broadcast_ema_buffers",
    "ema_digest",
    "check_ema_synchronized",
    "all_gather_objects",
]


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (set by ``torchrun`` and similar launchers), 1 when unset."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {value!r}") from None


def init_from_env(backend: Optional[str] = None, timeout: Optional[datetime.timedelta] = None) -> bool:
    """Initialises the default process group from the launcher's environment when ``WORLD_SIZE > 1``.

    Returns True when training is distributed (a process group of more than
    one rank exists afterwards, whether it was created here or before).  The
    environment must hold ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` (``torchrun`` sets them, and ``LOCAL_RANK``).  The backend
    defaults to NCCL when CUDA is available and gloo otherwise; with CUDA the
    current device becomes ``cuda:LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    world = env_world_size()
    if world <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; "
            "launch with torchrun (or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend=backend, **kwargs)
    return dist.get_world_size() > 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, and in a run that is not distributed."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: Any, group: Optional[Any] = None) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_ema_buffers(ema: Any, src: int = 0, group: Optional[Any] = None) -> None:
    """Copies the EMA's buffers (BatchNorm statistics and counters) from rank ``src`` to every rank.

    Call it on every rank.  Parameters need no broadcast under DDP (they are
    identical on every rank after each step); buffers are written from each
    rank's own batch in the forward pass, so their averages drift apart.  One
    call costs one broadcast of the buffers, a small fraction of the model.
    """
    if not is_distributed():
        return
    from ema_cuda._modules import state_entries

    seen = set()
    buffers = []
    for _, _, _, t, is_param in state_entries(ema.averaged_module)[0]:
        if not is_param and id(t) not in seen:
            seen.add(id(t))
            buffers.append(t)
    with torch.no_grad():
        for b in buffers:
            dist.broadcast(b, src=src, group=group)


def ema_digest(ema: Any) -> str:
    """A SHA-256 digest of the EMA's weights and buffers (names, dtypes, shapes and bytes) and its step.

    Equal digests mean bit-identical EMAs.  It copies every EMA tensor to the
    host once: use it for checks, not per step.
    """
    h = hashlib.sha256()
    state = ema.state_dict()
    for key, t in state["ema"].items():
        t = t.detach()
        if hasattr(t, "to_local"):  # a DTensor of a sharded EMA: this rank's shard
            t = t.to_local()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(f"step={state.get('step')}|updates={state.get('num_updates')}".encode())
    return h.hexdigest()


def check_ema_synchronized(ema: Any, group: Optional[Any] = None) -> None:
    """Raises ``RuntimeError`` naming the ranks whose EMA differs from rank 0's (call on every rank).

    Under DDP all ranks must hold the same EMA: the Trainer checks it once at
    the end of training.  Does nothing when training is not distributed.
    """
    if not is_distributed():
        return
    digests = all_gather_objects(ema_digest(ema), group=group)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(
            f"the EMA differs between ranks: ranks {differ} disagree with rank 0 (were the ranks' models "
            "identical when the EMA was built, and were BatchNorm buffers broadcast with broadcast_ema_buffers?)"
        )


def reduce_sums(values: Sequence[float], device: torch.device) -> List[float]:
    """Element-wise sums of ``values`` over all ranks (``values`` itself when not distributed)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
