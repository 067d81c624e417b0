"""Pairing the model's entries with the EMA's, and the plan that caches the pairing from step to step.

NOTE [plan validity] (Python side): a :class:`Plan` is built by
:func:`build_plan` for one source module (the model, unwrapped) and one
value of the ``buffers`` option, and reused by :meth:`PlanCache.get` while

1. the source is the same object and ``buffers`` the same value (the
   option decides which entries are averaged and which copied);
2. both module trees still register the same objects: every parameter,
   buffer and child under the same name in the same registry, and no
   registry grew or shrank.  The updaters hold tensor objects: a Parameter
   replaced in its module (``load_state_dict(assign=True)``, a new child)
   would otherwise go on being read in its stale form.  Tested by
   :func:`ema_cuda.ops.entries_unchanged` (pointer compares in C++);
3. every model entry still maps to the tensor it was paired through (a
   DTensor to the same local shard: FSDP may swap it);
4. the copied model tensors keep their shapes (those that go through a
   cast are not in the fused op's own check);
5. every ``FusedUpdater`` of the plan is ``ready()``: the op's rule, NOTE
   [plan validity] in csrc/plan.h (address, element count, dtype,
   shape and dense layout of every pair).  An updater adapts to a storage
   replaced by an equal one itself; one that cannot take its lists any more
   writes nothing and says so.

A plan failing any of these is rebuilt before anything is written; the
rebuild either adapts (the EMA is laid out again like the model) or raises
an error naming the entry.  :meth:`PlanCache.get` is the one place that
checks; nothing retries after a failed write.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ema_cuda import ops
from ema_cuda._modules import Entry, state_entries
from ema_cuda.ops import FusedUpdater, is_dense, same_layout

__all__ = ["Plan", "PlanCache", "TreeWatch", "build_plan"]


def _names(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class TreeWatch:
    """Rules 2-4 of NOTE [plan validity] for the trees and tensors a plan was built from."""

    __slots__ = ("entries", "registries", "mapped", "copied", "shapes")

    def __init__(self, trees: Sequence[Tuple[List[Entry], List[nn.Module]]],
                 mapped: Sequence[Tuple[torch.Tensor, torch.Tensor]], copied: Sequence[torch.Tensor]):
        owners, keys, objects, registries, sizes = [], [], [], [], []
        for entries, modules in trees:
            for e in entries:
                owners.append(e.owner)
                keys.append(e.name)
                objects.append(e.tensor)
            for module in modules:
                for registry in (module._parameters, module._buffers, module._modules):
                    registries.append(registry)
                    sizes.append(len(registry))
                for name, child in module._modules.items():
                    owners.append(module._modules)
                    keys.append(name)
                    objects.append(child)
        self.entries = (tuple(owners), tuple(keys), tuple(objects))
        self.registries = (tuple(registries), tuple(sizes))
        # Entries whose paired tensor is another object (a DTensor and its local shard).
        self.mapped = (tuple(t for t, _ in mapped), tuple(m for _, m in mapped)) if mapped else None
        self.copied = tuple(copied)
        self.shapes = tuple(t.shape for t in copied)

    def unchanged(self, map_tensor: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        if not ops.entries_unchanged(*self.entries, *self.registries):
            return False
        if self.mapped is not None and not all(map(operator.is_, map(map_tensor, self.mapped[0]), self.mapped[1])):
            return False
        return tuple(t.shape for t in self.copied) == self.shapes


class Plan:
    """What an update needs, built once per (source, ``buffers``) and reused while valid (NOTE [plan validity]).

    ``main`` averages (and copies same-dtype entries) in one fused call;
    ``side``, with ``async_update``, holds the parameters for the side
    stream (``main`` keeps the buffers, which the next forward pass writes);
    ``cast_ema``/``cast_model`` are the copied entries that change dtype or
    layout (one foreach copy).  ``pairs`` are (model, EMA) tensors, each
    model tensor once, for swapping and copying back; ``finite_check`` the
    model's floating tensors.
    """

    __slots__ = ("src", "buffers", "watch", "main", "side", "cast_ema", "cast_model", "pairs", "finite_check")

    def updaters(self) -> List[FusedUpdater]:
        return [u for u in (self.side, self.main) if u is not None]

    def model_is_finite(self) -> bool:
        # One max-abs reduction per tensor: finite iff no NaN/Inf, and unlike a
        # sum or a 2-norm it cannot overflow on large finite values.
        if not self.finite_check:
            return True
        maxima = torch._foreach_norm(self.finite_check, ord=float("inf"))
        return bool(torch.stack(maxima).isfinite().all())


def build_plan(where: str, src: nn.Module, ema_root: nn.Module, buffers: str, split_params: bool,
               map_tensor: Callable[[torch.Tensor], torch.Tensor],
               relayout: Callable[[Dict[int, torch.Tensor]], None]) -> Plan:
    """Pairs the entries of ``src`` with those of ``ema_root`` by name, checks them, and makes the plan.

    ``map_tensor`` gives the tensor a model entry is averaged with (itself,
    or a DTensor's local shard).  Nothing is written, except that EMA tensors
    whose memory layout differs from the model's (a model switched to
    channels_last) are moved by ``relayout`` into a buffer laid out like the
    model, values unchanged.
    """
    m_entries, m_modules = state_entries(src)
    e_entries, e_modules = state_entries(ema_root)
    model_by_key = {e.key: e for e in m_entries}
    ema_keys = {e.key for e in e_entries}
    missing = [e.key for e in e_entries if e.key not in model_by_key]
    unexpected = [k for k in model_by_key if k not in ema_keys]
    if missing or unexpected:
        parts = [f"missing from the model: {_names(missing)}"] if missing else []
        parts += [f"not in the EMA: {_names(unexpected)}"] if unexpected else []
        raise RuntimeError(
            f"{where}: the model does not match the EMA ({'; '.join(parts)}); entries are paired by name"
        )

    # Group keys by EMA tensor: tied weights are one tensor under several names.
    groups: Dict[int, Tuple[torch.Tensor, List[str], bool]] = {}
    for key, _, _, e, is_param in e_entries:
        m = map_tensor(model_by_key[key].tensor)
        if m.shape != e.shape:
            raise RuntimeError(
                f"{where}: entry {key!r} has shape {list(m.shape)} in the model but {list(e.shape)} in the EMA"
            )
        if m.is_floating_point() != e.is_floating_point():
            raise RuntimeError(f"{where}: entry {key!r} has dtype {m.dtype} in the model but {e.dtype} in the EMA")
        if m.device != e.device:
            raise RuntimeError(
                f"{where}: entry {key!r} is on {m.device} in the model but on {e.device} in the EMA; create the EMA "
                f"after moving the model, or move it with `ema.ema.to({str(m.device)!r})`"
            )
        if e.is_floating_point() and not is_dense(m):
            raise RuntimeError(
                f"{where}: model entry {key!r} with shape {list(m.shape)} and strides {list(m.stride())} is not dense"
            )
        if id(e) in groups:
            groups[id(e)][1].append(key)
        else:
            groups[id(e)] = (e, [key], is_param)

    avg: List[Tuple[torch.Tensor, torch.Tensor, bool]] = []
    copies: List[Tuple[torch.Tensor, torch.Tensor]] = []
    pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []
    seen_model = set()
    for e, keys, is_param in groups.values():
        ms = [map_tensor(model_by_key[k].tensor) for k in keys]
        if any(m is not ms[0] for m in ms[1:]):
            raise RuntimeError(f"{where}: entries {_names(keys)} share one tensor in the EMA but not in the model")
        m = ms[0]
        if e.is_floating_point() and (is_param or buffers == "average"):
            avg.append((e, m, is_param))
        else:
            copies.append((e, m))
        if id(m) not in seen_model:
            seen_model.add(id(m))
            pairs.append((m, e))

    if not all(same_layout(e, m) for e, m, _ in avg):
        relayout({id(e): m for e, m, _ in avg})

    plan = Plan()
    plan.src, plan.buffers, plan.pairs = src, buffers, pairs
    # Parameters on the side stream (nothing writes them before the next
    # optimizer step); buffers, which the next forward pass writes, on the current one.
    side = [(e, m) for e, m, p in avg if p] if split_params else []
    main = [(e, m) for e, m, p in avg if not (split_params and p)]
    plan.side = FusedUpdater([e for e, _ in side], [m for _, m in side]) if side else None
    # Copies of one dtype and layout (integer buffers; floating buffers with
    # buffers="copy") ride in the fused launch; the others, which cast or
    # change layout, are a separate foreach copy.
    fused = [e.dtype == m.dtype and is_dense(e) and is_dense(m) and same_layout(e, m) for e, m in copies]
    fused_copies = [c for c, f in zip(copies, fused) if f]
    plan.cast_ema = [e for (e, _), f in zip(copies, fused) if not f]
    plan.cast_model = [m for (_, m), f in zip(copies, fused) if not f]
    plan.main = FusedUpdater([e for e, _ in main], [m for _, m in main], [e for e, _ in fused_copies],
                             [m for _, m in fused_copies]) if main or fused_copies else None
    plan.finite_check = [m for m, e in pairs if m.is_floating_point() and m.numel() > 0]
    mapped = [(e.tensor, map_tensor(e.tensor)) for e in m_entries]
    plan.watch = TreeWatch([(m_entries, m_modules), (e_entries, e_modules)], [(t, m) for t, m in mapped if m is not t],
                           [m for _, m in copies])
    return plan


class PlanCache:
    """The EMA's one plan, and the one place that checks it (NOTE [plan validity]).

    Plans pair the source with ``storage.module``, map model tensors through
    ``tree.map_tensor``, and are made for ``executor`` (split for a side
    stream, then adopted by it).
    """

    def __init__(self, where: str, storage: Any, tree: Any, executor: Any):
        self.where, self.storage, self.tree, self.executor = where, storage, tree, executor
        self.current: Optional[Plan] = None

    def get(self, src: nn.Module, buffers: str) -> Plan:
        """A plan for ``src`` that is valid now: the cached one, or a new one (which may raise, writing nothing)."""
        plan = self.current
        if plan is None or plan.src is not src or plan.buffers != buffers \
                or not plan.watch.unchanged(self.tree.map_tensor) or not all(u.ready() for u in plan.updaters()):
            self.current = None  # a failed build leaves no stale plan behind
            plan = build_plan(self.where, src, self.storage.module, buffers, self.executor.split_params,
                              self.tree.map_tensor, self.storage.relayout)
            self.executor.adopt(plan)
            self.current = plan
        return plan

    def traced(self, src: nn.Module) -> Optional[Plan]:
        """The cached plan for ``src`` unchecked, or None: inside torch.compile or a CUDA graph capture nothing
        can be checked or built (both validate on the host and allocate), so the eager call before must have."""
        plan = self.current
        return plan if plan is not None and plan.src is src else None
