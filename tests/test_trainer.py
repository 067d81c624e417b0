"""Trainer / KDTrainer: EMA semantics (steps, validation, swap), checkpoints, resume, KD, params.

Everything runs on tiny synthetic data on the CPU so that the file finishes in
seconds on a 2-core machine.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ema_cuda import models
from ema_cuda.checkpoint import load_checkpoint
from ema_cuda.ema_decay_schedules import EMA_DECAY_FUNCTIONS, IDecayFunction
from ema_cuda.training import (
    KDLoss,
    KDOutput,
    KDTrainer,
    LRScheduler,
    MetricTracker,
    Trainer,
    TrainingParams,
    parse_training_params,
)
from ema_cuda.training.metrics import topk_correct
from support import N_CLASSES, N_FEATURES, Net, dataset, equal_nested, equal_states, loaders, state
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)


def _params(**kw):
    p = {
        "max_epochs": 2,
        "initial_lr": 0.2,
        "optimizer_params": {"momentum": 0.9},
        "ema": True,
        "ema_params": {"decay": 0.8, "decay_type": "constant"},
        "progress_bar": False,
        "silent_mode": True,
        "device": "cpu",
    }
    p.update(kw)
    if not p["ema"] and "ema_params" not in kw:
        del p["ema_params"]  # they would only draw the "no effect" warning
    return p


@torch.no_grad()
def _direct_eval(model, loader):
    """Loss and accuracy of ``model`` computed here, independently of the trainer."""
    was = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in loader:
        out = model(x)
        loss_sum += F.cross_entropy(out, y).item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    model.train(was)
    return loss_sum / n, correct / n


class RecordingDecay(IDecayFunction):
    """A constant decay that records every (step, total_steps) it is asked for."""

    calls = []
    model = None
    grads_none = []

    def __init__(self, **kwargs):
        pass

    def __call__(self, decay, step, total_steps):
        RecordingDecay.calls.append((step, total_steps))
        if RecordingDecay.model is not None:
            RecordingDecay.grads_none.append(all(p.grad is None for p in RecordingDecay.model.parameters()))
        return decay


@pytest.fixture
def recording_decay(monkeypatch):
    monkeypatch.setitem(EMA_DECAY_FUNCTIONS, "recording", RecordingDecay)
    RecordingDecay.calls = []
    RecordingDecay.grads_none = []
    RecordingDecay.model = None
    yield RecordingDecay
    RecordingDecay.model = None


# --------------------------------------------------------------------------- training params


def test_unknown_training_params_are_named_with_known_list(tmp_path):
    train, valid = loaders()
    with pytest.raises(ValueError) as exc:
        Trainer("x", tmp_path).train(Net(), _params(emma=True, foo_bar=1), train, valid)
    msg = str(exc.value)
    assert "'emma' (did you mean 'ema'?)" in msg and "'foo_bar'" in msg
    assert "Known training params:" in msg and "max_epochs" in msg and "batch_accumulate" in msg


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"lr_mode": "linear"}, "lr_mode"),
        ({"batch_accumulate": 0}, "batch_accumulate"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"optimizer": "Lion"}, "optimizer"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm"),
        ({"lr_warmup_epochs": 1, "lr_warmup_steps": 3}, "lr_warmup_epochs"),
        ({"ema": "yes"}, "'ema'"),
        ({"initial_lr": None}, "initial_lr"),
    ],
)
def test_invalid_values_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_training_params(_params(**bad))


def test_max_epochs_required_and_defaults():
    with pytest.raises(ValueError, match="max_epochs"):
        parse_training_params({"initial_lr": 0.1})
    p = parse_training_params({"max_epochs": 1, "initial_lr": 0.1})
    assert p.optimizer == "SGD" and p.ema is False and p.batch_accumulate == 1 and p.lr_mode == "constant"
    assert p.greater_is_better is True
    assert parse_training_params({"max_epochs": 1, "initial_lr": 0.1, "metric_to_watch": "loss"}).greater_is_better is False
    assert parse_training_params({"max_epochs": 1, "initial_lr": 0.1, "optimizer": "adamw"}).optimizer == "AdamW"
    # Every field is documented in the class docstring.
    for key in TrainingParams.known_keys():
        assert f"``{key}``" in TrainingParams.__doc__, key


def test_fp16_on_cpu_is_an_error(tmp_path):
    train, valid = loaders()
    with pytest.raises(ValueError, match="mixed_precision.*fp16.*CUDA"):
        Trainer("x", tmp_path).train(Net(), _params(mixed_precision="fp16"), train, valid)


def test_unknown_metric_to_watch(tmp_path):
    train, valid = loaders()
    with pytest.raises(ValueError, match="metric_to_watch.*'f1'.*accuracy"):
        Trainer("x", tmp_path).train(Net(), _params(metric_to_watch="f1", max_epochs=1), train, valid)


# --------------------------------------------------------------------------- EMA steps


@pytest.mark.parametrize("accumulate, expected", [(1, list(range(1, 11))), (2, [2, 4, 5, 7, 9, 10]), (3, [3, 5, 8, 10])])
def test_schedule_sees_sg_steps_and_total_steps(tmp_path, recording_decay, accumulate, expected):
    # 5 batches per epoch, 2 epochs: total_steps = 10 batches.  The step is the
    # 1-based global index of the batch that completes an optimizer step;
    # windows end at the epoch boundary (batch 5 and 10 close short windows).
    train, valid = loaders(batch_size=8)
    assert len(train) == 5
    model = Net()
    recording_decay.model = model
    trainer = Trainer("steps", tmp_path)
    steps_taken = []
    # Count optimizer steps on an optimizer instance handed to the trainer.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    real_step = optimizer.step

    def counted(*a, **k):
        steps_taken.append(len(steps_taken) + 1)
        return real_step(*a, **k)

    optimizer.step = counted
    params = _params(batch_accumulate=accumulate, ema_params={"decay": 0.9, "decay_type": "recording"},
                     optimizer=optimizer, initial_lr=None, optimizer_params={})
    trainer.train(model, params, train, valid)
    assert recording_decay.calls == [(s, 10) for s in expected]
    assert len(steps_taken) == len(expected)  # exactly one EMA update per optimizer step
    assert trainer.ema.num_updates == len(expected)
    # The update comes after optimizer.step() and zero_grad(set_to_none=True).
    assert all(recording_decay.grads_none)


def test_accumulated_gradients_are_averaged(tmp_path):
    # Without batch norm or dropout, two accumulated batches of 4 make the same
    # SGD step as one batch of 8 (up to float rounding).
    def run(batch_size, accumulate, name):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(N_FEATURES, 6), nn.Tanh(), nn.Linear(6, N_CLASSES))
        train = DataLoader(dataset(16), batch_size=batch_size, shuffle=False)
        valid = DataLoader(dataset(8, seed=1), batch_size=8)
        Trainer(name, tmp_path).train(
            model, _params(max_epochs=1, ema=False, batch_accumulate=accumulate, optimizer_params={}), train, valid
        )
        return state(model)

    a, b = run(8, 1, "big"), run(4, 2, "acc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- validation on EMA weights


class ProbingTrainer(Trainer):
    """Checks, at each epoch end, the logged metrics against direct evaluations."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.checked = 0

    def on_epoch_end(self, epoch, metrics):
        ema_loss, ema_acc = _direct_eval(self.ema.ema, self.valid_loader)
        raw_loss, raw_acc = _direct_eval(self.net, self.valid_loader)  # the raw weights are back
        assert metrics["valid_loss"] == pytest.approx(ema_loss, rel=1e-6)
        assert metrics["valid_accuracy"] == pytest.approx(ema_acc)
        assert metrics["valid_raw_loss"] == pytest.approx(raw_loss, rel=1e-6)
        assert metrics["valid_raw_accuracy"] == pytest.approx(raw_acc)
        assert abs(ema_loss - raw_loss) > 1e-4  # the two really are different weights
        self.checked += 1


