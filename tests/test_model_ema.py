"""ModelEMA and KDModelEMA: SuperGradients' semantics, the deliberate differences, and the options."""
import copy
import io
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import ema_cuda
from ema_cuda import KDModelEMA, ModelEMA, ops
from ema_cuda.ema_decay_schedules import (
    EMA_DECAY_FUNCTIONS,
    ConstantDecay,
    ExpDecay,
    IDecayFunction,
    PowerWarmupDecay,
    RampDecay,
    ThresholdDecay,
)
from support import KD, ConvNet, Tied, assert_bit_identical, state
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)

TOTAL = 120


def train_step(model, gen, scale=0.05):
    """A stand-in for an optimizer step: move every parameter, and let BatchNorm see a batch."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
        was = model.training
        model.train()
        inner = ema_cuda.ema.unwrap_model(model)
        target = inner.student if isinstance(inner, KD) else inner
        if isinstance(target, ConvNet):
            target(torch.randn(4, 3, 5, 5, generator=gen).to(next(target.parameters()).dtype))
        model.train(was)


class SGReference:
    """SuperGradients' loop over state_dict entries, ``ema * d + (1 - d) * p``, in float64."""

    def __init__(self, model):
        self.state = {k: v.detach().to(torch.float64) if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}

    def update(self, model, d):
        msd = model.state_dict()
        for k, v in self.state.items():
            if v.is_floating_point():
                self.state[k] = v * d + (1.0 - d) * msd[k].detach().to(torch.float64)


class LinearDecay(IDecayFunction):
    def __init__(self, **kwargs):
        pass

    def __call__(self, decay: float, step: int, total_steps: int) -> float:
        return decay * (step / total_steps)


@pytest.fixture
def linear_registered():
    EMA_DECAY_FUNCTIONS["linear"] = LinearDecay
    yield
    EMA_DECAY_FUNCTIONS.pop("linear", None)


SCHEDULES = [
    ("constant", {}),
    ("threshold", {}),
    ("exp", {"beta": 15}),
    ("power", {"power": 0.75}),
    ("ramp", {"tau": 30}),
    ("linear", {}),
]


# ---------------------------------------------------------------- equality with SuperGradients' loop


