"""The op's checks are written twice: in C++ (csrc/checks.cpp) and in Python
(ema_cuda/_checks.py, run by the fallback backend and the fake kernels).  Here
both meet the same bad inputs and must raise the same error class with the
same message, naming the same tensor, and leave every EMA tensor
bit-identical.  Removing a check on either side fails its cases.

The two sides, each reached twice:

* FusedUpdater's: ``ema_cuda._C.ListUpdater`` (compiled) and
  ``ema_cuda._fallback.ListUpdater`` (Python), constructed on the lists, then
  one update.
* the op's: ``torch.ops.ema_cuda.ema_update_`` (the compiled CPU kernel) and
  ``ema_cuda._fallback.update`` / ``update_tensor`` (plain functions, callable
  whatever backend is loaded).  Inputs with a tensor on another device or of
  another layout are left out here: the dispatcher sends those to the fake
  kernel (Python) or refuses them before any check.

Needs the compiled library: skipped in the fallback suite run.
"""
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Union

import pytest
import torch

from ema_cuda import _fallback, ops
from ema_cuda._checks import SUPPORTED_DTYPES

from test_ops import assert_bit_identical, snapshot

if ops.backend() != "compiled":
    pytest.skip(
        "compares the compiled library's checks with the Python ones: runs in the compiled suite "
        "(EMA_CUDA_BACKEND=compiled)",
        allow_module_level=True,
    )


@dataclass
class Inputs:
    ema: List[torch.Tensor]
    model: List[torch.Tensor]
    decay: Union[float, torch.Tensor] = 0.5
    copy_ema: List[torch.Tensor] = field(default_factory=list)
    copy_model: List[torch.Tensor] = field(default_factory=list)

    def written(self):
        """The tensors an update would write that can be compared bit for bit."""
        return [t for t in self.ema + self.copy_ema if t.layout == torch.strided and t.device.type != "meta"]


@dataclass
class Case:
    name: str
    make: Callable[[], Inputs]
    match: str  # what the message must say (the tensor it names)
    op: bool = True  # also through the op: CPU strided tensors, no copies
    updater: bool = True  # also through FusedUpdater's side


def _pairs(*sizes):
    return [torch.randn(s) for s in sizes], [torch.randn(s) for s in sizes]


def _e_m():
    return _pairs(10, 20, 30)


def _with(extra_ema, extra_model, decay=0.5):
    e, m = _e_m()
    return Inputs(e + extra_ema, m + extra_model, decay)


def _shared(n=100):
    return torch.randn(n)


def _copies(copy_ema, copy_model, ema_sizes=(10,)):
    e, m = _pairs(*ema_sizes)
    return Inputs(e, m, 0.5, copy_ema, copy_model)


def _long(*shape, device="cpu"):
    return torch.zeros(*shape, dtype=torch.int64, device=device)


def _model_overlapping_two_emas():
    buf = torch.randn(40)
    return Inputs([buf[:10], buf[10:20]], [buf[5:15], torch.randn(10)])


def _aliased_emas():
    s = _shared()
    return _with([s[:60], s[50:]], [torch.randn(60), torch.randn(50)])


def _model_aliasing_its_ema():
    s = _shared()
    return _with([s[:60]], [s[10:70]])


def _model_is_another_ema():
    e, m = _e_m()
    return Inputs(e, [m[0], e[2].view(-1)[:20], m[2]])


def _tied_emas():
    a = torch.randn(8)
    return Inputs([a, a], [torch.randn(8), torch.randn(8)])


def _copy_aliasing(kind):
    e, m = _pairs(10)
    if kind == "copy_ema overlaps ema":
        return Inputs(e, m, 0.5, [e[0][2:4]], [torch.zeros(2)])
    if kind == "copy_model overlaps ema":
        return Inputs(e, m, 0.5, [torch.zeros(2)], [e[0][2:4]])
    buf = torch.zeros(20)  # model overlaps copy_ema
    return Inputs([torch.zeros(10)], [buf[:10]], 0.5, [buf[5:7]], [torch.zeros(2)])


