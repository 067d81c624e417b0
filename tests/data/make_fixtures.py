"""Writes the compatibility fixtures of tests/test_compat_fixtures.py into this directory.

The committed files were written by ema_cuda before the EMA layer became the
``ema_cuda.ema`` package (when it was the single module ``ema_cuda/ema.py``),
so they hold what users' files of that time hold: a saved
``ModelEMA.state_dict()``, a training checkpoint written by
``ema_cuda.checkpoint.save_checkpoint``, and whole EMA objects saved with
``torch.save`` (pickles of the old attribute layout, one of them an
``async_update`` EMA made on the host with :class:`HostStreams`).  For each
EMA, ``expected_v1.pt`` (``expected_async_v1.pt``) records the state_dict it
reaches after ``CONTINUE_STEPS`` more updates on the old code, so a test can
tell that the new code continues it identically.

They are the old format: do not regenerate them.  This script ran on the
single-module code (``python tests/data/make_fixtures.py`` from the root of
such a checkout; the asynchronous case replaces that module's ``_STREAMS``);
the tests import its model, steps and :class:`HostStreams`.  Only torch.nn
modules and ema_cuda classes are pickled, so loading needs no test module.
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


class HostStreams:
    """The stream API of the asynchronous update, run on the host at once: lets an ``async_update`` EMA be
    built, pickled and loaded on a CPU (the real streams need CUDA)."""

    class _Stream:
        def wait_stream(self, other: object) -> None:
            pass

        def wait_event(self, event: object) -> None:
            pass

    class _Event:
        def record(self, stream: object) -> None:
            pass

    def supports(self, device: torch.device) -> bool:
        return True

    def side_stream(self, device: torch.device) -> object:
        return self._Stream()

    def current_stream(self, device: torch.device) -> object:
        return self._Stream()

    def stream(self, stream: object) -> object:
        import contextlib

        return contextlib.nullcontext()

    def new_event(self) -> object:
        return self._Event()

    def record_stream(self, tensor: torch.Tensor, stream: object) -> None:
        pass


def write_async_fixture() -> None:
    """An ``async_update`` EMA pickled by the single-module EMA (its module global ``_STREAMS`` replaced by
    :class:`HostStreams`): its ``ema.ema`` carries the old forward pre-hook class ``ema_cuda.ema._WaitHook``."""
    import ema_cuda.ema as single_module
    from ema_cuda import ModelEMA
    from ema_cuda.ema_decay_schedules import ThresholdDecay

    single_module._STREAMS = HostStreams()
    model = make_model()
    ema = ModelEMA(model, 0.9, ThresholdDecay(), async_update=True)
    run(ema, model, 1, 5)
    torch.save({"ema": ema, "model": model, "next_step": 5}, os.path.join(HERE, "pickled_async_v1.pt"))
    run(ema, model, 5, 5 + CONTINUE_STEPS)
    torch.save({"async": ema.state_dict()}, os.path.join(HERE, "expected_async_v1.pt"))


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
    write_async_fixture()


if __name__ == "__main__":
    main()
