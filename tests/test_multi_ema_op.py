"""The multi-EMA op (NOTE [several EMAs] in csrc/multi_tensor.h): K EMAs of one
model in one pass.  ``multi_ema_update_`` and ``MultiFusedUpdater`` give, bit
for bit, what K single-op updates with the same decays give, for every dtype
pair, on both backends; the CUDA path (run on the CPU by the host emulation)
gives the CPU kernel's bits; every check runs before any write (the messages
are compared with the Python side's in tests/test_check_parity.py); a cached
plan is never stale (NOTE [plan validity]).

Every test runs with both backends (the suite runs once per backend)."""
import sys
from pathlib import Path

import pytest
import torch

from conftest import DTYPES, requires_compiled, requires_cuda
from ema_cuda import ops

from test_ops import assert_bit_identical, assert_rejected_untouched, snapshot

SIZES = [0, 1, 7, 33, 1000, 4097, 70_001]
DECAYS = [0.999, 0.3, 0.9999]


def _model(sizes=SIZES, dtype=torch.float32, device="cpu"):
    return [torch.randn(s, device=device).to(dtype) for s in sizes]


def _emas(model, k, dtype=torch.float32):
    return [[torch.randn(m.shape, device=m.device).to(dtype) for m in model] for _ in range(k)]


def _copies(emas):
    return [snapshot(e) for e in emas]


def _single_updates(emas, model, decays):
    """What the multi op must equal: one single-op update per profile."""
    for e, d in zip(emas, decays):
        ops.ema_update_(e, model, d)


def _assert_same(emas, expected):
    for k, (e, x) in enumerate(zip(emas, expected)):
        assert_bit_identical(e, x), k


# ----------------------------------------------------------------------------- K single-op calls, bit for bit


@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", DTYPES)
def test_every_dtype_pair_is_bit_identical_to_k_single_updates(ema_dtype, model_dtype):
    model = _model([0, 7, 33, 4097], model_dtype)
    for k in (2, 3):
        emas = _emas(model, k, ema_dtype)
        expected = _copies(emas)
        decays = DECAYS[:k]
        ops.multi_ema_update_(emas, model, decays)
        _single_updates(expected, model, decays)
        _assert_same(emas, expected)
        # The tensor form reads the same values.
        ops.multi_ema_update_(emas, model, torch.tensor(decays, dtype=torch.float64))
        _single_updates(expected, model, [torch.tensor(d, dtype=torch.float64) for d in decays])
        _assert_same(emas, expected)


@pytest.mark.parametrize("k", [1, 2, 3, 16])
def test_updater_over_many_steps_is_bit_identical_to_k_fused_updaters(k):
    model = _model()
    emas = _emas(model, k)
    expected = _copies(emas)
    multi = ops.MultiFusedUpdater(emas, model)
    singles = [ops.FusedUpdater(e, model) for e in expected]
    assert len(multi) == len(model) and multi.profiles == k
    decays = [0.5 + 0.03 * i for i in range(k)]
    for step in range(3):
        multi.update(decays if step % 2 else torch.tensor(decays))
        for u, d in zip(singles, decays):
            u.update(d if step % 2 else torch.tensor(d))
        for m in model:
            m.add_(0.25)
    _assert_same(emas, expected)


def test_profiles_of_other_ema_dtypes_take_their_own_pass():
    # Profile 0 in fp32, profile 1 in bf16, of a bf16 model; and a view that
    # makes one profile's rows align at another element.
    model = _model([33, 4097], torch.bfloat16)
    emas = [[m.float() for m in model], [m.clone() for m in model]]
    base = torch.randn(4097 + 1)
    emas.append([torch.randn(33), base[1:]])
    expected = _copies(emas)
    ops.multi_ema_update_(emas, model, DECAYS)
    _single_updates(expected, model, DECAYS)
    _assert_same(emas, expected)


def test_many_small_tensors_and_threads_split_mid_tensor():
    model = _model([1000] * 300 + [200_000, 5])
    emas = _emas(model, 3)
    expected = _copies(emas)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ops.MultiFusedUpdater(emas, model).update(DECAYS)
    finally:
        torch.set_num_threads(threads)
    _single_updates(expected, model, DECAYS)
    _assert_same(emas, expected)