def _two_faults_decay_first():
    e, m = _e_m()
    return Inputs(e, m[:2], 1.5)


def _two_faults_lists_before_overlap():
    s = _shared()
    return _with([s[:60], s[50:]], [torch.randn(60), torch.randn(51)])


def _sparse_ema():
    return _with([torch.zeros(4).to_sparse()], [torch.zeros(4)])


CASES = [
    # list lengths
    Case("lengths", lambda: Inputs(*_e_m()[:1], _e_m()[1][:2]), r"got 3 ema tensors but 2 model tensors"),
    # dtypes
    Case("int model", lambda: Inputs(_e_m()[0], [torch.randn(10), torch.zeros(20, dtype=torch.int64), torch.randn(30)]),
         r"model\[1\] has dtype torch\.int64; expected one of torch\.float32, torch\.float64, torch\.bfloat16, "
         r"torch\.float16"),
    Case("bool ema", lambda: _with([torch.zeros(2, dtype=torch.bool)], [torch.zeros(2)]), r"ema\[3\] has dtype torch\.bool"),
    Case("complex ema", lambda: _with([torch.zeros(2, dtype=torch.complex64)], [torch.zeros(2)]),
         r"ema\[3\] has dtype torch\.complex64"),
    Case("float8 model", lambda: _with([torch.zeros(2)], [torch.zeros(2).to(torch.float8_e4m3fn)]),
         r"model\[3\] has dtype torch\.float8_e4m3fn"),
    # shapes and layouts
    Case("numel", lambda: _with([torch.randn(7)], [torch.randn(8)]), r"ema\[3\] has shape \[7\] but model\[3\] has shape \[8\]"),
    Case("shape", lambda: _with([torch.randn(30)], [torch.randn(5, 6)]), r"ema\[3\] has shape \[30\] but model\[3\] has shape \[5, 6\]"),
    Case("0-dim vs 1-dim", lambda: _with([torch.randn(())], [torch.randn(1)]), r"ema\[3\] has shape \[\] but model\[3\] has shape \[1\]"),
    Case("strided ema", lambda: _with([torch.randn(20)[::2]], [torch.randn(10)]),
         r"ema\[3\] with shape \[10\] and strides \[2\] is not dense"),
    Case("expanded model", lambda: _with([torch.randn(10)], [torch.randn(1).expand(10)]),
         r"model\[3\] with shape \[10\] and strides \[0\] is not dense"),
    Case("pair layouts", lambda: _with([torch.randn(3, 4)], [torch.randn(4, 3).t()]),
         r"ema\[3\] has strides \[4, 1\] but model\[3\] has strides \[1, 3\]"),
    Case("sparse ema", _sparse_ema, r"ema\[3\] has layout torch\.sparse_coo; only strided", op=False),
    # overlap
    Case("emas overlap", _aliased_emas, r"ema\[3\] and ema\[4\] overlap in memory"),
    Case("tied emas", _tied_emas, r"ema\[0\] and ema\[1\] overlap in memory"),
    Case("model overlaps its ema", _model_aliasing_its_ema, r"model\[3\] overlaps ema\[3\] in memory"),
    Case("model is another ema", _model_is_another_ema, r"model\[1\] overlaps ema\[2\] in memory"),
    Case("model overlaps two emas", _model_overlapping_two_emas, r"model\[0\] overlaps ema\[1\] in memory"),
    # device (meta stands in for a second device) and autograd
    Case("model on meta", lambda: Inputs(_e_m()[0], [torch.randn(10), torch.empty(20, device="meta"), torch.randn(30)]),
         r"model\[1\] is on meta but ema\[0\] is on cpu", op=False),
    Case("ema requires grad", lambda: _with([torch.zeros(2, requires_grad=True)], [torch.zeros(2)]), r"ema\[3\] requires grad"),
    # decay
    Case("decay nan", lambda: Inputs(*_e_m(), float("nan")), r"decay must be a finite number in \[0, 1\], got nan"),
    Case("decay inf", lambda: Inputs(*_e_m(), float("inf")), r"got inf$"),
    Case("decay -inf", lambda: Inputs(*_e_m(), float("-inf")), r"got -inf$"),
    Case("decay above one", lambda: Inputs(*_e_m(), 1.5), r"got 1\.5$"),
    Case("decay two", lambda: Inputs(*_e_m(), 2.0), r"got 2\.0$"),
    Case("decay negative", lambda: Inputs(*_e_m(), -0.1), r"got -0\.1$"),
    Case("decay just above one", lambda: Inputs(*_e_m(), 1.0000000000000002), r"got 1\.0000000000000002$"),
    Case("decay huge", lambda: Inputs(*_e_m(), 1e300), r"got 1e\+300$"),
    Case("decay tensor 1-dim", lambda: Inputs(*_e_m(), torch.tensor([0.5])), r"must be 0-dim, got shape \[1\]"),
    Case("decay tensor int", lambda: Inputs(*_e_m(), torch.tensor(1)),
         r"must be torch\.float32 or torch\.float64, got dtype torch\.int64$"),
    Case("decay tensor bool", lambda: Inputs(*_e_m(), torch.tensor(True)), r"got dtype torch\.bool$"),
    Case("decay tensor bf16", lambda: Inputs(*_e_m(), torch.tensor(0.5, dtype=torch.bfloat16)),
         r"got dtype torch\.bfloat16; decays near 1 are not representable"),
    Case("decay tensor fp16", lambda: Inputs(*_e_m(), torch.tensor(0.5, dtype=torch.float16)),
         r"got dtype torch\.float16; decays near 1"),
    Case("decay tensor out of range", lambda: Inputs(*_e_m(), torch.tensor(1.25)), r"got 1\.25$"),
    Case("decay tensor nan", lambda: Inputs(*_e_m(), torch.tensor(float("nan"), dtype=torch.float64)), r"got nan$"),
    Case("decay tensor on meta", lambda: Inputs(*_e_m(), torch.tensor(0.5, device="meta")),
         r"the decay tensor is on meta but the tensors are on cpu", op=False),
    # copied pairs
    Case("copy lengths", lambda: _copies([torch.zeros(2)], []), r"got 1 copy_ema tensors but 0 copy_model tensors", op=False),
    Case("copy dtypes", lambda: _copies([_long(2)], [torch.zeros(2, dtype=torch.int32)]),
         r"copy_ema\[0\] has dtype torch\.int64 but copy_model\[0\] has dtype torch\.int32", op=False),
    Case("copy shapes", lambda: _copies([_long(2, 3)], [_long(3, 2)]),
         r"copy_ema\[0\] has shape \[2, 3\] but copy_model\[0\] has shape \[3, 2\]", op=False),
    Case("copy layouts", lambda: _copies([torch.zeros(4, 3)], [torch.zeros(3, 4).t()]),
         r"copy_ema\[0\] has strides \[3, 1\] but copy_model\[0\] has strides \[1, 4\]", op=False),
    Case("copy not dense", lambda: _copies([torch.zeros(3)], [torch.zeros(6)[::2]]),
         r"copy_model\[0\] with shape \[3\] and strides \[2\] is not dense", op=False),
    Case("copy on meta", lambda: _copies([torch.zeros(2, device="meta")], [torch.zeros(2, device="meta")]),
         r"copy_ema\[0\] is on meta but ema\[0\] is on cpu", op=False),
    Case("copies only, one on meta", lambda: _copies([_long(2), _long(2)], [_long(2), _long(2, device="meta")], ()),
         r"copy_model\[1\] is on meta but copy_ema\[0\] is on cpu", op=False),
    Case("copy requires grad", lambda: _copies([torch.zeros(2, requires_grad=True)], [torch.zeros(2)]),
         r"copy_ema\[0\] requires grad", op=False),
    Case("copies overlap", lambda: (lambda b: _copies([b[:4], b[2:6]], [_long(4), _long(4)]))(_long(8)),
         r"copy_ema\[0\] and copy_ema\[1\] overlap in memory", op=False),
    Case("copy_ema overlaps ema", lambda: _copy_aliasing("copy_ema overlaps ema"),
         r"ema\[0\] and copy_ema\[0\] overlap in memory", op=False),
    Case("copy_model overlaps ema", lambda: _copy_aliasing("copy_model overlaps ema"),
         r"copy_model\[0\] overlaps ema\[0\] in memory", op=False),
    Case("model overlaps copy_ema", lambda: _copy_aliasing("model overlaps copy_ema"),
         r"model\[0\] overlaps copy_ema\[0\] in memory", op=False),
    Case("copies only, decay tensor on meta",
         lambda: Inputs([], [], torch.tensor(0.5, device="meta"), [_long(2)], [_long(2)]),
         r"the decay tensor is on meta but the tensors are on cpu", op=False),
    # which fault is reported when there are several: the same one (an
    # updater checks its lists when constructed, before it sees a decay)
    Case("bad decay and bad lists", _two_faults_decay_first, r"decay must be a finite number", updater=False),
    Case("bad shapes and overlap", _two_faults_lists_before_overlap, r"ema\[4\] has shape \[50\] but model\[4\] has shape \[51\]"),
]


