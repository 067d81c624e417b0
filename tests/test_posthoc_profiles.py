"""Power-function profiles: sigma_rel <-> gamma, the ``power_function`` schedule (float and tensor forms),
and its use through ModelEMA.from_params and the Trainer's ema_params."""
import math
import warnings

import pytest
import torch
from torch import nn

from ema_cuda import ModelEMA
from ema_cuda.ema_decay_schedules import EMA_DECAY_FUNCTIONS
from ema_cuda.posthoc import GAMMA_MIN, SIGMA_REL_MAX, PowerFunctionDecay, gamma_to_sigma_rel, sigma_rel_to_gamma
from support import Net, loaders
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)

NEAR_ONE = 1 - 1e-9  # a cap the short runs here never reach


def test_known_values():
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(math.sqrt(1 / 12))  # the uniform average
    assert SIGMA_REL_MAX == pytest.approx(0.3003, abs=1e-4) and GAMMA_MIN == pytest.approx(-0.381966, abs=1e-6)


@pytest.mark.parametrize("sigma_rel", [1e-4, 0.01, 0.05, 0.07, 0.1, 0.2, 0.29, SIGMA_REL_MAX])
def test_sigma_rel_round_trip(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-13)
    # The cubic the inverse solves (NOTE [sigma_rel of a power-function profile]).
    s2 = sigma_rel ** -2
    assert gamma ** 3 + 7 * gamma ** 2 + (16 - s2) * gamma + (12 - s2) == pytest.approx(0, abs=1e-7 * s2 * (gamma + 1))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 6.94, 16.97, 100.0, 1e5])
def test_gamma_round_trip(gamma):
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.31, float("nan"), float("inf"), True, "0.1"])
def test_sigma_rel_out_of_range(bad):
    with pytest.raises(ValueError, match=r"sigma_rel_to_gamma: sigma_rel must be"):
        sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("bad", [-0.5, -1.0, float("nan"), None])
def test_gamma_out_of_range(bad):
    with pytest.raises(ValueError, match=r"gamma_to_sigma_rel: gamma must be"):
        gamma_to_sigma_rel(bad)


def test_registered_and_one_parameter():
    assert EMA_DECAY_FUNCTIONS["power_function"] is PowerFunctionDecay
    assert PowerFunctionDecay(sigma_rel=0.1).gamma == pytest.approx(sigma_rel_to_gamma(0.1))
    assert PowerFunctionDecay(gamma=6.94).sigma_rel == pytest.approx(gamma_to_sigma_rel(6.94))
    for kwargs in ({}, {"gamma": 7.0, "sigma_rel": 0.1}):
        with pytest.raises(TypeError, match="exactly one of gamma and sigma_rel"):
            PowerFunctionDecay(**kwargs)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        PowerFunctionDecay(sigma_rel=0.5)
    # get_params() names gamma only, so that a saved schedule rebuilds.
    fn = PowerFunctionDecay(sigma_rel=0.07)
    assert fn.get_params() == {"gamma": fn.gamma}
    assert PowerFunctionDecay(**fn.get_params()).gamma == fn.gamma


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.25])
def test_schedule_against_closed_form(sigma_rel):
    fn = PowerFunctionDecay(sigma_rel=sigma_rel)
    g = sigma_rel_to_gamma(sigma_rel)
    steps = [1, 2, 3, 10, 100, 12345, 10 ** 7]
    for t in steps:
        expected = (1 - 1 / t) ** (g + 1)
        assert fn(NEAR_ONE, t, None) == pytest.approx(expected, rel=1e-14, abs=0)
        for dtype in (torch.int64, torch.float32, torch.float64):
            value = fn.tensor_value(NEAR_ONE, torch.tensor(t, dtype=dtype), None)
            assert value.dtype == torch.float64 and value.dim() == 0
            assert value.item() == pytest.approx(expected, rel=1e-14, abs=0)
    assert fn(NEAR_ONE, 0, None) == 0.0 and fn.tensor_value(NEAR_ONE, torch.tensor(0), None).item() == 0.0
    # decay caps the value, in both forms.
    assert fn(0.5, 10 ** 7, None) == 0.5 and fn.tensor_value(0.5, torch.tensor(10 ** 7), None).item() == 0.5


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1])
def test_ema_weights_are_the_discrete_profile(sigma_rel):
    # The EMA of one-hot "models" gives each step's weight; it must be the integral of
    # (g+1) tau^g / t^(g+1) over [tau-1, tau].
    t_end = 50
    g = sigma_rel_to_gamma(sigma_rel)
    fn = PowerFunctionDecay(sigma_rel=sigma_rel)
    ema = torch.zeros(t_end, dtype=torch.float64)
    for t in range(1, t_end + 1):
        d = fn(NEAR_ONE, t, None)
        ema.mul_(d)
        ema[t - 1] += 1 - d
    tau = torch.arange(1, t_end + 1, dtype=torch.float64)
    expected = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / t_end ** (g + 1)
    torch.testing.assert_close(ema, expected, rtol=1e-12, atol=1e-15)
    # Its standard deviation relative to t approaches sigma_rel.
    mean = (ema * (tau - 0.5)).sum()
    std = ((ema * (tau - 0.5) ** 2).sum() - mean ** 2).sqrt()
    assert (std / t_end).item() == pytest.approx(sigma_rel, rel=0.01)




