"""Per-step EMA cost inside Lightning: EMACallback against Lightning's EMAWeightAveraging.

What is timed is the callback's update hook, ``on_train_batch_end`` called
right after an optimizer step (``trainer.global_step`` advanced), which is
where both callbacks do all their per-step work; the training step around it
is the same for both and left out, so the figures are the EMA's own cost.
The model is a LightningModule whose parameters have the shapes of a
workload (fp32): ResNet-50's 161 tensors (25.6M elements) and 10,000
tensors of 1,000 elements.  Both callbacks use decay 0.9999 at every step;
the hook calls alternate (ours, theirs, ours, ...) so that a machine whose
load changes slows both alike.  Medians over the steps.

    python -m benchmarks.fw_lightning [--quick] [--device cuda]

:func:`rows` returns the figures for ``make bench``.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from benchmarks.workloads import get_workload

Shape = Tuple[int, ...]
DECAY = 0.9999


def default_workloads() -> Dict[str, List[Shape]]:
    return {"resnet50": get_workload("resnet50").shapes, "10k x 1k": get_workload("small").shapes}


def _module(shapes: Sequence[Shape], device: torch.device):
    import lightning as L

    class Params(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.params = nn.ParameterList([nn.Parameter(torch.randn(s, device=device)) for s in shapes])

    return Params()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(shapes: Sequence[Shape], device: torch.device, steps: int, warmup: int = 3) -> Dict[str, float]:
    """Median seconds of one update hook call for each callback, on a model of ``shapes``."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from ema_cuda.integrations.lightning import EMACallback

    model = _module(shapes, device)
    # The hooks read only these attributes of the trainer.
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=10**9, strategy=None)
    ours = EMACallback(decay=DECAY)
    theirs = EMAWeightAveraging(decay=DECAY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the horizon warning of a short run: irrelevant to a timing
        ours.on_fit_start(trainer, model)
        theirs.setup(trainer, model, "fit")
    times: Dict[str, List[float]] = {"ours": [], "lightning": []}
    for i in range(warmup + steps):
        trainer.global_step += 1
        for name, cb in (("ours", ours), ("lightning", theirs)):
            _sync(device)
            t0 = time.perf_counter()
            cb.on_train_batch_end(trainer, model, None, None, 0)
            _sync(device)
            if i >= warmup:  # the first update of EMAWeightAveraging is a copy, and both warm caches
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def rows(quick: bool, workloads: Optional[Dict[str, List[Shape]]] = None, steps: Optional[int] = None,
         device: Optional[str] = None) -> List[Dict]:
    """One row per workload: ``framework``, ``workload``, ``tensors``, ``numel``, ``ours_ms``,
    ``lightning_ms`` (median per-step hook time) and ``speedup`` (lightning / ours)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = steps or (10 if quick else 40)
    out = []
    for name, shapes in (workloads or default_workloads()).items():
        t = measure(shapes, dev, steps)
        out.append({
            "framework": "lightning", "workload": name, "device": str(dev), "tensors": len(shapes),
            "numel": sum(int(torch.Size(s).numel()) for s in shapes), "steps": steps,
            "ours_ms": t["ours"] * 1e3, "lightning_ms": t["lightning"] * 1e3,
            "speedup": t["lightning"] / t["ours"],
        })
    return out


def table(rows_: List[Dict]) -> str:
    lines = ["| workload | device | tensors | elements | EMACallback | EMAWeightAveraging | speedup |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows_:
        lines.append(f"| {r['workload']} | {r['device']} | {r['tensors']} | {r['numel'] / 1e6:.1f}M | "
                     f"{r['ours_ms']:.2f} ms | {r['lightning_ms']:.2f} ms | {r['speedup']:.1f}x |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per workload")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    print("per-step EMA cost in Lightning (median time of the update hook, decay 0.9999, fp32)")
    print(table(rows(args.quick, steps=args.steps, device=args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
