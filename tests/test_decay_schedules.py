"""The decay schedules: SuperGradients-exact values, the timm/diffusers and ultralytics warmups,
the documented tables, the registry, and bad input."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ema_cuda.ema_decay_schedules import (
    EMA_DECAY_FUNCTIONS,
    ConstantDecay,
    ExpDecay,
    IDecayFunction,
    PowerWarmupDecay,
    RampDecay,
    ThresholdDecay,
    decay_function_name,
)

TOTAL = 1000
STEPS = [0, 1, 2, 3, 10, 99, 100, 500, 999, 1000]
DECAYS = [0.9, 0.999, 0.9999]


# SuperGradients 3.7.1's formulas, written with numpy as SuperGradients does.
def sg_threshold(decay, step, total_steps):
    return np.minimum(decay, (1 + step) / (10 + step))


def sg_exp(beta):
    def fn(decay, step, total_steps):
        x = step / total_steps
        return decay * (1 - np.exp(-x * beta))

    return fn


@pytest.mark.parametrize("decay", DECAYS)
def test_constant_is_decay(decay):
    assert all(ConstantDecay()(decay, s, TOTAL) == decay for s in STEPS)


@pytest.mark.parametrize("decay", DECAYS)
def test_threshold_matches_supergradients(decay):
    fn = ThresholdDecay()
    for s in STEPS + [10**6]:
        assert fn(decay, s, TOTAL) == sg_threshold(decay, s, TOTAL), s


@pytest.mark.parametrize("beta", [1, 5, 15, 15.5])
@pytest.mark.parametrize("decay", DECAYS)
def test_exp_matches_supergradients(decay, beta):
    fn = ExpDecay(beta=beta)
    for s in STEPS:
        assert fn(decay, s, TOTAL) == sg_exp(beta)(decay, s, TOTAL), s


def test_exp_is_zero_at_start_and_below_decay():
    fn = ExpDecay(beta=15)
    assert fn(0.9999, 0, TOTAL) == 0.0
    values = [fn(0.9999, s, TOTAL) for s in range(TOTAL + 1)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] < 0.9999


def test_exp_clamps_past_total_steps():
    fn = ExpDecay(beta=15)
    assert fn(0.9999, TOTAL + 500, TOTAL) == fn(0.9999, TOTAL, TOTAL)
    assert fn(0.9999, TOTAL - 1, TOTAL) != fn(0.9999, TOTAL, TOTAL)


def diffusers_get_decay(optimization_step, decay, min_decay, update_after_step, inv_gamma, power):
    """diffusers' EMAModel.get_decay with use_ema_warmup=True (same as timm ModelEmaV3 with warmup)."""
    step = max(0, optimization_step - update_after_step - 1)
    if step <= 0:
        return 0.0
    cur = 1 - (1 + step / inv_gamma) ** -power
    cur = min(cur, decay)
    cur = max(cur, min_decay)
    return cur


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"power": 3 / 4},
        {"inv_gamma": 10.0, "power": 0.5},
        {"min_decay": 0.5},
        {"update_after_step": 7},
        {"min_decay": 0.95, "update_after_step": 3, "power": 0.9},
    ],
)
def test_power_warmup_matches_diffusers(kw):
    fn = PowerWarmupDecay(**kw)
    args = {"inv_gamma": 1.0, "power": 2 / 3, "min_decay": 0.0, "update_after_step": 0, **kw}
    for s in list(range(0, 30)) + [100, 1000, 10**5, 10**7]:
        expected = diffusers_get_decay(s, 0.9999, args["min_decay"], args["update_after_step"], args["inv_gamma"], args["power"])
        assert fn(0.9999, s, TOTAL) == expected, s


def test_power_warmup_first_updates_copy_the_model():
    fn = PowerWarmupDecay(update_after_step=5)
    assert [fn(0.999, s, 0) for s in range(1, 7)] == [0.0] * 6
    assert fn(0.999, 7, 0) > 0.0
    assert fn(0.999, 10**9, 0) == 0.999


