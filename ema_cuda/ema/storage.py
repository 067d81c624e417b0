"""The EMA's own tensors: a module tree whose floating state lives in flat buffers, laid out for the kernel.

NOTE [flat storage]: the EMA's floating tensors are views into one buffer
per (device, dtype), in the model's order, each starting on a 64-byte
boundary (a cache line on CPUs, and aligned for the CUDA kernel's 16-byte
vector loads) shifted to be co-aligned with its model tensor (see
:func:`coaligned_shift`).  An update that walks the tensors in order then
streams through one allocation instead of restarting the hardware prefetcher
at every tensor.  Whatever replaces the tensors (a copy, unpickling, a model
switched to another memory layout) packs them again with :meth:`EMAStorage.relayout`.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ema_cuda._modules import Entry, state_entries
from ema_cuda._overlap import overlapping_pairs
from ema_cuda.ops import SUPPORTED_DTYPES, is_dense

__all__ = ["EMAStorage", "coaligned_shift", "flat_views", "check_initialised", "check_packable", "packed_copy"]

_ALIGN_BYTES = 64

# (shape, strides, dtype, device) of a tensor to allocate.
Spec = Tuple[torch.Size, Tuple[int, ...], torch.dtype, torch.device]


def coaligned_shift(esize: int, model: Optional[torch.Tensor]) -> int:
    """Elements to add to an offset whose byte address is 16-byte aligned so that the EMA tensor there and
    ``model`` reach a 16-byte boundary at the same element.

    The CUDA kernel's vector loads need both sides aligned together, and a
    pair that never is runs scalar at a fraction of the bandwidth.  Model
    tensors inside flat or offset storages may start anywhere; 0 when the
    model itself never reaches a boundary.
    """
    if model is None or model.numel() == 0:
        return 0
    address, msize = model.data_ptr(), model.element_size()
    head = next((h for h in range(16) if (address + h * msize) % 16 == 0), None)
    if head is None:
        return 0
    return (-head) % max(1, 16 // esize)


def flat_views(specs: Sequence[Spec], models: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[torch.Tensor]:
    """Uninitialised tensors with the given specs, views into one buffer per (device, dtype) (NOTE [flat storage]).

    With ``models`` (the model tensor each one will be averaged with), each
    view starts where it is co-aligned with its model tensor.
    """
    ends: Dict[Tuple[torch.device, torch.dtype], int] = {}
    offsets = []
    for i, (shape, _, dtype, device) in enumerate(specs):
        esize = torch.empty((), dtype=dtype).element_size()
        align = max(1, _ALIGN_BYTES // esize)
        start = -(-ends.get((device, dtype), 0) // align) * align
        start += coaligned_shift(esize, models[i] if models is not None else None)
        offsets.append(start)
        ends[(device, dtype)] = start + math.prod(shape)
    flats = {key: torch.empty(end, dtype=key[1], device=key[0]) for key, end in ends.items()}
    return [
        flats[(device, dtype)].as_strided(shape, stride, offset)
        for (shape, stride, dtype, device), offset in zip(specs, offsets)
    ]


def check_initialised(where: str, key: str, t: torch.Tensor) -> None:
    if isinstance(t, nn.parameter.UninitializedTensorMixin):
        raise ValueError(
            f"{where}: model entry {key!r} is not initialised yet (a lazy module); run one forward pass before "
            "creating the EMA"
        )


def check_packable(where: str, key: str, t: torch.Tensor, what: str = "model entry") -> None:
    """Raises unless ``t`` (the tensor of ``key``) can get a flat EMA copy: initialised, dense, a supported dtype."""
    check_initialised(where, key, t)
    if t.is_floating_point() and not is_dense(t):
        raise ValueError(
            f"{where}: {what} {key!r} with shape {list(t.shape)} and strides {list(t.stride())} is not dense; the "
            "fused update needs contiguous (or permuted dense) tensors"
        )
    if t.is_floating_point() and t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{where}: {what} {key!r} has dtype {t.dtype}; the fused update supports "
            f"{[str(d) for d in SUPPORTED_DTYPES]}"
        )


def check_no_overlap(where: str, keyed: Sequence[Tuple[str, torch.Tensor]]) -> None:
    """Distinct model tensors that overlap in memory (views of one another) cannot be packed separately."""
    pair = next(overlapping_pairs([t for _, t in keyed]), None)
    if pair is not None:
        first, second = sorted(pair)  # named in the model's order
        raise ValueError(
            f"{where}: model entries {keyed[first][0]!r} and {keyed[second][0]!r} are different tensors that "
            "overlap in memory; tie weights by sharing one Parameter instead"
        )


def packed_copy(where: str, src: nn.Module, ema_dtype: Optional[torch.dtype]) -> nn.Module:
    """A deep copy of ``src`` in eval mode, without grad, whose floating state lives in flat buffers (in
    ``ema_dtype`` when given).

    The flat views are created first and handed to ``deepcopy`` through its
    memo, so the model is copied once, straight into its final place.
    """
    packed: List[Tuple[str, torch.Tensor]] = []
    seen = set()
    for key, _, _, t, _ in state_entries(src)[0]:
        check_packable(where, key, t)
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            packed.append((key, t))
    check_no_overlap(where, packed)
    tensors = [t for _, t in packed]
    views = flat_views([(t.shape, t.stride(), ema_dtype or t.dtype, t.device) for t in tensors], tensors)
    memo: Dict[int, Any] = {}
    with torch.no_grad():
        for t, view in zip(tensors, views):
            view.copy_(t)
            memo[id(t)] = nn.Parameter(view, requires_grad=False) if isinstance(t, nn.Parameter) else view
        if ema_dtype is not None:
            # Non-persistent floating buffers (not averaged) follow the EMA's
            # dtype too, so that the copy runs in one precision.
            for module in src.modules():
                for name in module._non_persistent_buffers_set:
                    b = module._buffers.get(name)
                    if b is not None and b.is_floating_point() and id(b) not in memo:
                        memo[id(b)] = b.detach().to(ema_dtype, copy=True)
        ema = copy.deepcopy(src, memo)
    ema.eval()
    for p in ema.parameters():
        p.requires_grad_(False)
        p.grad = None
    return ema


class EMAStorage:
    """The module tree whose state the EMA holds (``ema.ema``, or its student for a distillation EMA)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def entries(self) -> List[Entry]:
        return state_entries(self.module)[0]

    def floating(self) -> List[torch.Tensor]:
        """Each floating tensor once (tied ones appear under several keys), in order."""
        seen, out = set(), []
        for t in (e.tensor for e in self.entries()):
            if t.is_floating_point() and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def device(self, where: str, why: str) -> torch.device:
        """The one device of the floating tensors (``why`` names the option that needs one)."""
        devices = {t.device for t in self.floating()}
        if len(devices) > 1:
            raise ValueError(f"{where}: {why} needs the EMA on one device, found {sorted(str(d) for d in devices)}")
        return devices.pop() if devices else torch.device("cpu")

    def dtype_examples(self) -> Dict[torch.dtype, str]:
        """One key per floating dtype, for messages."""
        out: Dict[torch.dtype, str] = {}
        for key, _, _, t, _ in self.entries():
            if t.is_floating_point():
                out.setdefault(t.dtype, key)
        return out

    def relayout(self, like: Optional[Mapping[int, torch.Tensor]] = None) -> None:
        """Moves the floating tensors into new flat buffers, values unchanged (NOTE [flat storage]).

        A tensor whose id is in ``like`` takes the memory layout of the model
        tensor there and is co-aligned with it; the others keep their strides.
        """
        like = like or {}
        floating = self.floating()
        specs = []
        for t in floating:
            ref = like.get(id(t), t)
            specs.append((t.shape, ref.stride() if is_dense(ref) else t.contiguous().stride(), t.dtype, t.device))
        with torch.no_grad():
            for t, view in zip(floating, flat_views(specs, [like.get(id(t)) for t in floating])):
                view.copy_(t)
                t.data = view

    def memory_bytes(self) -> int:
        """Bytes of the EMA's own tensors (its flat buffers and copied buffers, each storage once)."""
        seen = set()
        total = 0
        for t in (e.tensor for e in self.entries()):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen or storage.nbytes() == 0:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total
