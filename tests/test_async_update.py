"""ModelEMA(async_update=True): the parameter update on a side stream, and every synchronisation it needs.

The stream bookkeeping is checked on the CPU with a recording stand-in for
the CUDA stream API (the same code paths call it); the tests at the end run
the real thing and need a GPU (skipped without one)."""
import copy
import gc

import pytest
import torch
from torch.optim.optimizer import _global_optimizer_pre_hooks

from ema_cuda import ModelEMA, ops
from ema_cuda.ema.executors import SideStreamExecutor, WaitHook
from ema_cuda.ema_decay_schedules import ConstantDecay, ThresholdDecay
from conftest import requires_cuda
from support import N_FEATURES, Net, RecordingStreams, seeded
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)


def make_net(seed=0):
    # No dropout: the runs compared here must take the same steps.
    return seeded(Net, seed, dropout=0.0)


@pytest.fixture
def fake(monkeypatch):
    """The EMA's stream API replaced by a recording one (see ``RecordingStreams``); ``calls`` records, per
    fused update, the stream it ran on and how many tensors it averaged."""
    streams = RecordingStreams()
    monkeypatch.setattr(SideStreamExecutor, "default_streams", streams)
    calls = []
    update = ops.FusedUpdater.update

    def recording_update(self, decay):
        calls.append((streams.active.name, len(self.ema)))
        return update(self, decay)

    monkeypatch.setattr(ops.FusedUpdater, "update", recording_update)
    streams.calls = calls
    return streams


def train_step(model, opt, seed):
    gen = torch.Generator().manual_seed(seed)
    model.train()
    model(torch.randn(5, N_FEATURES, generator=gen)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def waits_of_an_optimizer_step(fake):
    """What the current stream is made to wait for at an optimizer step now (the EMAs' step pre-hook)."""
    fake.log.clear()
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0).step()
    return list(fake.log)


def test_async_update_needs_cuda_and_excludes_capturable():
    with pytest.raises(ValueError, match="async_update needs the EMA on a CUDA device, it is on cpu"):
        ModelEMA(make_net(), 0.9, ConstantDecay(), async_update=True)
    with pytest.raises(ValueError, match="exclusive"):
        ModelEMA(make_net(), 0.9, ConstantDecay(), async_update=True, capturable=True)


def test_parameters_go_to_the_side_stream_after_it_waits_and_buffers_stay(fake):
    model = make_net()
    ref_model = copy.deepcopy(model)
    ema = ModelEMA(model, 0.9, ThresholdDecay(), async_update=True)
    ref = ModelEMA(ref_model, 0.9, ThresholdDecay())
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref_model))
    for step in range(1, 4):
        train_step(model, opt, step)
        train_step(ref_model, ref_opt, step)
        fake.log.clear()
        fake.calls.clear()
        ema.update(model, step, 10)
        ref.update(ref_model, step, 10)
        # The side stream waits for the current one (the optimizer's writes),
        # updates the parameters, and an event marks the end of that work.
        assert fake.log == [("wait_stream", "side", "main"), ("record", fake.events, "side")]
        n_params = len(list(model.parameters()))
        assert ("side", n_params) in fake.calls
        # BatchNorm's running statistics (written by the next forward pass) on the current stream.
        assert ("main", 2) in fake.calls
        # An update in flight, which the next step of any optimizer waits for (this EMA's step pre-hook).
        assert waits_of_an_optimizer_step(fake) == [("wait_event", "main", fake.events)]
    ema.wait()
    for key, v in ref.ema.state_dict().items():
        assert torch.equal(ema.ema.state_dict()[key], v), key
    # Each side-stream tensor was registered with the allocator once, not per update.
    assert len(fake.recorded) == 2 * n_params and {s for _, s in fake.recorded} == {"side"}


READS = {
    "swapped": lambda ema, model: ema.swapped(model).__enter__(),
    "copy_to": lambda ema, model: ema.copy_to(model),
    "state_dict": lambda ema, model: ema.state_dict(),
    "load_state_dict": lambda ema, model: ema.load_state_dict(copy.deepcopy(ModelEMA(model, 0.9, ConstantDecay()).state_dict())),
    "forward of ema.ema": lambda ema, model: ema.ema(torch.randn(2, N_FEATURES)),
}


@pytest.mark.parametrize("read", list(READS))
def test_every_read_of_the_ema_waits_for_the_update_in_flight(fake, read):
    model = make_net()
    ema = ModelEMA(model, 0.9, ConstantDecay(), async_update=True)
    ema.update(model, 1, 10)
    event = fake.events
    fake.log.clear()
    READS[read](ema, model)
    assert fake.log[0] == ("wait_event", "main", event)
    assert waits_of_an_optimizer_step(fake) == []  # nothing left for the optimizer step pre-hook to wait for
    fake.log.clear()
    ema.wait()  # nothing in flight any more: nothing to wait for
    assert fake.log == []


