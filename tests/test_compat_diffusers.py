"""ema_cuda.compat.diffusers.EMAModel against diffusers' own EMAModel, side by side on one training run.

Tolerance: diffusers computes ``shadow - (1 - d) * (shadow - param)``, ours
``shadow * d + param * (1 - d)`` with one fused multiply-add; they differ by
rounding, a few units in the last place per step, so fp32 shadows after 300
steps are compared with ``rtol=1e-5, atol=1e-6``.  Copies (frozen
parameters, store/restore, copy_to) are exact.
"""
import copy
import io
import os
import pickle
import warnings

import pytest
import torch

from ema_cuda.compat.diffusers import EMAModel
from support import Net, check_dropins_benchmark, require_package
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOL = dict(rtol=1e-5, atol=1e-6)
STEPS = 300


def real_class():
    return require_package("diffusers", "0.30").training_utils.EMAModel


def train(model, emas, steps, first=1, freeze_at=None):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for step in range(first, first + steps):
        if step == freeze_at:  # a parameter frozen mid-run is copied from then on
            model.fc2.bias.requires_grad_(False)
        # Random targets: the weights keep moving, so the average differs from them.
        loss = (model(torch.randn(16, 8)) - torch.randn(16, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for ema in emas:
            ema.step(model.parameters())


def assert_same(ours, theirs, **tol):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        if key == "shadow_params":
            assert len(a[key]) == len(b[key])
            for i, (x, y) in enumerate(zip(a[key], b[key])):
                assert x.dtype == y.dtype and x.device == y.device
                torch.testing.assert_close(x, y, **(tol or TOL), msg=lambda m: f"shadow_params[{i}]: {m}")
        else:
            assert a[key] == b[key] and type(a[key]) is type(b[key]), key
    assert ours.cur_decay_value == theirs.cur_decay_value


@pytest.mark.parametrize("kwargs", [
    dict(decay=0.99),
    dict(decay=0.999, use_ema_warmup=True),
    dict(decay=0.995, use_ema_warmup=True, inv_gamma=2.0, power=0.75, min_decay=0.5, update_after_step=20),
    dict(decay=0.99, foreach=True, update_after_step=3),
], ids=["plain", "warmup", "warmup-options", "foreach"])
def test_same_weights_as_diffusers(kwargs):
    torch.manual_seed(0)
    model = Net()
    model.fc1.bias.requires_grad_(False)  # frozen from the start: copied, not averaged
    theirs, ours = real_class()(model.parameters(), **kwargs), EMAModel(model.parameters(), **kwargs)
    train(model, [theirs, ours], STEPS, freeze_at=150)
    assert ours.optimization_step == theirs.optimization_step == STEPS
    assert_same(ours, theirs)
    assert torch.equal(ours.shadow_params[1], model.fc1.bias)
    assert torch.equal(ours.shadow_params[-1], model.fc2.bias)
    gap = max((s - p).abs().max().item() for s, p in zip(ours.shadow_params, model.parameters()))
    assert gap > 1e-3  # the average is not the model: the comparison is not vacuous


def test_get_decay_is_diffusers():
    for kwargs in [dict(), dict(use_ema_warmup=True), dict(use_ema_warmup=True, inv_gamma=3.0, power=0.5,
                                                            min_decay=0.3, update_after_step=7, decay=0.999)]:
        theirs, ours = real_class()(Net().parameters(), **kwargs), EMAModel(Net().parameters(), **kwargs)
        for step in [0, 1, 2, 3, 8, 9, 10, 100, 10_000, 10**7]:
            assert ours.get_decay(step) == theirs.get_decay(step), (kwargs, step)


def test_attributes_are_diffusers():
    params = list(Net().parameters())
    theirs, ours = real_class()(params, decay=0.9, foreach=True), EMAModel(params, decay=0.9, foreach=True)
    for name in ["decay", "min_decay", "update_after_step", "use_ema_warmup", "inv_gamma", "power",
                 "optimization_step", "cur_decay_value", "foreach", "model_cls", "model_config",
                 "temp_stored_params"]:
        assert getattr(ours, name) == getattr(theirs, name), name
    for s, p in zip(ours.shadow_params, params):
        assert torch.equal(s, p) and s.data_ptr() != p.data_ptr() and not s.requires_grad


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dicts_load_both_ways_and_training_continues():
    torch.manual_seed(0)
    model = Net()
    kwargs = dict(decay=0.95, use_ema_warmup=True)
    theirs, ours = real_class()(model.parameters(), **kwargs), EMAModel(model.parameters(), **kwargs)
    train(model, [theirs, ours], 40)
    into_theirs, into_ours = real_class()(Net().parameters()), EMAModel(Net().parameters())
    into_theirs.load_state_dict(roundtrip(ours.state_dict()))
    into_ours.load_state_dict(roundtrip(theirs.state_dict()))
    for loaded, source in [(into_theirs, ours), (into_ours, theirs)]:
        a, b = loaded.state_dict(), source.state_dict()
        assert list(a) == list(b)
        assert all(torch.equal(x, y) for x, y in zip(a.pop("shadow_params"), b.pop("shadow_params")))
        assert a == b
    # Loading replaces the shadow list: the plan follows it.
    into_ours.cur_decay_value = theirs.cur_decay_value
    train(model, [into_ours, theirs], 20, first=41)
    assert_same(into_ours, theirs)


def test_load_state_dict_checks_as_diffusers_before_setting_anything():
    ema = EMAModel(Net().parameters(), decay=0.9)
    good = ema.state_dict()
    for key, value in [("decay", 1.5), ("min_decay", 0), ("optimization_step", 2.0), ("use_ema_warmup", 1),
                       ("inv_gamma", "1"), ("shadow_params", (torch.zeros(1),)), ("shadow_params", [1.0])]:
        with pytest.raises(ValueError, match=key):
            ema.load_state_dict({**good, key: value, "power": 0.5})
        with pytest.raises(ValueError):
            real_class()(Net().parameters()).load_state_dict({**good, key: value})
        assert ema.power == 2 / 3 and ema.decay == 0.9


def test_store_copy_to_restore():
    torch.manual_seed(0)
    model = Net()
    theirs, ours = real_class()(model.parameters(), decay=0.9), EMAModel(model.parameters(), decay=0.9)
    train(model, [theirs, ours], 30)
    training_weights = [p.detach().clone() for p in model.parameters()]
    twin = copy.deepcopy(model)
    ours.store(model.parameters())
    theirs.store(twin.parameters())
    ours.copy_to(model.parameters())
    theirs.copy_to(twin.parameters())
    for p, q, s in zip(model.parameters(), twin.parameters(), ours.shadow_params):
        assert torch.equal(p, s)
        torch.testing.assert_close(p, q, **TOL)
    ours.restore(model.parameters())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), training_weights))
    assert ours.temp_stored_params is None
    with pytest.raises(RuntimeError, match="store"):
        ours.restore(model.parameters())