@pytest.mark.parametrize("decay_type,kwargs", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_matches_supergradients_loop(decay_type, kwargs, linear_registered):
    gen = torch.Generator().manual_seed(1)
    model = ConvNet()
    ema = ModelEMA.from_params(model, decay_type=decay_type, decay=0.95, **kwargs)
    ref = SGReference(model)
    for step in range(1, TOTAL + 1):
        train_step(model, gen)
        ema.update(model, step=step, total_steps=TOTAL)
        ref.update(model, ema.decay_function(0.95, step, TOTAL))
    got = ema.ema.state_dict()
    for k, v in ref.state.items():
        if v.is_floating_point():
            assert got[k].dtype == torch.float32
            torch.testing.assert_close(got[k].double(), v, rtol=2e-6, atol=2e-7, msg=k)
    # The EMA lags the model: it is not simply a copy of it.
    assert not torch.allclose(got["conv.weight"], model.conv.weight)
    assert ema.num_updates == TOTAL


def test_integer_buffers_follow_the_model():
    # SuperGradients skips non-float entries, so num_batches_tracked stays 0 there.
    gen = torch.Generator().manual_seed(2)
    model = ConvNet()
    ema = ModelEMA(model, 0.9, ConstantDecay())
    for step in range(1, 8):
        train_step(model, gen)
        ema.update(model, step, 10)
    assert model.bn.num_batches_tracked.item() == 7
    assert torch.equal(ema.ema.bn.num_batches_tracked, model.bn.num_batches_tracked)


def test_buffers_copy_mode():
    gen = torch.Generator().manual_seed(3)
    model = ConvNet()
    ema = ModelEMA(model, 0.9, ConstantDecay(), buffers="copy")
    avg = ModelEMA(model, 0.9, ConstantDecay())
    for step in range(1, 6):
        train_step(model, gen)
        ema.update(model, step, 10)
        avg.update(model, step, 10)
    assert torch.equal(ema.ema.bn.running_mean, model.bn.running_mean)
    assert torch.equal(ema.ema.bn.running_var, model.bn.running_var)
    assert not torch.equal(avg.ema.bn.running_mean, model.bn.running_mean)
    # Parameters are still averaged.
    assert torch.equal(ema.ema.conv.weight, avg.ema.conv.weight)
    assert not torch.allclose(ema.ema.conv.weight, model.conv.weight)


@pytest.fixture
def op_calls(monkeypatch):
    """Records what updates ask of ``ema_cuda.ops`` and torch: the ``FusedUpdater`` objects built (their
    public lists say what each fused call averages and copies), their ``update`` calls, and the destination
    list of every ``torch._foreach_copy_``."""
    calls = SimpleNamespace(updaters=[], updates=0, copies=[])
    init, update, foreach_copy = ops.FusedUpdater.__init__, ops.FusedUpdater.update, torch._foreach_copy_

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        calls.updaters.append(self)

    def counting_update(self, d):
        calls.updates += 1
        update(self, d)

    def recording_copy(dst, *args, **kwargs):
        calls.copies.append(list(dst))
        return foreach_copy(dst, *args, **kwargs)

    monkeypatch.setattr(ops.FusedUpdater, "__init__", recording_init)
    monkeypatch.setattr(ops.FusedUpdater, "update", counting_update)
    monkeypatch.setattr(torch, "_foreach_copy_", recording_copy)
    return calls


def test_one_fused_call_per_update_and_plan_reused(op_calls):
    gen = torch.Generator().manual_seed(4)
    model = ConvNet()
    ema = ModelEMA(model, 0.9, ConstantDecay())
    op_calls.copies.clear()  # the updates' copies only
    for step in range(1, 11):
        train_step(model, gen)
        ema.update(model, step, 10)
    assert (len(op_calls.updaters), op_calls.updates) == (1, 10)
    # num_batches_tracked is copied inside that call, not by a second op
    # (the fallback's FusedUpdater makes it a foreach copy of its own).
    assert len(op_calls.copies) == (0 if ops.backend() == "compiled" else 10)
    assert op_calls.updaters[0].copy_ema == [ema.ema.bn.num_batches_tracked]
    assert torch.equal(ema.ema.bn.num_batches_tracked, model.bn.num_batches_tracked)


def test_copied_buffers_that_change_dtype_are_cast(op_calls):
    # buffers="copy" with an fp32 EMA of a bf16 model: the floating buffers
    # are copied with a cast (outside the fused call), the integer one inside.
    gen = torch.Generator().manual_seed(41)
    model = ConvNet().to(torch.bfloat16)
    ema = ModelEMA(model, 0.9, ConstantDecay(), buffers="copy", ema_dtype=torch.float32)
    for step in range(1, 4):
        train_step(model, gen, scale=0.01)
        ema.update(model, step, 10)
    (fused,) = op_calls.updaters
    counter = ema.ema.bn.num_batches_tracked
    assert fused.copy_ema == [counter]
    casts = {frozenset(map(id, dst)) for dst in op_calls.copies if not any(t is counter for t in dst)}
    assert casts == {frozenset((id(ema.ema.bn.running_mean), id(ema.ema.bn.running_var)))}
    assert ema.ema.bn.running_mean.dtype == torch.float32
    assert torch.equal(ema.ema.bn.running_mean, model.bn.running_mean.float())
    assert torch.equal(ema.ema.bn.running_var, model.bn.running_var.float())
    assert torch.equal(ema.ema.bn.num_batches_tracked, model.bn.num_batches_tracked)


def test_a_replaced_integer_buffer_is_followed():
    gen = torch.Generator().manual_seed(42)
    model = ConvNet()
    ema = ModelEMA(model, 0.9, ConstantDecay())
    train_step(model, gen)
    ema.update(model, 1, 10)
    model.bn.num_batches_tracked = torch.tensor(40)       # a new tensor in the registry
    ema.update(model, 2, 10)
    assert ema.ema.bn.num_batches_tracked.item() == 40
    model.bn.num_batches_tracked.data = torch.tensor(50)  # a new storage, same tensor object
    ema.update(model, 3, 10)
    assert ema.ema.bn.num_batches_tracked.item() == 50


def test_ema_module_is_an_eval_copy_in_flat_buffers():
    model = ConvNet()
    model.train()
    ema = ModelEMA(model, 0.9, ConstantDecay())
    assert isinstance(ema.ema, ConvNet) and ema.ema is not model
    assert not ema.ema.training and not ema.ema.bn.training
    assert model.training
    assert all(not p.requires_grad for p in ema.ema.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert_bit_identical(state(ema.ema), state(model))
    model_ptrs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    floating = [t for t in ema.ema.state_dict().values() if t.is_floating_point()]
    # Every floating EMA tensor is a view of one buffer, none shares the model's memory.
    assert len({t.untyped_storage().data_ptr() for t in floating}) == 1
    assert not model_ptrs & {t.untyped_storage().data_ptr() for t in ema.ema.state_dict().values()}


def test_tied_weights_are_updated_once():
    gen = torch.Generator().manual_seed(5)
    model = Tied()
    ema = ModelEMA(model, 0.8, ConstantDecay())
    assert ema.ema.out.weight is ema.ema.embed.weight
    ref = SGReference(model)  # holds the tied entry twice, updated identically
    for step in range(1, 31):
        train_step(model, gen)
        ema.update(model, step, 30)
        ref.update(model, 0.8)
    torch.testing.assert_close(ema.ema.embed.weight.double(), ref.state["embed.weight"], rtol=2e-6, atol=2e-7)
    assert ema.ema.out.weight is ema.ema.embed.weight


def test_fp32_ema_of_bf16_model():
    gen = torch.Generator().manual_seed(6)
    model = ConvNet().to(torch.bfloat16)
    ema = ModelEMA(model, 0.999, ConstantDecay(), ema_dtype=torch.float32)
    low = ModelEMA(model, 0.999, ConstantDecay())
    assert all(t.dtype == torch.float32 for t in ema.ema.state_dict().values() if t.is_floating_point())
    ref = SGReference(model)
    start = low.ema.conv.weight.clone()
    for step in range(1, 51):
        train_step(model, gen, scale=0.01)
        ema.update(model, step, 50)
        low.update(model, step, 50)
        ref.update(model, 0.999)
    torch.testing.assert_close(ema.ema.conv.weight.double(), ref.state["conv.weight"], rtol=1e-5, atol=1e-6)
    # The reason for the option: a bf16 EMA barely moves at this decay.
    moved_fp32 = (ema.ema.conv.weight - start.float()).abs().sum()
    moved_bf16 = (low.ema.conv.weight.float() - start.float()).abs().sum()
    assert moved_bf16 < 0.5 * moved_fp32


def test_ema_dtype_from_string():
    ema = ModelEMA.from_params(ConvNet(), decay=0.9, decay_type="constant", ema_dtype="float64")
    assert ema.ema.conv.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="ema_dtype"):
        ModelEMA(ConvNet(), 0.9, ConstantDecay(), ema_dtype=torch.int32)


def test_update_every():
    gen = torch.Generator().manual_seed(7)
    model = ConvNet()
    ema = ModelEMA(model, 0.5, ConstantDecay(), update_every=3)
    ref = SGReference(model)
    for step in range(1, 11):
        train_step(model, gen)
        ema.update(model, step, 10)
        if step % 3 == 0:
            ref.update(model, 0.5)
    assert ema.num_updates == 3
    torch.testing.assert_close(ema.ema.head.weight.double(), ref.state["head.weight"], rtol=2e-6, atol=2e-7)


def test_skip_nonfinite_guard():
    model = ConvNet()
    guarded = ModelEMA(model, 0.5, ConstantDecay(), skip_nonfinite=True)
    plain = ModelEMA(model, 0.5, ConstantDecay())
    before = state(guarded.ema)
    with torch.no_grad():
        model.head.bias[2] = float("nan")
    guarded.update(model, 1, 10)
    plain.update(model, 1, 10)
    assert_bit_identical(state(guarded.ema), before)
    assert guarded.num_skipped == 1 and guarded.num_updates == 0
    assert torch.isnan(plain.ema.head.bias[2])
    with torch.no_grad():
        model.head.bias[2] = float("inf")
    guarded.update(model, 2, 10)
    assert guarded.num_skipped == 2
    with torch.no_grad():
        model.head.bias[2] = 3e38  # large but finite: not skipped
    guarded.update(model, 3, 10)
    assert guarded.num_updates == 1 and torch.isfinite(guarded.ema.head.bias).all()


# ---------------------------------------------------------------- swap, copy_to, update_attr


def test_swapped_exchanges_and_restores_exactly():
    gen = torch.Generator().manual_seed(8)
    model = ConvNet()
    ema = ModelEMA(model, 0.9, ConstantDecay())
    for step in range(1, 6):
        train_step(model, gen)
        ema.update(model, step, 5)
    params = list(model.parameters())
    ptrs = [t.data_ptr() for t in model.state_dict().values()]
    before = state(model)
    ema_values = state(ema.ema)
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    with ema.swapped(model) as m:
        assert m is model
        assert_bit_identical(state(model), ema_values)
        # No copy: the model's tensors are the EMA's memory.
        assert model.conv.weight.data_ptr() == ema.ema.conv.weight.data_ptr()
        assert torch.equal(model(x), ema.ema(x))
        with pytest.raises(RuntimeError, match="inside swapped"):
            ema.update(model, 6, 10)
    assert_bit_identical(state(model), before)
    assert [t.data_ptr() for t in model.state_dict().values()] == ptrs
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert_bit_identical(state(ema.ema), ema_values)


def test_swapped_restores_on_exception():
    gen = torch.Generator().manual_seed(9)
    model = ConvNet()
    ema = ModelEMA(model, 0.9, ConstantDecay())
    train_step(model, gen)
    ema.update(model, 1, 5)
    before = state(model)
    with pytest.raises(ZeroDivisionError):
        with ema.swapped(model):
            assert not torch.equal(model.conv.weight, before["conv.weight"])
            1 / 0
    assert_bit_identical(state(model), before)
    ema.update(model, 2, 5)  # no longer inside the block
    assert ema.num_updates == 2


def test_swapped_with_different_ema_dtype_keeps_model_dtype():
    gen = torch.Generator().manual_seed(10)
    model = ConvNet().to(torch.bfloat16)
    ema = ModelEMA(model, 0.9, ConstantDecay(), ema_dtype=torch.float32)
    train_step(model, gen)
    ema.update(model, 1, 5)
    before = state(model)
    with ema.swapped(model):
        assert model.conv.weight.dtype == torch.bfloat16
        assert torch.equal(model.conv.weight, ema.ema.conv.weight.to(torch.bfloat16))
    assert_bit_identical(state(model), before)


def _trained_with_ema(seed):
    """A ConvNet trained 3 SGD-with-momentum steps, its optimizer, its EMA and the batch."""
    gen = torch.Generator().manual_seed(seed)
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = ModelEMA(model, 0.9, ConstantDecay())
    x, y = torch.randn(4, 3, 5, 5, generator=gen), torch.randint(0, 5, (4,), generator=gen)
    for step in range(1, 4):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ema.update(model, step, 10)
    return model, opt, ema, x, y


def test_swapped_then_optimizer_keeps_training():
    model, opt, ema, x, y = _trained_with_ema(seed=11)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # not shared momentum buffers
    model.eval()
    with ema.swapped(model):
        model(x)
    model.train()
    for m, o in ((model, opt), (twin, twin_opt)):
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    # The swap left nothing behind: training continues exactly as without it.
    assert_bit_identical(state(model), state(twin))


def test_copy_to_with_optimizer_continuing():
    model, opt, ema, x, y = _trained_with_ema(seed=12)
    params = list(model.parameters())
    ptrs = [p.data_ptr() for p in params]
    ema.copy_to(model)
    assert_bit_identical(state(model), state(ema.ema))
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(a is b for a, b in zip(model.parameters(), params))
    # The momentum buffers are still attached to the same parameters and used.
    assert all(p in opt.state and "momentum_buffer" in opt.state[p] for p in params)
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    start = [p.detach().clone() for p in params]
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in params]
    opt.step()
    for p, s, b, g in zip(params, start, bufs, grads):
        torch.testing.assert_close(p.detach(), s - 0.1 * (0.9 * b + g))


