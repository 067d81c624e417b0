"""The kernels' arithmetic (NOTE [update arithmetic] in csrc/multi_tensor.h):
the CUDA path (run on the CPU by the host emulation) and the CPU kernel give
the same bits for every dtype pair; the pure-PyTorch fallback agrees within
the bound ``ema_cuda._fallback.apply`` states; 64-bit element indices above 2^31
in both kernels, on tensors whose pages are never touched but for the rows
run; the CPU kernel's work pool in a forked child."""
import mmap
import multiprocessing
import os

import pytest
import torch

from ema_cuda import _fallback
from ema_cuda import ops
from conftest import DTYPES, requires_compiled

from test_ops import assert_bit_identical, check, make_pairs, reference, snapshot

SIZES = [0, 1, 7, 31, 32, 33, 1000, 4095, 4096, 4097, 70_001]


def _unit_roundoff(dtype):
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


@requires_compiled
@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.3, 0.999, 0.9999])
def test_emulated_cuda_path_is_bit_identical_to_the_cpu_kernel(ema_dtype, model_dtype, decay):
    ema, model = make_pairs(SIZES, ema_dtype, model_dtype)
    emulated = snapshot(ema)
    ops.ema_update_(ema, model, decay)
    torch.ops.ema_cuda_testing.emulate_cuda_update_(emulated, model, [], [], decay, 4096, 64, sm_count=3)
    assert_bit_identical(emulated, ema)


@requires_compiled
@pytest.mark.parametrize("decay_dtype", [torch.float32, torch.float64])
def test_emulated_decay_read_through_a_pointer_matches_the_float(decay_dtype):
    # The kernel reads a tensor decay on the device, as double from fp32 or
    # fp64; the value-in-launch form must give the same bits.
    ema, model = make_pairs(SIZES, torch.float32, torch.bfloat16)
    by_value = snapshot(ema)
    d = torch.tensor(0.9993, dtype=decay_dtype)
    torch.ops.ema_cuda_testing.emulate_cuda_update_(ema, model, [], [], 0.0, 4096, 64, sm_count=2, decay_tensor=d)
    torch.ops.ema_cuda_testing.emulate_cuda_update_(by_value, model, [], [], float(d), 4096, 64, sm_count=2)
    assert_bit_identical(ema, by_value)


@requires_compiled
@pytest.mark.parametrize("sm_count", [1, 2, 132])
def test_emulation_runs_the_real_grid(sm_count):
    # More chunks than blocks (sm_count 1 -> 2 blocks), and more blocks than
    # chunks: every chunk exactly once either way.
    ema, model = make_pairs([5000] * 9 + [3])
    ref = snapshot(ema)
    ops.ema_update_(ref, model, 0.5)
    torch.ops.ema_cuda_testing.emulate_cuda_update_(ema, model, [], [], 0.5, 1024, 32, sm_count=sm_count)
    assert_bit_identical(ema, ref)


