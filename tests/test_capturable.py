"""ModelEMA(capturable=True): the step and decay as device tensors, for torch.compile and CUDA graphs.

The schedule's tensor form and the capturable update run on the CPU here;
the CUDA graph tests need a GPU and are skipped without one (the capturable
update they capture is the same code these CPU tests run eagerly and
compiled)."""
import copy

import pytest
import torch
from torch import nn

from ema_cuda import ModelEMA
from ema_cuda.ema_decay_schedules import (
    ConstantDecay,
    ExpDecay,
    IDecayFunction,
    PowerWarmupDecay,
    RampDecay,
    ThresholdDecay,
)
from conftest import DEVICES, requires_cuda
from support import N_FEATURES, Net, assert_bit_identical, seeded, state
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)

TOTAL = 40

SCHEDULES = [
    ConstantDecay(),
    ThresholdDecay(),
    ExpDecay(beta=15),
    ExpDecay(beta=5),
    PowerWarmupDecay(),
    PowerWarmupDecay(power=0.75, min_decay=0.5, update_after_step=7, inv_gamma=3.0),
    RampDecay(tau=2000),
    RampDecay(tau=7),
]


CLASSES = 4


def make_net(seed=0):
    # No dropout: compiled, captured and eager runs of one model must take the same steps.
    return seeded(Net, seed, dropout=0.0, num_classes=CLASSES)


def sgd_step(model, x, y, lr=0.1):
    """Forward, backward and a plain SGD step written with foreach ops (torch.optim's step breaks a
    torch.compile graph on purpose, see torch/optim/optimizer.py)."""
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    with torch.no_grad():
        params = list(model.parameters())
        torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)
        for p in params:
            p.grad = None
    return loss.detach()


def batches(n, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, N_FEATURES, generator=gen).to(device),
             torch.randint(0, CLASSES, (6,), generator=gen).to(device)) for _ in range(n)]


# ---------------------------------------------------------------- the schedules' tensor form


STEPS = list(range(0, 1200)) + list(range(1200, 120_000, 997))


@pytest.mark.parametrize("fn", SCHEDULES, ids=repr)
@pytest.mark.parametrize("device", DEVICES)
def test_tensor_value_equals_float_schedule(fn, device):
    total = 100_000
    exact = not isinstance(fn, (ExpDecay, RampDecay))  # these use exp, whose last bit is library-specific
    for decay in (0.999, 0.9999):
        for s in STEPS:
            want = fn(decay, s, total)
            got_t = fn.tensor_value(decay, torch.tensor(s, device=device), total)
            assert got_t.dtype == torch.float64 and got_t.dim() == 0 and got_t.device.type == device
            got = got_t.item()
            if exact and device == "cpu":
                assert got == want, (s, got, want)
            else:
                assert got == pytest.approx(want, rel=1e-13, abs=1e-17), (s, got, want)
            # What the kernel uses for an fp32 EMA: the value rounded to float32.
            assert torch.tensor(got, dtype=torch.float64).float() == torch.tensor(want, dtype=torch.float64).float(), s


def test_tensor_value_accepts_float_steps():
    fn = ThresholdDecay()
    assert fn.tensor_value(0.99, torch.tensor(5.0), None).item() == fn(0.99, 5, None)


@pytest.mark.parametrize("fn,step,total,error,match", [
    (ThresholdDecay(), torch.tensor([5]), None, ValueError, "0-dim"),
    (ExpDecay(beta=15), torch.tensor(5), None, ValueError, "total_steps must be > 0"),
    (ExpDecay(beta=15), torch.tensor(5), torch.tensor(10), TypeError, "Python number"),
], ids=["step not 0-dim", "no total_steps", "tensor total_steps"])
def test_tensor_value_checks_its_input(fn, step, total, error, match):
    with pytest.raises(error, match=match):
        fn.tensor_value(0.99, step, total)


