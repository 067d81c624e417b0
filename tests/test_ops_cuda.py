"""CUDA-only behaviour of the fused op: one launch, streams, CUDA graphs.

These tests need a GPU and are skipped without one; the index arithmetic of
the CUDA kernel is covered everywhere by the host emulation in test_ops.py."""
import pytest
import torch

from ema_cuda import ops
from conftest import DTYPES, requires_compiled, requires_cuda

pytestmark = [requires_cuda]


def _pairs(n_tensors=50, size=1234, ema_dtype=torch.float32, model_dtype=torch.bfloat16):
    ema = [torch.randn(size + i, device="cuda").to(ema_dtype) for i in range(n_tensors)]
    model = [torch.randn(size + i, device="cuda").to(model_dtype) for i in range(n_tensors)]
    return ema, model


def _ref(ema, model, d):
    """What the CPU kernel computes from these tensors: NOTE [update
    arithmetic] makes the GPU result the same bits (the fallback backend is
    held to the bound of ema_cuda._fallback.apply instead)."""
    cpu = [e.detach().cpu().clone() for e in ema]
    ops.ema_update_(cpu, [m.detach().cpu() for m in model], float(d))
    return cpu


def _check(ema, ref):
    for i, (e, r) in enumerate(zip(ema, ref)):
        if ops.backend() == "compiled":
            assert torch.equal(e.cpu().view(-1).view(torch.uint8), r.view(-1).view(torch.uint8)), f"tensor {i} differs"
        else:
            torch.testing.assert_close(e.cpu().double(), r.double(), rtol=2 * torch.finfo(e.dtype).eps,
                                       atol=1e-30)


@requires_compiled
def test_one_kernel_launch_for_ten_thousand_tensors():
    ema, model = _pairs(10_000, 100, torch.float32, torch.float32)
    ops.ema_update_(ema, model, 0.9)  # build the plan outside the profile
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.ema_update_(ema, model, 0.9)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = {e.name for e in kernels}
    assert len(kernels) == 1, names
    assert "ema_update_kernel" in next(iter(names))


@requires_compiled
def test_model_ema_update_of_a_batchnorm_model_is_one_launch():
    # Parameters and running statistics averaged, num_batches_tracked copied:
    # all in the one fused kernel.
    from ema_cuda import ModelEMA
    from ema_cuda.ema_decay_schedules import ConstantDecay

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 4)).cuda()
    ema = ModelEMA(model, 0.9, ConstantDecay())
    model(torch.randn(2, 3, 8, 8, device="cuda"))
    ema.update(model, 1, 10)  # builds the plan
    model(torch.randn(2, 3, 8, 8, device="cuda"))
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ema.update(model, 2, 10)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, {e.name for e in kernels}
    assert ema.ema[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 2


@requires_compiled
def test_no_host_to_device_copy_once_the_plan_is_cached():
    ema, model = _pairs()
    ops.ema_update_(ema, model, 0.9)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.ema_update_(ema, model, torch.tensor(0.9, device="cuda"))
        torch.cuda.synchronize()
    memcpys = [e for e in prof.events() if "Memcpy" in e.name and "HtoD" in e.name]
    # The decay tensor itself was created by the test (one H2D); the op adds none.
    assert len(memcpys) <= 1


@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.3, 0.999])
def test_every_dtype_pair_is_bit_identical_to_the_cpu_kernel(ema_dtype, model_dtype, decay):
    ema, model = _pairs(5, 70_001, ema_dtype, model_dtype)
    ref = _ref(ema, model, decay)
    ops.ema_update_(ema, model, torch.tensor(decay, dtype=torch.float64, device="cuda"))
    torch.cuda.synchronize()
    _check(ema, ref)


def test_the_launch_is_ordered_on_the_current_stream():
    # On a side stream: a long sleep, then the model is overwritten, then the
    # update.  Launched on that stream, the update sees the new model; launched
    # on any other stream it would run during the sleep and see the old one.
    ema, model = _pairs(5, 70_001)
    new_model = [torch.randn_like(m) for m in model]
    ref = _ref(ema, new_model, 0.3)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        for m, n in zip(model, new_model):
            m.copy_(n)
        ops.ema_update_(ema, model, torch.tensor(0.3, device="cuda"))
    torch.cuda.synchronize()
    _check(ema, ref)