def test_validation_uses_ema_weights(tmp_path):
    train, valid = loaders()
    trainer = ProbingTrainer("probe", tmp_path)
    trainer.train(Net(), _params(max_epochs=3), train, valid)
    assert trainer.checked == 3


class WatchingTrainer(Trainer):
    """Records what the model holds at each forward, and checks it at each epoch end, against the state before validation."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []  # per forward: "train", or in eval mode "raw" / "EMA" (the weights the model holds)
        self.before_validation = None
        self.checked = 0

    def watch(self, model):
        self.params_at_start = [(id(q), q.data_ptr()) for q in model.parameters()]

        # A closure, not a bound method: the EMA's deep copy of the model keeps
        # the hook, and copying a bound method would copy the trainer too.
        def pre_forward(module, args):
            if module.training:
                self.seen.append("train")
                return
            if self.seen[-1] == "train":  # an epoch's first evaluation: nothing has touched the model yet
                self.before_validation = state(module)
            self.seen.append("EMA" if equal_states(module, self.ema.ema) else "raw")

        model.register_forward_pre_hook(pre_forward)

    def on_epoch_end(self, epoch, metrics):
        assert equal_states(state(self.net), self.before_validation)
        assert [(id(q), q.data_ptr()) for q in self.net.parameters()] == self.params_at_start
        # The optimizer state is still attached to the very same parameters.
        assert all(q in self.optimizer.state for q in self.net.parameters())
        assert self.net.training
        self.checked += 1


def test_training_weights_restored_bit_exact_after_validation(tmp_path):
    train, valid = loaders()
    assert (len(train), len(valid)) == (5, 2)
    model = Net()
    trainer = WatchingTrainer("restore", tmp_path)
    trainer.watch(model)
    trainer.train(model, _params(max_epochs=2), train, valid)
    assert trainer.checked == 2
    # While being validated the model holds the raw weights, then the EMA's.
    assert trainer.seen == (["train"] * 5 + ["raw"] * 2 + ["EMA"] * 2) * 2


# --------------------------------------------------------------------------- end of training


def test_end_of_training_model_holds_ema_in_place_and_trains_again(tmp_path):
    train, valid = loaders()
    model = Net()
    ids = [(id(q), q.data_ptr()) for q in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer("swap", tmp_path)
    trainer.train(model, _params(optimizer=optimizer, initial_lr=None, optimizer_params={}), train, valid)

    assert [(id(q), q.data_ptr()) for q in model.parameters()] == ids
    assert equal_states(state(model), state(trainer.ema.ema))
    latest = load_checkpoint(tmp_path / "swap" / "ckpt_latest.pth")
    assert equal_states(latest["ema_net"], state(model))
    assert not equal_states(latest["net"], state(model))  # the raw weights stay in the checkpoint
    assert all(q in optimizer.state for q in model.parameters())

    # A second train() on the same model and optimizer starts from the EMA weights and works.
    start = state(model)
    trainer2 = Trainer("swap2", tmp_path)
    trainer2.train(model, _params(optimizer=optimizer, initial_lr=None, optimizer_params={}), train, valid)
    assert [(id(q), q.data_ptr()) for q in model.parameters()] == ids
    assert not equal_states(state(model), start)
    assert equal_states(state(model), state(trainer2.ema.ema))
    # The base rate survived the first run (the scheduler records it as 'initial_lr').
    assert trainer2.lr_scheduler.base_lrs == [0.1]


def test_test_evaluates_ema(tmp_path):
    train, valid = loaders()
    model = Net()
    trainer = Trainer("test", tmp_path)
    trainer.train(model, _params(), train, valid)
    with torch.no_grad():  # move the model away from the EMA weights
        for q in model.parameters():
            q.add_(0.3)
    moved = state(model)
    ema_loss, ema_acc = _direct_eval(trainer.ema.ema, valid)
    out = trainer.test()
    assert out["loss"] == pytest.approx(ema_loss, rel=1e-6) and out["accuracy"] == pytest.approx(ema_acc)
    assert equal_states(state(model), moved)  # restored after the EMA evaluation
    own_loss, _ = _direct_eval(model, valid)
    assert trainer.test(valid, use_ema=False)["loss"] == pytest.approx(own_loss, rel=1e-6)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_keys_contents_and_metrics_log(tmp_path):
    train, valid = loaders()
    model = Net()
    trainer = Trainer("keys", tmp_path)
    history = trainer.train(model, _params(max_epochs=3), train, valid)
    d = tmp_path / "keys"
    latest = torch.load(d / "ckpt_latest.pth", weights_only=True)
    for key in ("net", "ema_net", "ema_state", "epoch", "acc", "metrics", "optimizer_state_dict",
                "scaler_state_dict", "scheduler_state_dict", "rng_state", "best_metric"):
        assert key in latest, key
    assert latest["epoch"] == 3
    assert latest["metrics"] == history[-1]
    assert latest["acc"] == history[-1]["valid_accuracy"]
    assert equal_states(latest["ema_net"], state(trainer.ema.ema))
    assert latest["ema_state"]["num_updates"] == 15
    assert set(latest["net"]) == set(model.state_dict())
    assert latest["scheduler_state_dict"]["last_batch"] == 14

    best_epoch = max(range(3), key=lambda i: (history[i]["valid_accuracy"], -i))  # first maximum
    best = load_checkpoint(d / "ckpt_best.pth")
    assert best["epoch"] == best_epoch + 1
    assert best["acc"] == history[best_epoch]["valid_accuracy"] == latest["best_metric"]

    lines = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert {"valid_accuracy", "valid_raw_accuracy", "valid_loss", "valid_raw_loss", "train_loss", "lr"} <= set(line)


@pytest.mark.parametrize("ema, key", [(False, "net"), (True, "ema_net")])
def test_models_get_loads_the_ema_when_the_run_had_one_else_net(tmp_path, ema, key):
    kw = dict(in_features=N_FEATURES, num_classes=N_CLASSES, hidden_features=(16,))
    model = models.get("mlp", **kw)
    train, valid = loaders()
    trainer = Trainer("get", tmp_path)
    trainer.train(model, _params(ema=ema), train, valid)
    path = tmp_path / "get" / "ckpt_latest.pth"
    latest = load_checkpoint(path)
    assert ("ema_net" in latest) == ("ema_state" in latest) == ema
    loaded = models.get("mlp", checkpoint_path=path, **kw)
    assert loaded.loaded_checkpoint_key == key and equal_states(state(loaded), latest[key])
    assert trainer.ema is None or equal_states(state(loaded), state(trainer.ema.ema))
    assert equal_states(state(loaded), state(model))  # the trained model holds what models.get loads


# --------------------------------------------------------------------------- resume


class Interrupt(Exception):
    pass


class StopAfter(Trainer):
    def __init__(self, *a, stop_after, **k):
        super().__init__(*a, **k)
        self.stop_after = stop_after

    def on_epoch_end(self, epoch, metrics):
        if epoch == self.stop_after:
            raise Interrupt(epoch)


RESUME_CASES = {
    # shuffling from the loader's own generator, accumulation with a short last window, cosine with warm-up
    "loader-generator": dict(own_generator=True, params=dict(batch_accumulate=2, lr_mode="cosine", lr_warmup_steps=3,
                                                              ema_params={"decay": 0.9, "decay_type": "exp", "beta": 5})),
    # shuffling from the global generator, bf16 autocast, step decay, clipping, threshold schedule
    "global-rng": dict(own_generator=False, params=dict(mixed_precision="bf16", lr_mode="step", lr_updates=[2],
                                                        clip_grad_norm=0.5,
                                                        ema_params={"decay": 0.99, "decay_type": "threshold"})),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_is_bit_identical(tmp_path, case):
    cfg = RESUME_CASES[case]
    params = _params(max_epochs=4, **cfg["params"])

    torch.manual_seed(7)
    model_a = Net()
    init = state(model_a)
    train, valid = loaders(own_generator=cfg["own_generator"])
    trainer_a = Trainer("a", tmp_path)
    history_a = trainer_a.train(model_a, params, train, valid)

    model_b = Net()
    model_b.load_state_dict(init)
    train, valid = loaders(own_generator=cfg["own_generator"])
    with pytest.raises(Interrupt):
        StopAfter("b", tmp_path, stop_after=2).train(model_b, params, train, valid)

    # A "new process": fresh model (other initial weights), fresh loaders, fresh trainer.
    torch.manual_seed(999)
    model_c = Net()
    train, valid = loaders(own_generator=cfg["own_generator"])
    trainer_c = Trainer("b", tmp_path)
    history_c = trainer_c.train(model_c, dict(params, resume=True), train, valid)

    assert equal_nested(history_c, history_a)
    assert equal_states(state(model_c), state(model_a))
    assert equal_states(state(trainer_c.ema.ema), state(trainer_a.ema.ema))
    assert trainer_c.ema.num_updates == trainer_a.ema.num_updates
    a = load_checkpoint(tmp_path / "a" / "ckpt_latest.pth")
    c = load_checkpoint(tmp_path / "b" / "ckpt_latest.pth")
    for key in ("net", "ema_net", "ema_state", "optimizer_state_dict", "scheduler_state_dict", "rng_state", "epoch",
                "best_metric", "metrics"):
        assert equal_nested(c[key], a[key]), key
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_resume_drops_log_lines_written_after_the_checkpoint(tmp_path):
    train, valid = loaders()
    params = _params(max_epochs=2)
    with pytest.raises(Interrupt):
        StopAfter("log", tmp_path, stop_after=1).train(Net(), params, train, valid)
    log = tmp_path / "log" / "metrics.jsonl"
    # As if the process died after logging epoch 2 but before its checkpoint was renamed into place.
    log.write_text(log.read_text() + json.dumps({"epoch": 2, "lr": 0.0}) + "\n")
    trainer = Trainer("log", tmp_path)
    history = trainer.train(Net(), dict(params, resume=True), train, valid)
    assert [h["epoch"] for h in history] == [1, 2]
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]
    assert history[1]["lr"] == 0.2


def test_resume_without_ema_net_warns_and_recreates_from_net(tmp_path):
    train, valid = loaders()
    Trainer("late", tmp_path).train(Net(), _params(max_epochs=1, ema=False), train, valid)
    net_weights = load_checkpoint(tmp_path / "late" / "ckpt_latest.pth")["net"]
    model = Net()
    trainer = Trainer("late", tmp_path)
    with pytest.warns(RuntimeWarning, match=r"no 'ema_net'.*re-created from the checkpoint's 'net'") as record:
        trainer.train(model, _params(max_epochs=1, resume=True), train, valid)  # nothing left to train
    # The warnings of a run point at the line that called train().
    assert {w.filename for w in record if issubclass(w.category, RuntimeWarning)} == {__file__}
    assert equal_states(state(trainer.ema.ema), net_weights)
    assert equal_states(state(model), net_weights)


def test_resume_without_checkpoint_names_path(tmp_path):
    train, valid = loaders()
    with pytest.raises(FileNotFoundError, match=r"nothing[/\\]ckpt_latest\.pth"):
        Trainer("nothing", tmp_path).train(Net(), _params(resume=True), train, valid)


# --------------------------------------------------------------------------- knowledge distillation


def test_kd_teacher_unchanged_student_ema_and_models_get(tmp_path):
    train, valid = loaders()
    torch.manual_seed(3)
    teacher = Net(hidden=24, dropout=0.5)
    teacher.train()  # the trainer must switch it to eval itself
    teacher_before = state(teacher)
    kw = dict(in_features=N_FEATURES, num_classes=N_CLASSES, hidden_features=(8,))
    student = models.get("mlp", **kw)
    student_before = state(student)
    trainer = KDTrainer("kd", tmp_path)
    history = trainer.train(student, teacher, _params(max_epochs=2, loss_params={"temperature": 2.0,
                                                                                  "distillation_weight": 0.7}),
                            train, valid)

    assert equal_states(state(teacher), teacher_before)  # BN running stats included
    assert not teacher.training and not any(q.requires_grad for q in teacher.parameters())
    assert not equal_states(state(student), student_before)
    assert trainer.ema.ema.teacher is teacher  # the EMA shares the teacher, never copies or averages it
    assert equal_states(state(student), state(trainer.ema.ema.student))  # end-of-training swap
    assert {"valid_accuracy", "valid_raw_accuracy"} <= set(history[-1])

    latest = load_checkpoint(tmp_path / "kd" / "ckpt_latest.pth")
    assert set(latest["net"]) == set(student.state_dict())  # the student only
    assert equal_states(latest["ema_net"], state(student))
    loaded = models.get("mlp", checkpoint_path=tmp_path / "kd" / "ckpt_latest.pth", **kw)
    assert loaded.loaded_checkpoint_key == "ema_net" and equal_states(state(loaded), state(student))
    # test() evaluates the student EMA through the distillation module; a bare
    # student reports its hard-label loss.
    assert trainer.test()["accuracy"] == pytest.approx(_direct_eval(trainer.ema.ema.student, valid)[1])
    bare = trainer.test(valid, model=loaded)
    assert bare["loss"] == pytest.approx(_direct_eval(loaded, valid)[0], rel=1e-6)
    # The optimizer never saw the teacher.
    teacher_ids = {id(q) for q in teacher.parameters()}
    assert not any(id(q) in teacher_ids for g in trainer.optimizer.param_groups for q in g["params"])


def test_kd_loss_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    T, w = 3.0, 0.25
    loss = KDLoss(temperature=T, distillation_weight=w)(KDOutput(s, t), y)
    p_t = F.softmax(t / T, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, dim=1))).sum(1).mean()
    expected = w * T * T * kl + (1 - w) * F.cross_entropy(s, y)
    torch.testing.assert_close(loss, expected)
    assert KDLoss(distillation_weight=0.0)(KDOutput(s, t), y).item() == pytest.approx(F.cross_entropy(s, y).item())
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=0)


def test_kd_rejects_plain_loss_name(tmp_path):
    train, valid = loaders()
    with pytest.raises(ValueError, match="KDTrainer supports 'kd_loss'"):
        KDTrainer("kd", tmp_path).train(Net(), Net(), _params(loss="cross_entropy"), train, valid)


# --------------------------------------------------------------------------- pieces


def test_lr_schedules():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    const = LRScheduler(opt, mode="constant", batches_per_epoch=10, max_epochs=3, base_lrs=[1.0], warmup_batches=4)
    assert [const.factor(b) for b in range(6)] == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0, 1.0])
    step = LRScheduler(opt, mode="step", batches_per_epoch=10, max_epochs=3, base_lrs=[1.0], lr_updates=[1, 2],
                       lr_decay_factor=0.5)
    assert [step.factor(b) for b in (0, 9, 10, 19, 20, 29)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    cos = LRScheduler(opt, mode="cosine", batches_per_epoch=10, max_epochs=3, base_lrs=[2.0], cosine_final_lr_ratio=0.1)
    assert cos.lrs_at(0) == [pytest.approx(2.0)] and cos.lrs_at(29) == [pytest.approx(0.2)]
    assert cos.lrs_at(14) < cos.lrs_at(10) < [2.0]
    cos.set_batch(29)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


def test_metrics():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    y = torch.tensor([1, 2, 2])
    assert topk_correct(logits, y, 1).item() == 2
    assert topk_correct(logits, y, 2).item() == 2
    assert topk_correct(logits, F.one_hot(y, 3).float(), 1).item() == 2
    m = MetricTracker()
    m.update(torch.tensor(1.0), logits[:2], y[:2])
    m.update(torch.tensor(4.0), logits[2:], y[2:])
    assert m.compute() == {"loss": pytest.approx(2.0), "accuracy": pytest.approx(2 / 3)}


def test_progress_bars_and_summary_lines(tmp_path, capsys):
    pytest.importorskip("tqdm")
    train, valid = loaders()
    Trainer("bars", tmp_path).train(Net(), _params(progress_bar=True, silent_mode=False), train, valid)
    captured = capsys.readouterr()
    assert "epoch 1/2" in captured.out + captured.err and "EMA" in captured.out + captured.err
    assert "train 1/2" in captured.err  # the batch bar


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_with_scaler(tmp_path):
    train, valid = loaders()
    model = Net()
    trainer = Trainer("cuda", tmp_path)
    trainer.train(model, _params(device="cuda", mixed_precision=True), train, valid)
    assert trainer.scaler.is_enabled() and next(model.parameters()).is_cuda
    assert next(trainer.ema.ema.parameters()).is_cuda
    latest = load_checkpoint(tmp_path / "cuda" / "ckpt_latest.pth")
    assert latest["scaler_state_dict"]["scale"] > 0


# --------------------------------------------------------------------------- issue 14: mistakes are caught


def test_unknown_ema_params_key_fails_before_any_work(tmp_path):
    train, valid = loaders()
    params = _params(ema_params={"decay": 0.9, "decay_type": "constant", "ema_dtyp": "float32"})
    with pytest.raises(ValueError, match=r"training param 'ema_params': unknown argument 'ema_dtyp' "
                                         r"\(did you mean 'ema_dtype'\?\)"):
        Trainer("typo", tmp_path).train(Net(), params, train, valid)
    assert not (tmp_path / "typo").exists()
    with pytest.raises(ValueError, match=r"'decya' \(did you mean 'decay'\?\)"):
        parse_training_params(_params(ema_params={"decya": 0.9, "decay_type": "constant"}))


def test_sg_recipe_with_another_schedules_key_warns_once_and_trains(tmp_path):
    train, valid = loaders()
    params = _params(max_epochs=1, ema_params={"decay": 0.8, "decay_type": "threshold", "beta": 15})
    with pytest.warns(UserWarning, match=r"ignoring beta=15") as record:
        trainer = Trainer("recipe", tmp_path)
        trainer.train(Net(), params, train, valid)
    assert sum("ignoring beta" in str(w.message) for w in record) == 1
    assert type(trainer.ema.decay_function).__name__ == "ThresholdDecay"


def test_ema_params_without_ema_warns_once_naming_them(tmp_path):
    train, valid = loaders()
    params = _params(max_epochs=1, ema=False, ema_params={"decay": 0.8, "decay_type": "constant"})
    with pytest.warns(UserWarning, match=r"'ema_params' \{'decay': 0.8, 'decay_type': 'constant'\} is set but "
                                         r"'ema' is False") as record:
        Trainer("off", tmp_path).train(Net(), params, train, valid)
    assert sum("'ema' is False" in str(w.message) for w in record) == 1


def test_decay_horizon_longer_than_the_run_warns_once(tmp_path):
    train, valid = loaders()  # 5 batches per epoch, 2 epochs: 10 steps
    params = _params(ema_params={"decay": 0.999, "decay_type": "constant"})
    with pytest.warns(UserWarning, match=r"decay=0.999 averages over about 1/\(1-decay\) = 1000 steps, more than "
                                         r"the planned total_steps=10") as record:
        Trainer("horizon", tmp_path).train(Net(), params, train, valid)
    assert sum("averages over" in str(w.message) for w in record) == 1


def test_skipped_updates_count_survives_a_resume(tmp_path):
    from ema_cuda.checkpoint import save_checkpoint

    train, valid = loaders()
    params = _params(max_epochs=2, ema_params={"decay": 0.8, "decay_type": "constant", "skip_nonfinite": True})
    with pytest.raises(Interrupt):
        StopAfter("skips", tmp_path, stop_after=1).train(Net(), params, train, valid)
    path = tmp_path / "skips" / "ckpt_latest.pth"
    ckpt = load_checkpoint(path)
    ckpt["ema_state"]["num_skipped"] = 3  # as if three steps had been skipped in epoch 1
    save_checkpoint(ckpt, path)
    trainer = Trainer("skips", tmp_path)
    trainer.train(Net(), dict(params, resume=True), train, valid)
    assert trainer.ema.num_skipped == 3 and trainer.ema.num_updates == 10


# --------------------------------------------------------------------------- issue 14: models users really have


def test_compiled_model_checkpoints_plain_keys_and_resumes(tmp_path):
    train, valid = loaders()
    params = _params(max_epochs=2)
    torch.manual_seed(3)
    model = Net()
    with pytest.raises(Interrupt):
        StopAfter("compiled", tmp_path, stop_after=1).train(torch.compile(model, backend="eager"), params, train, valid)
    path = tmp_path / "compiled" / "ckpt_latest.pth"
    ckpt = load_checkpoint(path)
    assert set(ckpt["net"]) == set(Net().state_dict()) == set(ckpt["ema_net"])
    loaded = models.get(Net, checkpoint_path=path)
    assert loaded.loaded_checkpoint_key == "ema_net" and equal_states(state(loaded), ckpt["ema_net"])
    resumed = Net()
    trainer = Trainer("compiled", tmp_path)
    trainer.train(torch.compile(resumed, backend="eager"), dict(params, resume=True), train, valid)
    assert [h["epoch"] for h in trainer.history] == [1, 2]
    assert set(load_checkpoint(path)["net"]) == set(Net().state_dict())
    torch._dynamo.reset()


# --------------------------------------------------------------------------- issue 14: a second run of one name


@pytest.mark.parametrize("save_model", [True, False])
def test_second_run_of_an_experiment_is_refused_and_leaves_the_first_intact(tmp_path, save_model):
    train, valid = loaders()
    Trainer("exp", tmp_path).train(Net(), _params(max_epochs=1), train, valid)
    d = tmp_path / "exp"
    # Every file, in subfolders too (the TensorBoard events).
    before = {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=r"already holds ckpt_latest.pth, ckpt_best.pth, metrics.jsonl of "
                                              r"an earlier run of experiment 'exp'.*'resume': True.*'overwrite': True"):
        Trainer("exp", tmp_path).train(Net(), _params(max_epochs=1, save_model=save_model), train, valid)
    assert {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file()} == before


def test_second_train_call_of_one_trainer_is_a_second_run(tmp_path):
    train, valid = loaders()
    trainer = Trainer("exp2", tmp_path)
    trainer.train(Net(), _params(max_epochs=1), train, valid)
    with pytest.raises(FileExistsError):
        trainer.train(Net(), _params(max_epochs=1), train, valid)


def test_overwrite_replaces_an_earlier_run(tmp_path):
    train, valid = loaders()
    Trainer("exp", tmp_path).train(Net(), _params(max_epochs=2), train, valid)
    history = Trainer("exp", tmp_path).train(Net(), _params(max_epochs=1, overwrite=True), train, valid)
    assert load_checkpoint(tmp_path / "exp" / "ckpt_latest.pth")["epoch"] == 1
    lines = (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1] == [h["epoch"] for h in history]
    with pytest.raises(ValueError, match="'overwrite'"):
        parse_training_params(_params(overwrite="yes"))


def test_kd_with_a_compiled_student_checkpoints_the_plain_student(tmp_path):
    train, valid = loaders()
    torch.manual_seed(3)
    teacher = Net(hidden=24)
    kw = dict(in_features=N_FEATURES, num_classes=N_CLASSES, hidden_features=(8,))
    student = models.get("mlp", **kw)
    trainer = KDTrainer("kdc", tmp_path)
    trainer.train(torch.compile(student, backend="eager"), teacher, _params(max_epochs=1), train, valid)
    latest = load_checkpoint(tmp_path / "kdc" / "ckpt_latest.pth")
    assert set(latest["net"]) == set(latest["ema_net"]) == set(student.state_dict())
    assert equal_states(latest["ema_net"], state(student))  # the end-of-training copy reached the student
    loaded = models.get("mlp", checkpoint_path=tmp_path / "kdc" / "ckpt_latest.pth", **kw)
    assert loaded.loaded_checkpoint_key == "ema_net" and equal_states(state(loaded), state(student))
    torch._dynamo.reset()
