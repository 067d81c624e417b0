"""The fused op ``ema_cuda::ema_update_``: values, edge cases, validation, plan cache."""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import ema_cuda
from ema_cuda import ops
from conftest import DTYPES, expected_backend, requires_compiled, requires_cuda

# Tolerances relative to an fp64 reference: the result is rounded once to the
# EMA dtype after fp32 (or fp64) math.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


def make_pairs(sizes, ema_dtype=torch.float32, model_dtype=torch.float32, device="cpu"):
    ema = [torch.randn(s, device=device).to(ema_dtype) for s in sizes]
    model = [torch.randn(s, device=device).to(model_dtype) for s in sizes]
    return ema, model


def reference(ema, model, decay):
    return [e.double() * decay + m.double() * (1.0 - decay) for e, m in zip(ema, model)]


def tolerance(dtype):
    """TOL, or for a dtype it does not list one rounding to that dtype."""
    eps = torch.finfo(dtype).eps
    return TOL.get(dtype, dict(rtol=eps, atol=eps))


def check(ema, ref):
    for i, (e, r) in enumerate(zip(ema, ref)):
        assert_close(e.double(), r, **tolerance(e.dtype), msg=lambda m, i=i: f"tensor {i}: {m}")


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def assert_rejected_untouched(update, tensors, match):
    """``update()`` raises a RuntimeError matching ``match`` and leaves ``tensors`` bit-identical."""
    before = snapshot(tensors)
    with pytest.raises(RuntimeError, match=match):
        update()
    assert_bit_identical(tensors, before)


def assert_bit_identical(tensors, before):
    for i, (t, b) in enumerate(zip(tensors, before)):
        bits_now = t.detach().contiguous().view(-1).view(torch.uint8)
        bits_then = b.contiguous().view(-1).view(torch.uint8)
        assert torch.equal(bits_now, bits_then), f"tensor {i} was modified"


# ----------------------------------------------------------------------------- backend


def test_backend_matches_environment():
    want = expected_backend()
    if want in ("compiled", "fallback"):
        assert ops.backend() == want
    assert ops.backend() in ("compiled", "fallback")
    assert (ops.fallback_reason() is None) == (ops.backend() == "compiled")


@pytest.mark.skipif(os.environ.get("EMA_CUDA_EXPECT_CUDA") != "1", reason="CUDA build not requested")
def test_cuda_kernel_was_compiled():
    # `make test` sets EMA_CUDA_EXPECT_CUDA=1 when nvcc is on the PATH: the
    # extension must then contain the CUDA kernel, GPU or not.
    assert ops.backend() == "compiled"
    assert ops.cuda_kernel_available()
    assert torch.ops.ema_cuda_testing.cuda_compiled()


def test_fallback_warns_once_and_reports_itself():
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import ema_cuda, torch\n"
        "    from ema_cuda import ops\n"
        "    e, m = [torch.zeros(3)], [torch.ones(3)]\n"
        "    ops.ema_update_(e, m, 0.5); ops.ema_update_(e, m, 0.5)\n"
        "print(ops.backend(), sum('fallback' in str(x.message) for x in w), e[0].tolist())\n"
    )
    env = dict(os.environ, EMA_CUDA_BACKEND="fallback")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["fallback", "1", "[0.75,", "0.75,", "0.75]"]


