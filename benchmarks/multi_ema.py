"""K EMAs of one model: the fused multi-EMA update against K separate fused updates and ema-pytorch.

``python -m benchmarks.multi_ema`` times, for K = 1, 2, 3 EMA profiles of one
model, on the CPU at ``--threads`` torch threads (2 by default):

* ``multi``: :class:`ema_cuda.ops.MultiFusedUpdater` (one pass, each model
  element read once for all K EMAs: 4 + 8K bytes per fp32 element);
* ``K x fused``: K :class:`ema_cuda.ops.FusedUpdater` updates of the same
  EMA tensors (12K bytes per element, K passes of per-call overhead);
* ``ema-pytorch``: ``PostHocEMA.update`` of the real package over a module
  holding the same tensors, with K sigma_rels, ``update_every=1`` and
  ``checkpoint_every_num_steps="manual"`` (no file I/O).  PostHocEMA needs at
  least two profiles; at K = 1 the row times its building block,
  ``KarrasEMA.update``, instead.

on the ResNet-50 parameter shapes and 10,000 tensors of 1,000 elements, fp32.
Two more workloads take 10k x 1k apart (``--workloads small overhead
traffic``): ``overhead`` is its 10,000 tensors with one element each (the
per-call costs that grow with the number of tensors: the validity check of
every EMA and model tensor, a chunk row each), ``traffic`` its 10M elements
as one tensor (the memory traffic alone).
Before timing, ``multi`` is checked bit for bit against the K separate
updates.  The methods are timed in interleaved rounds (each round one block
of each method, :class:`benchmarks.timing.BlockTimer`) and the medians and
their ratios printed, all from one run.  ``--busy`` repeats the measurement
beside one busy-looping process (:class:`benchmarks.busy.Spinner`).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from benchmarks.busy import Spinner
from benchmarks.report import fmt_time
from benchmarks.timing import BlockTimer
from benchmarks.workloads import Workload, custom_workload, get_workload

# NOTE [the limit]: what the memory traffic alone allows on this machine, in
# the same run: the multi-EMA update of one flat EMA tensor per profile and
# one flat model tensor, as many elements as the workload (the same bytes,
# no per-tensor costs: no check of each tensor, no jumps between them).  A
# speed-up over another method that would need ``multi`` to beat this time
# is out of reach on this machine.
from ema_cuda import ops

DEFAULT_WORKLOADS = ("resnet50", "small")
METHODS = ("multi", "separate", "ema_pytorch", "limit")
_LABELS = {"multi": "multi", "separate": "K x fused", "ema_pytorch": "ema-pytorch", "limit": "limit"}


class _Params(nn.Module):
    """A module whose parameters are given tensors (what ema-pytorch averages)."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in tensors])


def workload(name: str, small_count: int = 10_000) -> Workload:
    """A workload of :mod:`benchmarks.workloads`, or ``overhead`` / ``traffic``: 10k x 1k's tensor count and
    element count apart (``small_count`` tensors of 1 element; one tensor of ``small_count`` x 1,000)."""
    if name == "overhead":
        return custom_workload("overhead", [(1,)] * small_count)
    if name == "traffic":
        return custom_workload("traffic", [(small_count * 1_000,)])
    return get_workload(name, small_count=small_count)


def _decays(k: int) -> List[float]:
    return [0.999, 0.9995, 0.9999, 0.99, 0.9][:k]


def _sigma_rels(k: int) -> tuple:
    return (0.05, 0.1, 0.15, 0.2, 0.25)[:k]


def _ema_pytorch_step(model: nn.Module, k: int, folder: str) -> Optional[Callable[[], None]]:
    try:
        from ema_pytorch import KarrasEMA, PostHocEMA
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if k == 1:
            ema = KarrasEMA(model, sigma_rel=_sigma_rels(1)[0], update_every=1)
        else:
            ema = PostHocEMA(model, sigma_rels=_sigma_rels(k), update_every=1,
                             checkpoint_every_num_steps="manual", checkpoint_folder=folder)
    return ema.update


def _check_bit_identical(model: List[torch.Tensor], emas: List[List[torch.Tensor]], decays: List[float]) -> None:
    """One multi update and K separate ones on copies of the EMAs give the same bits."""
    a = [[e.clone() for e in ema] for ema in emas]
    b = [[e.clone() for e in ema] for ema in emas]
    ops.MultiFusedUpdater(a, model).update(decays)
    for ema, d in zip(b, decays):
        ops.FusedUpdater(ema, model).update(d)
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            if not torch.equal(s, t):
                raise AssertionError("multi-EMA update differs from K separate fused updates")