def test_the_next_optimizer_step_waits_for_the_update(fake):
    model = make_net()
    ema = ModelEMA(model, 0.9, ConstantDecay(), async_update=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen_at_step = []
    opt.register_step_pre_hook(lambda *a: seen_at_step.append(list(fake.log)))
    train_step(model, opt, 1)
    ema.update(model, 1, 10)
    event = fake.events
    fake.log.clear()
    train_step(model, opt, 2)
    # The wait was issued before the step (the global pre-hook runs before the optimizer's own).
    assert seen_at_step[-1] == [("wait_event", "main", event)]
    fake.log.clear()
    ema.wait()  # that wait took the update in flight: nothing is left to wait for
    assert fake.log == []


def test_the_optimizer_hook_goes_with_its_ema(fake):
    before = set(_global_optimizer_pre_hooks)
    ema = ModelEMA(make_net(), 0.9, ConstantDecay(), async_update=True)
    added = set(_global_optimizer_pre_hooks) - before
    assert len(added) == 1  # the EMA's optimizer step pre-hook
    del ema
    gc.collect()
    assert not added & set(_global_optimizer_pre_hooks)


def test_a_copy_of_an_async_ema_waits_for_its_own_updates(fake):
    model = make_net()
    ema = ModelEMA(model, 0.9, ConstantDecay(), async_update=True)
    ema.update(model, 1, 10)
    original_event = fake.events
    twin = copy.deepcopy(ema)
    # Nothing in flight for the copy: neither it nor its module waits for the original's update.
    fake.log.clear()
    twin.wait()
    twin.ema(torch.randn(2, N_FEATURES))
    assert fake.log == []
    hooks = [h for h in twin.ema._forward_pre_hooks.values() if isinstance(h, WaitHook)]
    assert len(hooks) == 1  # the copied module's hook was replaced, not kept beside the copy's own
    fake.log.clear()
    twin.update(model, 2, 10)
    # On a side stream of its own, made for it.
    assert fake.log == [("wait_stream", "side2", "main"), ("record", fake.events, "side2")]
    fake.log.clear()
    twin.ema(torch.randn(2, N_FEATURES))
    assert fake.log == [("wait_event", "main", fake.events)]
    fake.log.clear()
    ema.wait()  # the original's update is still its own to wait for
    assert fake.log == [("wait_event", "main", original_event)]


# ---------------------------------------------------------------- on a GPU


def _delay_side_stream(ema, cycles=50_000_000):
    """Queues a long sleep on the EMA's side stream, so that a missing wait shows up as a wrong result."""
    with torch.cuda.stream(ema._executor.side_stream()):
        torch.cuda._sleep(cycles)


@requires_cuda
def test_async_update_on_gpu_matches_sync_and_the_optimizer_waits():
    model = make_net().cuda()
    ref_model = copy.deepcopy(model)
    ema = ModelEMA(model, 0.9, ThresholdDecay(), async_update=True)
    ref = ModelEMA(ref_model, 0.9, ThresholdDecay())
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, ref_model))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for step in range(1, 8):
        x = torch.randn(64, N_FEATURES, device="cuda", generator=gen)
        for m, o, e in ((model, opt, ema), (ref_model, ref_opt, ref)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
            if e is ema:
                _delay_side_stream(ema)  # the update starts late; the next step must not overtake it
            e.update(m, step, 8)
    torch.cuda.synchronize()
    for key, v in ref.ema.state_dict().items():
        # A race (the optimizer overtaking the delayed update) would be off by a whole step of lr=0.5.
        torch.testing.assert_close(ema.ema.state_dict()[key], v, rtol=1e-5, atol=1e-6, msg=key)


@requires_cuda
def test_state_dict_after_an_async_update_holds_the_update():
    model = make_net().cuda()
    ema = ModelEMA(model, 0.5, ConstantDecay(), async_update=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    expected = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    for name, p in model.named_parameters():
        expected[name] = expected[name] * 0.5 + p.detach() * 0.5
    _delay_side_stream(ema)
    ema.update(model, 1, 10)
    saved = {k: v.cpu() for k, v in ema.state_dict()["ema"].items()}  # copied on the current stream
    for name, _ in model.named_parameters():
        torch.testing.assert_close(saved[name], expected[name].cpu(), msg=name)
