"""Schedules defined per elapsed step (NOTE [elapsed steps]): the half-life in steps and in samples, the
power function over several steps, and that update_every, skipped updates and irregular calls keep the
EMA's length, while the SuperGradients-compatible schedules keep their values."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

from ema_cuda import ModelEMA
from ema_cuda.ema_decay_schedules import EMA_DECAY_FUNCTIONS, ConstantDecay, ThresholdDecay
from ema_cuda.posthoc import PowerFunctionDecay
from ema_cuda.schedules_time import HalfLifeDecay
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)

CAP = 1 - 1e-9  # a cap on the decay that the values here never reach
TOTAL = 10_000


def scalar_model(value=0.0):
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def ema_value(ema):
    return ema.ema.weight.double().item()


def run_step_input(schedule, update_every, last_step, steps=None):
    """The EMA of a weight that jumps from 0 to 1 after step 0, updated at ``steps`` (default: every step)."""
    model = scalar_model(0.0)
    ema = ModelEMA(model, CAP, schedule, update_every=update_every, ema_dtype=torch.float64)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for step in (steps if steps is not None else range(1, last_step + 1)):
        ema.update(model, step, TOTAL)
    return ema


# ---------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("half_life", [1.0, 8.0, 693.0, 1e5])
@pytest.mark.parametrize("elapsed", [0, 1, 3, 4, 100])
def test_half_life_closed_form(half_life, elapsed):
    fn = HalfLifeDecay(half_life=half_life)
    assert fn.decay_over(CAP, 50, None, elapsed) == 0.5 ** (elapsed / half_life)
    assert fn(CAP, 50, None) == 0.5 ** (1 / half_life)  # called as any schedule: one step


def test_half_life_in_samples_is_the_half_life_in_steps():
    # 64 samples per step: 6,400 samples are 100 steps.
    by_samples = HalfLifeDecay(half_life_samples=6400, samples_per_step=64)
    by_steps = HalfLifeDecay(half_life=100)
    assert by_samples.half_life_steps == 100
    for k in (1, 2, 7):
        assert by_samples.decay_over(CAP, 10, None, k) == by_steps.decay_over(CAP, 10, None, k) == 0.5 ** (k / 100)


def test_the_cap_applies_per_step():
    fn = HalfLifeDecay(half_life=1e6)  # per step 0.99999931 > the cap 0.999
    assert fn.decay_over(0.999, 5, None, 1) == 0.999
    assert fn.decay_over(0.999, 5, None, 4) == 0.999 ** 4


def test_rampup_bounds_the_half_life_by_the_step():
    fn = HalfLifeDecay(half_life=100, rampup=0.1)
    assert fn.decay_over(CAP, 50, None, 2) == 0.5 ** (2 / 5)  # 0.1 * 50 = 5 < 100
    assert fn.decay_over(CAP, 5000, None, 2) == 0.5 ** (2 / 100)
    assert fn.decay_over(CAP, 0, None, 1) == 0.0  # at step 0 the half-life is 0: a copy
    assert fn.decay_over(CAP, 0, None, 0) == 1.0  # and no step elapsed: nothing changes


@pytest.mark.parametrize("kwargs", [dict(half_life=8.0), dict(half_life=100.0, rampup=0.05),
                                    dict(half_life_samples=512, samples_per_step=32)])
@pytest.mark.parametrize("step", [0, 1, 4, 10, 1000])
@pytest.mark.parametrize("elapsed", [0, 1, 4])
def test_float_and_tensor_forms_agree(kwargs, step, elapsed):
    fn = HalfLifeDecay(**kwargs)
    value = fn.decay_over(CAP, step, None, elapsed)
    for dtype in (torch.int64, torch.float64):
        t = fn.tensor_decay_over(CAP, torch.tensor(step, dtype=dtype), None, torch.tensor(elapsed, dtype=dtype))
        assert t.dtype == torch.float64 and t.dim() == 0
        assert t.item() == pytest.approx(value, rel=1e-15, abs=1e-300)
    assert fn.tensor_value(CAP, torch.tensor(step), None).item() == pytest.approx(fn(CAP, step, None), rel=1e-15)


@pytest.mark.parametrize("gamma", [0.0, 6.94, 16.97])
@pytest.mark.parametrize("t,k", [(4, 4), (8, 4), (100, 1), (100, 4), (1000, 16)])
def test_power_function_over_elapsed_steps_is_the_telescoped_product(gamma, t, k):
    fn = PowerFunctionDecay(gamma=gamma)
    closed = ((t - k) / t) ** (gamma + 1)
    product = math.prod((1 - 1 / s) ** (gamma + 1) for s in range(t - k + 1, t + 1))
    assert fn.decay_over(CAP, t, None, k) == pytest.approx(closed, rel=1e-12, abs=1e-300)
    assert closed == pytest.approx(product, rel=1e-12, abs=1e-300)
    tensor = fn.tensor_decay_over(CAP, torch.tensor(t), None, torch.tensor(float(k)))
    assert tensor.item() == pytest.approx(closed, rel=1e-12, abs=1e-300)
    assert fn.decay_over(CAP, t, None, 1) == fn(CAP, t, None)  # one step: the old value


# ---------------------------------------------------------------------- through ModelEMA


@pytest.mark.parametrize("schedule", [HalfLifeDecay(half_life=8), HalfLifeDecay(half_life=37.5),
                                      HalfLifeDecay(half_life_samples=2560, samples_per_step=128)])
def test_update_every_keeps_the_half_life(schedule):
    # A step input: after t steps the EMA is 1 - 0.5 ** (t / h), however often it was updated.
    h = schedule.half_life_steps
    every_step = run_step_input(schedule, 1, 48)
    every_fourth = run_step_input(schedule, 4, 48)
    assert ema_value(every_step) == pytest.approx(1 - 0.5 ** (48 / h), rel=1e-12)
    assert ema_value(every_fourth) == pytest.approx(ema_value(every_step), rel=1e-12)
    assert every_fourth.num_updates == 12


def test_the_old_behaviour_for_contrast():
    # A per-update schedule with the same per-step decay: every fourth step averages 4x longer.
    d = 0.5 ** (1 / 8)
    every_fourth = ModelEMA(scalar_model(0.0), d, ConstantDecay(), update_every=4, ema_dtype=torch.float64)
    model = scalar_model(1.0)
    for step in range(1, 49):
        every_fourth.update(model, step, TOTAL)
    assert ema_value(every_fourth) == pytest.approx(1 - d ** 12, rel=1e-12)
    assert abs(ema_value(every_fourth) - (1 - 0.5 ** 6)) > 0.1


def test_irregular_calls_and_accumulation_count_the_steps_between_them():
    # The Trainer with two batches per optimizer step passes 2, 4, 6, ...; a loop may skip calls.
    h = 10.0
    for steps in ([2, 4, 6, 8, 10, 12], [3, 4, 9, 10, 12], [12]):
        ema = run_step_input(HalfLifeDecay(half_life=h), 1, None, steps=steps)
        assert ema_value(ema) == pytest.approx(1 - 0.5 ** (12 / h), rel=1e-12), steps


def test_a_skipped_update_is_counted_in_the_next():
    model = scalar_model(0.0)
    ema = ModelEMA(model, CAP, HalfLifeDecay(half_life=5), skip_nonfinite=True, ema_dtype=torch.float64)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 1, TOTAL)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    ema.update(model, 2, TOTAL)
    assert ema.num_skipped == 1
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 3, TOTAL)
    assert ema_value(ema) == pytest.approx(1 - 0.5 ** (3 / 5), rel=1e-12)
    assert ema.last_decay == pytest.approx(0.5 ** (2 / 5), rel=1e-15)


def test_power_function_under_update_every_is_the_same_profile():
    fn = PowerFunctionDecay(gamma=3.0)
    # A ramp input theta(s) = s: at a multiple of 4 both EMAs hold the same average of the values they saw.
    model = scalar_model(0.0)
    one = ModelEMA(model, CAP, fn, ema_dtype=torch.float64)
    four = ModelEMA(model, CAP, fn, update_every=4, ema_dtype=torch.float64)
    for step in range(1, 41):
        with torch.no_grad():
            model.weight.fill_(float(step))
        one.update(model, step, TOTAL)
        if step % 4 == 0:
            # Update-every-4 sees only every fourth value; compare it with its own closed form:
            # the weight of the value at update tau is (tau^(g+1) - (tau-4)^(g+1)) / t^(g+1).
            four.update(model, step, TOTAL)
            want = sum((tau ** 4 - (tau - 4) ** 4) * tau for tau in range(4, step + 1, 4)) / step ** 4
            assert ema_value(four) == pytest.approx(want, rel=1e-12)
    # Sampling every fourth value of a ramp lags by 1.5 steps at most.
    assert abs(ema_value(four) - ema_value(one)) < 1.5


@pytest.mark.parametrize("schedule", [ThresholdDecay(), ConstantDecay()])
def test_per_update_schedules_are_unchanged_under_update_every(schedule):
    model = scalar_model(0.0)
    ema = ModelEMA(model, 0.9, schedule, update_every=3, ema_dtype=torch.float64)
    with torch.no_grad():
        model.weight.fill_(1.0)
    want = 0.0
    for step in range(1, 13):
        ema.update(model, step, 100)
        if step % 3 == 0:
            d = schedule(0.9, step, 100)
            want = want * d + (1 - d)
            assert ema.last_decay == d
    assert ema_value(ema) == pytest.approx(want, rel=1e-14)
    assert ema.state_dict()["step"] is None  # as before: nothing depends on it


def test_capturable_counts_the_elapsed_steps_on_the_device():
    schedule = HalfLifeDecay(half_life=6)
    model = scalar_model(1.0)
    eager = ModelEMA(scalar_model(0.0), CAP, schedule, ema_dtype=torch.float64)
    captured = ModelEMA(scalar_model(0.0), CAP, schedule, ema_dtype=torch.float64, capturable=True, total_steps=TOTAL)
    for step in (2, 4, 5, 9):
        eager.update(model, step, TOTAL)
        captured.update(model, torch.tensor(step))
        assert captured.last_decay == pytest.approx(eager.last_decay, rel=1e-15)
    assert ema_value(captured) == pytest.approx(1 - 0.5 ** (9 / 6), rel=1e-12)
    for _ in range(3):  # the counted step: one step each
        captured.update(model)
    assert captured.last_decay == pytest.approx(0.5 ** (1 / 6), rel=1e-15)


# ---------------------------------------------------------------------- saved forms and configuration


def test_state_dict_round_trip_keeps_the_last_step():
    schedule = HalfLifeDecay(half_life=8)
    model = scalar_model(1.0)
    ema = ModelEMA(scalar_model(0.0), CAP, schedule, update_every=4, ema_dtype=torch.float64)
    for step in range(1, 9):
        ema.update(model, step, TOTAL)
    state = copy.deepcopy(ema.state_dict())
    assert state["step"] == 8 and state["decay_function"] == {
        "name": "half_life", "params": {"half_life": 8.0, "half_life_samples": None, "samples_per_step": None,
                                        "rampup": None}}
    resumed = ModelEMA(scalar_model(0.5), CAP, ConstantDecay(), update_every=4, ema_dtype=torch.float64)
    with pytest.warns(UserWarning, match="replaces the current"):
        resumed.load_state_dict(state)
    pickled = copy.deepcopy(ema)
    for step in (11, 16):  # an irregular call: 3 steps, then 5
        for e in (ema, resumed, pickled):
            e.update(model, step, TOTAL)
    assert ema_value(resumed) == ema_value(ema) == ema_value(pickled) == pytest.approx(1 - 0.5 ** 2, rel=1e-12)


def test_a_state_without_the_step_counts_update_every():
    model = scalar_model(1.0)
    ema = ModelEMA(scalar_model(0.0), CAP, HalfLifeDecay(half_life=8), update_every=4, ema_dtype=torch.float64)
    state = ema.state_dict()
    state["step"] = None  # as saved before the step was kept, or by a per-update schedule
    ema.load_state_dict(state)
    ema.update(model, 1000, TOTAL)
    assert ema.last_decay == 0.5 ** (4 / 8)
    ema.update(model, 992, TOTAL)  # a step before the last one: the count restarted
    assert ema.last_decay == 0.5 ** (4 / 8)


def test_from_params_and_the_registry():
    assert EMA_DECAY_FUNCTIONS["half_life"] is HalfLifeDecay
    model = scalar_model()
    ema = ModelEMA.from_params(model, decay_type="half_life", decay=CAP, half_life_samples=1000,
                               samples_per_step=10, update_every=2)
    assert isinstance(ema.decay_function, HalfLifeDecay) and ema.decay_function.half_life_steps == 100
    assert ema.update_every == 2
    rebuilt = HalfLifeDecay(**ema.decay_function.get_params())
    assert rebuilt.get_params() == ema.decay_function.get_params()
    with pytest.raises(ValueError, match="half_lif"):
        ModelEMA.from_params(model, decay_type="half_life", decay=CAP, half_lif=10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one of half_life"),
    (dict(half_life=3, half_life_samples=3, samples_per_step=1), "exactly one of half_life"),
    (dict(half_life_samples=100), "needs samples_per_step"),
    (dict(half_life=10, samples_per_step=4), "goes with half_life_samples"),
    (dict(half_life=0), "half_life must be None or a finite number > 0"),
    (dict(half_life=float("inf")), "half_life must be"),
    (dict(half_life=10, rampup=-1), "rampup must be"),
    (dict(half_life_samples=10, samples_per_step=True), "samples_per_step must be"),
])
def test_bad_parameters_are_errors(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        HalfLifeDecay(**kwargs)


def test_bad_elapsed_and_step_are_errors():
    fn = HalfLifeDecay(half_life=4)
    with pytest.raises(ValueError, match="elapsed must be"):
        fn.decay_over(CAP, 5, None, -1)
    with pytest.raises(ValueError, match="step must be >= 0"):
        fn.decay_over(CAP, -1, None, 1)
    with pytest.raises(ValueError, match="step must be a 0-dim real tensor"):
        fn.tensor_decay_over(CAP, torch.tensor([1, 2]), None, torch.tensor(1))


def test_largest_decay_drives_the_configuration_warnings():
    fn = HalfLifeDecay(half_life=6931)  # about decay 0.9999 per step
    assert fn.largest_decay(CAP, None) == 0.5 ** (1 / 6931)
    assert HalfLifeDecay(half_life=1000, rampup=0.1).largest_decay(CAP, 200) == 0.5 ** (1 / 20)
    with pytest.warns(UserWarning, match="more than the planned total_steps=100"):
        ModelEMA(scalar_model(), CAP, fn, total_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelEMA(scalar_model(), CAP, fn, total_steps=100_000)
    with pytest.warns(UserWarning, match="rounds to 1 in torch.bfloat16"):
        ModelEMA(scalar_model().to(torch.bfloat16), CAP, fn)


# ------------------------------------------------------------------ in the Trainer

def _train_with_half_life(tmp_path, ema_params, train_loader, **kw):
    from ema_cuda.training import Trainer
    from support import Net, loaders

    torch.manual_seed(0)
    _, valid = loaders()
    params = {"max_epochs": 1, "initial_lr": 0.1, "ema": True, "ema_params": ema_params, "progress_bar": False,
              "silent_mode": True, "device": "cpu", "tensorboard": False, **kw}
    trainer = Trainer("run", tmp_path)
    trainer.train(Net(), params, train_loader, valid)
    return trainer


@pytest.mark.parametrize("accumulate", [1, 2])
def test_trainer_gives_the_half_life_in_samples_its_samples_per_step(tmp_path, accumulate):
    """The Trainer's steps count batches, so a half-life of 160 samples with batches of 8 is 20 steps, whatever
    ``batch_accumulate``; an EMA update after ``accumulate`` batches applies ``0.5 ** (accumulate / 20)``."""
    from support import loaders

    train, _ = loaders(batch_size=8, n=48)  # 6 batches: updates after batches 2, 4, 6 when accumulating 2
    trainer = _train_with_half_life(tmp_path, {"decay_type": "half_life", "half_life_samples": 160, "decay": CAP},
                                    train, batch_accumulate=accumulate)
    schedule = trainer.ema.decay_function
    assert schedule.samples_per_step == 8 and schedule.half_life_steps == 20
    assert trainer.ema.last_decay == pytest.approx(0.5 ** (accumulate / 20), rel=1e-12)
    assert trainer.training_params.ema_params["samples_per_step"] == 8


def test_trainer_keeps_a_given_samples_per_step(tmp_path):
    from support import loaders

    train, _ = loaders(batch_size=8)
    trainer = _train_with_half_life(
        tmp_path, {"decay_type": "half_life", "half_life_samples": 160, "samples_per_step": 32, "decay": CAP}, train)
    assert trainer.ema.decay_function.half_life_steps == 5


def test_trainer_without_a_batch_size_asks_for_samples_per_step(tmp_path):
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
    from support import dataset

    data = dataset(40)
    train = DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), batch_size=8, drop_last=False))
    with pytest.raises(TypeError, match="half_life_samples needs samples_per_step"):
        _train_with_half_life(tmp_path, {"decay_type": "half_life", "half_life_samples": 160, "decay": CAP}, train)