def test_model_tensors_are_not_written_and_decays_zero_and_one_are_exact():
    model = _model([7, 4097])
    before = snapshot(model)
    emas = _emas(model, 2)
    old = _copies(emas)
    ops.multi_ema_update_(emas, model, [1.0, 0.0])
    assert_bit_identical(model, before)
    assert_bit_identical(emas[0], old[0])
    assert_bit_identical(emas[1], model)


def test_empty_lists():
    ops.multi_ema_update_([[], []], [], [0.5, 0.5])
    with pytest.raises(RuntimeError, match=r"decays\[1\] must be a finite number in \[0, 1\], got 2\.0"):
        ops.multi_ema_update_([[], []], [], [0.5, 2.0])


# ----------------------------------------------------------------------------- the Python API's own checks


def test_lists_of_other_lengths_are_rejected_before_any_write():
    model = _model([3, 4])
    emas = _emas(model, 2)
    emas[1] = emas[1][:1]
    with pytest.raises(RuntimeError, match=r"multi_ema_update_: ema\[1\] has 1 tensors but model has 2"):
        ops.multi_ema_update_(emas, model, [0.5, 0.5])
    with pytest.raises(RuntimeError, match=r"MultiFusedUpdater: ema\[1\] has 1 tensors but model has 2"):
        ops.MultiFusedUpdater(emas, model)


def test_decay_count_must_match_the_profiles():
    model = _model([3])
    emas = _emas(model, 2)
    flat = [t for e in emas for t in e]
    assert_rejected_untouched(lambda: ops.multi_ema_update_(emas, model, [0.5]), flat,
                              r"got 2 EMA lists but 1 decays")
    updater = ops.MultiFusedUpdater(emas, model)
    assert_rejected_untouched(lambda: updater.update([0.5, 0.5, 0.5]), flat, r"got 3 decays for 2 EMA profiles")
    assert_rejected_untouched(lambda: updater.update(torch.tensor([0.5])), flat, r"got 1 decays for 2 EMA profiles")
    with pytest.raises(RuntimeError, match=r"got 17 EMA profiles; one multi-EMA update takes 1 to 16"):
        ops.MultiFusedUpdater(_emas(model, 17), model)


def test_the_same_tensor_in_two_profiles_is_rejected():
    model = _model([3, 4])
    a = _emas(model, 1)[0]
    with pytest.raises(RuntimeError, match=r"ema\[0\]\[1\] and ema\[1\]\[1\] overlap in memory"):
        ops.MultiFusedUpdater([a, [torch.zeros(3), a[1]]], model)


def test_a_model_tensor_may_not_be_one_of_its_emas():
    model = _model([3, 4])
    emas = _emas(model, 2)
    emas[1][0] = model[0]
    assert_rejected_untouched(lambda: ops.multi_ema_update_(emas, model, [0.5, 0.5]), emas[0],
                              r"model\[0\] overlaps ema\[1\]\[0\] in memory")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decays_tensors_are_rejected_through_torch_ops_too(dtype):
    model = _model([3])
    emas = _emas(model, 2)
    flat = [t for e in emas for t in e]
    decays = torch.tensor([0.5, 0.9], dtype=dtype)
    for run in (lambda: torch.ops.ema_cuda.multi_ema_update_(flat, model, decays),
                lambda: ops.multi_ema_update_(emas, model, decays),
                lambda: ops.MultiFusedUpdater(emas, model).update(decays)):
        assert_rejected_untouched(run, flat, r"a decays tensor must be torch\.float32 or torch\.float64, got dtype "
                                             r"torch\.(bfloat16|float16); decays near 1 are not representable")


def test_torch_ops_with_a_float64_tensor_takes_the_tensor_overload():
    model = _model([5])
    emas = _emas(model, 2)
    expected = _copies(emas)
    flat = [t for e in emas for t in e]
    torch.ops.ema_cuda.multi_ema_update_(flat, model, torch.tensor([0.25, 0.75], dtype=torch.float64))
    _single_updates(expected, model, [0.25, 0.75])
    _assert_same(emas, expected)
    assert_rejected_untouched(lambda: torch.ops.ema_cuda.multi_ema_update_(flat, model, torch.tensor([0.5, 1.5])),
                              flat, r"decays\[1\] must be a finite number in \[0, 1\], got 1\.5")


