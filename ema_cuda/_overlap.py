"""Which of several tensors share memory: the one Python implementation of that test.

An EMA tensor written in place must own its bytes: two EMA tensors that
overlap (a weight and a view of it registered as two parameters) would each
be updated, and the second write would read the first's result.  The EMA's
packing refuses such models, and the op's fallback refuses such lists; the
compiled op has its own test in C++.
"""
from __future__ import annotations

import heapq
from typing import Iterator, List, Sequence, Tuple

import torch

__all__ = ["byte_spans", "overlapping_pairs"]


def byte_spans(tensors: Sequence[torch.Tensor]) -> List[Tuple[int, int, int]]:
    """``(start, end, index)`` of every tensor that holds memory, sorted by address.

    The span of a tensor is ``numel * element_size`` bytes from its data
    pointer, which is exactly its memory for a dense tensor (contiguous or a
    permutation of one); callers test density first.  Empty tensors and
    tensors on the meta device hold no memory and are left out.
    """
    return sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i)
        for i, t in enumerate(tensors)
        if t.numel() and t.device.type != "meta"
    )


def overlapping_pairs(tensors: Sequence[torch.Tensor]) -> Iterator[Tuple[int, int]]:
    """Every pair ``(i, j)`` of indices into ``tensors`` whose byte spans overlap, the earlier address first.

    A sweep over the spans sorted by address, keeping those not yet ended:
    O(n log n) plus one step per pair found, so a caller that accepts some
    pairs (a tensor beside itself in another list, say) iterates on, and one
    that accepts none stops at the first.  Pass each tensor once: a tensor
    overlaps itself.
    """
    active: List[Tuple[int, int]] = []  # (end, index) of the spans still open, a heap
    for start, end, index in byte_spans(tensors):
        while active and active[0][0] <= start:
            heapq.heappop(active)
        for _, other in active:
            yield other, index
        heapq.heappush(active, (end, index))
