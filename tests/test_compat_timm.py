"""ema_cuda.compat.timm.ModelEmaV3 against timm's own ModelEmaV3, side by side on one training run.

Tolerance: timm's update is ``lerp`` (``ema + w * (model - ema)``), ours
``ema * d + model * w`` with one fused multiply-add; they differ by rounding,
a few units in the last place per update, so fp32 weights after 300 updates
are compared with ``rtol=1e-5, atol=1e-6``.  Integer buffers are exact.
"""
import copy
import io
import pickle

import pytest
import torch

from ema_cuda.compat.timm import ModelEmaV3
from support import Net, check_dropins_benchmark, require_package
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)

TOL = dict(rtol=1e-5, atol=1e-6)
STEPS = 300


def real_class():
    return require_package("timm", "1.0").utils.ModelEmaV3


def train_side_by_side(kwargs, steps=STEPS, with_step=True, model=None, seed=0):
    torch.manual_seed(seed)
    model = model or Net()
    theirs, ours = real_class()(model, **kwargs), ModelEmaV3(model, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(1, steps + 1):
        # Random targets: the weights keep moving, so the average differs from them.
        loss = (model(torch.randn(16, 8)) - torch.randn(16, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        theirs.update(model, step=step if with_step else None)
        ours.update(model, step=step if with_step else None)
    return model, theirs, ours


def assert_same_state(ours, theirs, **tol):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], **(tol or TOL), msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kwargs", [
    dict(decay=0.99),
    dict(decay=0.999, use_warmup=True),
    dict(decay=0.995, use_warmup=True, warmup_gamma=2.0, warmup_power=0.75, min_decay=0.5, update_after_step=20),
    dict(decay=0.99, exclude_buffers=True, update_after_step=5),
    dict(decay=0.99, foreach=False),
], ids=["plain", "warmup", "warmup-options", "exclude-buffers", "no-foreach"])
def test_same_weights_as_timm(kwargs):
    model, theirs, ours = train_side_by_side(kwargs)
    assert_same_state(ours, theirs)
    # The EMA really moved away from the model and from its start (the comparison is not vacuous).
    gap = max((e - m).abs().max().item() for e, m in zip(ours.module.parameters(), model.parameters()))
    assert gap > 1e-3


def test_without_a_step_the_decay_is_constant():
    _, theirs, ours = train_side_by_side(dict(decay=0.9, use_warmup=True), steps=50, with_step=False)
    assert_same_state(ours, theirs)


def test_get_decay_is_timms():
    for kwargs in [dict(), dict(use_warmup=True), dict(use_warmup=True, warmup_gamma=3.0, warmup_power=0.5,
                                                        min_decay=0.3, update_after_step=7, decay=0.999)]:
        theirs, ours = real_class()(Net(), **kwargs), ModelEmaV3(Net(), **kwargs)
        for step in [None, 0, 1, 2, 3, 8, 9, 10, 100, 10_000, 10**7]:
            assert ours.get_decay(step) == theirs.get_decay(step), (kwargs, step)


def test_attributes_and_state_dict_keys_are_timms():
    model = Net()
    theirs, ours = real_class()(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    for name in ["decay", "min_decay", "update_after_step", "use_warmup", "warmup_gamma", "warmup_power", "foreach",
                 "device", "dtype", "stochastic_rounding", "stochastic_rounding_seed", "exclude_buffers"]:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert not ours.module.training
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dicts_load_both_ways_and_training_continues():
    model, theirs, ours = train_side_by_side(dict(decay=0.95), steps=40)
    fresh_theirs, fresh_ours = real_class()(Net(), decay=0.95), ModelEmaV3(Net(), decay=0.95)
    fresh_theirs.load_state_dict(roundtrip(ours.state_dict()))
    fresh_ours.load_state_dict(roundtrip(theirs.state_dict()))
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh_theirs.state_dict()[key], value), key
    for key, value in theirs.state_dict().items():
        assert torch.equal(fresh_ours.state_dict()[key], value), key
    # Loading writes in place: the loaded EMA goes on updating (the cached plan still holds).
    for step in range(41, 61):
        with torch.no_grad():
            model.fc1.weight.add_(0.01)
        fresh_ours.update(model, step)
        theirs.update(model, step)
    assert_same_state(fresh_ours, theirs)