@pytest.mark.parametrize("tau", [1, 100, 2000])
def test_ramp_matches_ultralytics(tau):
    ultralytics = lambda x: 0.9999 * (1 - math.exp(-x / tau))  # noqa: E731 - as written there
    fn = RampDecay(tau=tau)
    for s in STEPS + [10**5]:
        assert fn(0.9999, s, TOTAL) == ultralytics(s), s


# (schedule, step, total_steps, value printed in the class docstring)
DOC_TABLES = [
    (ConstantDecay(), 12345, TOTAL, 0.9999),
    (ThresholdDecay(), 0, TOTAL, 0.1),
    (ThresholdDecay(), 1, TOTAL, 0.18181818181818182),
    (ThresholdDecay(), 100, TOTAL, 0.9181818181818182),
    (ThresholdDecay(), 1000, TOTAL, 0.9910891089108911),
    (ThresholdDecay(), 10000, TOTAL, 0.999100899100899),
    (ThresholdDecay(), 100000, TOTAL, 0.9999),
    (ExpDecay(beta=15), 10000, 10**6, 0.1392780943725847),
    (ExpDecay(beta=15), 100000, 10**6, 0.7767921528675851),
    (ExpDecay(beta=15), 500000, 10**6, 0.9993469709382893),
    (ExpDecay(beta=15), 10**6, 10**6, 0.9998996941282697),
    (ExpDecay(beta=5), 200000, 10**6, 0.6320573467726748),
    (ExpDecay(beta=5), 10**6, 10**6, 0.9931627267956145),
    (PowerWarmupDecay(), 1, 0, 0.0),
    (PowerWarmupDecay(), 2, 0, 0.3700394750525634),
    (PowerWarmupDecay(), 100, 0, 0.9535841116638722),
    (PowerWarmupDecay(), 10000, 0, 0.9978455653099682),
    (PowerWarmupDecay(power=3 / 4), 10, 0, 0.8221720589961077),
    (PowerWarmupDecay(power=3 / 4), 100000, 0, 0.9998221720589962),
    (RampDecay(), 1, 0, 0.000499825033328626),
    (RampDecay(), 2000, 0, 0.6320573467726748),
    (RampDecay(), 20000, 0, 0.9998546046102305),
]


@pytest.mark.parametrize("fn,step,total,value", DOC_TABLES, ids=lambda v: repr(v)[:30])
def test_docstring_tables_are_the_values(fn, step, total, value):
    # numpy's exp (ExpDecay) may differ in the last bit between CPUs.
    assert fn(0.9999, step, total) == pytest.approx(value, rel=1e-14, abs=0)
    assert repr(value) in type(fn).__doc__


def test_registry_names():
    assert EMA_DECAY_FUNCTIONS["constant"] is ConstantDecay
    assert EMA_DECAY_FUNCTIONS["threshold"] is ThresholdDecay
    assert EMA_DECAY_FUNCTIONS["exp"] is ExpDecay
    assert EMA_DECAY_FUNCTIONS["power"] is PowerWarmupDecay
    assert EMA_DECAY_FUNCTIONS["ramp"] is RampDecay
    assert all(issubclass(c, IDecayFunction) for c in EMA_DECAY_FUNCTIONS.values())


def test_extra_kwargs_are_ignored():
    # SuperGradients passes the whole ema_params dict (minus decay/decay_type) to the schedule.
    extra = {"beta": 15, "tau": 7, "power": 0.5, "something_else": "x"}
    assert ConstantDecay(**extra)(0.9, 5, 10) == 0.9
    assert ThresholdDecay(**extra)(0.9, 5, 10) == 6 / 15
    assert ExpDecay(**extra).beta == 15
    assert RampDecay(**extra).tau == 7
    assert PowerWarmupDecay(**extra).power == 0.5


def test_get_params_rebuilds_an_equal_schedule():
    for fn in [ConstantDecay(), ThresholdDecay(), ExpDecay(beta=3), PowerWarmupDecay(power=0.7, update_after_step=4), RampDecay(tau=50)]:
        name = decay_function_name(fn)
        rebuilt = EMA_DECAY_FUNCTIONS[name](**fn.get_params())
        assert type(rebuilt) is type(fn)
        assert rebuilt.get_params() == fn.get_params()
        assert [rebuilt(0.99, s, 100) for s in range(0, 120, 7)] == [fn(0.99, s, 100) for s in range(0, 120, 7)]
    assert ExpDecay(beta=3).get_params() == {"beta": 3.0}