def test_cuda_graph_capture_and_replay_with_changing_decay():
    ema, model = _pairs()
    updater = ops.FusedUpdater(ema, model)
    decay = torch.tensor(0.9, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        updater.update(decay)  # warm-up builds the plan outside capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        updater.update(decay)
    for d in (0.5, 0.99, 0.0):
        ref = _ref(ema, model, torch.tensor(d, dtype=torch.float32).item())
        decay.fill_(d)
        g.replay()
        torch.cuda.synchronize()
        _check(ema, ref)


@requires_compiled
def test_capture_without_a_built_plan_is_a_clear_error():
    ema, model = _pairs(3)
    decay = torch.tensor(0.9, device="cuda")
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="run the update once before capture"):
        with torch.cuda.graph(g):
            ops.ema_update_(ema, model, decay)


@requires_compiled
def test_plans_baked_into_graphs_survive_cache_eviction():
    ema, model = _pairs(4)
    decay = torch.tensor(0.9, device="cuda")
    ops.ema_update_(ema, model, decay)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.ema_update_(ema, model, decay)
    for _ in range(100):  # churn the plan cache far past its capacity (64)
        e2, m2 = _pairs(2, 10)
        ops.ema_update_(e2, m2, 0.5)
    # Fill the freed memory of evicted tables with garbage.
    junk = [torch.full((4096,), -1, dtype=torch.uint8, device="cuda") for _ in range(64)]
    ref = _ref(ema, model, torch.tensor(0.9).item())
    g.replay()
    torch.cuda.synchronize()
    _check(ema, ref)
    del junk


@requires_compiled
def test_a_graph_outlives_the_updater_and_the_cache_that_built_its_table():
    # NOTE [captured plans]: the FusedUpdater that captured the update is
    # gone and its plan was never in the LRU's recent set; the cache keeps
    # the captured table alive until release_captured_plans().
    ops.release_captured_plans()
    ema, model = _pairs(4)
    decay = torch.tensor(0.9, device="cuda")
    updater = ops.FusedUpdater(ema, model)
    updater.update(decay)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        updater.update(decay)
    del updater
    keep = []
    for _ in range(100):  # far past the LRU's 64 plans
        e2, m2 = _pairs(2, 10)
        keep.append((e2, m2))
        ops.ema_update_(e2, m2, 0.5)
    torch.ops.ema_cuda_testing.clear_plan_cache()
    junk = [torch.full((4096,), -1, dtype=torch.uint8, device="cuda") for _ in range(64)]
    ref = _ref(ema, model, torch.tensor(0.9).item())
    g.replay()
    torch.cuda.synchronize()
    _check(ema, ref)
    del g, junk
    assert ops.release_captured_plans() == 1


def test_large_tensor_on_gpu_if_memory_allows():
    free, _ = torch.cuda.mem_get_info()
    n = (1 << 29) + 5  # fp32 EMA of 2 GiB + 20 bytes, bf16 model of 1 GiB
    if free < 8 * 2**30:
        pytest.skip("needs ~4 GiB of free GPU memory")
    ema = torch.ones(n, device="cuda")
    model = torch.full((n,), 3.0, dtype=torch.bfloat16, device="cuda")
    idx = torch.tensor([0, 1, (1 << 29) - 1, 1 << 29, n - 1], device="cuda")
    model[idx] = torch.tensor([5.0, 7.0, 9.0, 11.0, 13.0], dtype=torch.bfloat16, device="cuda")
    ops.ema_update_([ema], [model], 0.5)
    assert ema[idx].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert int((ema == 2.0).sum()) == n - 5


@requires_compiled
def test_a_table_uploaded_on_one_stream_is_waited_for_on_another():
    # NOTE [table upload]: the plan is built (its tables copied without
    # blocking) on a stream held back by a long sleep; the first launch on
    # another stream must wait for that copy, not read an unfilled table.
    torch.ops.ema_cuda_testing.clear_plan_cache()
    ema, model = _pairs(7, 5000)
    ref = _ref(ema, model, 0.3)
    torch.cuda.synchronize()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(s1):
        torch.cuda._sleep(200_000_000)
        updater = ops.FusedUpdater(ema, model)      # builds and uploads on s1
    with torch.cuda.stream(s2):
        updater.update(0.3)
    torch.cuda.synchronize()
    _check(ema, ref)