def test_fp32_ema_of_a_bf16_model():
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    kwargs = dict(decay=0.99, dtype=torch.float32)
    theirs, ours = real_class()(model, **kwargs), ModelEmaV3(model, **kwargs)
    for step in range(1, 101):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)
        theirs.update(model, step)
        ours.update(model, step)
    assert ours.module.fc1.weight.dtype == torch.float32
    assert_same_state(ours, theirs)


def test_stochastic_rounding_of_a_bf16_ema_is_refused_by_name():
    model = Net().to(torch.bfloat16)
    with pytest.raises(NotImplementedError, match="stochastic_rounding=True.*dtype=torch.float32"):
        ModelEmaV3(model)
    ema = ModelEmaV3(model, stochastic_rounding=False)  # round to nearest, as asked
    ema.update(model, step=1)
    assert torch.equal(ema.module.fc1.weight, model.fc1.weight)


def test_replaced_model_tensors_are_followed():
    torch.manual_seed(0)
    model = Net()
    theirs, ours = real_class()(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    for step in range(1, 4):
        theirs.update(model, step)
        ours.update(model, step)
    # New Parameter objects (and storage) under the same names: the cached plan must not read the old ones.
    new_state = {k: v + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(new_state, assign=True)
    with torch.no_grad():
        model.fc2.bias.data = model.fc2.bias.data * 3  # storage replaced under the same Parameter
    for step in range(4, 8):
        theirs.update(model, step)
        ours.update(model, step)
    assert_same_state(ours, theirs)


def test_a_model_that_does_not_pair_is_refused_before_any_write():
    ema = ModelEmaV3(Net(), decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"EMA entry 'fc1.weight' has shape \[16, 8\] but .*, has \[12, 8\]"):
        ema.update(Net(hidden=12), step=5)
    with pytest.raises(RuntimeError, match="model has 7 state_dict entries and the EMA 9"):
        ema.update(torch.nn.Sequential(*list(Net().children())[:2]), step=5)
    for key, value in ema.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_set_copy_and_pickle():
    model, theirs, ours = train_side_by_side(dict(decay=0.9), steps=5)
    clone = copy.deepcopy(ours)
    unpickled = pickle.loads(pickle.dumps(ours))
    for ema in (clone, unpickled):
        for step in range(6, 9):
            ema.update(model, step)
    for step in range(6, 9):
        ours.update(model, step)
        theirs.update(model, step)
    for ema in (clone, unpickled):
        assert_same_state(ema, ours, rtol=0, atol=0)
    ours.set(model)
    theirs.set(model)
    assert_same_state(ours, theirs, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ema_on_another_device():
    torch.manual_seed(0)
    model = Net().cuda()
    kwargs = dict(decay=0.9, device=torch.device("cpu"))
    theirs, ours = real_class()(model, **kwargs), ModelEmaV3(model, **kwargs)
    assert ours.module.fc1.weight.device.type == "cpu" and ours.foreach is False
    for step in range(1, 21):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)
        model(torch.randn(8, 8, device="cuda"))  # BN statistics move too
        theirs.update(model, step)
        ours.update(model, step)
    assert_same_state(ours, theirs)


def test_benchmark_rows_smoke():
    """benchmarks/fw_dropins.py runs end to end on a tiny model (no speed is asserted here)."""
    real_class()  # the framework must be there
    check_dropins_benchmark("timm")


def test_a_model_switched_to_channels_last_after_the_ema_was_made():
    from support import ConvNet

    torch.manual_seed(0)
    model = ConvNet()
    theirs, ours = real_class()(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    model.to(memory_format=torch.channels_last)
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)
        theirs.update(model, step)
        ours.update(model, step)
    assert ours.module.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_state(ours, theirs)