def test_unregistered_schedule_name_is_its_class_path():
    class Mine(IDecayFunction):
        def __call__(self, decay, step, total_steps):
            return decay

    assert decay_function_name(Mine()).endswith("test_unregistered_schedule_name_is_its_class_path.<locals>.Mine")


def test_exp_without_beta_is_an_error():
    with pytest.raises(TypeError, match="beta"):
        ExpDecay()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ExpDecay(beta=0), "beta"),
        (lambda: ExpDecay(beta=-1), "beta"),
        (lambda: ExpDecay(beta=float("nan")), "beta"),
        (lambda: RampDecay(tau=0), "tau"),
        (lambda: PowerWarmupDecay(inv_gamma=0), "inv_gamma"),
        (lambda: PowerWarmupDecay(power=-1), "power"),
        (lambda: PowerWarmupDecay(min_decay=1.5), "min_decay"),
        (lambda: PowerWarmupDecay(update_after_step=-1), "update_after_step"),
        (lambda: PowerWarmupDecay(update_after_step=2.5), "update_after_step"),
    ],
)
def test_bad_parameters_are_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("total", [0, -5, None])
def test_exp_needs_positive_total_steps(total):
    with pytest.raises(ValueError, match=f"total_steps must be > 0, got {total}"):
        ExpDecay(beta=15)(0.9999, 1, total)


@pytest.mark.parametrize("fn", [ExpDecay(beta=15), ThresholdDecay(), RampDecay()])
def test_negative_step_is_an_error(fn):
    with pytest.raises(ValueError, match="step must be >= 0, got -3"):
        fn(0.9999, -3, TOTAL)


def test_schedules_never_exceed_decay():
    for fn in [ConstantDecay(), ThresholdDecay(), ExpDecay(beta=15), PowerWarmupDecay(), RampDecay(tau=10)]:
        for s in range(0, 3000, 37):
            d = fn(0.999, s, 2000)
            assert 0.0 <= d <= 0.999, (fn, s, d)


@pytest.mark.parametrize("decay_type", ["constant", "threshold", "exp", "power", "ramp"])
def test_from_params_warns_on_another_schedules_parameter_and_rejects_typos(decay_type):
    # Every parameter of every other built-in schedule is a warning (a recipe
    # that switched schedules); a typo of one is an error naming it.
    import warnings

    from torch import nn

    from ema_cuda import ModelEMA

    model = nn.Linear(2, 2)
    own = {"exp": {"beta": 15}}.get(decay_type, {})
    params = {"beta": 15, "tau": 7.0, "power": 0.5, "inv_gamma": 1.0, "min_decay": 0.0, "update_after_step": 0}
    foreign = {k: v for k, v in params.items() if k not in EMA_DECAY_FUNCTIONS[decay_type](**own).get_params()}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ModelEMA.from_params(model, decay=0.5, decay_type=decay_type, **own, **foreign)
    ignored = [str(w.message) for w in record if "ignoring" in str(w.message)]
    assert len(ignored) == 1 and all(f"{k}=" in ignored[0] for k in foreign)
    with pytest.raises(ValueError, match=r"unknown argument 'betta' \(did you mean 'beta'\?\)"):
        ModelEMA.from_params(model, decay=0.5, decay_type=decay_type, betta=15, **own)


# ---------------------------------------------------------------- values pinned on a grid of steps
#
# tests/data/decay_schedule_values.json holds, for a grid of steps (integers
# from 0 to 10**7 and a few fractional ones), decays 0.999 and 0.9999 and
# total_steps=1000, each built-in schedule's float value and, where it is not
# the same number, its tensor value on the CPU (integer steps as int64 tensors,
# fractional ones as float64).  A change to how a formula is written must
# leave these numbers alone.  Values that pass through exp or pow may differ in
# the last place on another CPU or math library (numpy and torch choose their
# exp by CPU features), so those are compared to one ulp here and exactly,
# below, with an independent transcription evaluated by the same libraries.

