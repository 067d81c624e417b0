"""Per-step EMA cost of timm's ``ModelEmaV3`` and diffusers' ``EMAModel`` against their ema_cuda drop-ins.

Each framework's class and ``ema_cuda.compat``'s replacement keep an EMA of
the same model, called as a training loop calls them
(``ema.update(model)``; ``ema.step(model.parameters())``), in interleaved
rounds (a burst of load from elsewhere lands on both alike).  Models are
parameter lists with the shapes of :mod:`benchmarks.workloads`: ResNet-50
and 10,000 x 1,000 fp32.  Rows: diffusers with ``foreach=True`` and with
``foreach=False`` (its default), timm with its default (``foreach=True``).

    python -m benchmarks.fw_dropins [--quick] [--threads 2] [--device cpu] [--json out.json]

:func:`rows` returns the measurements for ``make bench``.  A framework that
is not installed gives a row with ``status`` "skipped".
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from benchmarks.report import fmt_time, fmt_x
from benchmarks.timing import BlockTimer, sync
from benchmarks.workloads import Shape, get_workload

__all__ = ["rows", "main", "VARIANTS", "GOALS"]

DECAY = 0.9999

#: (framework, variant label, constructor keyword arguments for both classes).
VARIANTS: Tuple[Tuple[str, str, Dict[str, Any]], ...] = (
    ("diffusers", "EMAModel foreach=True", {"foreach": True}),
    ("diffusers", "EMAModel foreach=False", {"foreach": False}),
    ("timm", "ModelEmaV3 (default)", {}),
)

#: The issue's goals: the drop-in's speedup over the native class, per workload.
GOALS: Dict[str, float] = {"resnet50": 1.0, "small": 3.0}


class ParamModel(nn.Module):
    """A module holding one separately allocated parameter per shape (standard normal values)."""

    def __init__(self, shapes: Sequence[Shape], device: torch.device, seed: int = 0):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(seed)
        self.params = nn.ParameterList(
            [nn.Parameter(torch.randn(s, generator=g, device=device)) for s in shapes]
        )


def _stepper(framework: str, cls: Any, model: nn.Module, kwargs: Dict[str, Any]) -> Callable[[], None]:
    if framework == "timm":
        ema = cls(model, decay=DECAY, **kwargs)
        return lambda: ema.update(model)
    ema = cls(model.parameters(), decay=DECAY, **kwargs)
    return lambda: ema.step(model.parameters())


def _classes(framework: str) -> Tuple[Any, Any]:
    """(native class, drop-in class); ImportError when the framework is missing."""
    if framework == "timm":
        from timm.utils import ModelEmaV3 as native

        from ema_cuda.compat.timm import ModelEmaV3 as ours
    else:
        from diffusers.training_utils import EMAModel as native

        from ema_cuda.compat.diffusers import EMAModel as ours
    return native, ours


def rows(
    quick: bool,
    *,
    device: Optional[torch.device] = None,
    workloads: Optional[Dict[str, List[Shape]]] = None,
    block_time: Optional[float] = None,
    rounds: Optional[int] = None,
    frameworks: Sequence[str] = ("diffusers", "timm"),
    log: Callable[[str], None] = lambda _: None,
) -> List[Dict[str, Any]]:
    """One row per (variant, workload): the native and drop-in medians per step and their ratio.

    ``quick`` runs fewer and shorter rounds on the same sizes.  ``workloads``
    (name -> shapes), ``block_time`` and ``rounds`` override the defaults
    (the smoke tests run tiny ones); ``frameworks`` picks the rows.  Each row: ``framework``, ``variant``,
    ``workload``, ``tensors``, ``numel``, ``native_s``, ``ours_s``,
    ``speedup`` (native / ours), ``goal``, ``status`` ("ok", "skipped" or
    "failed") and ``detail``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if workloads is None:
        workloads = {name: get_workload(name).shapes for name in ("resnet50", "small")}
    block_time = block_time if block_time is not None else (0.05 if quick else 0.2)
    rounds = rounds if rounds is not None else (5 if quick else 15)
    out: List[Dict[str, Any]] = []
    for wname, shapes in workloads.items():
        model = ParamModel(shapes, device)
        numel = sum(p.numel() for p in model.parameters())
        for framework, variant, kwargs in VARIANTS:
            if framework not in frameworks:
                continue
            row: Dict[str, Any] = {
                "framework": framework, "variant": variant, "workload": wname, "tensors": len(shapes),
                "numel": numel, "native_s": None, "ours_s": None, "speedup": None, "goal": GOALS.get(wname),
                "status": "ok", "detail": "",
            }
            out.append(row)
            try:
                native_cls, ours_cls = _classes(framework)
            except Exception as exc:  # noqa: BLE001 - a missing or broken framework skips its rows
                row["status"], row["detail"] = "skipped", f"{framework} not usable: {exc}"
                log(f"{variant} on {wname}: skipped ({exc})")
                continue
            try:
                steps = {"native": _stepper(framework, native_cls, model, kwargs),
                         "ours": _stepper(framework, ours_cls, model, kwargs)}
                timers = {k: BlockTimer(s, device, block_time) for k, s in steps.items()}
                times: Dict[str, List[float]] = {k: [] for k in timers}
                keys = list(timers)
                for r in range(rounds):  # interleaved, the order alternating
                    for k in keys[r % 2:] + keys[:r % 2]:
                        times[k].append(timers[k].block())
                sync(device)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other rows
                row["status"], row["detail"] = "failed", f"{type(exc).__name__}: {exc}"
                log(f"{variant} on {wname}: failed ({exc})")
                continue
            row["native_s"] = statistics.median(times["native"])
            row["ours_s"] = statistics.median(times["ours"])
            row["speedup"] = row["native_s"] / row["ours_s"]
            log(f"{variant:<24} {wname:<10} native {fmt_time(row['native_s']):>10}  ours "
                f"{fmt_time(row['ours_s']):>10}  {fmt_x(row['speedup'])}")
            del steps, timers
    return out


def table(result: Sequence[Dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| framework class | workload | tensors | native / step | ema_cuda drop-in / step | speedup | goal |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['workload']} | {r['tensors']:,} | {r['status']}: {r['detail']} "
                         "| | | |")
            continue
        goal = "-" if r["goal"] is None else f">= {r['goal']:g}x " + ("met" if r["speedup"] >= r["goal"] else "MISSED")
        lines.append(f"| {r['variant']} | {r['workload']} | {r['tensors']:,} | {fmt_time(r['native_s'])} | "
                     f"{fmt_time(r['ours_s'])} | {fmt_x(r['speedup'])} | {goal} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (same sizes)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ema_cuda

    print(f"ema_cuda backend {ema_cuda.ops.backend()}, torch {torch.__version__}, {args.threads} threads")
    result = rows(args.quick, device=args.device, log=print)
    print()
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