def _step(updater, decay):
    if isinstance(decay, torch.Tensor):
        updater.update_tensor(decay)
    else:
        updater.update(decay)


def _compiled_updater(x: Inputs):
    _step(ops._C.ListUpdater(x.ema, x.model, x.copy_ema, x.copy_model), x.decay)


def _python_updater(x: Inputs):
    _step(_fallback.ListUpdater(x.ema, x.model, x.copy_ema, x.copy_model), x.decay)


def _compiled_op(x: Inputs):
    if isinstance(x.decay, torch.Tensor):
        torch.ops.ema_cuda.ema_update_.Tensor(x.ema, x.model, x.decay)
    else:
        torch.ops.ema_cuda.ema_update_.default(x.ema, x.model, x.decay)


def _python_op(x: Inputs):
    if isinstance(x.decay, torch.Tensor):
        _fallback.update_tensor(x.ema, x.model, x.decay)
    else:
        _fallback.update(x.ema, x.model, x.decay)


SIDES = {"updater": (_compiled_updater, _python_updater), "op": (_compiled_op, _python_op)}
PARAMS = [pytest.param(c, "updater", id=f"updater-{c.name}") for c in CASES if c.updater] + [
    pytest.param(c, "op", id=f"op-{c.name}") for c in CASES if c.op
]