def time_k(wl: Workload, k: int, min_time: float, repeats: int, seed: int = 0) -> Dict[str, Optional[float]]:
    """Median seconds per update of each method for K = ``k`` on workload ``wl`` (None: not run)."""
    g = torch.Generator().manual_seed(seed)
    model = [torch.randn(s, generator=g, dtype=wl.model_dtype) for s in wl.shapes]
    emas = [[m.to(wl.ema_dtype).clone() for m in model] for _ in range(k)]
    decays = _decays(k)
    _check_bit_identical(model, emas, decays)

    multi = ops.MultiFusedUpdater(emas, model)
    separate = [ops.FusedUpdater(ema, model) for ema in emas]

    def separate_step():
        for u, d in zip(separate, decays):
            u.update(d)

    # The limit: the same update of one flat tensor per side, as many elements
    # (the memory traffic without the per-tensor costs; NOTE [the limit]).
    numel = sum(m.numel() for m in model)
    flat_model = torch.randn(numel, generator=g, dtype=wl.model_dtype)
    flat = ops.MultiFusedUpdater([[flat_model.to(wl.ema_dtype).clone()] for _ in range(k)], [flat_model])

    steps: Dict[str, Callable[[], None]] = {"multi": lambda: multi.update(decays), "separate": separate_step,
                                            "limit": lambda: flat.update(decays)}
    with tempfile.TemporaryDirectory() as folder:
        step = _ema_pytorch_step(_Params(model), k, folder)
        if step is not None:
            steps["ema_pytorch"] = step
        device = torch.device("cpu")
        timers = {name: BlockTimer(s, device, min_time) for name, s in steps.items()}
        times: Dict[str, List[float]] = {name: [] for name in steps}
        for _ in range(repeats):  # interleaved: drift hits every method alike
            for name, timer in timers.items():
                times[name].append(timer.block())
    return {name: (statistics.median(times[name]) if name in times else None) for name in METHODS}


def run(workloads: Sequence[Workload], ks: Sequence[int], min_time: float, repeats: int,
        busy: bool = False) -> List[Dict]:
    rows = []
    states = ("quiet", "busy") if busy else ("quiet",)
    for wl in workloads:
        for k in ks:
            for state in states:
                if state == "busy":
                    with Spinner():
                        t = time_k(wl, k, min_time, repeats)
                else:
                    t = time_k(wl, k, min_time, repeats)
                rows.append({"workload": wl.name, "k": k, "state": state, "median_s": t})
    return rows


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(rows: List[Dict]) -> str:
    """One line per (workload, K, quiet/busy): medians, and the speed-ups of ``multi``.

    ``bytes bound`` is the speed-up the memory traffic allows over K separate
    fp32 updates: 12K / (4 + 8K) bytes per element.  ``limit`` is the
    multi-EMA update of one flat tensor per side with the workload's element
    count, ``% of limit`` its time over ``multi``'s: how close ``multi``
    comes to the memory traffic alone (NOTE [the limit])."""
    head = (f"{'workload':<9} {'K':>2} {'CPU':<5} {'multi':>9} {'K x fused':>10} {'ema-pytorch':>11} "
            f"{'limit':>9} {'vs K x fused':>12} {'vs ema-pytorch':>14} {'bytes bound':>11} {'% of limit':>10}")
    lines = [head]
    for r in rows:
        t, k = r["median_s"], r["k"]
        share = f"{100 * t['limit'] / t['multi']:.0f}%" if t.get("limit") and t["multi"] else "-"
        lines.append(
            f"{r['workload']:<9} {k:>2} {r['state']:<5} {fmt_time(t['multi']):>9} {fmt_time(t['separate']):>10} "
            f"{fmt_time(t['ema_pytorch']):>11} {fmt_time(t.get('limit')):>9} {_ratio(t['separate'], t['multi']):>12} "
            f"{_ratio(t['ema_pytorch'], t['multi']):>14} {12 * k / (4 + 8 * k):>10.2f}x {share:>10}"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS),
                   help="workloads of benchmarks.workloads, or overhead / traffic (10k x 1k taken apart)")
    p.add_argument("--k", nargs="+", type=int, default=[1, 2, 3], help="numbers of EMA profiles")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed block")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    p.add_argument("--busy", action="store_true", help="also time beside one busy-looping process")
    p.add_argument("--small-count", type=int, default=10_000, help="tensors of the 'small' workload")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    workloads = [workload(name, small_count=args.small_count) for name in args.workloads]
    print(f"multi-EMA update, CPU, {args.threads} threads, backend {ops.backend()}, fp32, medians of "
          f"{args.repeats} interleaved rounds")
    rows = run(workloads, args.k, args.min_time, args.repeats, args.busy)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