def test_update_attr():
    class WithAttrs(ConvNet):
        def __init__(self):
            super().__init__()
            self.names = ["a", "b"]
            self.stride = 8
            self._private = 1

    model = WithAttrs()
    ema = ModelEMA(model, 0.9, ConstantDecay())
    model.names = ["x"]
    model.stride = 16
    model._private = 2
    model.extra = "new"
    model.train()
    ema.update_attr(model)
    assert ema.ema.names == ["x"] and ema.ema.stride == 16 and ema.ema.extra == "new"
    assert ema.ema._private == 1
    assert not ema.ema.training
    ema.update_attr(model, exclude=["stride"])
    model.stride = 32
    ema.update_attr(model, include=["names"])
    assert ema.ema.stride == 16


def test_update_attr_uses_declared_include_exclude():
    class Declared(ConvNet):
        def __init__(self):
            super().__init__()
            self.anchors = [1]
            self.other = 1

        def get_include_attributes(self):
            return []

        def get_exclude_attributes(self):
            return ["other"]

    model = Declared()
    ema = ModelEMA(model, 0.9, ConstantDecay())
    model.anchors, model.other = [2], 2
    ema.update_attr(nn.DataParallel(model))
    assert ema.ema.anchors == [2] and ema.ema.other == 1


# ---------------------------------------------------------------- checkpoints


