"""``ema_cuda.ops.ema_update_`` / ``multi_ema_update_`` with lists (NOTE [listed calls]).

With the compiled backend, lists of plain tensors reach the op through the
dispatcher without ``torch.ops``' per-element conversion.  Everything a
caller can observe must stay what ``torch.ops`` gives: the bits, the errors
(type and message, nothing written), Python dispatch modes, torch function
modes, tensor subclasses, fake tensors and the profiler's event.  On the
fallback backend every call goes through ``torch.ops``; the same assertions
hold there.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ema_cuda import ops
from conftest import requires_compiled


def lists(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = [torch.randn(3 + i, generator=g) for i in range(n)]
    ema = [torch.randn(3 + i, generator=g) for i in range(n)]
    return ema, model


def snapshot(tensors):
    return [t.clone() for t in tensors]


def assert_equal_lists(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


class _Spy:
    """Stands in for ``ops._C``, counting the listed calls it forwards."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not name.endswith("listed") and not name.endswith("listed_tensor"):
            return attr

        def call(*args):
            result = attr(*args)
            self.calls.append((name, result))
            return result

        return call


@pytest.mark.parametrize("decay", [0.9, "tensor"])
def test_same_bits_as_torch_ops(decay):
    d = torch.tensor(0.9) if decay == "tensor" else decay
    e1, model = lists()
    e2 = snapshot(e1)
    ops.ema_update_(e1, model, d)
    if isinstance(d, torch.Tensor):
        torch.ops.ema_cuda.ema_update_.Tensor(e2, model, d)
    else:
        torch.ops.ema_cuda.ema_update_.default(e2, model, d)
    assert_equal_lists(e1, e2)


@pytest.mark.parametrize("decays", [[0.9, 0.5], "tensor"])
def test_multi_same_bits_as_torch_ops(decays):
    d = torch.tensor([0.9, 0.5], dtype=torch.float64) if decays == "tensor" else decays
    a, model = lists()
    b, _ = lists(seed=1)
    flat = snapshot(a) + snapshot(b)
    ops.multi_ema_update_([a, b], model, d)
    if isinstance(d, torch.Tensor):
        torch.ops.ema_cuda.multi_ema_update_.Tensor(flat, model, d)
    else:
        torch.ops.ema_cuda.multi_ema_update_.default(flat, model, d)
    assert_equal_lists(a + b, flat)


@requires_compiled
def test_plain_lists_take_the_listed_call(monkeypatch):
    """The wrapper hands plain lists (and Parameters) to ``_C``, and they run there: the speed-up is not
    silently lost."""
    spy = _Spy(ops._C)
    monkeypatch.setattr(ops, "_C", spy)
    ema, model = lists()
    model = [torch.nn.Parameter(m) for m in model]
    before = snapshot(ema)
    ops.ema_update_(ema, model, 0.5)
    ops.ema_update_(ema, model, torch.tensor(0.5))
    ops.multi_ema_update_([ema], model, [0.5])
    ops.multi_ema_update_([ema], model, torch.tensor([0.5]))
    assert spy.calls == [("update_listed", True), ("update_listed_tensor", True),
                         ("multi_update_listed", True), ("multi_update_listed_tensor", True)]
    expected = [b * 0.0625 + m.detach() * 0.9375 for b, m in zip(before, model)]
    for e, x in zip(ema, expected):
        torch.testing.assert_close(e, x, rtol=1e-6, atol=1e-6)


