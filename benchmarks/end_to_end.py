"""End to end: the share of a small CNN's SGD training step spent in the EMA update, SG loop vs fused."""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, Dict

import torch
from torch import nn

import ema_cuda
from benchmarks.methods import FUSED, Skip, model_ema_class, sg_update
from benchmarks.report import fmt_time
from benchmarks.timing import count_cuda_launches, sync


class SmallCNN(nn.Module):
    """A CIFAR-sized CNN (4.3M parameters and BN buffers) for the end-to-end run."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128 * 8 * 8, 512), nn.ReLU(), nn.Linear(512, classes))

    def forward(self, x):
        return self.head(self.features(x))


def run_end_to_end(
    device: torch.device,
    steps: int,
    batch: int,
    decay: float,
    log: Callable[[str], None] = print,
    model_fn: Callable[[], nn.Module] = SmallCNN,
) -> Dict[str, Any]:
    """Share of an SGD training step spent in the EMA update: none vs SG loop vs fused.

    ``model_fn`` builds the model (input ``[batch, 3, 32, 32]``, 10 classes).
    """
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    out: Dict[str, Any] = {"model": getattr(model_fn, "__name__", "model"), "batch": batch, "steps": steps,
                           "variants": {}}
    warmup = min(3, steps)

    def make_sg(model, ema_model):
        return lambda: sg_update(ema_model, model, decay)

    def make_fused(model, ema_model):
        msd = model.state_dict(keep_vars=True)
        pairs = [(v, msd[k]) for k, v in ema_model.state_dict(keep_vars=True).items() if v.dtype.is_floating_point]
        updater = ema_cuda.FusedUpdater([e for e, _ in pairs], [m.detach() for _, m in pairs])
        return lambda: updater.update(decay)

    def make_model_ema(model, ema_model):
        cls, why = model_ema_class()
        if cls is None:
            raise Skip(why)
        obj = cls.from_params(model, decay=decay, decay_type="constant")
        counter = [0]

        def update():
            counter[0] += 1
            obj.update(model, counter[0], 10**9)
        return update

    variants = [("none", "no EMA", None), ("sg_loop", "SG loop", make_sg), (FUSED, "FusedUpdater", make_fused),
                ("model_ema", "ModelEMA.update", make_model_ema)]
    live = []
    for key, label, make in variants:
        torch.manual_seed(0)
        model = model_fn().to(device)
        ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        try:
            update = make(model, ema_model) if make else None
        except Skip as exc:
            out["variants"][key] = {"label": label, "status": "skipped", "detail": str(exc)}
            log(f"  {label:<16} skipped: {exc}")
            continue
        live.append((key, label, model, opt, update, [], []))

    # Interleaved, one step of each variant in turn, so that load from
    # elsewhere on the machine falls on all variants alike.
    for i in range(steps + warmup):
        for key, label, model, opt, update, step_times, ema_times in live:
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(device)
            t1 = time.perf_counter()
            if update is not None:
                update()
                sync(device)
            t2 = time.perf_counter()
            if i >= warmup:
                step_times.append(t2 - t0)
                ema_times.append(t2 - t1)
    for key, label, model, opt, update, step_times, ema_times in live:
        step = statistics.median(step_times)
        ema_t = statistics.median(ema_times)
        rec = {"label": label, "status": "ok", "step_s": step, "ema_s": ema_t, "ema_share": ema_t / step}
        extra = ""
        if device.type == "cuda" and update is not None:
            # With BatchNorm's integer buffers in the model: the SG loop
            # launches per tensor, the fused update once.
            rec.update(count_cuda_launches(update, device))
            extra = f", {rec['launches']:g} launches"
        out["variants"][key] = rec
        log(f"  {label:<16} step {fmt_time(step):>10}, EMA {fmt_time(ema_t):>10} ({100 * ema_t / step:4.1f}% of "
            f"the step){extra}")
    n_params = sum(p.numel() for p in model_fn().state_dict().values() if p.dtype.is_floating_point)
    out["ema_elements"] = n_params
    return out