@pytest.mark.parametrize("overload", ["default", "Tensor"])
def test_opcheck(overload):
    model = [torch.randn(3, 4), torch.randn(5).bfloat16()]
    flat = [torch.randn(3, 4), torch.randn(5), torch.randn(3, 4).double(), torch.randn(5)]
    decays = [0.9, 0.5] if overload == "default" else torch.tensor([0.9, 0.5])
    torch.library.opcheck(getattr(torch.ops.ema_cuda.multi_ema_update_, overload), (flat, model, decays))


def test_the_meta_kernel_checks_the_lists():
    model = [torch.empty(3, device="meta")]
    flat = [torch.empty(3, device="meta"), torch.empty(4, device="meta")]
    with pytest.raises(RuntimeError, match=r"ema\[1\]\[0\] has shape \[4\] but model\[0\] has shape \[3\]"):
        torch.ops.ema_cuda.multi_ema_update_(flat, model, [0.5, 0.5])


# ----------------------------------------------------------------------------- NOTE [plan validity]


@pytest.mark.parametrize("change", ["resize_", "as_strided_", "set_", "data"])
def test_a_changed_ema_of_a_later_profile_is_seen(change):
    model = _model([1000, 10])
    emas = _emas(model, 3)
    updater = ops.MultiFusedUpdater(emas, model)
    updater.update(DECAYS)
    t = emas[2][0]
    if change == "resize_":
        t.resize_(500)
        match = r"ema\[2\]\[0\] has shape \[500\] but model\[0\] has shape \[1000\]"
    elif change == "as_strided_":
        t.as_strided_((1000,), (0,))
        match = r"ema\[2\]\[0\] with shape \[1000\] and strides \[0\] is not dense"
    elif change == "set_":
        t.set_(torch.zeros(2000).untyped_storage(), 0, (1000,), (1,))
        match = None
    else:
        t.data = torch.zeros(1000)
        match = None
    flat = [x for e in emas for x in e]
    if match is not None:
        assert_rejected_untouched(lambda: updater.update(DECAYS), flat, match)
        return
    expected = _copies(emas)
    updater.update(DECAYS)  # a new storage of the same kind: taken, and updated there
    _single_updates(expected, model, DECAYS)
    _assert_same(emas, expected)


def test_a_resized_model_tensor_is_seen():
    model = _model([1000, 10])
    emas = _emas(model, 2)
    updater = ops.MultiFusedUpdater(emas, model)
    updater.update([0.5, 0.5])
    model[0].resize_(10)
    assert not updater.ready()
    assert_rejected_untouched(lambda: updater.update([0.5, 0.5]), emas[0] + emas[1],
                              r"ema\[0\]\[0\] has shape \[1000\] but model\[0\] has shape \[10\]")


# ----------------------------------------------------------------------------- the CUDA path, emulated on the CPU


@requires_compiled
@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", DTYPES)
def test_emulated_cuda_path_is_bit_identical_to_the_cpu_kernel(ema_dtype, model_dtype):
    model = _model([0, 1, 31, 33, 4095, 4097], model_dtype)
    emas = _emas(model, 3, ema_dtype)
    emulated = _copies(emas)
    ops.multi_ema_update_(emas, model, DECAYS)
    flat = [t for e in emulated for t in e]
    torch.ops.ema_cuda_testing.emulate_cuda_multi_update_(flat, model, DECAYS, 1024, 32, sm_count=2)
    _assert_same(emulated, emas)


@requires_compiled
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_emulated_misaligned_views_and_unfused_profiles(offset):
    # Profile 1's EMA starts `offset` elements into a buffer: its rows align at
    # another element than profile 0's, so each profile takes its own pass.
    model = [torch.randn(2999 + offset).bfloat16()[offset:], torch.randn(77)]
    emas = [[torch.randn(m.shape) for m in model], [torch.randn(3000)[1:], torch.randn(77).double()]]
    emulated = _copies(emas)
    ops.multi_ema_update_(emas, model, [0.9, 0.7])
    flat = [t for e in emulated for t in e]
    torch.ops.ema_cuda_testing.emulate_cuda_multi_update_(flat, model, [0.9, 0.7], 512, 16, sm_count=1)
    _assert_same(emulated, emas)