def run(ema, model_states, model, start, stop):
    for step in range(start, stop):
        model.load_state_dict(model_states[step])
        ema.update(model, step, TOTAL)


@pytest.mark.parametrize("decay_type,kwargs", [("exp", {"beta": 15}), ("power", {"update_after_step": 3})])
def test_state_dict_round_trip_continues_bit_exactly(decay_type, kwargs, tmp_path):
    gen = torch.Generator().manual_seed(13)
    model = ConvNet()
    init = state(model)
    states = {}
    for step in range(1, TOTAL + 1):
        train_step(model, gen)
        states[step] = state(model)

    def fresh():
        m = ConvNet()
        m.load_state_dict(init)
        return m

    model = fresh()
    uninterrupted = ModelEMA.from_params(model, decay_type=decay_type, decay=0.99, **kwargs)
    run(uninterrupted, states, model, 1, TOTAL + 1)

    model = fresh()
    first = ModelEMA.from_params(model, decay_type=decay_type, decay=0.99, **kwargs)
    run(first, states, model, 1, 61)
    path = tmp_path / "ema.pt"
    torch.save(first.state_dict(), path)
    del first

    model = ConvNet()  # a fresh process: other initial weights, another schedule
    resumed = ModelEMA(model, 0.5, ConstantDecay())
    with pytest.warns(UserWarning, match="replaces the current"):
        resumed.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.decay == 0.99 and type(resumed.decay_function) is EMA_DECAY_FUNCTIONS[decay_type]
    assert resumed.num_updates == 60
    run(resumed, states, model, 61, TOTAL + 1)
    assert_bit_identical(state(resumed.ema), state(uninterrupted.ema))
    assert resumed.num_updates == uninterrupted.num_updates == TOTAL


def test_state_dict_holds_only_plain_values():
    ema = ModelEMA(ConvNet(), 0.9, ExpDecay(beta=15), update_every=2)
    sd = ema.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["decay_function"] == {"name": "exp", "params": {"beta": 15.0}}
    assert loaded["update_every"] == 2 and loaded["decay"] == 0.9
    assert set(loaded["ema"]) == set(ConvNet().state_dict())


def _bad_state(case):
    if case == "another width":
        return ModelEMA(ConvNet(width=7), 0.9, ConstantDecay()).state_dict()
    saved = ModelEMA(ConvNet(), 0.9, ConstantDecay()).state_dict()
    if case == "a missing entry":
        del saved["ema"]["bn.running_var"]
    elif case == "decay 1.5":
        saved["decay"] = 1.5
    return saved


_BAD_STATE_ERRORS = {
    "another width": (RuntimeError, "'conv.weight'"),
    "a missing entry": (RuntimeError, "bn.running_var"),
    "decay 1.5": (ValueError, "1.5"),
}


@pytest.mark.parametrize("case", list(_BAD_STATE_ERRORS))
def test_load_state_dict_rejects_mismatch_untouched(case):
    error, match = _BAD_STATE_ERRORS[case]
    ema = ModelEMA(ConvNet(), 0.9, ConstantDecay())
    before = state(ema.ema)
    bad = _bad_state(case)
    with pytest.raises(error, match=match):
        ema.load_state_dict(bad)
    assert_bit_identical(state(ema.ema), before)


# ---------------------------------------------------------------- distillation and wrappers


def test_kd_teacher_never_written():
    gen = torch.Generator().manual_seed(14)
    kd = KD(ConvNet(4), ConvNet(8))
    teacher_before = state(kd.teacher)
    teacher_ptrs = [t.data_ptr() for t in kd.teacher.state_dict().values()]
    ema = KDModelEMA.from_params(kd, decay_type="threshold", decay=0.9)
    assert ema.ema.teacher is kd.teacher
    assert ema.ema.student is not kd.student and isinstance(ema.ema, KD)
    assert kd.student is not ema.ema.student and kd._modules["student"] is kd.student
    ref = SGReference(kd.student)
    for step in range(1, 101):
        train_step(kd, gen)
        ema.update(kd, step, 100)
        ref.update(kd.student, ThresholdDecay()(0.9, step, 100))
    with ema.swapped(kd):
        pass
    ema.copy_to(kd)
    assert_bit_identical(state(kd.teacher), teacher_before)
    assert [t.data_ptr() for t in kd.teacher.state_dict().values()] == teacher_ptrs
    torch.testing.assert_close(ema.ema.student.conv.weight.double(), ref.state["conv.weight"], rtol=2e-6, atol=2e-7)
    assert set(ema.state_dict()["ema"]) == set(kd.student.state_dict())