class HostOnly(IDecayFunction):
    def __call__(self, decay, step, total_steps):
        return decay


def test_schedule_without_tensor_form_is_refused():
    assert not HostOnly.has_tensor_value() and ExpDecay.has_tensor_value()
    with pytest.raises(NotImplementedError, match="HostOnly has no tensor form"):
        HostOnly().tensor_value(0.9, torch.tensor(1), 10)
    with pytest.raises(ValueError, match="tensor form"):
        ModelEMA(make_net(), 0.9, HostOnly(), capturable=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"update_every": 2}, "update_every=1"),
        ({"skip_nonfinite": True}, "skip_nonfinite"),
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 2.5}, "total_steps"),
    ],
)
def test_capturable_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelEMA(make_net(), 0.9, ExpDecay(beta=15), capturable=True, **kwargs)


# ---------------------------------------------------------------- eager capturable updates


@pytest.mark.parametrize("fn", SCHEDULES[1:6], ids=repr)
def test_capturable_update_equals_float_update(fn):
    model = make_net()
    ema_f = ModelEMA(model, 0.99, fn)
    ema_t = ModelEMA(model, 0.99, fn, capturable=True, total_steps=TOTAL)
    for step, (x, y) in enumerate(batches(TOTAL), start=1):
        model.train()
        sgd_step(model, x, y)
        ema_f.update(model, step, TOTAL)
        ema_t.update(model)  # counts the step on the device
        assert float(ema_t.decay_tensor) == pytest.approx(ema_f.decay_at(step, TOTAL), rel=1e-13, abs=1e-17)
    assert int(ema_t.step_tensor) == TOTAL and ema_t.num_updates == TOTAL
    assert_bit_identical(ema_f.ema, ema_t.ema)


def test_capturable_step_argument_forms():
    model = make_net()
    ema = ModelEMA(model, 0.99, ThresholdDecay(), capturable=True)
    assert ema.step_tensor.dtype == torch.int64 and ema.decay_tensor.dtype == torch.float64
    ema.update(model)
    assert int(ema.step_tensor) == 1 and float(ema.decay_tensor) == ThresholdDecay()(0.99, 1, None)
    ema.update(model, step=50)  # eager: an int sets the counter
    assert int(ema.step_tensor) == 50 and float(ema.decay_tensor) == ThresholdDecay()(0.99, 50, None)
    ema.update(model, step=torch.tensor(7))
    assert int(ema.step_tensor) == 7
    ema.update(model)
    assert int(ema.step_tensor) == 8 and ema.num_updates == 4
    with pytest.raises(ValueError, match="0-dim"):
        ema.update(model, step=torch.tensor([3]))
    with pytest.raises(ValueError, match="integer >= 0"):
        ema.update(model, step=-1)
    with pytest.raises(TypeError, match="step and total_steps are required"):
        ModelEMA(model, 0.99, ThresholdDecay()).update(model)


def test_capturable_exp_needs_total_steps():
    model = make_net()
    ema = ModelEMA(model, 0.99, ExpDecay(beta=15), capturable=True)
    with pytest.raises(ValueError, match="total_steps must be > 0, got None"):
        ema.update(model)
    ema.update(model, total_steps=10)
    assert float(ema.decay_tensor) == pytest.approx(ExpDecay(beta=15)(0.99, 1, 10), rel=1e-13)


def test_capturable_state_dict_round_trip_continues_bit_exactly():
    data = batches(TOTAL)
    model_a, model_b = make_net(), make_net()
    a = ModelEMA(model_a, 0.99, ExpDecay(beta=15), capturable=True, total_steps=TOTAL)
    for x, y in data[:15]:
        sgd_step(model_a, x, y)
        a.update(model_a)
    state = copy.deepcopy(a.state_dict())
    assert state["step"] == 15 and state["num_updates"] == 15
    model_b.load_state_dict(model_a.state_dict())
    b = ModelEMA(model_b, 0.99, ExpDecay(beta=15), capturable=True, total_steps=TOTAL)
    b.load_state_dict(state)
    assert int(b.step_tensor) == 15 and b.num_updates == 15
    for x, y in data[15:]:
        sgd_step(model_a, x, y)
        a.update(model_a)
        sgd_step(model_b, x, y)
        b.update(model_b)
    assert int(b.step_tensor) == TOTAL
    assert_bit_identical(a.ema, b.ema)