def test_a_new_parameter_list_rebuilds_the_plan():
    torch.manual_seed(0)
    a, b = Net(), Net()
    ema = EMAModel(a.parameters(), decay=0.5)
    ema.step(a.parameters())
    ema.step(b.parameters())  # other Parameter objects of the same shapes
    d = (1 + 1) / (10 + 1)  # step 1 copied a; step 2's decay is 2/11 (under the cap of 0.5)
    for s, pa, pb in zip(ema.shadow_params, a.parameters(), b.parameters()):
        torch.testing.assert_close(s, pa * d + pb * (1 - d), **TOL)
    with pytest.raises(RuntimeError, match="got 2 parameters for 6 shadow parameters"):
        ema.step(list(a.parameters())[:2])
    assert ema.optimization_step == 2


def test_fp32_shadow_of_a_bf16_model():
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    theirs, ours = real_class()(model.parameters(), decay=0.99), EMAModel(model.parameters(), decay=0.99)
    for ema in (theirs, ours):
        ema.to(dtype=torch.float32)
    for _ in range(50):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)
        theirs.step(model.parameters())
        ours.step(model.parameters())
    assert ours.shadow_params[0].dtype == torch.float32
    assert_same(ours, theirs)


def test_deprecated_forms_warn_and_work():
    model = Net()
    with pytest.warns(FutureWarning):
        ema = EMAModel(model)
    assert ema.use_ema_warmup is True and len(ema.shadow_params) == 6
    with pytest.warns(FutureWarning):
        ema = EMAModel(model.parameters(), max_value=0.5, min_value=0.1)
    assert (ema.decay, ema.min_decay) == (0.5, 0.1)
    with pytest.warns(FutureWarning):
        ema.step(model)
    assert ema.optimization_step == 1


def test_copies_and_pickles_continue_alike():
    torch.manual_seed(0)
    model = Net()
    ours = EMAModel(model.parameters(), decay=0.9)
    train(model, [ours], 3)
    others = [copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))]
    train(model, [ours] + others, 3, first=4)
    for other in others:
        assert_same(other, ours, rtol=0, atol=0)


def test_save_and_from_pretrained(tmp_path):
    diffusers = require_package("diffusers", "0.30")
    from diffusers.configuration_utils import ConfigMixin, register_to_config

    class Tiny(diffusers.ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, width: int = 4):
            super().__init__()
            self.lin = torch.nn.Linear(width, width)

    torch.manual_seed(0)
    model = Tiny()
    ema = EMAModel(model.parameters(), decay=0.9, model_cls=Tiny, model_config=model.config)
    with torch.no_grad():
        model.lin.weight.add_(1.0)
    ema.step(model.parameters())
    ema.step(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ema.save_pretrained(tmp_path / "ema")
        loaded = EMAModel.from_pretrained(tmp_path / "ema", model_cls=Tiny)
        theirs = real_class().from_pretrained(tmp_path / "ema", model_cls=Tiny)
    for other in (loaded, theirs):
        assert other.optimization_step == 2 and other.decay == 0.9
        assert all(torch.equal(x, y) for x, y in zip(other.shadow_params, ema.shadow_params))


def test_benchmark_rows_smoke():
    """benchmarks/fw_dropins.py runs end to end on a tiny model (no speed is asserted here)."""
    real_class()  # the framework must be there
    check_dropins_benchmark("diffusers")


def test_a_model_switched_to_channels_last_after_the_ema_was_made():
    from support import ConvNet

    torch.manual_seed(0)
    model = ConvNet()
    theirs, ours = real_class()(model.parameters(), decay=0.9), EMAModel(model.parameters(), decay=0.9)
    model.to(memory_format=torch.channels_last)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)
        theirs.step(model.parameters())
        ours.step(model.parameters())
    assert ours.shadow_params[0].is_contiguous(memory_format=torch.channels_last)
    assert_same(ours, theirs)


def test_a_parameter_passed_twice():
    # A weight tied in the model appears twice when the parameters are listed without deduplication.
    torch.manual_seed(0)
    model = Net()
    params = list(model.parameters()) + [model.fc1.weight]
    theirs, ours = real_class()(params, decay=0.9), EMAModel(params, decay=0.9)
    for _ in range(5):
        with torch.no_grad():
            model.fc1.weight.add_(0.1)
        theirs.step(params)
        ours.step(params)
    assert_same(ours, theirs)