GRID = json.loads((Path(__file__).parent / "data" / "decay_schedule_values.json").read_text())
LIBM_DEPENDENT = {"exp", "power", "ramp"}


def _grid_cases():
    return [
        pytest.param(EMA_DECAY_FUNCTIONS[rec["name"]](**rec["params"]), rec, id=f"{rec['name']}{rec['params']}")
        for rec in GRID["schedules"]
    ]


GRID_CASES = _grid_cases()


def _same_value(got, want, libm_dependent):
    if libm_dependent:
        return abs(got - want) <= math.ulp(want)
    return got == want


def _grid_step_tensor(step):
    return torch.tensor(step, dtype=torch.float64 if isinstance(step, float) else torch.int64)


@pytest.mark.parametrize("fn,rec", GRID_CASES)
def test_float_values_are_the_recorded_ones(fn, rec):
    loose = rec["name"] in LIBM_DEPENDENT
    for decay in GRID["decays"]:
        for step, want in zip(GRID["steps"], rec["values"][repr(decay)]):
            got = fn(decay, step, GRID["total_steps"])
            assert type(got) is float and _same_value(got, want, loose), (decay, step, got, want)


@pytest.mark.parametrize("fn,rec", GRID_CASES)
def test_tensor_values_are_the_recorded_ones(fn, rec):
    loose = rec["name"] in LIBM_DEPENDENT
    for decay in GRID["decays"]:
        differs = rec["tensor_differs"][repr(decay)]
        for i, (step, value) in enumerate(zip(GRID["steps"], rec["values"][repr(decay)])):
            want = differs.get(str(i), value)
            got = fn.tensor_value(decay, _grid_step_tensor(step), GRID["total_steps"])
            assert got.dtype == torch.float64 and got.dim() == 0
            assert _same_value(got.item(), want, loose), (decay, step, got.item(), want)


# Each schedule's two forms written out separately, as plain functions: the
# float form with Python's math (numpy's exp for ExpDecay, as SuperGradients),
# the tensor form with torch in float64.  Evaluated by the same libraries as
# the schedules, they must agree with them bit for bit on any machine.
def _float_form(name, p, decay, step, total):
    if name == "constant":
        return decay
    if name == "threshold":
        return min(decay, (1 + step) / (10 + step))
    if name == "exp":
        return float(decay * (1 - np.exp(-(min(step, total) / total) * p["beta"])))
    if name == "power":
        s = max(0, step - p["update_after_step"] - 1)
        if s <= 0:
            return 0.0
        return max(min(1 - (1 + s / p["inv_gamma"]) ** -p["power"], decay), p["min_decay"])
    assert name == "ramp"
    return decay * (1 - math.exp(-step / p["tau"]))


def _tensor_form(name, p, decay, step, total):
    s = step.to(torch.float64)
    if name == "constant":
        return torch.full_like(s, decay)
    if name == "threshold":
        return torch.clamp((1 + s) / (10 + s), max=decay)
    if name == "exp":
        return decay * (1 - torch.exp(-(torch.clamp(s, max=total) / total) * p["beta"]))
    if name == "power":
        s = torch.clamp(s - (p["update_after_step"] + 1), min=0)
        d = torch.clamp(torch.clamp(1 - (1 + s / p["inv_gamma"]) ** -p["power"], max=decay), min=p["min_decay"])
        return torch.where(s <= 0, torch.zeros_like(d), d)
    assert name == "ramp"
    return decay * (1 - torch.exp(-s / p["tau"]))


@pytest.mark.parametrize("fn,rec", GRID_CASES)
def test_both_forms_equal_a_separate_transcription_bit_for_bit(fn, rec):
    p = fn.get_params()
    total = GRID["total_steps"]
    for decay in GRID["decays"]:
        for step in GRID["steps"]:
            assert fn(decay, step, total) == _float_form(rec["name"], p, decay, step, total), (decay, step)
            step_t = _grid_step_tensor(step)
            got, want = fn.tensor_value(decay, step_t, total), _tensor_form(rec["name"], p, decay, step_t, total)
            assert torch.equal(got, want), (decay, step, got.item(), want.item())