def test_capturable_load_refuses_a_state_it_cannot_run():
    model = make_net()
    plain = ModelEMA(model, 0.99, ExpDecay(beta=15), update_every=3)
    cap = ModelEMA(model, 0.99, ExpDecay(beta=15), capturable=True, total_steps=TOTAL)
    before = state(cap.ema)
    with pytest.raises(ValueError, match="capturable=True"):
        cap.load_state_dict(plain.state_dict())
    assert_bit_identical(cap.ema, before)


# ---------------------------------------------------------------- torch.compile


@pytest.fixture
def dynamo():
    import torch._dynamo
    import torch._dynamo.testing

    torch._dynamo.reset()
    yield torch._dynamo
    torch._dynamo.reset()


def test_compiled_training_step_matches_eager_without_recompiling(dynamo):
    """Forward, backward, SGD and the EMA update in one fullgraph-compiled function."""
    data = batches(TOTAL)
    model_c, model_e = make_net(), make_net()
    ema_c = ModelEMA(model_c, 0.999, ExpDecay(beta=15), capturable=True, total_steps=TOTAL)
    ema_e = ModelEMA(model_e, 0.999, ExpDecay(beta=15))

    def step(model, ema, x, y):
        loss = sgd_step(model, x, y)
        ema.update(model)
        return loss

    counter = dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    decays = []
    with dynamo.config.patch(error_on_recompile=True, trace_autograd_ops=True):
        for i, (x, y) in enumerate(data, start=1):
            loss_c = compiled(model_c, ema_c, x, y)
            if i == 1:
                compiled_frames = counter.frame_count
            decays.append(float(ema_c.decay_tensor))
            loss_e = sgd_step(model_e, x, y)
            ema_e.update(model_e, i, TOTAL)
            assert torch.equal(loss_c, loss_e), i
    assert counter.frame_count == compiled_frames  # nothing compiled after the first step
    assert any("ema_cuda.ema_update_" in g.code for g in counter.graphs)  # the update is in the graph
    assert len(set(decays)) == TOTAL  # the decay changed at every step, the graph did not
    assert int(ema_c.step_tensor) == TOTAL and ema_c.num_updates == TOTAL
    assert_bit_identical(model_c, model_e)
    assert_bit_identical(ema_c.ema, ema_e.ema)


def test_compiled_update_after_an_eager_optimizer(dynamo):
    model = make_net()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    ema = ModelEMA(model, 0.99, PowerWarmupDecay(power=0.75), capturable=True)
    ema_ref = ModelEMA(reference, 0.99, PowerWarmupDecay(power=0.75))
    counter = dynamo.testing.CompileCounterWithBackend("aot_eager")
    update = torch.compile(ema.update, fullgraph=True, backend=counter)
    with dynamo.config.patch(error_on_recompile=True):
        for i, (x, y) in enumerate(batches(12), start=1):
            for net, o in ((model, opt), (reference, opt_ref)):
                nn.functional.cross_entropy(net(x), y).backward()
                o.step()
                o.zero_grad()
            update(model)
            ema_ref.update(reference, i, 12)
            if i == 1:
                compiled_frames = counter.frame_count
    assert counter.frame_count == compiled_frames
    assert any("ema_cuda.ema_update_" in g.code for g in counter.graphs)
    assert_bit_identical(ema.ema, ema_ref.ema)