def test_kd_needs_student_and_teacher():
    with pytest.raises(TypeError, match="student"):
        KDModelEMA(ConvNet(), 0.9, ConstantDecay())


def test_data_parallel_wrapper_is_removed():
    gen = torch.Generator().manual_seed(15)
    model = ConvNet()
    wrapped = nn.DataParallel(model)
    ema = ModelEMA(wrapped, 0.9, ConstantDecay())
    assert isinstance(ema.ema, ConvNet)
    assert set(ema.ema.state_dict()) == set(model.state_dict())
    ref = SGReference(model)
    for step in range(1, 11):
        train_step(model, gen)
        ema.update(wrapped if step % 2 else model, step, 10)
        ref.update(model, 0.9)
    torch.testing.assert_close(ema.ema.conv.weight.double(), ref.state["conv.weight"], rtol=2e-6, atol=2e-7)


def test_ddp_wrapper_is_removed(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = ConvNet()
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = ModelEMA(ddp, 0.9, ConstantDecay())
        assert isinstance(ema.ema, ConvNet)
        with torch.no_grad():
            model.conv.weight.add_(1.0)
        expected = ema.ema.conv.weight * 0.9 + model.conv.weight * 0.1
        ema.update(ddp, 1, 10)
        torch.testing.assert_close(ema.ema.conv.weight, expected)
        with ema.swapped(ddp):
            assert torch.equal(model.conv.weight, ema.ema.conv.weight)
    finally:
        dist.destroy_process_group()


def test_compiled_wrapper_is_removed():
    model = ConvNet()
    compiled = torch.compile(model)
    ema = ModelEMA(compiled, 0.9, ConstantDecay())
    assert isinstance(ema.ema, ConvNet)
    assert set(ema.ema.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        model.head.bias.add_(1.0)
    ema.update(compiled, 1, 10)
    torch.testing.assert_close(ema.ema.head.bias, model.head.bias - 0.9)


# ---------------------------------------------------------------- the seed's example and from_params


def test_seed_linear_decay_example(linear_registered):
    # The seed's example: a schedule of the user's (LinearDecay above), registered under a name.
    model = ConvNet()
    ema = ModelEMA.from_params(model, decay=0.999, decay_type="linear")
    assert isinstance(ema.decay_function, LinearDecay) and ema.decay == 0.999
    with torch.no_grad():
        model.head.bias.add_(1.0)
    start = ema.ema.head.bias.clone()
    ema.update(model, step=50, total_steps=100)
    d = 0.999 * 0.5
    torch.testing.assert_close(ema.ema.head.bias, start * d + model.head.bias * (1 - d))
    assert ema.state_dict()["decay_function"] == {"name": "linear", "params": {}}


def test_from_params_defaults_warn():
    with pytest.warns(UserWarning) as record:
        ema = ModelEMA.from_params(ConvNet())
    messages = " ".join(str(r.message) for r in record)
    assert "decay=0.9999" in messages and "decay_type='exp'" in messages
    assert ema.decay == 0.9999
    assert isinstance(ema.decay_function, ExpDecay) and ema.decay_function.beta == 15


@pytest.mark.parametrize("flag,cls", [(True, ExpDecay), (False, ConstantDecay)])
def test_from_params_legacy_exp_activation(flag, cls):
    with pytest.warns(DeprecationWarning, match="exp_activation"):
        ema = ModelEMA.from_params(ConvNet(), decay=0.99, exp_activation=flag)
    assert type(ema.decay_function) is cls
    if flag:
        assert ema.decay_function.beta == 15


def test_from_params_unknown_type_lists_registered():
    with pytest.raises(ValueError, match=r"'cosine'.*\['constant', 'threshold', 'exp', 'power', 'ramp'"):
        ModelEMA.from_params(ConvNet(), decay=0.99, decay_type="cosine")


def test_from_params_exp_without_beta():
    with pytest.raises(TypeError, match="beta"):
        ModelEMA.from_params(ConvNet(), decay=0.99, decay_type="exp")


def test_from_params_routes_options_and_ignores_extra_kwargs():
    # Extra keyword arguments of other schedules are ignored with a warning
    # naming them (and unknown ones are errors: see the tests of issue 14 below).
    with pytest.warns(UserWarning, match=r"ignoring beta=3 \(a parameter of 'exp'\)"):
        ema = ModelEMA.from_params(
            ConvNet(), decay=0.99, decay_type="ramp", tau=100, beta=3,
            buffers="copy", update_every=4, skip_nonfinite=True, ema_dtype=torch.float64,
        )
    assert isinstance(ema.decay_function, RampDecay) and ema.decay_function.tau == 100
    assert (ema.buffers, ema.update_every, ema.skip_nonfinite, ema.ema_dtype) == ("copy", 4, True, torch.float64)
    assert isinstance(PowerWarmupDecay(), IDecayFunction)


# ---------------------------------------------------------------- bad input leaves the EMA untouched


@pytest.mark.parametrize("decay", [1.5, 1.0, 0.0, -0.1, float("nan"), float("inf"), True, "0.9"])
def test_decay_outside_open_interval_is_an_error(decay):
    with pytest.raises(ValueError, match="decay must be a number in \\(0, 1\\)"):
        ModelEMA(ConvNet(), decay, ConstantDecay())


class Returns(IDecayFunction):
    def __init__(self, value):
        self.value = value

    def __call__(self, decay, step, total_steps):
        return self.value


@pytest.mark.parametrize("value", [1.5, -0.01, float("nan"), float("inf")])
def test_schedule_value_outside_unit_interval_is_an_error(value):
    model = ConvNet()
    ema = ModelEMA(model, 0.9, Returns(value))
    with torch.no_grad():
        model.head.bias.add_(1.0)
    before = state(ema.ema)
    with pytest.raises(ValueError, match=f"returned {value} at step 7 of 10"):
        ema.update(model, 7, 10)
    assert_bit_identical(state(ema.ema), before)
    assert ema.num_updates == 0


def test_schedule_extremes_are_allowed():
    model = ConvNet()
    with torch.no_grad():
        model.head.bias.add_(1.0)
    ema = ModelEMA(model, 0.9, Returns(0.0))
    ema.update(model, 1, 10)
    assert torch.equal(ema.ema.head.bias, model.head.bias)
    ema.decay_function = Returns(1.0)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    ema.update(model, 2, 10)
    assert not torch.equal(ema.ema.head.bias, model.head.bias)


@pytest.mark.parametrize("total", [0, -1])
def test_exp_with_bad_total_steps_is_an_error(total):
    model = ConvNet()
    ema = ModelEMA(model, 0.9, ExpDecay(beta=15))
    with torch.no_grad():
        model.head.bias.add_(1.0)
    before = state(ema.ema)
    with pytest.raises(ValueError, match="total_steps must be > 0"):
        ema.update(model, 1, total)
    assert_bit_identical(state(ema.ema), before)


def test_step_past_total_steps_is_clamped():
    model = ConvNet()
    a = ModelEMA(model, 0.9, ExpDecay(beta=15))
    b = ModelEMA(model, 0.9, ExpDecay(beta=15))
    with torch.no_grad():
        model.head.bias.add_(1.0)
    a.update(model, 150, 100)
    b.update(model, 100, 100)
    assert_bit_identical(state(a.ema), state(b.ema))


class Renamed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)  # `bn` in ConvNet
        self.head = nn.Linear(6, 5)


def _reshape_head(model):
    with torch.no_grad():
        model.head.weight.data = torch.randn(5, 7)
    return model


# What update() gets instead of the model the EMA was made from, whether the EMA has a plan by then (a
# change to a planned model must be noticed), and the error, which names the entry.
_MISMATCHES = {
    "renamed entries": (lambda model: Renamed(), False,
                        r"missing from the model: 'bn.weight'.*not in the EMA: 'norm.weight'"),
    "a reshaped entry": (_reshape_head, True,
                         r"'head.weight' has shape \[5, 7\] in the model but \[5, 6\] in the EMA"),
    # A differently shaped model of the same names.
    "another width": (lambda model: ConvNet(width=7), True, "'conv.weight'"),
    "another device": (lambda model: model.to("meta"), True,
                       "'conv.weight' is on meta in the model but on cpu in the EMA"),
}


@pytest.mark.parametrize("case", list(_MISMATCHES))
def test_a_model_that_does_not_match_is_an_error_naming_the_key_before_any_write(case):
    mismatch, planned, match = _MISMATCHES[case]
    model = ConvNet()
    ema = ModelEMA(model, 0.9, ConstantDecay())
    if planned:
        ema.update(model, 1, 10)
    before = state(ema.ema)
    with pytest.raises(RuntimeError, match=match):
        ema.update(mismatch(model), 2, 10)
    assert_bit_identical(state(ema.ema), before)


def test_replaced_parameters_are_noticed():
    # load_state_dict(assign=True) swaps in new Parameter objects: the cached
    # plan must follow them, not keep averaging the old ones.
    model = ConvNet()
    ema = ModelEMA(model, 0.5, ConstantDecay())
    ema.update(model, 1, 10)
    old = model.head.bias
    new_state = {k: v + 1.0 if v.is_floating_point() else v for k, v in state(model).items()}
    model.load_state_dict(new_state, assign=True)
    assert model.head.bias is not old
    with torch.no_grad():
        old.add_(100.0)  # the stale tensor must not leak in
    start = ema.ema.head.bias.clone()
    ema.update(model, 2, 10)
    torch.testing.assert_close(ema.ema.head.bias, 0.5 * start + 0.5 * model.head.bias)
    # A replaced submodule as well.
    model.head = nn.Linear(6, 5)
    start = ema.ema.head.weight.clone()
    ema.update(model, 3, 10)
    torch.testing.assert_close(ema.ema.head.weight, 0.5 * start + 0.5 * model.head.weight)


_TREE_CHANGES = {
    "nothing": lambda m: None,
    "values in place": lambda m: m.head.weight.data.add_(1.0),
    "a parameter object": lambda m: setattr(m.head, "bias", nn.Parameter(m.head.bias.detach().clone())),
    "a buffer object": lambda m: setattr(m.bn, "running_mean", m.bn.running_mean.clone()),
    "a child module": lambda m: setattr(m, "head", nn.Linear(6, 5)),
    "a new buffer": lambda m: m.head.register_buffer("extra", torch.zeros(2), persistent=False),
    "a new child": lambda m: m.add_module("extra", nn.Identity()),
}


@pytest.mark.parametrize("change", list(_TREE_CHANGES))
def test_cached_plan_is_rebuilt_exactly_when_the_module_trees_change(change, op_calls):
    # The per-step check (in C++ with the compiled backend, in Python with the
    # fallback) must see every replaced or added entry, and nothing else.  A
    # rebuilt plan is a new fused updater (this model needs one per plan).
    model = ConvNet()
    ema = ModelEMA(model, 0.5, ConstantDecay())
    ema.update(model, 1, 10)
    assert len(op_calls.updaters) == 1
    _TREE_CHANGES[change](model)
    ema.update(model, 2, 10)
    reused = change in ("nothing", "values in place")
    assert len(op_calls.updaters) == (1 if reused else 2)


def test_a_deleted_entry_is_noticed():
    model = ConvNet()
    ema = ModelEMA(model, 0.5, ConstantDecay())
    ema.update(model, 1, 10)
    del model.head.bias
    model.head.register_parameter("bias", None)
    with pytest.raises(Exception, match="head.bias"):
        ema.update(model, 2, 10)


def test_model_switched_to_channels_last():
    gen = torch.Generator().manual_seed(16)
    model = ConvNet()
    ema = ModelEMA(model, 0.8, ConstantDecay())
    ref = SGReference(model)
    ema.update(model, 1, 10)
    ref.update(model, 0.8)
    model.to(memory_format=torch.channels_last)
    assert not model.conv.weight.is_contiguous()
    for step in range(2, 6):
        train_step(model, gen)
        ema.update(model, step, 10)
        ref.update(model, 0.8)
    torch.testing.assert_close(ema.ema.conv.weight.double(), ref.state["conv.weight"], rtol=2e-6, atol=2e-7)
    assert ema.ema.conv.weight.stride() == model.conv.weight.stride()


def test_lazy_module_must_be_initialised_first():
    model = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="'0.weight' is not initialised"):
        ModelEMA(model, 0.9, ConstantDecay())
    model(torch.randn(2, 4))
    assert ModelEMA(model, 0.9, ConstantDecay()).ema[0].weight.shape == (3, 4)