def _rejected(run, case: Case) -> BaseException:
    """``run`` on fresh inputs of ``case`` raises an error saying ``case.match``, and writes nothing."""
    torch.manual_seed(0)
    inputs = case.make()
    written = inputs.written()
    before = snapshot(written)
    with pytest.raises(Exception, match=case.match) as info:
        run(inputs)
    assert_bit_identical(written, before)
    return info.value


@pytest.mark.parametrize("case,path", PARAMS)
def test_both_sides_reject_alike(case, path):
    compiled, python = SIDES[path]
    from_cpp = _rejected(compiled, case)
    from_python = _rejected(python, case)
    assert type(from_cpp) is type(from_python)
    assert str(from_cpp) == str(from_python)


def test_every_case_runs_the_op_where_the_dispatcher_lets_it():
    # A case left out of the op path must have a reason: a tensor the
    # dispatcher sends elsewhere (meta, sparse) or copied pairs (no op takes
    # them).
    for case in CASES:
        if case.op:
            continue
        assert case.updater, case.name
        torch.manual_seed(0)
        x = case.make()
        tensors = x.ema + x.model + x.copy_ema + x.copy_model + ([x.decay] if isinstance(x.decay, torch.Tensor) else [])
        dispatched_elsewhere = any(t.device.type == "meta" or t.layout != torch.strided for t in tensors)
        assert dispatched_elsewhere or x.copy_ema or x.copy_model, case.name


