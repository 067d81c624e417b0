"""Writes the compatibility fixtures of tests/test_compat_fixtures.py into this directory.

The committed files were written by ema_cuda before the EMA layer became the
``ema_cuda.ema`` package (when it was the single module ``ema_cuda/ema.py``),
so they hold what users' files of that time hold: a saved
``ModelEMA.state_dict()``, a training checkpoint written by
``ema_cuda.checkpoint.save_checkpoint``, and whole EMA objects saved with
``torch.save`` (pickles of the old attribute layout).  For each EMA,
``expected_v1.pt`` records the state_dict it reaches after
``CONTINUE_STEPS`` more updates on the old code, so a test can tell that the
new code continues it identically.

Do not regenerate them to make a test pass: they are the old format.  Run
``python tests/data/make_fixtures.py`` from the repository root only to add a
fixture for a new format (with a new file name).  Only torch.nn modules and
ema_cuda classes are pickled, so loading needs no test module.
"""
from __future__ import annotations

import os
from typing import Dict

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
CONTINUE_STEPS = 3
TOTAL = 20


def make_model(seed: int = 0) -> nn.Module:
    """A tiny conv net with every kind of entry: weights, BatchNorm statistics, an integer buffer."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))


def make_kd(seed: int = 0) -> nn.Module:
    from ema_cuda.training.kd import KDModule

    return KDModule(make_model(seed), make_model(seed + 1))


def train_step(model: nn.Module, step: int) -> None:
    """A deterministic stand-in for an optimizer step: move every parameter, let BatchNorm see a batch."""
    gen = torch.Generator().manual_seed(1000 + step)
    net = getattr(model, "student", model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        was = net.training
        net.train()
        net(torch.randn(2, 3, 4, 4, generator=gen))
        net.train(was)


def snapshot(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run(ema, model: nn.Module, start: int, stop: int) -> None:
    for step in range(start, stop):
        train_step(model, step)
        if ema.capturable:
            ema.update(model)
        else:
            ema.update(model, step, TOTAL)


def main() -> None:
    from ema_cuda import KDModelEMA, ModelEMA
    from ema_cuda.checkpoint import save_checkpoint
    from ema_cuda.ema_decay_schedules import ExpDecay, ThresholdDecay

    # (a) a state_dict after a few updates, and the model it was taken with.
    model = make_model()
    ema = ModelEMA.from_params(model, decay=0.9, decay_type="threshold")
    run(ema, model, 1, 5)
    torch.save({"state": ema.state_dict(), "model": snapshot(model), "next_step": 5},
               os.path.join(HERE, "model_ema_state_v1.pt"))

    # (b) a training checkpoint as the Trainer writes it (net, ema_net, ema_state, epoch).
    save_checkpoint({"net": model.state_dict(), "ema_net": ema.ema.state_dict(), "ema_state": ema.state_dict(),
                     "epoch": 1}, os.path.join(HERE, "checkpoint_v1.pth"))

    # What that EMA reaches after CONTINUE_STEPS more updates.
    run(ema, model, 5, 5 + CONTINUE_STEPS)
    from ema_cuda import ops

    # The backends agree to rounding, not bit for bit: the file says which one wrote it.
    expected = {"state_dict": ema.state_dict(), "backend": ops.backend()}

    # (c) whole EMA objects (pickles of the old layout), each with the model it
    # follows and the EMA it reaches after CONTINUE_STEPS more updates.
    cases = {
        "model_ema": (make_model(), lambda m: ModelEMA(m, 0.9, ThresholdDecay(), buffers="copy",
                                                       update_every=1, skip_nonfinite=True)),
        "capturable": (make_model(), lambda m: ModelEMA(m, 0.9, ExpDecay(beta=5), capturable=True,
                                                        total_steps=TOTAL, ema_dtype=torch.float64)),
        "kd": (make_kd(), lambda m: KDModelEMA(m, 0.9, ThresholdDecay())),
    }
    for name, (model, build) in cases.items():
        ema = build(model)
        run(ema, model, 1, 5)
        torch.save({"ema": ema, "model": model, "next_step": 5}, os.path.join(HERE, f"pickled_{name}_v1.pt"))
        run(ema, model, 5, 5 + CONTINUE_STEPS)
        expected[name] = ema.state_dict()
    torch.save(expected, os.path.join(HERE, "expected_v1.pt"))


if __name__ == "__main__":
    main()