@requires_compiled
@pytest.mark.parametrize("decay_dtype", [torch.float32, torch.float64])
def test_emulated_decays_read_through_a_pointer_match_the_floats(decay_dtype):
    model = _model([33, 4097], torch.bfloat16)
    emas = _emas(model, 3)
    by_value = _copies(emas)
    decays = torch.tensor([0.9993, 0.5, 0.25, 0.125], dtype=decay_dtype)[::2][:2]  # strided: read `stride` apart
    decays = torch.cat([decays, decays[:1]])
    flat = [t for e in emas for t in e]
    torch.ops.ema_cuda_testing.emulate_cuda_multi_update_(flat, model, [], 1024, 32, sm_count=2,
                                                          decays_tensor=decays)
    flat = [t for e in by_value for t in e]
    torch.ops.ema_cuda_testing.emulate_cuda_multi_update_(flat, model, decays.tolist(), 1024, 32, sm_count=2)
    _assert_same(emas, by_value)


@requires_compiled
def test_emulated_strided_decays_tensor():
    model = _model([100])
    emas = _emas(model, 2)
    by_value = _copies(emas)
    decays = torch.tensor([0.9, 0.0, 0.6, 0.0])[::2]
    assert decays.stride(0) == 2
    flat = [t for e in emas for t in e]
    torch.ops.ema_cuda_testing.emulate_cuda_multi_update_(flat, model, [], 64, 8, sm_count=1, decays_tensor=decays)
    _single_updates(by_value, model, decays.tolist())  # the fp32 values, read as double
    _assert_same(emas, by_value)


# ----------------------------------------------------------------------------- on a GPU


@requires_cuda
def test_cuda_is_one_launch_and_matches_the_cpu():
    from torch.profiler import ProfilerActivity, profile

    model = _model(SIZES, torch.bfloat16)
    emas = _emas(model, 3)
    cpu = _copies(emas)
    ops.multi_ema_update_(cpu, model, DECAYS)
    gm = [m.cuda() for m in model]
    ge = [[t.cuda() for t in e] for e in emas]
    updater = ops.MultiFusedUpdater(ge, gm)
    decays = torch.tensor(DECAYS, device="cuda")
    updater.update(decays)
    torch.cuda.synchronize()
    for e, c in zip(ge, cpu):
        assert_bit_identical([t.cpu() for t in e], c)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        updater.update(decays)
        torch.cuda.synchronize()
    kernels = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [ev.name for ev in kernels]


@requires_cuda
def test_cuda_graph_replays_with_the_decays_tensor_it_reads():
    model = _model([1000, 70_001], device="cuda")
    emas = _emas(model, 2)
    expected = _copies(emas)
    updater = ops.MultiFusedUpdater(emas, model)
    decays = torch.tensor([0.9, 0.5], device="cuda")
    updater.update(decays)  # warm-up: the plan is built before capture
    _single_updates(expected, model, [0.9, 0.5])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        updater.update(decays)
    decays.copy_(torch.tensor([0.25, 0.75]))
    graph.replay()
    torch.cuda.synchronize()
    _single_updates(expected, model, [0.25, 0.75])
    _assert_same(emas, expected)
    del graph
    ops.release_captured_plans()


# ----------------------------------------------------------------------------- the benchmark


def test_benchmark_runs_on_tiny_sizes():
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import multi_ema

    rows = multi_ema.main(["--workloads", "small", "overhead", "traffic", "--small-count", "20", "--k", "1", "2",
                           "--threads", "1", "--min-time", "0.001", "--repeats", "2"])
    assert [(r["workload"], r["k"]) for r in rows] == [(w, k) for w in ("small", "overhead", "traffic") for k in (1, 2)]
    for r in rows:
        assert r["median_s"]["multi"] > 0 and r["median_s"]["separate"] > 0 and r["median_s"]["limit"] > 0
    table = multi_ema.table(rows)
    assert "vs K x fused" in table and "% of limit" in table
    # 10k x 1k taken apart: its tensor count with one element each, its element count as one tensor.
    assert multi_ema.workload("overhead", small_count=20).shapes == [(1,)] * 20
    assert multi_ema.workload("traffic", small_count=20).shapes == [(20_000,)]