def test_int_step_inside_compile_is_an_error(dynamo):
    model = make_net()
    ema = ModelEMA(model, 0.99, ThresholdDecay(), capturable=True)
    compiled = torch.compile(lambda s: ema.update(model, step=s), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="frozen into the compiled code"):
        compiled(3)
    assert int(ema.step_tensor) == 0 and ema.num_updates == 0


def test_compiled_update_without_a_plan_for_the_model_is_an_error(dynamo):
    model, other = make_net(), make_net()
    ema = ModelEMA(model, 0.99, ThresholdDecay(), capturable=True)
    compiled = torch.compile(lambda m: ema.update(m), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="call update\\(\\) once eagerly"):
        compiled(other)
    ema.update(other)  # eager: builds the plan for `other`
    compiled(other)
    assert int(ema.step_tensor) == 2


# ---------------------------------------------------------------- CUDA graphs (GPU only)


@requires_cuda
def test_cuda_graph_replays_a_whole_training_step_with_a_new_step_each_time():
    """Capture forward, backward, SGD and the EMA update once; replay with new batches; compare with eager."""
    device = "cuda"
    data = batches(TOTAL, device)
    model_g, model_e = make_net().to(device), make_net().to(device)
    ema_g = ModelEMA(model_g, 0.999, ExpDecay(beta=15), capturable=True, total_steps=TOTAL)
    ema_e = ModelEMA(model_e, 0.999, ExpDecay(beta=15))
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    warmup = 3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up, as torch's whole-network capture recipe does
        for i in range(warmup):
            static_x.copy_(data[i][0])
            static_y.copy_(data[i][1])
            static_loss = sgd_step(model_g, static_x, static_y)
            ema_g.update(model_g)
    torch.cuda.current_stream().wait_stream(side)
    for i in range(warmup):
        sgd_step(model_e, *data[i])
        ema_e.update(model_e, i + 1, TOTAL)

    graph = torch.cuda.CUDAGraph()
    for p in model_g.parameters():
        p.grad = None
    with torch.cuda.graph(graph):
        static_loss = sgd_step(model_g, static_x, static_y)
        ema_g.update(model_g)
    # Capturing does not run the step: the counter is still at the warm-up's end.
    assert int(ema_g.step_tensor) == warmup
    for i in range(warmup, TOTAL):
        static_x.copy_(data[i][0])
        static_y.copy_(data[i][1])
        graph.replay()
        loss_e = sgd_step(model_e, *data[i])
        ema_e.update(model_e, i + 1, TOTAL)
        torch.cuda.synchronize()
        assert int(ema_g.step_tensor) == i + 1
        assert float(ema_g.decay_tensor) == pytest.approx(ema_e.decay_at(i + 1, TOTAL), rel=1e-12)
        torch.testing.assert_close(static_loss, loss_e, rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(ema_g.ema.state_dict().items(), ema_e.ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert ema_g.num_updates == TOTAL


@requires_cuda
def test_int_step_inside_cuda_graph_capture_is_an_error():
    model = make_net().to("cuda")
    ema = ModelEMA(model, 0.99, ThresholdDecay(), capturable=True)
    ema.update(model)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(TypeError, match="frozen into the compiled code or the graph"):
        with torch.cuda.graph(graph):
            ema.update(model, step=5)


@pytest.mark.parametrize("step", [5.5, torch.tensor(5.5), torch.tensor(5.0, dtype=torch.float64), torch.tensor(True)])
def test_capturable_rejects_a_non_integer_step_untouched(step):
    model = make_net()
    ema = ModelEMA(model, 0.99, ThresholdDecay(), capturable=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=3)
    before = state(ema.ema)
    with pytest.raises((TypeError, ValueError), match="integer"):
        ema.update(model, step=step)
    assert_bit_identical(ema.ema, before)
    assert int(ema.step_tensor) == 3 and ema.num_updates == 1
    ema.update(model, step=torch.tensor(4, dtype=torch.int32))  # any integer dtype
    assert int(ema.step_tensor) == 4
