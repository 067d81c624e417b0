"""The Trainer's TensorBoard events, read back with TensorBoard's own reader: per-batch loss and learning
rate, the decay of each EMA update, raw and EMA validation metrics side by side, resume without duplicate
steps, closing after a failure, and the ``tensorboard`` training param."""
import copy
import logging
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from ema_cuda.training import Trainer, parse_training_params
from ema_cuda.training.logs import TENSORBOARD_DIR
from support import Net, loaders, require_package
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)

BATCHES = 5  # 40 samples in batches of 8


def _params(**kw):
    p = {"max_epochs": 2, "initial_lr": 0.1, "ema": True, "ema_params": {"decay": 0.8, "decay_type": "constant"},
         "progress_bar": False, "silent_mode": True, "device": "cpu"}
    p.update(kw)
    return p


def _read(run_dir, run):
    require_package("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR / run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _train(tmp_path, name="tb", model=None, **kw):
    torch.manual_seed(0)
    trainer = Trainer(name, ckpt_root_dir=tmp_path)
    train, valid = loaders()
    trainer.train(model or Net(), _params(**kw), train, valid)
    return trainer


def test_scalars_of_a_run_with_ema(tmp_path):
    trainer = _train(tmp_path)
    raw, ema = _read(trainer.checkpoints_dir, "raw"), _read(trainer.checkpoints_dir, "ema")
    steps = list(range(1, 2 * BATCHES + 1))
    assert [s for s, _ in raw["train/loss"]] == steps and [s for s, _ in raw["train/lr"]] == steps
    assert all(v == pytest.approx(0.1) for _, v in raw["train/lr"])
    assert ema["ema/decay"] == [(s, pytest.approx(0.8)) for s in steps]
    # Validation of both weights under one tag, in two runs: one chart (NOTE [raw and EMA side by side]).
    h = trainer.history
    assert raw["val/accuracy"] == [(BATCHES * (e + 1), pytest.approx(r["valid_raw_accuracy"])) for e, r in enumerate(h)]
    assert ema["val/accuracy"] == [(BATCHES * (e + 1), pytest.approx(r["valid_accuracy"])) for e, r in enumerate(h)]
    assert ema["val/loss"] == [(BATCHES * (e + 1), pytest.approx(r["valid_loss"])) for e, r in enumerate(h)]
    assert raw["train/epoch_loss"] == [(BATCHES * (e + 1), pytest.approx(r["train_loss"])) for e, r in enumerate(h)]
    assert "ema/decay" not in raw
    assert trainer._tensorboard is None  # closed


def test_the_batch_loss_is_the_one_trained_on(tmp_path):
    # One epoch of one batch: the logged loss is the cross entropy of the initial model on it.
    torch.manual_seed(0)
    model = Net(dropout=0.0)
    train, valid = loaders(batch_size=40)
    x, y = next(iter(train))
    want = F.cross_entropy(copy.deepcopy(model)(x), y).item()  # a copy: BatchNorm updates its statistics
    trainer = Trainer("one", ckpt_root_dir=tmp_path)
    train, valid = loaders(batch_size=40)
    trainer.train(model, _params(max_epochs=1, ema=False, ema_params={}), train, valid)
    raw = _read(trainer.checkpoints_dir, "raw")
    assert raw["train/loss"] == [(1, pytest.approx(want, rel=1e-6))]
    assert not (trainer.checkpoints_dir / TENSORBOARD_DIR / "ema").exists()  # no EMA: one run
    assert [s for s, _ in raw["val/accuracy"]] == [1]


def test_decay_per_update_under_accumulation_with_a_half_life(tmp_path):
    # Windows of two batches in epochs of five: updates at steps 2, 4, 5, 7, 9, 10 (the last window is short);
    # the half-life schedule applies the decay of the batches since the last update.
    trainer = _train(tmp_path, batch_accumulate=2, ema_params={"decay": 1 - 1e-9, "decay_type": "half_life",
                                                                "half_life": 4})
    decays = _read(trainer.checkpoints_dir, "ema")["ema/decay"]
    want = [(2, 2), (4, 2), (5, 1), (7, 2), (9, 2), (10, 1)]
    assert decays == [(s, pytest.approx(0.5 ** (k / 4))) for s, k in want]


def test_resume_writes_each_step_once(tmp_path):
    trainer = _train(tmp_path, name="resume", max_epochs=2)
    run_dir = trainer.checkpoints_dir
    shutil.copy(run_dir / "ckpt_latest.pth", tmp_path / "after_2.pth")
    with pytest.warns(RuntimeWarning, match="max_epochs=2"):
        _train(tmp_path, name="resume", max_epochs=3, resume=True)
    # As if the third epoch had been lost: resume again from the end of the second one.
    with pytest.warns(RuntimeWarning, match="max_epochs=2"):
        trainer = _train(tmp_path, name="resume", max_epochs=3, resume=True,
                         resume_path=str(tmp_path / "after_2.pth"))
    for run, tag in (("raw", "train/loss"), ("raw", "val/accuracy"), ("ema", "ema/decay"), ("ema", "val/accuracy")):
        steps = [s for s, _ in _read(run_dir, run)[tag]]
        assert steps == sorted(set(steps)), (run, tag, steps)
    raw = _read(run_dir, "raw")
    assert [s for s, _ in raw["train/loss"]] == list(range(1, 3 * BATCHES + 1))
    assert raw["val/accuracy"][-1] == (3 * BATCHES, pytest.approx(trainer.history[-1]["valid_raw_accuracy"]))


def test_a_new_run_replaces_the_events_of_an_earlier_one(tmp_path):
    _train(tmp_path, name="again", max_epochs=2)
    trainer = _train(tmp_path, name="again", max_epochs=1, overwrite=True)
    assert [s for s, _ in _read(trainer.checkpoints_dir, "raw")["train/loss"]] == list(range(1, BATCHES + 1))


def test_events_are_written_and_closed_when_training_fails(tmp_path):
    calls = []

    def failing_loss(outputs, targets):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return F.cross_entropy(outputs, targets)

    trainer = Trainer("fails", ckpt_root_dir=tmp_path)
    train, valid = loaders()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train(Net(), _params(loss=failing_loss), train, valid)
    assert trainer._tensorboard is None
    assert [s for s, _ in _read(trainer.checkpoints_dir, "raw")["train/loss"]] == [1, 2]


def test_off(tmp_path):
    trainer = _train(tmp_path, name="off", max_epochs=1, tensorboard=False)
    assert not (trainer.checkpoints_dir / TENSORBOARD_DIR).exists()


@pytest.fixture
def no_tensorboard(monkeypatch):
    # None in sys.modules makes the import raise ImportError, as when the package is not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_missing_tensorboard_with_true_is_an_error_before_any_work(no_tensorboard):
    with pytest.raises(ImportError, match="pip install tensorboard"):
        parse_training_params(_params(tensorboard=True))


def test_missing_tensorboard_by_default_is_one_info_line(no_tensorboard, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ema_cuda.training"):
        trainer = _train(tmp_path, name="none", max_epochs=1)
    lines = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert lines == ["TensorBoard logging is off: the tensorboard package is not installed (pip install tensorboard)"]
    assert not (trainer.checkpoints_dir / TENSORBOARD_DIR).exists()


@pytest.mark.parametrize("value", ["yes", 1, 0])
def test_bad_values_are_errors(value):
    with pytest.raises(ValueError, match="training param 'tensorboard'"):
        parse_training_params(_params(tensorboard=value))
