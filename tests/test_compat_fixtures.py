"""Files written by an earlier ema_cuda still load and continue exactly (fixtures in tests/data).

``tests/data/make_fixtures.py`` wrote them with the single-module EMA of that
time: a ``state_dict``, a training checkpoint and whole pickled EMA objects.
Each must continue, update after update, exactly as that code continued it
(``expected_v1.pt``) and as a fresh EMA loaded from the same state does.
"""
import copy
import importlib.util
import io
import os

import pytest
import torch

from ema_cuda import KDModelEMA, ModelEMA, ops
from ema_cuda.checkpoint import load_checkpoint, load_checkpoint_to_model
from ema_cuda.ema_decay_schedules import ConstantDecay, ExpDecay, ThresholdDecay
from support import RecordingStreams
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

_spec = importlib.util.spec_from_file_location("ema_cuda_fixtures", os.path.join(DATA, "make_fixtures.py"))
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)


def expected():
    return torch.load(os.path.join(DATA, "expected_v1.pt"), weights_only=True)


# Bit for bit when this backend wrote the fixtures.
EXACT = expected()["backend"] == ops.backend()


def assert_same_state(got, want, exact=True):
    """Two EMA state_dicts agree: every option and counter, and every weight bit for bit (``exact``) or to
    rounding (the fixtures' values from the other backend: the fallback rounds like ``lerp``, the kernel
    like ``fma``)."""
    assert got.keys() == want.keys()
    assert got["ema"].keys() == want["ema"].keys()
    for key, v in want["ema"].items():
        assert got["ema"][key].dtype == v.dtype, key
        if exact or not v.is_floating_point():
            assert torch.equal(got["ema"][key], v), key
        else:
            torch.testing.assert_close(got["ema"][key], v, rtol=1e-6, atol=1e-7, msg=key)
    for key in want:
        if key != "ema":
            assert got[key] == want[key], key


def continue_run(ema, model, start):
    fixtures.run(ema, model, start, start + fixtures.CONTINUE_STEPS)


def test_a_saved_state_dict_loads_and_continues_as_before():
    saved = torch.load(os.path.join(DATA, "model_ema_state_v1.pt"), weights_only=True)
    model = fixtures.make_model(seed=3)  # other initial weights, another schedule: all come from the state
    model.load_state_dict(saved["model"])
    ema = ModelEMA(fixtures.make_model(seed=4), 0.5, ConstantDecay())
    with pytest.warns(UserWarning, match="replaces the current"):
        ema.load_state_dict(saved["state"])
    assert isinstance(ema.decay_function, ThresholdDecay) and ema.decay == 0.9 and ema.num_updates == 4
    continue_run(ema, model, saved["next_step"])
    assert_same_state(ema.state_dict(), expected()["state_dict"], EXACT)


def test_a_training_checkpoint_resumes_as_before(tmp_path):
    path = os.path.join(DATA, "checkpoint_v1.pth")
    ckpt = load_checkpoint(path)  # the digest of the old file still verifies
    assert ckpt["epoch"] == 1
    model = fixtures.make_model(seed=5)
    load_checkpoint_to_model(model, path)  # `net`: the raw weights
    ema = ModelEMA.from_params(model, decay=0.9, decay_type="threshold")
    ema.load_state_dict(ckpt["ema_state"])
    for key, v in ckpt["ema_net"].items():
        assert torch.equal(ema.ema.state_dict()[key], v), key
    continue_run(ema, model, 5)
    assert_same_state(ema.state_dict(), expected()["state_dict"], EXACT)
    # The EMA weights alone load into a bare model (models.get's path).
    bare = fixtures.make_model(seed=6)
    load_checkpoint_to_model(bare, path, load_ema_as_net=True)
    for key, v in ckpt["ema_net"].items():
        assert torch.equal(bare.state_dict()[key], v), key


def _fresh(name, model):
    """A new EMA of ``model`` built with the pickled one's options (its values then come from load_state_dict)."""
    if name == "model_ema":
        return ModelEMA(model, 0.5, ThresholdDecay(), buffers="copy", skip_nonfinite=True)
    if name == "capturable":
        return ModelEMA(model, 0.5, ExpDecay(beta=5), capturable=True, total_steps=fixtures.TOTAL,
                        ema_dtype=torch.float64)
    return KDModelEMA(model, 0.5, ThresholdDecay())


def _load_pickle(name):
    return torch.load(os.path.join(DATA, f"pickled_{name}_v1.pt"), weights_only=False)


@pytest.mark.parametrize("name", ["model_ema", "capturable", "kd"])
def test_a_pickled_ema_of_the_old_layout_continues_as_before_and_as_a_fresh_one(name):
    blob = _load_pickle(name)
    ema, model, start = blob["ema"], blob["model"], blob["next_step"]
    assert type(ema) is (KDModelEMA if name == "kd" else ModelEMA)
    # Unpickling restores the flat layout: the floating EMA tensors are views of one buffer per dtype.
    covered = ema.ema.student if name == "kd" else ema.ema
    floating = [t for t in covered.state_dict().values() if t.is_floating_point()]
    assert len({t.untyped_storage().data_ptr() for t in floating}) == 1
    if name == "kd":
        assert ema.ema.teacher is model.teacher  # still shared with the training module, not copied

    twin_model = copy.deepcopy(model)
    fresh = _fresh(name, twin_model)
    fresh.load_state_dict(ema.state_dict())

    continue_run(ema, model, start)
    continue_run(fresh, twin_model, start)
    want = expected()[name]
    assert_same_state(ema.state_dict(), want, EXACT)
    assert_same_state(fresh.state_dict(), ema.state_dict())


@pytest.mark.parametrize("name", ["model_ema", "capturable", "kd"])
def test_an_unpickled_ema_pickles_and_copies_again(name):
    blob = _load_pickle(name)
    buf = io.BytesIO()
    torch.save(blob, buf)  # the current layout, written from an object of the old one
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    copied = copy.deepcopy(blob)
    for b in (again, copied):
        continue_run(b["ema"], b["model"], b["next_step"])
        assert_same_state(b["ema"].state_dict(), expected()[name], EXACT)


def test_a_pickled_async_ema_of_the_old_layout_gets_its_own_executor_and_continues(monkeypatch):
    # Its ema.ema carries the old forward pre-hook class (ema_cuda.ema._WaitHook); the stream API is run on
    # the host here, recording what is asked of it (the fixture was made on the host too).
    from ema_cuda.ema.executors import SideStreamExecutor, WaitHook

    streams = RecordingStreams()
    monkeypatch.setattr(SideStreamExecutor, "default_streams", streams)
    blob = torch.load(os.path.join(DATA, "pickled_async_v1.pt"), weights_only=False)
    ema, model = blob["ema"], blob["model"]
    hooks = [h for h in ema.ema._forward_pre_hooks.values() if isinstance(h, WaitHook)]
    assert ema.async_update and len(hooks) == 1
    continue_run(ema, model, blob["next_step"])
    # The loaded EMA's side stream ran the updates, and a forward pass of ema.ema waits for the last one.
    assert ("wait_stream", "side", "main") in streams.log
    streams.log.clear()
    with torch.no_grad():
        ema.ema(torch.randn(2, 3, 4, 4))  # the fixtures' model takes 3x4x4 images
    assert streams.log == [("wait_event", "main", streams.events)]
    want = torch.load(os.path.join(DATA, "expected_async_v1.pt"), weights_only=True)["async"]
    assert_same_state(ema.state_dict(), want, EXACT)
