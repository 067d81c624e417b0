"""NOTE [plan validity]: a cached plan (the op's plan cache, ``FusedUpdater``,
``ModelEMA``) may only be reused while every pair it was built from still has
the address, element count, dtype, device, shape and (dense) memory layout
the plan recorded, on both sides of the pair.  A change in place (``resize_``,
``as_strided_``, ``set_``, ``p.data = p.data[:k]``) must either rebuild the
plan and update correctly, or raise an error naming the tensor; it must never
make the kernel touch memory the tensor does not own.

Every test here runs with both backends (the suite runs once per backend).
"""
import pytest
import torch

from ema_cuda import ModelEMA, ops
from ema_cuda.ema_decay_schedules import ConstantDecay

from test_ops import assert_rejected_untouched, check, reference

N = 1000


def _updater_pairs(side):
    ema = [torch.randn(N), torch.randn(N)]
    model = [torch.randn(N), torch.randn(N)]
    return ema, model, (ema if side == "ema" else model)


@pytest.mark.parametrize("side", ["ema", "model"])
def test_resize_in_place_to_fewer_elements_is_seen(side):
    # resize_ to fewer elements keeps the data pointer; a plan keyed on the
    # address alone would go on using N elements.
    ema, model, pair = _updater_pairs(side)
    updater = ops.FusedUpdater(ema, model)
    updater.update(0.5)
    address = pair[0].data_ptr()
    pair[0].resize_(N // 2)
    assert pair[0].data_ptr() == address
    assert_rejected_untouched(
        lambda: updater.update(0.5), ema, r"ema\[0\] has shape \[\d+\] but model\[0\] has shape \[\d+\]"
    )


@pytest.mark.parametrize("side", ["ema", "model"])
def test_resize_in_place_to_the_same_count_in_another_shape_is_seen(side):
    ema = [torch.randn(6, 4), torch.randn(3)]
    model = [torch.randn(6, 4), torch.randn(3)]
    pair = ema if side == "ema" else model
    updater = ops.FusedUpdater(ema, model)
    updater.update(0.5)
    pair[0].resize_(4, 6)       # same pointer, same numel, other shape
    assert_rejected_untouched(
        lambda: updater.update(0.5), ema, r"ema\[0\] has shape \[\d, \d\] but model\[0\] has shape"
    )


def test_as_strided_to_a_non_dense_view_of_both_sides_is_seen():
    # Both tensors of the pair become the same non-dense view at the same
    # address: numel, dtype, address and "same strides" all still match.
    base_e, base_m = torch.randn(2 * N), torch.randn(2 * N)
    ema, model = [base_e[:N].clone()], [base_m[:N].clone()]
    ema[0].set_(base_e.untyped_storage(), 0, (N,))
    model[0].set_(base_m.untyped_storage(), 0, (N,))
    updater = ops.FusedUpdater(ema, model)
    updater.update(0.5)
    ema[0].as_strided_((N,), (2,))
    model[0].as_strided_((N,), (2,))
    before = base_e.clone()
    with pytest.raises(RuntimeError, match=r"ema\[0\] with shape \[1000\] and strides \[2\] is not dense"):
        updater.update(0.5)
    assert torch.equal(base_e, before)


@pytest.mark.parametrize("side", ["ema", "model"])
def test_slice_assigned_to_data_between_updates_is_seen(side):
    ema, model, pair = _updater_pairs(side)
    updater = ops.FusedUpdater(ema, model)
    updater.update(0.5)
    pair[0].data = pair[0].data[: N - 7]
    assert_rejected_untouched(lambda: updater.update(0.5), ema, r"has shape \[993\]")


@pytest.mark.parametrize("side", ["copy_ema", "copy_model"])
def test_resized_copy_pair_is_seen(side):
    ema, model = [torch.randn(N)], [torch.randn(N)]
    copy_ema, copy_model = [torch.zeros(N, dtype=torch.long)], [torch.arange(N)]
    updater = ops.FusedUpdater(ema, model, copy_ema, copy_model)
    updater.update(0.5)
    target = copy_ema if side == "copy_ema" else copy_model
    target[0].resize_(N // 4)
    assert_rejected_untouched(
        lambda: updater.update(0.5), ema + copy_ema, r"copy_ema\[0\] has shape \[\d+\] but copy_model\[0\] has shape"
    )


def test_copy_pairs_of_the_same_count_but_another_shape_are_rejected():
    with pytest.raises(RuntimeError, match=r"copy_ema\[0\] has shape \[2, 3\] but copy_model\[0\] has shape \[3, 2\]"):
        ops.FusedUpdater([], [], [torch.zeros(2, 3, dtype=torch.long)], [torch.zeros(3, 2, dtype=torch.long)])


@pytest.mark.parametrize("side", ["ema", "model"])
def test_the_list_op_sees_the_same_changes(side):
    # The op called with lists looks its plan up in a cache: the same rule.
    ema, model, pair = _updater_pairs(side)
    ops.ema_update_(ema, model, 0.5)
    pair[0].resize_(N // 2)
    assert_rejected_untouched(lambda: ops.ema_update_(ema, model, 0.5), ema, r"ema\[0\] has shape")


def test_a_layout_change_that_stays_valid_rebuilds_and_updates_correctly():
    # Both sides transposed in place to the same dense permuted layout: a
    # valid pair, so the update goes on, with the new layout.
    ema, model = [torch.randn(30, 40)], [torch.randn(30, 40)]
    updater = ops.FusedUpdater(ema, model)
    updater.update(0.5)
    ema[0].as_strided_((40, 30), (1, 40))
    model[0].as_strided_((40, 30), (1, 40))
    ref = reference(ema, model, 0.25)
    updater.update(0.25)
    check(ema, ref)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(10, 10)
        self.b = torch.nn.Linear(10, 3)


def test_model_ema_sees_a_parameter_sliced_in_place():
    net = _Net()
    ema = ModelEMA(net, 0.9, ConstantDecay())
    ema.update(net, 1, 10)
    with torch.no_grad():
        net.a.weight.data = net.a.weight.data[:5]
    assert_rejected_untouched(
        lambda: ema.update(net, 1, 10),
        list(ema.ema.state_dict().values()),
        r"entry 'a\.weight' has shape \[5, 10\] in the model but \[10, 10\] in the EMA",
    )


def test_model_ema_sees_a_parameter_resized_in_place():
    net = _Net()
    ema = ModelEMA(net, 0.9, ConstantDecay())
    ema.update(net, 1, 10)
    net.b.weight.requires_grad_(False)    # resize_ refuses tensors that require grad
    net.b.weight.resize_(2, 10)
    assert_rejected_untouched(
        lambda: ema.update(net, 1, 10),
        list(ema.ema.state_dict().values()),
        r"entry 'b\.weight' has shape \[2, 10\] in the model but \[3, 10\] in the EMA",
    )


def test_both_sides_resized_alike_rebuild_and_write_only_the_new_count():
    # Shrunk together, the pair is valid again: a new plan, and nothing past
    # the new count is written (the storage behind it still exists).
    e_store, m_store = torch.randn(N), torch.randn(N)
    ema = [torch.empty(0).set_(e_store.untyped_storage(), 0, (N,)), torch.randn(3)]
    model = [torch.empty(0).set_(m_store.untyped_storage(), 0, (N,)), torch.randn(3)]
    updater = ops.FusedUpdater(ema, model)
    updater.update(0.5)
    ema[0].resize_(N // 2)
    model[0].resize_(N // 2)
    beyond = e_store[N // 2:].clone()
    ref = reference(ema, model, 0.25)
    updater.update(0.25)
    check(ema, ref)
    assert torch.equal(e_store[N // 2:], beyond)


@pytest.mark.parametrize("model_dtype,offset", [(torch.float32, 1), (torch.float32, 3), (torch.bfloat16, 1),
                                                 (torch.bfloat16, 5), (torch.float16, 7), (torch.float64, 1)])
@pytest.mark.parametrize("ema_dtype", [None, torch.float32])
def test_model_ema_storage_is_co_aligned_with_offset_model_tensors(model_dtype, offset, ema_dtype):
    # Parameters that are views at odd offsets of one storage (flat-parameter
    # setups): the EMA's copy starts where both sides reach a 16-byte boundary
    # at the same element, so the CUDA kernel's vector path covers the pair.
    if ema_dtype is None and model_dtype == torch.float64:
        pytest.skip("covered by the float32 EMA case")
    flat = torch.randn(4096).to(model_dtype)
    net = torch.nn.Linear(20, 30).to(model_dtype)
    with torch.no_grad():
        net.weight.data = flat[offset:offset + 600].view(30, 20)
        net.bias.data = flat[offset + 601:offset + 631]
    ema = ModelEMA(net, 0.9, ConstantDecay(), ema_dtype=ema_dtype)
    for name, e in ema.ema.named_parameters():
        m = dict(net.named_parameters())[name]
        width = 16 // min(e.element_size(), m.element_size())
        heads = [h for h in range(width) if (e.data_ptr() + h * e.element_size()) % 16 == 0
                 and (m.data_ptr() + h * m.element_size()) % 16 == 0]
        assert heads, f"{name}: EMA at {e.data_ptr() % 16} and model at {m.data_ptr() % 16} never co-align"
        assert torch.equal(e.to(m.dtype), m) if ema_dtype is None else torch.allclose(e, m.float())


def test_ready_takes_a_same_layout_storage_and_refuses_another_layout_without_writing():
    ema = [torch.randn(4, 3, 5, 5), torch.randn(7)]
    model = [torch.randn(4, 3, 5, 5), torch.randn(7)]
    updater = ops.FusedUpdater(ema, model)
    assert updater.ready()
    model[1].data = torch.randn(7)                  # same shape, dtype and layout: adaptable
    assert updater.ready()
    before = [e.clone() for e in ema]
    updater.update(0.5)
    check(ema, reference(before, model, 0.5))
    model[0].data = model[0].data.to(memory_format=torch.channels_last)
    before = [e.clone() for e in ema]
    assert not updater.ready()                      # another layout: the owner must rebuild
    assert all(torch.equal(b, e) for b, e in zip(before, ema))


def test_model_ema_adapts_to_a_channels_last_model_without_writing_twice():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = ModelEMA(net, 0.5, ConstantDecay())
    expected = {k: v.clone() * 0.5 for k, v in ema.ema.state_dict().items() if v.is_floating_point()}
    net.to(memory_format=torch.channels_last)
    expected = {k: v + net.state_dict()[k] * 0.5 for k, v in expected.items()}
    ema.update(net, step=1, total_steps=10)
    for key, value in expected.items():
        torch.testing.assert_close(ema.ema.state_dict()[key], value, msg=key)
    assert ema.ema[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_entries_unchanged_sees_a_replaced_object_and_a_grown_registry():
    owner = {"a": torch.zeros(1), "b": torch.zeros(1)}
    watch = ((owner, owner), ("a", "b"), (owner["a"], owner["b"]), (owner,), (2,))
    assert ops.entries_unchanged(*watch)
    owner["c"] = torch.zeros(1)
    assert not ops.entries_unchanged(*watch)
    del owner["c"]
    owner["b"] = torch.zeros(1)
    assert not ops.entries_unchanged(*watch)