def test_from_params_eager_and_capturable():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    eager = ModelEMA.from_params(model, decay_type="power_function", sigma_rel=0.1, decay=NEAR_ONE)
    captured = ModelEMA.from_params(model, decay_type="power_function", sigma_rel=0.1, decay=NEAR_ONE,
                                    capturable=True)
    assert isinstance(eager.decay_function, PowerFunctionDecay)
    assert eager.decay_function.gamma == pytest.approx(sigma_rel_to_gamma(0.1))
    g = eager.decay_function.gamma
    ref = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    for t in range(1, 21):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        eager.update(model, t, 20)
        captured.update(model)
        d = (1 - 1 / t) ** (g + 1)
        for k, v in model.state_dict().items():
            ref[k] = ref[k] * d + v.double() * (1 - d)
    assert captured.decay_tensor.item() == pytest.approx((1 - 1 / 20) ** (g + 1), rel=1e-14)
    for ema in (eager, captured):
        for k, v in ema.state_dict()["ema"].items():
            torch.testing.assert_close(v.double(), ref[k], rtol=1e-5, atol=1e-6)
    # A saved EMA rebuilds the same schedule.
    saved = eager.state_dict()
    assert saved["decay_function"] == {"name": "power_function", "params": {"gamma": g}}
    other = ModelEMA.from_params(model, decay_type="constant", decay=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the saved schedule differs from the current one"
        other.load_state_dict(saved)
    assert isinstance(other.decay_function, PowerFunctionDecay) and other.decay_function.gamma == g


def test_from_params_gamma_and_bad_arguments():
    model = nn.Linear(2, 2)
    ema = ModelEMA.from_params(model, decay_type="power_function", gamma=16.97, decay=NEAR_ONE)
    assert ema.decay_function.gamma == 16.97
    with pytest.raises(TypeError, match="exactly one of gamma and sigma_rel"):
        ModelEMA.from_params(model, decay_type="power_function", decay=NEAR_ONE)
    with pytest.raises(ValueError, match="sigma_rel"):
        ModelEMA.from_params(model, decay_type="power_function", sigma_rel=0.4, decay=NEAR_ONE)


def test_trainer_ema_params(tmp_path):
    from ema_cuda.training import Trainer

    torch.manual_seed(0)
    model = Net()
    train, valid = loaders()
    params = {
        "max_epochs": 2, "initial_lr": 0.1, "ema": True, "progress_bar": False, "silent_mode": True,
        "device": "cpu", "ema_params": {"decay_type": "power_function", "sigma_rel": 0.1, "decay": NEAR_ONE},
    }
    trainer = Trainer("posthoc", tmp_path)
    with warnings.catch_warnings():
        # The power-function schedule's cap draws no configuration warning (largest_decay).
        warnings.simplefilter("error", UserWarning)
        trainer.train(model, params, train, valid)
    fn = trainer.ema.decay_function
    assert isinstance(fn, PowerFunctionDecay) and fn.gamma == pytest.approx(sigma_rel_to_gamma(0.1))
    assert trainer.ema.num_updates == 2 * len(train)
    assert fn(trainer.ema.decay, trainer.ema.num_updates, None) > 0


@pytest.mark.parametrize("total_steps", [None, 1000])
def test_the_cap_draws_no_configuration_warning_but_a_stall_at_the_last_step_does(total_steps):
    # decay=1-1e-9 is a cap the schedule never reaches: judged by it, the
    # horizon (1e9 steps) and the fp32 stall (1 + 1e-9 rounds to 1) would
    # warn on every run.  The schedule's value at the last step decides.
    model = nn.Linear(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ema = ModelEMA.from_params(model, decay_type="power_function", sigma_rel=0.1, decay=NEAR_ONE,
                                   total_steps=total_steps)
        ema.update(model, 1, 1000)
    # In bf16 the step at the end of a 10**6-step run, (gamma + 1) / t ~ 8e-6, is lost to rounding.
    with pytest.warns(UserWarning, match=r"rounds to 1 in torch.bfloat16"):
        ModelEMA.from_params(model, decay_type="power_function", sigma_rel=0.1, decay=NEAR_ONE,
                             total_steps=10**6, ema_dtype=torch.bfloat16)
    # A schedule without the hook is judged by its cap, as before.
    with pytest.warns(UserWarning, match=r"rounds to 1 in torch.float32"):
        ModelEMA.from_params(model, decay_type="constant", decay=NEAR_ONE)