def test_deepcopy_of_the_ema_is_independent():
    model = ConvNet()
    ema = ModelEMA(model, 0.5, ConstantDecay())
    ema.update(model, 1, 10)
    twin = copy.deepcopy(ema)
    # The copy keeps the flat layout: its floating tensors still share one buffer.
    assert len({t.untyped_storage().data_ptr() for t in twin.ema.state_dict().values() if t.is_floating_point()}) == 1
    before = state(ema.ema)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    twin.update(model, 2, 10)
    assert_bit_identical(state(ema.ema), before)
    torch.testing.assert_close(twin.ema.head.bias, 0.5 * before["head.bias"] + 0.5 * model.head.bias)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((0.9, ConstantDecay()), {"buffers": "freeze"}, ValueError, "buffers"),
    ((0.9, ConstantDecay()), {"update_every": 0}, ValueError, "update_every"),
    ((0.9, "constant"), {}, TypeError, "decay_function"),
], ids=["buffers", "update_every", "decay_function"])
def test_constructor_rejects_bad_options(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ModelEMA(ConvNet(), *args, **kwargs)


def test_decay_at_reports_the_schedule_value():
    ema = ModelEMA(ConvNet(), 0.9999, ExpDecay(beta=15))
    assert ema.decay_at(50, 100) == ExpDecay(beta=15)(0.9999, 50, 100)
    assert math.isclose(ema.decay_at(100, 100), 0.9999 * (1 - math.exp(-15)))


# ---------------------------------------------------------------- issue 14: bad input, mistakes, wrappers


@pytest.mark.parametrize("key,value", [("num_updates", "abc"), ("num_updates", -1), ("num_updates", 2.5),
                                       ("num_skipped", "x"), ("step", "7"), ("skip_nonfinite", "yes")])
def test_load_state_dict_with_a_bad_counter_writes_nothing(key, value):
    model = ConvNet()
    ema = ModelEMA(model, 0.9, ConstantDecay())
    ema.update(model, 1, 10)
    before = state(ema.ema)
    counters = (ema.num_updates, ema.num_skipped, ema.decay)
    other = ModelEMA(ConvNet(width=6), 0.5, ThresholdDecay())  # other weights, decay and schedule
    with torch.no_grad():
        other.ema.head.bias.add_(3.0)
    saved = other.state_dict()
    saved[key] = value
    with pytest.raises(ValueError, match=f"{key} must be .*{value!r}"):
        ema.load_state_dict(saved)
    assert_bit_identical(state(ema.ema), before)
    assert (ema.num_updates, ema.num_skipped, ema.decay) == counters
    assert isinstance(ema.decay_function, ConstantDecay)


def test_num_skipped_survives_a_state_round_trip():
    model = ConvNet()
    ema = ModelEMA(model, 0.9, ConstantDecay(), skip_nonfinite=True)
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    ema.update(model, 1, 10)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    resumed = ModelEMA(ConvNet(), 0.9, ConstantDecay(), skip_nonfinite=True)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert (resumed.num_skipped, resumed.num_updates) == (1, 0)


@pytest.mark.parametrize("kwargs,name,hint", [
    ({"ema_dtyp": "float32"}, "ema_dtyp", "ema_dtype"),
    ({"decya": 0.9}, "decya", "decay"),
    ({"bufers": "copy"}, "bufers", "buffers"),
    ({"tua": 100}, "tua", "tau"),
])
def test_from_params_unknown_argument_is_an_error_with_the_closest_name(kwargs, name, hint):
    with pytest.raises(ValueError, match=rf"unknown argument '{name}' \(did you mean '{hint}'\?\)"):
        ModelEMA.from_params(ConvNet(), decay=0.99, decay_type="ramp", **kwargs)


def test_from_params_keeps_sg_recipes_working():
    # beta beside threshold: a recipe that switched from exp; a warning, then the EMA as asked.
    with pytest.warns(UserWarning, match=r"ignoring beta=15 .*'exp'.*'threshold' does not take it") as record:
        ema = ModelEMA.from_params(ConvNet(), decay=0.99, decay_type="threshold", beta=15)
    assert isinstance(ema.decay_function, ThresholdDecay)
    assert sum("ignoring" in str(w.message) for w in record) == 1


def test_from_params_custom_schedule_with_kwargs_receives_the_rest(monkeypatch):
    class Custom(IDecayFunction):
        def __init__(self, **kwargs):
            self.seen = dict(kwargs)

        def __call__(self, decay, step, total_steps):
            return decay

    class Strict(IDecayFunction):
        def __init__(self, width=1.0):
            self.width = width

        def __call__(self, decay, step, total_steps):
            return decay

    monkeypatch.setitem(EMA_DECAY_FUNCTIONS, "custom", Custom)
    monkeypatch.setitem(EMA_DECAY_FUNCTIONS, "strict", Strict)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema = ModelEMA.from_params(ConvNet(), decay=0.99, decay_type="custom", slope=2, beta=3)
    assert ema.decay_function.seen == {"slope": 2, "beta": 3}
    assert ModelEMA.from_params(ConvNet(), decay=0.99, decay_type="strict", width=2.0).decay_function.width == 2.0
    with pytest.raises(ValueError, match=r"'widht' \(did you mean 'width'\?\)"):
        ModelEMA.from_params(ConvNet(), decay=0.99, decay_type="strict", widht=2.0)


@pytest.mark.parametrize("step", [5.5, 5.0, "5", torch.tensor(5.5), torch.tensor([5]), True])
def test_update_rejects_a_non_integer_step_untouched(step):
    model = ConvNet()
    ema = ModelEMA(model, 0.9, ConstantDecay())
    with torch.no_grad():
        model.head.bias.add_(1.0)
    before = state(ema.ema)
    with pytest.raises(TypeError, match="step must be an integer"):
        ema.update(model, step, 10)
    assert_bit_identical(state(ema.ema), before)
    assert ema.num_updates == 0


def test_update_accepts_integer_steps_of_every_kind():
    np = pytest.importorskip("numpy")
    model = ConvNet()
    ema = ModelEMA(model, 0.9, ThresholdDecay(), update_every=2)
    for step in (np.int64(2), torch.tensor(4), 6, np.int32(7)):
        ema.update(model, step, 10)
    assert ema.num_updates == 3


def test_horizon_longer_than_the_run_warns_once_with_the_values():
    model = ConvNet()
    ema = ModelEMA(model, 0.999, ConstantDecay())
    with pytest.warns(UserWarning, match=r"decay=0.999 averages over about 1/\(1-decay\) = 1000 steps, more than "
                                         r"the planned total_steps=200.*decay=0.95 ") as record:
        for step in range(1, 4):
            ema.update(model, step, 200)
    assert sum("averages over" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelEMA(model, 0.99, ConstantDecay()).update(model, 1, 200)  # 100 steps of 200: fine
    with pytest.warns(UserWarning, match="total_steps=50"):
        ModelEMA(model, 0.99, ConstantDecay(), capturable=True, total_steps=50)


@pytest.mark.parametrize("decay,dtype,stalls", [
    (0.9999, torch.bfloat16, True), (0.99, torch.bfloat16, False), (0.9999, torch.float16, True),
    (0.999, torch.float16, False), (0.9999, torch.float32, False), (1 - 2 ** -25, torch.float32, True),
])
def test_ema_dtype_that_cannot_move_warns(decay, dtype, stalls):
    model = nn.Linear(4, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ModelEMA(model, decay, ConstantDecay(), ema_dtype=dtype)
    messages = [str(w.message) for w in record if "rounds to 1" in str(w.message)]
    if stalls:
        assert len(messages) == 1
        assert str(dtype) in messages[0] and f"decay={decay}" in messages[0] and "ema_dtype=torch.float32" in messages[0]
    else:
        assert messages == []


def test_bf16_model_without_ema_dtype_warns_and_float32_does_not():
    model = nn.Linear(4, 3).to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"rounds to 1 in torch.bfloat16 \(e.g. 'weight'\)"):
        ModelEMA(model, 0.9999, ConstantDecay())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelEMA(model, 0.9999, ConstantDecay(), ema_dtype=torch.float32)


def test_non_capturable_update_inside_torch_compile_warns_once():
    model = nn.Linear(3, 3)
    ema = ModelEMA(model, 0.5, ConstantDecay())

    @torch.compile(backend="eager")
    def step_fn(step):
        ema.update(model, step, 100)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(1, 4):
            step_fn(step)
    messages = [str(w.message) for w in record if "inside torch.compile" in str(w.message)]
    assert len(messages) == 1 and "capturable=True" in messages[0] and "recompiles every step" in messages[0]
    assert ema.num_updates == 3
    torch._dynamo.reset()


def test_one_unwrap_helper_for_nested_wrappers():
    from ema_cuda import _modules
    from ema_cuda.ema import unwrap_model

    assert unwrap_model is _modules.unwrap_model
    net = ConvNet()
    compiled = torch.compile(nn.DataParallel(torch.compile(net, backend="eager")), backend="eager")
    assert unwrap_model(compiled) is net
    ema = ModelEMA(compiled, 0.5, ConstantDecay())
    assert set(ema.state_dict()["ema"]) == set(net.state_dict())
    torch._dynamo.reset()