class _Logged(torch.Tensor):
    """A tensor subclass whose ``__torch_function__`` records the functions it sees."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("where", ["ema", "model", "decay"])
def test_subclass_sees_the_call(where):
    """A tensor subclass anywhere in the call gets its ``__torch_function__``, as through ``torch.ops``."""
    ema, model = lists(2)
    decay = torch.tensor(0.5)
    if where == "ema":
        ema[1] = ema[1].as_subclass(_Logged)
    elif where == "model":
        model[0] = model[0].as_subclass(_Logged)
    else:
        decay = decay.as_subclass(_Logged)
    expected = [e * 0.5 + m * 0.5 for e, m in zip(snapshot(ema), model)]
    _Logged.seen = []
    ops.ema_update_(ema, model, decay)
    assert "ema_cuda.ema_update_.Tensor" in _Logged.seen
    for e, x in zip(ema, expected):
        torch.testing.assert_close(torch.Tensor(e), torch.Tensor(x))


@requires_compiled
def test_listed_call_declines_subclasses():
    """``_C`` leaves a list holding a subclass, or a subclass decay, to torch.ops and writes nothing."""
    ema, model = lists(2)
    before = snapshot(ema)
    sub = [model[0], model[1].as_subclass(_Logged)]
    assert ops._C.update_listed(ema, sub, 0.5) is False
    assert ops._C.update_listed_tensor(ema, model, torch.tensor(0.5).as_subclass(_Logged)) is False
    assert ops._C.multi_update_listed([ema[0].as_subclass(_Logged), ema[1]], model, [0.5]) is False
    assert_equal_lists(ema, before)


def test_torch_function_mode_sees_the_call():
    seen = []

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    ema, model = lists(2)
    with Mode():
        ops.ema_update_(ema, model, 0.5)
        ops.multi_ema_update_([ema], model, [0.5])
    assert seen == ["ema_cuda.ema_update_.default", "ema_cuda.multi_ema_update_.default"]


def test_dispatch_mode_sees_the_call():
    seen = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    ema, model = lists(2)
    decay, decays = torch.tensor(0.5), torch.tensor([0.5])
    with Mode():
        ops.ema_update_(ema, model, 0.5)
        ops.ema_update_(ema, model, decay)
        ops.multi_ema_update_([ema], model, [0.5])
        ops.multi_ema_update_([ema], model, decays)
    assert [s for s in seen if s.startswith("ema_cuda")] == [
        "ema_cuda.ema_update_.default", "ema_cuda.ema_update_.Tensor",
        "ema_cuda.multi_ema_update_.default", "ema_cuda.multi_ema_update_.Tensor"]


def test_fake_tensors_run_the_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ema, model = [torch.zeros(3)], [torch.ones(3)]
        ops.ema_update_(ema, model, 0.5)
        with pytest.raises(RuntimeError, match="decay"):
            ops.ema_update_(ema, model, 1.5)


def test_profiler_records_the_op():
    ema, model = lists(2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.ema_update_(ema, model, 0.5)
        ops.multi_ema_update_([ema], model, [0.5])
    names = [ev.name for ev in prof.events()]
    assert "ema_cuda::ema_update_" in names and "ema_cuda::multi_ema_update_" in names


def _bad_calls():
    """(label, make) pairs; ``make()`` returns (ema, model, decay) that the op rejects."""
    def base():
        return lists(3)

    def overlap():
        ema, model = base()
        ema[2] = ema[0]
        return ema, model, 0.5

    def shape():
        ema, model = base()
        model[1] = model[1][:-1]
        return ema, model, 0.5

    def int_ema():
        ema, model = base()
        ema[0] = ema[0].to(torch.int32)
        return ema, model, 0.5

    def length():
        ema, model = base()
        return ema[:2], model, 0.5

    return [
        ("decay above 1", lambda: (*base(), 1.5)),
        ("nan decay", lambda: (*base(), float("nan"))),
        ("bf16 decay tensor", lambda: (*base(), torch.tensor(0.5, dtype=torch.bfloat16))),
        ("1-element 1-dim decay", lambda: (*base(), torch.tensor([0.5]))),
        ("integer decay tensor", lambda: (*base(), torch.tensor(1))),
        ("meta decay tensor", lambda: (*base(), torch.tensor(0.5, device="meta"))),
        ("overlapping EMA tensors", overlap),
        ("shape mismatch", shape),
        ("integer EMA", int_ema),
        ("lists of different lengths", length),
    ]


@pytest.mark.parametrize("label,make", _bad_calls(), ids=[b[0] for b in _bad_calls()])
def test_errors_match_torch_ops(label, make):
    """The same exception type and message as ``torch.ops``, and nothing written."""
    ema, model, decay = make()
    before = snapshot(ema)
    overload = "Tensor" if isinstance(decay, torch.Tensor) else "default"
    with pytest.raises(Exception) as via_ops:
        getattr(torch.ops.ema_cuda.ema_update_, overload)(ema, model, decay)
    with pytest.raises(Exception) as via_wrapper:
        ops.ema_update_(ema, model, decay)
    assert type(via_wrapper.value) is type(via_ops.value), label
    assert str(via_wrapper.value) == str(via_ops.value), label
    assert_equal_lists(ema, before)


def test_multi_errors_match_torch_ops():
    a, model = lists(3)
    b = [a[0]] + snapshot(a[1:])  # a[0] in both profiles: an overlap
    before = snapshot(a + b)
    with pytest.raises(Exception) as via_ops:
        torch.ops.ema_cuda.multi_ema_update_.default(a + b, model, [0.5, 0.9])
    with pytest.raises(Exception) as via_wrapper:
        ops.multi_ema_update_([a, b], model, [0.5, 0.9])
    assert type(via_wrapper.value) is type(via_ops.value)
    assert str(via_wrapper.value) == str(via_ops.value)
    assert_equal_lists(a + b, before)