# ----------------------------------------------------------------------------- the dtype tables


def _creatable_dtypes():
    found = []
    for name in sorted(dir(torch)):
        dtype = getattr(torch, name)
        if isinstance(dtype, torch.dtype) and dtype not in found:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "experimental" dtypes say so
                    torch.zeros(4, dtype=dtype)
            except Exception:  # quantized and sub-byte dtypes: not an input anyone can pass
                continue
            found.append(dtype)
    return found


ALL_DTYPES = _creatable_dtypes()


def _outcome(run, ema, model):
    try:
        run(Inputs(ema, model, 0.5))
    except Exception as exc:  # noqa: BLE001 -- the class is part of what is compared
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize("side", ["ema", "model"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_both_sides_accept_the_same_dtypes(dtype, side):
    def lists():
        odd = torch.zeros(4, dtype=dtype)
        return ([torch.zeros(4), odd], [torch.ones(4), torch.zeros(4)]) if side == "ema" else (
            [torch.zeros(4), torch.zeros(4)], [torch.ones(4), odd])

    for compiled, python in SIDES.values():
        assert _outcome(compiled, *lists()) == _outcome(python, *lists())


def test_the_compiled_dtype_table_is_supported_dtypes():
    # csrc/dtypes.h and SUPPORTED_DTYPES list the same dtypes, in one order
    # (the messages list them in that order).
    accepted = [d for d in ALL_DTYPES if _outcome(_compiled_updater, [torch.zeros(4, dtype=d)], [torch.zeros(4)]) is None]
    assert set(accepted) == set(SUPPORTED_DTYPES)
    message = _outcome(_compiled_updater, [torch.zeros(4, dtype=torch.int8)], [torch.zeros(4)])[1]
    assert message.endswith("expected one of " + ", ".join(str(d) for d in SUPPORTED_DTYPES))


# ----------------------------------------------------------------------------- inputs both accept


def _self_model():
    e = torch.randn(10)
    return Inputs([e], [e])


def _size_one_strides():
    return Inputs([torch.randn(1, 5)], [torch.randn(5, 1).t()])


def _permuted():
    return Inputs([torch.randn(6, 7).t()], [torch.randn(6, 7).t()])


ACCEPTED = {
    "ema is its own model": _self_model,
    "contiguous with other size-1 strides": _size_one_strides,
    "same permuted layout": _permuted,
    "empty tensors": lambda: Inputs([torch.empty(0), torch.empty(3, 0)], [torch.empty(0), torch.empty(3, 0)]),
    "decay 0": lambda: Inputs(*_pairs(5), 0.0),
    "decay 1": lambda: Inputs(*_pairs(5), 1.0),
    "decay -0.0": lambda: Inputs(*_pairs(5), -0.0),
    "float64 decay tensor": lambda: Inputs(*_pairs(5), torch.tensor(0.3, dtype=torch.float64)),
    "copies of every kind": lambda: _copies([_long(3), torch.zeros(2, dtype=torch.bool)], [_long(3), torch.ones(2, dtype=torch.bool)]),
    "copies only": lambda: Inputs([], [], 0.5, [_long(3)], [torch.arange(3)]),
}


@pytest.mark.parametrize(
    "name,path",
    [(n, "updater") for n in sorted(ACCEPTED)] + [(n, "op") for n in sorted(ACCEPTED) if not n.startswith("copies")],
)
def test_both_sides_accept_alike(name, path):
    results = []
    for run in SIDES[path]:
        torch.manual_seed(0)
        x = ACCEPTED[name]()
        run(x)
        results.append(x.ema + x.copy_ema)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-7, atol=1e-7)


# ----------------------------------------------------------------------------- the multi-EMA op


@dataclass
class MultiInputs:
    """``ema`` profile-major: ``ema[k * len(model) + i]`` is profile k's EMA of ``model[i]``."""

    ema: List[torch.Tensor]
    model: List[torch.Tensor]
    decays: Union[List[float], torch.Tensor]
    profiles: int = 0  # the updater's profile count; 0: one per decay

    def k(self):
        return self.profiles or len(self.decays)

    def written(self):
        return [t for t in self.ema if t.layout == torch.strided and t.device.type != "meta"]


def _multi(k=2, sizes=(10, 20, 30), decays=None):
    model = [torch.randn(s) for s in sizes]
    ema = [torch.randn(s) for _ in range(k) for s in sizes]
    return MultiInputs(ema, model, decays if decays is not None else [0.5 + 0.1 * j for j in range(k)])


def _multi_with(row, tensor=None, model_row=None, model_tensor=None, **kw):
    x = _multi(**kw)
    if tensor is not None:
        x.ema[row] = tensor
    if model_tensor is not None:
        x.model[model_row] = model_tensor
    return x


def _multi_shared_across_profiles():
    x = _multi()
    x.ema[4] = x.ema[1]
    return x


def _multi_model_is_a_later_ema():
    x = _multi()
    x.ema[3] = x.model[0]
    return x


def _multi_decays(decays, profiles=0):
    x = _multi(decays=decays)
    if profiles:
        x = MultiInputs(_multi(k=profiles).ema, x.model, decays, profiles)
    return x


MULTI_CASES = [
    Case("lengths", lambda: MultiInputs(_multi().ema[:5], _multi().model, [0.5, 0.6]),
         r"got 5 ema tensors for 2 decays and 3 model tensors; expected 2 x 3 = 6"),
    Case("int ema of profile 1", lambda: _multi_with(5, torch.zeros(30, dtype=torch.int64)),
         r"ema\[1\]\[2\] has dtype torch\.int64; expected one of"),
    Case("int model", lambda: _multi_with(0, model_row=1, model_tensor=torch.zeros(20, dtype=torch.int32)),
         r"model\[1\] has dtype torch\.int32"),
    Case("shape in profile 1", lambda: _multi_with(3, torch.randn(7)), r"ema\[1\]\[0\] has shape \[7\] but model\[0\] has shape \[10\]"),
    Case("strided ema", lambda: _multi_with(4, torch.randn(40)[::2]), r"ema\[1\]\[1\] with shape \[20\] and strides \[2\] is not dense"),
    Case("pair layouts", lambda: _multi_with(3, torch.randn(3, 4), 0, torch.randn(4, 3).t(), sizes=((3, 4), 20)),
         r"ema\[0\]\[0\] has strides \[4, 1\] but model\[0\] has strides \[1, 3\]"),
    Case("one tensor in two profiles", _multi_shared_across_profiles, r"ema\[0\]\[1\] and ema\[1\]\[1\] overlap in memory"),
    Case("model is a later profile's ema", _multi_model_is_a_later_ema, r"model\[0\] overlaps ema\[1\]\[0\] in memory"),
    Case("model on meta", lambda: _multi_with(0, model_row=1, model_tensor=torch.empty(20, device="meta")),
         r"model\[1\] is on meta but ema\[0\]\[0\] is on cpu", op=False),
    Case("ema requires grad", lambda: _multi_with(5, torch.zeros(30, requires_grad=True)), r"ema\[1\]\[2\] requires grad"),
    Case("decays nan", lambda: _multi_decays([0.5, float("nan")]), r"decays\[1\] must be a finite number in \[0, 1\], got nan"),
    Case("decays above one", lambda: _multi_decays([1.5, 0.5]), r"decays\[0\] must be a finite number in \[0, 1\], got 1\.5$"),
    Case("no decays", lambda: _multi_decays([]), r"got 0 decays; one multi-EMA update takes 1 to 16 profiles", updater=False),
    Case("17 decays", lambda: _multi_decays([0.5] * 17), r"got 17 decays; one multi-EMA update takes 1 to 16", updater=False),
    Case("decays for other profiles", lambda: _multi_decays([0.5, 0.5, 0.5], profiles=2), r"got 3 decays for 2 EMA profiles",
         op=False),
    Case("decays tensor 0-dim", lambda: _multi_decays(torch.tensor(0.5)), r"a decays tensor must be 1-dim \(one decay per profile\), got shape \[\]",
         updater=False),
    Case("decays tensor 2-dim", lambda: _multi_decays(torch.tensor([[0.5, 0.5]]), profiles=2), r"must be 1-dim .*got shape \[1, 2\]"),
    Case("decays tensor bf16", lambda: _multi_decays(torch.tensor([0.5, 0.5], dtype=torch.bfloat16)),
         r"a decays tensor must be torch\.float32 or torch\.float64, got dtype torch\.bfloat16; decays near 1"),
    Case("decays tensor int", lambda: _multi_decays(torch.tensor([1, 1])), r"got dtype torch\.int64$"),
    Case("decays tensor out of range", lambda: _multi_decays(torch.tensor([0.5, 1.25])), r"decays\[1\] must be .* got 1\.25$"),
    Case("decays tensor on meta", lambda: _multi_decays(torch.tensor([0.5, 0.5], device="meta")),
         r"the decays tensor is on meta but the tensors are on cpu", op=False),
    Case("bad decays and bad lists", lambda: MultiInputs(_multi().ema[:5], _multi().model, [0.5, 2.0]), r"decays\[1\] must be",
         updater=False),
]


def _multi_step(updater, decays):
    if isinstance(decays, torch.Tensor):
        updater.update_tensor(decays)
    else:
        updater.update(decays)


def _compiled_multi_updater(x: MultiInputs):
    _multi_step(ops._C.MultiListUpdater(x.ema, x.model, x.k()), x.decays)


def _python_multi_updater(x: MultiInputs):
    _multi_step(_fallback.MultiListUpdater(x.ema, x.model, x.k()), x.decays)


def _compiled_multi_op(x: MultiInputs):
    overload = "Tensor" if isinstance(x.decays, torch.Tensor) else "default"
    getattr(torch.ops.ema_cuda.multi_ema_update_, overload)(x.ema, x.model, x.decays)


def _python_multi_op(x: MultiInputs):
    if isinstance(x.decays, torch.Tensor):
        _fallback.multi_update_tensor(x.ema, x.model, x.decays)
    else:
        _fallback.multi_update(x.ema, x.model, x.decays)


MULTI_SIDES = {"updater": (_compiled_multi_updater, _python_multi_updater), "op": (_compiled_multi_op, _python_multi_op)}


@pytest.mark.parametrize(
    "case,path",
    [pytest.param(c, "updater", id=f"updater-{c.name}") for c in MULTI_CASES if c.updater]
    + [pytest.param(c, "op", id=f"op-{c.name}") for c in MULTI_CASES if c.op],
)
def test_both_sides_of_the_multi_op_reject_alike(case, path):
    compiled, python = MULTI_SIDES[path]
    from_cpp = _rejected(compiled, case)
    from_python = _rejected(python, case)
    assert type(from_cpp) is type(from_python)
    assert str(from_cpp) == str(from_python)


@pytest.mark.parametrize("path", ["updater", "op"])
def test_both_sides_of_the_multi_op_accept_alike(path):
    results = []
    for run in MULTI_SIDES[path]:
        torch.manual_seed(0)
        x = _multi(k=3, decays=[0.0, 1.0, 0.3])
        run(x)
        results.append(x.ema)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-7, atol=1e-7)