def test_bad_backend_env_is_rejected():
    env = dict(os.environ, EMA_CUDA_BACKEND="fastest")
    out = subprocess.run([sys.executable, "-c", "import ema_cuda"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "EMA_CUDA_BACKEND must be" in out.stderr


# ----------------------------------------------------------------------------- values

SIZES = [0, 1, 3, 7, 8, 9, 15, 16, 17, 1000, (1 << 16) - 1, 1 << 16, (1 << 16) + 1, 100_003]


@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", DTYPES)
def test_every_dtype_pair_matches_fp64_reference(device, ema_dtype, model_dtype):
    ema, model = make_pairs(SIZES, ema_dtype, model_dtype, device)
    ref = reference(ema, model, 0.9)
    ops.ema_update_(ema, model, 0.9)
    check(ema, ref)


def test_model_tensors_are_not_written(device):
    ema, model = make_pairs(SIZES, torch.float32, torch.bfloat16, device)
    before = snapshot(model)
    ops.ema_update_(ema, model, 0.7)
    assert_bit_identical(model, before)


@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", DTYPES)
def test_decay_zero_and_one_are_exact(device, ema_dtype, model_dtype):
    ema, model = make_pairs([0, 1, 17, 4099], ema_dtype, model_dtype, device)
    before = snapshot(ema)
    ops.ema_update_(ema, model, 1.0)
    assert_bit_identical(ema, before)
    ops.ema_update_(ema, model, 0.0)
    for e, m in zip(ema, model):
        assert torch.equal(e, m.to(ema_dtype))


def test_zero_dim_and_multi_dim_and_permuted_layouts(device):
    ema = [torch.randn((), device=device), torch.randn(3, 4, 5, device=device),
           torch.randn(6, 7, device=device).t()]
    model = [torch.randn((), device=device), torch.randn(3, 4, 5, device=device),
             torch.randn(6, 7, device=device).t()]
    ref = reference(ema, model, 0.25)
    ops.ema_update_(ema, model, 0.25)
    check(ema, ref)


def test_empty_lists_and_empty_tensors(device):
    ops.ema_update_([], [], 0.5)
    ema = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    model = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    ops.ema_update_(ema, model, 0.5)
    ops.ema_update_(ema, model, torch.tensor(0.5, device=device))


@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_misaligned_views(device, offset, model_dtype):
    n = (1 << 16) + 37
    ebuf = torch.randn(n + offset, device=device)
    mbuf = torch.randn(n + offset, device=device).to(model_dtype)
    cases = [
        (ebuf[offset:], mbuf[offset:]),         # both shifted the same way
        (ebuf[offset:], mbuf[: n]),             # only the EMA shifted
        (ebuf[: n], mbuf[offset:]),             # only the model shifted
    ]
    for e, m in cases:
        ref = reference([e], [m], 0.6)
        ops.ema_update_([e], [m], 0.6)
        check([e], ref)


def test_ten_thousand_tensors(device):
    ema, model = make_pairs([1000] * 10_000, device=device)
    ema[17] = torch.randn(3, device=device)  # odd sizes among them
    model[17] = torch.randn(3, device=device)
    ref = reference(ema, model, 0.99)
    ops.ema_update_(ema, model, 0.99)
    check(ema, ref)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_threads_split_by_elements_mid_tensor(threads):
    # The CPU kernel hands each thread the same number of elements, so the
    # boundaries fall inside tensors and inside chunks: every element must
    # still be updated exactly once.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ema, model = make_pairs([5] * 300 + [(1 << 16) * 3 + 11] + [1, 2, 3] * 50)
        ref = reference(ema, model, 0.4)
        ops.ema_update_(ema, model, 0.4)
        check(ema, ref)
    finally:
        torch.set_num_threads(old)


@requires_compiled
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_list_update_is_bit_identical_to_one_tensor_at_a_time(threads):
    # The CPU kernel works on 8, 4 or 2 small chunks side by side where it can
    # (same dtypes, all whole in one thread's range, up to 16K elements) and
    # one at a time elsewhere; the arithmetic must not depend on which.
    sizes = [1000, 1003, 2048, 999, 33, 7, 16_384, 16_385, 16, 1, 0, 5000, 4999, 70_000, 31, 64] * 3
    dtypes = [(torch.float32, torch.float32)] * 24 + [(torch.float32, torch.bfloat16)] * 8 + [
        (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float64, torch.float32),
        (torch.float32, torch.float16)] * 4
    assert len(dtypes) == len(sizes)
    ema = [torch.randn(s).to(dtypes[i][0]) for i, s in enumerate(sizes)]
    model = [torch.randn(s).to(dtypes[i][1]) for i, s in enumerate(sizes)]
    start = snapshot(ema)
    one_by_one = snapshot(ema)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ops.ema_update_(ema, model, 0.37)
        for e, m in zip(one_by_one, model):
            ops.ema_update_([e], [m], 0.37)
    finally:
        torch.set_num_threads(old)
    assert_bit_identical(ema, one_by_one)
    check(ema, reference(start, model, 0.37))


def test_decay_tensor_matches_float(device):
    ema, model = make_pairs(SIZES, torch.float32, torch.bfloat16, device)
    start = snapshot(ema)
    ops.ema_update_(ema, model, 0.8)
    check(ema, reference(start, model, 0.8))     # the float overload itself is right
    for dt in (torch.float32, torch.float64):
        e = snapshot(start)
        d = torch.tensor(0.8, dtype=dt, device=device)
        ops.ema_update_(e, model, d)
        check(e, reference(start, model, float(d)))
        if dt == torch.float64:
            # The same decay value, read from a tensor or passed as a float:
            # the same bits.
            assert_bit_identical(e, ema)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decay_tensors_are_rejected_saying_why(device, dtype):
    ema, model = make_pairs([10], device=device)
    before = snapshot(ema)
    with pytest.raises(RuntimeError, match=r"float32 or torch.float64, got dtype torch\.(bfloat16|float16); .*0\.9999 rounds to 1\.0"):
        ops.ema_update_(ema, model, torch.tensor(0.9999, dtype=dtype, device=device))
    assert_bit_identical(ema, before)


@pytest.mark.parametrize(
    "decay,match",
    [
        (lambda dev: torch.tensor([0.5], device=dev), r"must be 0-dim, got shape \[1\]"),
        (lambda dev: torch.tensor(1, device=dev), r"got dtype torch\.int64"),
        (lambda dev: torch.tensor(True, device=dev), r"got dtype torch\.bool"),
        (lambda dev: torch.tensor(0.5, dtype=torch.bfloat16, device=dev), r"got dtype torch\.bfloat16"),
    ],
)
def test_the_op_called_through_torch_ops_checks_a_decay_tensor(device, decay, match):
    # Straight through torch.ops, without the Python wrapper: a tensor decay
    # must reach the Tensor overload and its checks, never be converted to
    # the float overload's float.
    ema, model = make_pairs([10], device=device)
    before = snapshot(ema)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.ema_cuda.ema_update_(ema, model, decay(device))
    assert_bit_identical(ema, before)


def test_the_op_through_torch_ops_takes_a_good_decay_tensor_and_a_float(device):
    ema, model = make_pairs([10, 70_000], device=device)
    start = snapshot(ema)
    torch.ops.ema_cuda.ema_update_(ema, model, torch.tensor(0.25, dtype=torch.float64, device=device))
    check(ema, reference(start, model, 0.25))
    torch.ops.ema_cuda.ema_update_(ema, model, 0.5)
    check(ema, reference([r.to(torch.float32) for r in reference(start, model, 0.25)], model, 0.5))


def test_a_decay_tensor_on_another_device_is_rejected():
    # A meta decay tensor with CPU lists: the device check must fire (on a
    # GPU machine a CPU decay with CUDA lists is the same case).
    ema, model = make_pairs([10])
    before = snapshot(ema)
    with pytest.raises(RuntimeError, match=r"the decay tensor is on meta but the tensors are on cpu"):
        ops.ema_update_(ema, model, torch.tensor(0.5, device="meta"))
    assert_bit_identical(ema, before)


def test_repeated_updates_converge_like_reference(device):
    ema, model = make_pairs([5, 70_000], device=device)
    ref = [e.double() for e in ema]
    for step in range(20):
        d = 0.5 + step / 50
        ops.ema_update_(ema, model, d)
        ref = [r * d + m.double() * (1 - d) for r, m in zip(ref, model)]
    check(ema, ref)


def test_model_parameters_may_require_grad():
    net = torch.nn.Linear(4, 3)
    ema = [p.detach().clone() for p in net.parameters()]
    ref = reference(ema, list(net.parameters()), 0.5)
    ops.ema_update_(ema, list(net.parameters()), 0.5)
    check(ema, ref)


def test_ema_requiring_grad_is_allowed_under_no_grad():
    e = torch.zeros(4, requires_grad=True)
    with torch.no_grad():
        ops.ema_update_([e], [torch.ones(4)], 0.5)
    assert e.detach().tolist() == [0.5] * 4


# ----------------------------------------------------------------------------- validation

def _ema_model(device="cpu"):
    return make_pairs([10, 20, 30], device=device)


def bad_inputs(device):
    """(description, ema list, model list, decay, message pattern)."""
    e, m = _ema_model(device)
    shared = torch.randn(100, device=device)
    cases = [
        ("lengths", e, m[:2], 0.5, r"got 3 ema tensors but 2 model tensors"),
        ("numel", e, [m[0], m[1], torch.randn(31, device=device)], 0.5, r"ema\[2\] has shape \[30\] but model\[2\] has shape \[31\]"),
        ("shape", e, [m[0], m[1], torch.randn(5, 6, device=device)], 0.5, r"ema\[2\] has shape \[30\] but model\[2\] has shape \[5, 6\]"),
        ("int model", e, [m[0], m[1].long(), m[2]], 0.5, r"model\[1\] has dtype torch.int64"),
        ("bool ema", e + [torch.zeros(2, dtype=torch.bool, device=device)], m + [torch.zeros(2, device=device)], 0.5, r"ema\[3\] has dtype torch.bool"),
        ("complex", e + [torch.zeros(2, dtype=torch.complex64, device=device)], m + [torch.zeros(2, device=device)], 0.5, r"ema\[3\] has dtype torch.complex64"),
        ("strided", e + [torch.randn(20, device=device)[::2]], m + [torch.randn(10, device=device)], 0.5, r"ema\[3\] .* is not dense"),
        ("expanded", e + [torch.randn(10, device=device)], m + [torch.randn(1, device=device).expand(10)], 0.5, r"model\[3\] .* is not dense"),
        ("layouts", e + [torch.randn(3, 4, device=device)], m + [torch.randn(4, 3, device=device).t()], 0.5, r"ema\[3\] has strides \[4, 1\] but model\[3\] has strides \[1, 3\]"),
        ("nan", e, m, float("nan"), r"decay must be a finite number in \[0, 1\], got nan"),
        ("inf", e, m, float("inf"), r"decay must be a finite number in \[0, 1\], got inf"),
        ("above one", e, m, 1.5, r"got 1.5"),
        ("negative", e, m, -0.1, r"got -0.1"),
        ("decay 1-dim", e, m, torch.tensor([0.5], device=device), r"decay tensor must be 0-dim, got shape \[1\]"),
        ("decay int", e, m, torch.tensor(1, device=device), r"decay tensor must be torch.float32 or torch.float64, got dtype torch.int64"),
        ("ema aliasing", e + [shared[:60], shared[50:]], m + [torch.randn(60, device=device), torch.randn(50, device=device)], 0.5, r"ema\[3\] and ema\[4\] overlap"),
        ("model aliasing ema", e + [shared[:60]], m + [shared[10:70]], 0.5, r"model\[3\] overlaps ema\[3\]"),
        ("model is other ema", e, [m[0], e[2].view(-1)[:20], m[2]], 0.5, r"model\[1\] overlaps ema\[2\]"),
        ("ema requires grad", e + [torch.zeros(2, device=device, requires_grad=True)], m + [torch.zeros(2, device=device)], 0.5, r"ema\[3\] requires grad"),
    ]
    if device.type == "cpu":
        cases += [
            ("cpu decay tensor out of range", e, m, torch.tensor(1.25), r"got 1.25"),
            ("cpu decay tensor nan", e, m, torch.tensor(float("nan")), r"got nan"),
        ]
    return cases


@pytest.mark.parametrize("case", range(21))
def test_bad_input_names_the_problem_and_writes_nothing(device, case):
    cases = bad_inputs(device)
    if case >= len(cases):
        pytest.skip("case only exists on the CPU")
    name, ema, model, decay, pattern = cases[case]
    before = snapshot(ema)
    with pytest.raises((RuntimeError, TypeError), match=pattern):
        ops.ema_update_(ema, model, decay)
    assert_bit_identical(ema, before)


def test_error_names_the_op():
    e, m = _ema_model()
    with pytest.raises(RuntimeError, match=r"ema_cuda::ema_update_: "):
        ops.ema_update_(e, m, 2.0)


@requires_cuda
def test_mixed_devices_are_rejected():
    e, m = _ema_model("cuda")
    m[1] = m[1].cpu()
    before = snapshot(e)
    with pytest.raises(RuntimeError, match=r"model\[1\] is on cpu but ema\[0\] is on cuda:0"):
        ops.ema_update_(e, m, 0.5)
    assert_bit_identical(e, before)
    with pytest.raises(RuntimeError, match=r"decay tensor is on cpu but the tensors are on cuda:0"):
        ops.ema_update_(e, [x.cuda() for x in m], torch.tensor(0.5))
    assert_bit_identical(e, before)


def test_mixed_devices_are_rejected_by_the_meta_kernel():
    # Without a GPU, the meta device stands in for a second device: the fake
    # kernel runs the same device check.
    e, m = _ema_model()
    m[1] = torch.empty(20, device="meta")
    before = snapshot(e)
    with pytest.raises(RuntimeError, match=r"model\[1\] is on meta but ema\[0\] is on cpu"):
        ops.ema_update_(e, m, 0.5)
    assert_bit_identical(e, before)


# ----------------------------------------------------------------------------- plan cache

@requires_compiled
def test_plan_is_cached_then_rebuilt_when_a_tensor_changes():
    torch.ops.ema_cuda_testing.clear_plan_cache()
    ema, model = make_pairs([100, 200])
    ops.ema_update_(ema, model, 0.5)
    ops.ema_update_(ema, model, 0.5)
    builds, hits, *_ = torch.ops.ema_cuda_testing.plan_cache_stats()
    assert (builds, hits) == (1, 1)
    model[1] = torch.randn(200)          # a replaced tensor: new signature
    ref = reference(ema, model, 0.5)
    ops.ema_update_(ema, model, 0.5)
    check(ema, ref)
    builds, hits, *_ = torch.ops.ema_cuda_testing.plan_cache_stats()
    assert (builds, hits) == (2, 1)


@requires_compiled
def test_plan_cache_is_bounded():
    torch.ops.ema_cuda_testing.clear_plan_cache()
    keep = []      # alive, so no address is reused by a later pair
    for _ in range(100):
        ema, model = make_pairs([10])
        keep.append((ema, model))
        ops.ema_update_(ema, model, 0.5)
    assert torch.ops.ema_cuda_testing.plan_cache_stats()[2] == 64


@requires_compiled
def test_a_steady_loop_over_many_lists_never_rebuilds():
    # Several EMAs / parameter groups per step, each its own lists: after the
    # first step every call finds its plan.
    torch.ops.ema_cuda_testing.clear_plan_cache()
    lists = [make_pairs([10, 20]) for _ in range(40)]
    for _ in range(3):
        for ema, model in lists:
            ops.ema_update_(ema, model, 0.5)
    builds, hits, *_ = torch.ops.ema_cuda_testing.plan_cache_stats()
    assert (builds, hits) == (40, 80)


def test_stale_plan_never_writes_to_freed_memory():
    n = 1 << 16
    ema, model = make_pairs([n, n])
    updater = ops.FusedUpdater(ema, model)
    updater.update(0.5)
    # Swap the EMA's storage: the old block goes back to the allocator and is
    # likely handed to the very next allocation of the same size.
    ema[0].data = torch.randn(n)
    sentinels = [torch.full((n,), 7.0) for _ in range(4)]
    ref = reference(ema, model, 0.5)
    updater.update(0.5)
    check(ema, ref)
    for s in sentinels:
        assert torch.equal(s, torch.full((n,), 7.0))
    # The same through the list op after the lists' tensors were freed.
    ema2, model2 = make_pairs([n, n])
    ops.ema_update_(ema2, model2, 0.5)
    del ema2, model2
    sentinels = [torch.full((n,), 3.0) for _ in range(4)]
    ema3, model3 = make_pairs([n, n])
    ref = reference(ema3, model3, 0.5)
    ops.ema_update_(ema3, model3, 0.5)
    check(ema3, ref)
    for s in sentinels:
        assert torch.equal(s, torch.full((n,), 3.0))


# ----------------------------------------------------------------------------- FusedUpdater

def test_fused_updater_matches_op(device):
    ema, model = make_pairs(SIZES, torch.float32, torch.bfloat16, device)
    ema2 = snapshot(ema)
    updater = ops.FusedUpdater(ema, model)
    assert len(updater) == len(SIZES)
    for d in (0.9, torch.tensor(0.7, device=device), 0.0):
        updater.update(d)
        ops.ema_update_(ema2, model, d)
        for a, b in zip(ema, ema2):
            assert torch.equal(a, b)


def test_fused_updater_revalidates_replaced_storage():
    ema, model = make_pairs([10, 20])
    updater = ops.FusedUpdater(ema, model)
    updater.update(0.5)
    model[1].data = torch.randn(21)      # now mismatched: must be caught, not read out of bounds
    before = snapshot(ema)
    with pytest.raises(RuntimeError, match=r"ema\[1\] has shape \[20\] but model\[1\] has shape \[21\]"):
        updater.update(0.5)
    assert_bit_identical(ema, before)


def test_fused_updater_notices_a_layout_change_at_the_same_address():
    # Same pointer, numel and dtype, but the model's layout no longer matches
    # the EMA's: averaging element by element would mix transposed entries.
    ema, model = [torch.randn(4, 4)], [torch.randn(4, 4)]
    updater = ops.FusedUpdater(ema, model)
    updater.update(0.5)
    model[0].data = model[0].data.t()
    before = snapshot(ema)
    with pytest.raises(RuntimeError, match=r"ema\[0\] has strides \[4, 1\] but model\[0\] has strides \[1, 4\]"):
        updater.update(0.5)
    assert_bit_identical(ema, before)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_fused_updater_checks_every_pair_of_a_long_list(where):
    # 5,000 pairs: the compiled signature check splits the list across
    # threads and prefetches ahead; a change at any position must be seen.
    n = 5_000
    index = {"first": 0, "middle": n // 2 + 1, "last": n - 1}[where]
    ema, model = make_pairs([8] * n)
    updater = ops.FusedUpdater(ema, model)
    updater.update(0.5)
    model[index].data = torch.randn(8)   # replaced storage: read it, not the old one
    ref = reference(ema, model, 0.25)
    updater.update(0.25)
    check(ema, ref)
    model[index].data = torch.randn(9)   # now mismatched: an error, nothing written
    assert_rejected_untouched(
        lambda: updater.update(0.5), ema, rf"ema\[{index}\] has shape \[8\] but model\[{index}\] has shape \[9\]"
    )


@pytest.mark.parametrize("where", ["first", "last"])
def test_fused_updater_notices_a_layout_change_in_a_long_list(where):
    n = 3_000
    index = 0 if where == "first" else n - 1
    ema = [torch.randn(3, 3) for _ in range(n)]
    model = [torch.randn(3, 3) for _ in range(n)]
    updater = ops.FusedUpdater(ema, model)
    updater.update(0.5)
    model[index].data = model[index].data.t()
    before = snapshot(ema)
    with pytest.raises(RuntimeError, match=rf"model\[{index}\] has strides \[1, 3\]"):
        updater.update(0.5)
    assert_bit_identical(ema, before)


@pytest.mark.parametrize("side", ["ema", "model"])
@pytest.mark.parametrize("change", ["offset", "resize", "other_storage", "emptied"])
def test_fused_updater_sees_in_place_changes_of_a_tensors_memory(side, change):
    # The same tensor object, its memory moved in place: a new offset into the
    # same storage (now misaligned), a storage reallocated by resize_, another
    # storage through set_, or no elements at all.  The per-call signature
    # check reads the address from the storage itself; it must see each one.
    n = 1000
    storage = torch.randn(n + 1)
    moving = torch.empty(0).set_(storage.untyped_storage(), 0, (n,))
    other = torch.randn(n)
    if side == "ema":
        ema, model = [moving, torch.randn(n)], [torch.randn(n), torch.randn(n)]
    else:
        ema, model = [torch.randn(n), torch.randn(n)], [moving, torch.randn(n)]
    updater = ops.FusedUpdater(ema, model)
    updater.update(0.5)
    if change == "offset":
        moving.set_(storage.untyped_storage(), 1, (n,))
    elif change == "resize":
        address = moving.data_ptr()
        moving.resize_(1 << 20)
        moving.resize_(n)
        assert moving.data_ptr() != address
    elif change == "other_storage":
        moving.set_(other)
    else:
        moving.resize_(0)
    pair = ema if side == "ema" else model
    if change == "emptied":
        before = snapshot(ema)
        with pytest.raises(RuntimeError, match=rf"{side}\[0\] has shape \[0\]"):
            updater.update(0.5)
        assert_bit_identical(ema, before)
        return
    assert pair[0] is moving
    first = storage[0].clone()
    ref = reference(ema, model, 0.25)
    updater.update(0.25)
    check(ema, ref)
    if change == "offset" and side == "ema":
        assert torch.equal(storage[0], first)   # the element before the new view is not written


@requires_compiled
def test_fused_updater_keeps_its_plan_for_contiguous_pairs_with_different_strides():
    # Strides of size-1 dimensions differ, both tensors are contiguous: the
    # pair is valid, so steady-state updates must not re-validate every call.
    ema = [torch.randn(1, 5)]                  # strides (5, 1)
    model = [torch.randn(5, 1).t()]            # shape (1, 5), strides (1, 1)
    assert ema[0].stride() != model[0].stride() and model[0].is_contiguous()
    updater = ops.FusedUpdater(ema, model)
    ref = [e.double() for e in ema]
    for _ in range(3):
        updater.update(0.5)
        ref = [r * 0.5 + m.double() * 0.5 for r, m in zip(ref, model)]
    check(ema, ref)
    assert updater._impl.rebuilds == 0


COPY_DTYPES = [torch.int64, torch.int32, torch.int8, torch.bool, torch.bfloat16, torch.float64, torch.complex64]


def make_copies(sizes, dtype, device="cpu"):
    def draw(n):
        if dtype == torch.bool:
            return torch.rand(n, device=device) > 0.5
        if dtype.is_floating_point or dtype.is_complex:
            return torch.randn(n, device=device, dtype=dtype)
        return torch.randint(-100, 100, (n,), device=device).to(dtype)
    return [draw(n) for n in sizes], [draw(n) for n in sizes]


@pytest.mark.parametrize("dtype", COPY_DTYPES)
def test_fused_updater_copies_pairs_in_the_same_call(device, dtype):
    ema, model = make_pairs([10, 3000, 70_001], torch.float32, torch.bfloat16, device)
    copy_ema, copy_model = make_copies([1, 0, 17, 4099, 70_003], dtype, device)
    updater = ops.FusedUpdater(ema, model, copy_ema, copy_model)
    for d in (0.9, torch.tensor(0.7, device=device)):
        for c in copy_model:
            c.copy_(make_copies([c.numel()], dtype, device)[0][0].view(c.shape))
        ref = reference(ema, model, float(d))
        updater.update(d)
        check(ema, ref)
        assert_bit_identical(copy_ema, copy_model)


def test_fused_updater_with_copies_only(device):
    copy_ema, copy_model = make_copies([1, 5, 100_000], torch.int64, device)
    updater = ops.FusedUpdater([], [], copy_ema, copy_model)
    updater.update(0.5)
    assert_bit_identical(copy_ema, copy_model)
    copy_model[2].add_(1)
    updater.update(torch.tensor(0.5, device=device))
    assert_bit_identical(copy_ema, copy_model)


def test_fused_updater_copy_follows_a_replaced_storage():
    ema, model = make_pairs([10])
    copy_ema, copy_model = make_copies([4], torch.int64)
    updater = ops.FusedUpdater(ema, model, copy_ema, copy_model)
    updater.update(0.5)
    copy_model[0].data = torch.tensor([7, 8, 9, 10])     # a new storage: copy from it
    updater.update(0.5)
    assert copy_ema[0].tolist() == [7, 8, 9, 10]
    copy_model[0].data = copy_model[0].data.int()         # a new dtype: an error, nothing written
    before = snapshot(ema) + snapshot(copy_ema)
    with pytest.raises(RuntimeError, match=r"copy_ema\[0\] has dtype torch.int64 but copy_model\[0\] has dtype "
                       r"torch.int32; a copied pair must share one dtype"):
        updater.update(0.5)
    assert_bit_identical(ema + copy_ema, before)


def _bad_copies():
    base = torch.zeros(8, dtype=torch.int64)
    return {
        "count": ([torch.zeros(2)], [], r"got 1 copy_ema tensors but 0 copy_model tensors"),
        "dtype": ([torch.zeros(2, dtype=torch.int64)], [torch.zeros(2, dtype=torch.int32)],
                  r"copy_ema\[0\] has dtype torch.int64 but copy_model\[0\] has dtype torch.int32"),
        "shape": ([torch.zeros(2, dtype=torch.int64)], [torch.zeros(3, dtype=torch.int64)],
                  r"copy_ema\[0\] has shape \[2\] but copy_model\[0\] has shape \[3\]"),
        "layout": ([torch.zeros(4, 3)], [torch.zeros(3, 4).t()],
                   r"copy_ema\[0\] has strides \[3, 1\] but copy_model\[0\] has strides \[1, 4\]"),
        "dense": ([torch.zeros(3)], [torch.zeros(6)[::2]], r"copy_model\[0\] with shape \[3\] and strides \[2\] is not dense"),
        "device": ([torch.zeros(2, device="meta")], [torch.zeros(2, device="meta")],
                   r"copy_ema\[0\] is on meta but ema\[0\] is on cpu"),
        "grad": ([torch.zeros(2, requires_grad=True)], [torch.zeros(2)], r"copy_ema\[0\] requires grad"),
        "overlap": ([base[:4], base[2:6]], [torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)],
                    r"copy_ema\[0\] and copy_ema\[1\] overlap in memory"),
    }


@pytest.mark.parametrize("case", sorted(_bad_copies()))
def test_fused_updater_rejects_bad_copies_naming_them(case):
    copy_ema, copy_model, message = _bad_copies()[case]
    ema, model = make_pairs([10])
    with pytest.raises(RuntimeError, match=message):
        ops.FusedUpdater(ema, model, copy_ema, copy_model)


def test_fused_updater_copies_must_not_alias_the_averaged_tensors():
    ema, model = make_pairs([10])
    with pytest.raises(RuntimeError, match=r"ema\[0\] and copy_ema\[0\] overlap in memory"):
        ops.FusedUpdater(ema, model, [ema[0][2:4]], [torch.zeros(2)])
    with pytest.raises(RuntimeError, match=r"copy_model\[0\] overlaps ema\[0\] in memory"):
        ops.FusedUpdater(ema, model, [torch.zeros(2)], [ema[0][2:4]])
    with pytest.raises(RuntimeError, match=r"model\[0\] overlaps copy_ema\[0\] in memory"):
        buf = torch.zeros(20)
        ops.FusedUpdater([torch.zeros(10)], [buf[:10]], [buf[5:7]], [torch.zeros(2)])


def test_fused_updater_bad_decay_writes_no_copy():
    ema, model = make_pairs([10])
    copy_ema, copy_model = make_copies([3], torch.int64)
    updater = ops.FusedUpdater(ema, model, copy_ema, copy_model)
    before = snapshot(ema) + snapshot(copy_ema)
    for bad in (1.5, float("nan"), torch.tensor(-1.0)):
        with pytest.raises(RuntimeError):
            updater.update(bad)
    assert_bit_identical(ema + copy_ema, before)


def test_fused_updater_rejects_bad_decay():
    ema, model = make_pairs([10])
    updater = ops.FusedUpdater(ema, model)
    before = snapshot(ema)
    for bad in (1.5, float("nan"), torch.tensor(-1.0), torch.ones(2)):
        with pytest.raises(RuntimeError):
            updater.update(bad)
    assert_bit_identical(ema, before)


# ----------------------------------------------------------------------------- torch.library integration

def _opcheck_args(device):
    ema, model = make_pairs([3, 17, 1000], torch.float32, torch.bfloat16, device)
    return ema, model


def test_opcheck_float_overload(device):
    ema, model = _opcheck_args(device)
    torch.library.opcheck(torch.ops.ema_cuda.ema_update_.default, (ema, model, 0.9))


def test_opcheck_tensor_overload(device):
    ema, model = _opcheck_args(device)
    torch.library.opcheck(torch.ops.ema_cuda.ema_update_.Tensor, (ema, model, torch.tensor(0.9, device=device)))


def test_opcheck_with_model_requiring_grad(device):
    net = torch.nn.Linear(5, 4).to(device)
    ema = [p.detach().clone() for p in net.parameters()]
    torch.library.opcheck(torch.ops.ema_cuda.ema_update_.default, (ema, list(net.parameters()), 0.5),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_matches_eager(device):
    ema, model = make_pairs([7, 300], device=device)
    ema_eager = snapshot(ema)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(e, m, d):
        torch.ops.ema_cuda.ema_update_(e, m, d)

    for d in (0.9, 0.8):
        dt = torch.tensor(d, device=device)
        step(ema, model, dt)
        ops.ema_update_(ema_eager, model, dt)
    for a, b in zip(ema, ema_eager):
        assert torch.equal(a, b)


def test_torch_compile_does_not_recompile_for_new_decay_tensor_values(device):
    import torch._dynamo

    torch._dynamo.reset()
    ema, model = make_pairs([11], device=device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(e, m, d):
        ops.ema_update_(e, m, d)

    with torch._dynamo.config.patch(error_on_recompile=True):
        for d in (0.9, 0.99, 0.999, 0.5):
            step(ema, model, torch.tensor(d, device=device))


# ----------------------------------------------------------------------------- host emulation of the CUDA path

@requires_compiled
@pytest.mark.parametrize("chunk,threads,blocks", [(64, 32, 1), (64, 7, 3), (1000, 3, 2), (1000, 128, 5), (4096, 16, 2), (1 << 16, 512, 4)])
@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", DTYPES)
def test_emulated_cuda_path_every_dtype_pair(chunk, threads, blocks, ema_dtype, model_dtype):
    sizes = [0, 1, 7, chunk - 1, chunk, chunk + 1, 2 * chunk + 3, 1001]
    ema, model = make_pairs(sizes, ema_dtype, model_dtype)
    ref = reference(ema, model, 0.75)
    torch.ops.ema_cuda_testing.emulate_cuda_update_(ema, model, [], [], 0.75, chunk, threads, sm_count=blocks)
    check(ema, ref)


@requires_compiled
@pytest.mark.parametrize("chunk,threads,blocks", [(64, 32, 1), (64, 7, 3), (1000, 3, 2), (4096, 16, 2), (1 << 16, 512, 4)])
@pytest.mark.parametrize("eoff,moff", [(0, 0), (1, 1), (3, 11), (0, 5)])
def test_emulated_cuda_path_copies_bytes(chunk, threads, blocks, eoff, moff):
    # Copied rows count bytes: sizes around the chunk and the 16-byte vector,
    # at offsets that align both sides, or never the two together.
    sizes = [1, 15, 16, 17, chunk - 1, chunk, chunk + 1, 3 * chunk + 5]
    ebufs = [torch.randint(0, 255, (n + 16,), dtype=torch.uint8) for n in sizes]
    mbufs = [torch.randint(0, 255, (n + 16,), dtype=torch.uint8) for n in sizes]
    copy_ema = [b[eoff:eoff + n] for b, n in zip(ebufs, sizes)]
    copy_model = [b[moff:moff + n] for b, n in zip(mbufs, sizes)]
    outside = [torch.cat([b[:eoff], b[eoff + n:]]).clone() for b, n in zip(ebufs, sizes)]
    ema, model = make_pairs([chunk + 3, 5])
    ref = reference(ema, model, 0.4)
    torch.ops.ema_cuda_testing.emulate_cuda_update_(ema, model, copy_ema, copy_model, 0.4, chunk, threads, sm_count=blocks)
    check(ema, ref)
    assert_bit_identical(copy_ema, copy_model)
    for b, n, o in zip(ebufs, sizes, outside):
        assert torch.equal(torch.cat([b[:eoff], b[eoff + n:]]), o)


def _expected_head(ea, ma, esize, msize, width, ealign=16, malign=16):
    """The first element where both addresses are aligned (16 bytes unless
    given), or -1."""
    for h in range(width):
        if (ea + h * esize) % ealign == 0 and (ma + h * msize) % malign == 0:
            return h
    return -1


@requires_compiled
@pytest.mark.parametrize("eoff,moff", [(0, 0), (1, 1), (3, 3), (1, 0), (0, 5), (2, 7)])
@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", DTYPES)
@pytest.mark.parametrize("chunk", [251, 256])
def test_emulated_cuda_path_misaligned(eoff, moff, ema_dtype, model_dtype, chunk):
    # Views at element offsets that align both sides after a head, or never
    # together; chunk sizes that are and are not multiples of the vector
    # width.  The emulation checks every vector access for alignment itself.
    n = 4099
    ebuf = torch.randn(n + 8).to(ema_dtype)
    mbuf = torch.randn(n + 8).to(model_dtype)
    e, m = ebuf[eoff:eoff + n], mbuf[moff:moff + n]
    outside = torch.cat([ebuf[:eoff], ebuf[eoff + n:]]).clone()
    cpu = e.clone()
    ops.ema_update_([cpu], [m], 0.3)
    head, width = torch.ops.ema_cuda_testing.vector_head(e.data_ptr(), m.data_ptr(), e.dtype, m.dtype)
    assert width == 16 // min(e.element_size(), m.element_size())
    assert head == _expected_head(e.data_ptr(), m.data_ptr(), e.element_size(), m.element_size(), width)
    torch.ops.ema_cuda_testing.emulate_cuda_update_([e], [m], [], [], 0.3, chunk, 32, sm_count=3)
    assert_bit_identical([e], [cpu])
    # Neighbours outside the view are untouched.
    assert torch.equal(torch.cat([ebuf[:eoff], ebuf[eoff + n:]]), outside)


@requires_compiled
def test_vector_head_arithmetic():
    vh = torch.ops.ema_cuda_testing.vector_head
    assert vh(0x1000, 0x2000, torch.float32, torch.float32) == [0, 4]
    assert vh(0x1004, 0x2004, torch.float32, torch.float32) == [3, 4]
    assert vh(0x1004, 0x2008, torch.float32, torch.float32) == [-1, 4]   # never aligned together
    assert vh(0x1000, 0x2002, torch.float32, torch.bfloat16) == [-1, 8]
    assert vh(0x1008, 0x2004, torch.float32, torch.bfloat16) == [6, 8]  # 0x1020, 0x2010
    assert vh(0x1004, 0x2004, torch.float32, torch.bfloat16) == [-1, 8]
    assert vh(0x1010 - 8, 0x2010 - 4, torch.float32, torch.bfloat16) == [2, 8]
    assert vh(0x1008, 0x2008, torch.float64, torch.float64) == [1, 2]


@requires_compiled
def test_vector_choice_falls_back_to_8_and_4_byte_vectors():
    vc = torch.ops.ema_cuda_testing.vector_choice
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    assert vc(0x1000, 0x2000, f32, f32) == [16, 0]
    assert vc(0x1004, 0x200C, f32, f32) == [8, 1]      # 16-byte never together, 8-byte at element 1
    assert vc(0x1004, 0x2008, f32, f32) == [0, -1]     # 4-byte fp32 vectors would be one element
    assert vc(0x1002, 0x2006, bf16, bf16) == [4, 1]    # 2 bf16 per 4-byte vector
    assert vc(0x1008, 0x2000, f64, f64) == [0, -1]


@requires_compiled
@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", DTYPES)
def test_every_pair_offset_gets_the_widest_vector_it_can(ema_dtype, model_dtype):
    # For every element offset of both sides: the choice is the widest vector
    # (16, 8, 4 bytes) whose alignment both sides reach at one element, and
    # the emulated CUDA path with that choice gives the CPU kernel's bits.
    es, ms = torch.empty((), dtype=ema_dtype).element_size(), torch.empty((), dtype=model_dtype).element_size()
    ebuf, mbuf = torch.randn(300).to(ema_dtype), torch.randn(300).to(model_dtype)
    for eoff in range(16 // es):
        for moff in range(16 // ms):
            e, m = ebuf[eoff:eoff + 257], mbuf[moff:moff + 257]
            vb, head = torch.ops.ema_cuda_testing.vector_choice(e.data_ptr(), m.data_ptr(), e.dtype, m.dtype)
            expected = [0, -1]
            for width in (16, 8, 4):
                n = width // min(es, ms)
                if n < 2:
                    break
                h = _expected_head(e.data_ptr(), m.data_ptr(), es, ms, n, min(16, n * es), min(16, n * ms))
                if h >= 0:
                    expected = [width, h]
                    break
            assert [vb, head] == expected, (eoff, moff)
            cpu = e.clone()
            ops.ema_update_([cpu], [m], 0.3)
            torch.ops.ema_cuda_testing.emulate_cuda_update_([e], [m], [], [], 0.3, 64, 8, sm_count=2)
            assert_bit_identical([e], [cpu])


@requires_compiled
def test_plan_chunks_use_64_bit_offsets():
    big = 3_000_000_000            # > 2^31 elements: no machine here can allocate it
    chunk = 1 << 16
    rows = torch.ops.ema_cuda_testing.plan_chunks([5, big, 0, chunk], chunk)
    tensor, start, length = rows.unbind(1)
    assert rows.shape[0] == 1 + math.ceil(big / chunk) + 0 + 1
    mine = tensor == 1
    assert int(length[mine].sum()) == big
    assert int(start[mine].max()) == (big - 1) // chunk * chunk > 2**31
    assert int(length[mine][-1]) == big - (big - 1) // chunk * chunk
    assert torch.equal(start[mine][1:] - start[mine][:-1], torch.full((int(mine.sum()) - 1,), chunk))
    assert rows[0].tolist() == [0, 0, 5] and rows[-1].tolist() == [3, 0, chunk]


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


@pytest.mark.slow
@pytest.mark.skipif(_available_bytes() < 10 * 2**30, reason="needs ~4 GiB of free memory with headroom")
def test_tensor_larger_than_2_gib():
    n = (1 << 29) + 5                      # fp32: 2 GiB + 20 bytes
    ema = torch.ones(n)
    model = torch.full((n,), 3.0, dtype=torch.bfloat16)
    idx = torch.tensor([0, 1, (1 << 29) - 1, 1 << 29, n - 1])
    model[idx] = torch.tensor([5.0, 7.0, 9.0, 11.0, 13.0], dtype=torch.bfloat16)
    ops.ema_update_([ema], [model], 0.5)
    assert ema[idx].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert int((ema == 2.0).sum()) == n - 5