def _lazy_tensor(numel, dtype):
    """A tensor of `numel` elements over an anonymous mapping that reserves
    no memory: only the pages a test touches are ever allocated."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
    return torch.frombuffer(buf, dtype=dtype, count=numel), buf


BIG = (1 << 31) + (1 << 16) + 5   # element indices past 2^31 in the last rows


@requires_compiled
@pytest.mark.parametrize("kernel", ["emulated_cuda", "cpu"])
def test_indices_above_2_to_the_31(kernel):
    ema, ebuf = _lazy_tensor(BIG, torch.float32)
    model, mbuf = _lazy_tensor(BIG, torch.bfloat16)
    try:
        tail = (1 << 16) + 5             # the last two chunk rows (64K, 5), from 2^31 on
        lo = BIG - tail
        model[lo:] = torch.arange(tail, dtype=torch.float32).remainder(97).to(torch.bfloat16)
        ema[lo:] = 1.0
        ema[lo - 1] = 42.0               # just before the rows run: never written
        expected = (ema[lo:] * 0.5 + model[lo:].float() * 0.5).clone()
        if kernel == "cpu":
            torch.ops.ema_cuda_testing.cpu_update_range_([ema], [model], 0.5, lo, BIG)
        else:
            rows = torch.ops.ema_cuda_testing.plan_chunks([BIG], 1 << 16)
            n = rows.shape[0]
            assert int(rows[n - 2, 1]) == lo == 2**31
            torch.ops.ema_cuda_testing.emulate_cuda_update_(
                [ema], [model], [], [], 0.5, 1 << 16, 64, sm_count=132, first_chunk=n - 2, end_chunk=n
            )
        assert torch.equal(ema[lo:], expected)
        assert float(ema[lo - 1]) == 42.0
    finally:
        del ema, model
        ebuf.close()
        mbuf.close()


@requires_compiled
@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", DTYPES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_fallback_agrees_with_the_kernel_within_the_stated_bound(ema_dtype, model_dtype, as_tensor):
    # The bound of _fallback.apply: 2u(|e|d + |m|w) in the accumulation
    # dtype, plus one unit in the last place of a narrower EMA dtype.
    decay = 0.9137
    ema, model = make_pairs([4099, 70_000], ema_dtype, model_dtype)
    for e in ema:     # mixed signs and magnitudes: cancellation
        e.mul_(torch.logspace(-3, 3, e.numel()).to(e.dtype))
    start = snapshot(ema)
    fallback = snapshot(ema)
    ops.ema_update_(ema, model, decay)
    d = torch.tensor(decay, dtype=torch.float64) if as_tensor else decay
    _fallback.apply(fallback, model, d)
    acc = torch.float64 if torch.float64 in (ema_dtype, model_dtype) else torch.float32
    u = _unit_roundoff(acc)
    for e0, m, k, f in zip(start, model, ema, fallback):
        scale = e0.double().abs() * decay + m.double().abs() * (1 - decay)
        bound = 2 * u * scale
        if ema_dtype != acc:
            bound = bound + torch.finfo(ema_dtype).eps * k.double().abs()
        diff = (k.double() - f.double()).abs()
        assert bool((diff <= bound).all()), f"max excess {float((diff - bound).max())}"


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neither_backend_overflows_near_the_largest_float(dtype):
    big = torch.finfo(torch.float32).max * 0.75
    ema = [torch.tensor([big, -big, big], dtype=torch.float32)]
    model = [torch.tensor([-big, big, big], dtype=dtype)]
    fallback = snapshot(ema)
    ops.ema_update_(ema, model, 0.5)
    _fallback.apply(fallback, model, 0.5)
    for out in (ema[0], fallback[0]):
        assert torch.isfinite(out).all(), out
    if dtype == torch.float32:
        assert ema[0][2] == big      # ema == model: exactly itself


# Tensors below torch's own parallel grain (32K elements): in a forked child
# torch's OpenMP regions can hang (GNU OpenMP is not fork-safe), which is why
# data-loader workers run torch on one thread; the EMA kernel's own pool (80
# work units here) must still run on 2.
_CHILD_SIZES = [1 << 14] * 40 + [5]


def _child_update(queue):
    torch.set_num_threads(2)
    ema, model = make_pairs(_CHILD_SIZES)
    ref = reference(ema, model, 0.5)
    ops.ema_update_(ema, model, 0.5)
    check(ema, ref)
    queue.put("ok")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_an_update_in_a_forked_child_after_the_parent_used_its_threads():
    # Data-loader workers are forked from a process whose CPU kernel has
    # started helper threads; the child has none and must not wait for them.
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ema, model = make_pairs(_CHILD_SIZES)
        ops.ema_update_(ema, model, 0.5)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child_update, args=(queue,), daemon=True)
        child.start()
        child.join(timeout=60)
        if child.exitcode is None:
            child.kill()
            child.join()
            pytest.fail("the forked child's update did not finish in 60 s")
        assert child.exitcode == 0 and queue.get(timeout=5) == "ok"
    finally:
        torch.set_num_threads(old)
