"""ModelEMA.save_safetensors / load_safetensors: a round trip that continues bit-exactly, files that plain
safetensors and ``model.load_state_dict`` read, and bad files that leave the EMA untouched."""
import json
import warnings

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ema_cuda import KDModelEMA, ModelEMA
from ema_cuda.ema.files import FORMAT, FORMAT_KEY
from ema_cuda.ema_decay_schedules import ConstantDecay, ExpDecay, PowerWarmupDecay
from support import KD, ConvNet, Tied, assert_bit_identical, seeded, state
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)

TOTAL = 40


def trained_states(build, n, seed=3, **kwargs):
    """``n`` successive model states of a run: every parameter and the BatchNorm statistics move."""
    gen = torch.Generator().manual_seed(seed)
    model = seeded(build, **kwargs)
    out = []
    with torch.no_grad():
        for _ in range(n):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.05)
            for name, b in model.named_buffers():
                if name.endswith("running_mean"):
                    b.add_(torch.randn(b.shape, generator=gen).to(b.dtype) * 0.05)
                elif name.endswith("num_batches_tracked"):
                    b.add_(1)
            out.append(state(model))
    return out


def run(ema, model, states, start, stop):
    for step in range(start, stop):
        model.load_state_dict(states[step - 1])
        ema.update(model, step, TOTAL)


@pytest.mark.parametrize("model_dtype,ema_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                   (torch.bfloat16, torch.float32)])
def test_round_trip_continues_bit_exactly(device, model_dtype, ema_dtype, tmp_path):
    def build():
        return seeded(ConvNet).to(device, model_dtype)

    states = [{k: v.to(device) for k, v in s.items()} for s in trained_states(ConvNet, TOTAL)]
    states = [{k: v.to(model_dtype) if v.is_floating_point() else v for k, v in s.items()} for s in states]
    make = dict(decay=0.9, decay_function=PowerWarmupDecay(update_after_step=2), ema_dtype=ema_dtype,
                skip_nonfinite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bf16 EMA warns about rounding: irrelevant here
        model = build()
        uninterrupted = ModelEMA(model, **make)
        run(uninterrupted, model, states, 1, TOTAL + 1)
        model = build()
        first = ModelEMA(model, **make)
        run(first, model, states, 1, 21)
        path = first.save_safetensors(tmp_path / "ema.safetensors")
        model = build()
        resumed = ModelEMA(model, 0.5, ConstantDecay(), ema_dtype=ema_dtype)  # another schedule and options
    with pytest.warns(UserWarning, match="replaces the current"):
        resumed.load_safetensors(path)
    assert_bit_identical(state(resumed.ema), state(first.ema))
    assert (resumed.decay, resumed.skip_nonfinite, resumed.num_updates) == (0.9, True, 20)
    assert isinstance(resumed.decay_function, PowerWarmupDecay)
    assert resumed.decay_function.get_params() == first.decay_function.get_params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(resumed, model, states, 21, TOTAL + 1)
    assert_bit_identical(state(resumed.ema), state(uninterrupted.ema))
    assert resumed.num_updates == uninterrupted.num_updates == TOTAL
    expected_dtype = ema_dtype or model_dtype
    weights = load_file(str(path))
    assert weights["conv.weight"].dtype == expected_dtype
    assert weights["bn.num_batches_tracked"].dtype == torch.int64 and int(weights["bn.num_batches_tracked"]) == 20


def test_file_loads_with_plain_safetensors_into_the_model(tmp_path):
    states = trained_states(ConvNet, 5)
    model = seeded(ConvNet)
    ema = ModelEMA(model, 0.9, ExpDecay(beta=15))
    run(ema, model, states, 1, 6)
    path = ema.save_safetensors(str(tmp_path / "sub" / "ema.safetensors"))  # a str; the directory is created
    weights = load_file(str(path))
    assert_bit_identical(weights, state(ema.ema))
    fresh = ConvNet()
    fresh.load_state_dict(weights, strict=True)
    assert_bit_identical(state(fresh), state(ema.ema))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata[FORMAT_KEY] == FORMAT
    assert json.loads(metadata["decay_function"]) == {"name": "exp", "params": {"beta": 15.0}}
    assert json.loads(metadata["num_updates"]) == 5 and json.loads(metadata["decay"]) == 0.9
    assert [p.name for p in path.parent.iterdir()] == ["ema.safetensors"]  # no temporary file left


def test_tied_weights_round_trip(tmp_path):
    model = seeded(Tied)
    ema = ModelEMA(model, 0.9, ConstantDecay())
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    ema.update(model, 1, 10)
    path = ema.save_safetensors(tmp_path / "tied.safetensors")
    weights = load_file(str(path))
    assert torch.equal(weights["embed.weight"], weights["out.weight"])
    assert torch.equal(weights["out.weight"], ema.ema.embed.weight)
    other = ModelEMA(seeded(Tied, 1), 0.9, ConstantDecay())
    other.load_safetensors(path)
    assert other.ema.out.weight is other.ema.embed.weight
    assert_bit_identical(state(other.ema), state(ema.ema))
    plain = Tied()
    plain.load_state_dict(weights, strict=True)
    assert plain.out.weight is plain.embed.weight and torch.equal(plain.out.weight, ema.ema.out.weight)


def test_kd_ema_saves_the_student(tmp_path):
    kd = KD(seeded(ConvNet, 0, width=4), seeded(ConvNet, 1, width=8))
    ema = KDModelEMA(kd, 0.9, ConstantDecay())
    with torch.no_grad():
        kd.student.conv.weight.add_(1.0)
    ema.update(kd, 1, 10)
    path = ema.save_safetensors(tmp_path / "student.safetensors")
    student = ConvNet(width=4)
    student.load_state_dict(load_file(str(path)), strict=True)
    assert_bit_identical(state(student), state(ema.ema.student))
    other = KDModelEMA(KD(ConvNet(width=4), ConvNet(width=8)), 0.9, ConstantDecay())
    other.load_safetensors(path)
    assert_bit_identical(state(other.ema.student), state(ema.ema.student))


def test_capturable_step_round_trips(tmp_path):
    model = seeded(ConvNet)
    ema = ModelEMA(model, 0.9, ConstantDecay(), capturable=True, total_steps=50)
    for _ in range(3):
        ema.update(model)
    path = ema.save_safetensors(tmp_path / "ema.safetensors")
    other = ModelEMA(seeded(ConvNet, 1), 0.9, ConstantDecay(), capturable=True, total_steps=50)
    other.load_safetensors(path)
    assert int(other.step_tensor) == 3 and other.num_updates == 3


# ---------------------------------------------------------------- bad files


def _rewrite(path, *, rename=None, metadata=None, drop=None):
    """The file at ``path`` again, with a tensor renamed, metadata entries replaced or dropped."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if rename:
        tensors[rename[1]] = tensors.pop(rename[0])
    meta.update(metadata or {})
    for key in drop or ():
        del meta[key]
    save_file(tensors, str(path), metadata=meta)


BAD_FILES = {
    "a renamed tensor": (dict(rename=("bn.running_var", "bn.running_varr")), RuntimeError, "bn.running_var"),
    "a missing entry": (dict(drop=["decay"]), ValueError, "lacks 'decay'"),
    "metadata not JSON": (dict(metadata={"num_updates": "twelve"}), ValueError, "'num_updates' is not JSON"),
    "decay 1.5": (dict(metadata={"decay": "1.5"}), ValueError, "1.5"),
    "a negative counter": (dict(metadata={"num_skipped": "-1"}), ValueError, "num_skipped"),
    "skip_nonfinite a string": (dict(metadata={"skip_nonfinite": '"yes"'}), ValueError, "skip_nonfinite"),
    "another format": (dict(metadata={FORMAT_KEY: "ema_cuda.ema/9"}), ValueError, "ema_cuda.ema/9"),
}


def _check_untouched(ema, path, error, match):
    before, updates = state(ema.ema), ema.num_updates
    decay, fn = ema.decay, ema.decay_function
    with pytest.raises(error, match=match) as info:
        ema.load_safetensors(path)
    assert str(path) in str(info.value)
    assert_bit_identical(state(ema.ema), before)
    assert (ema.num_updates, ema.decay, ema.decay_function) == (updates, decay, fn)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_leaves_the_ema_untouched(case, tmp_path):
    changes, error, match = BAD_FILES[case]
    saved = ModelEMA(seeded(ConvNet, 1), 0.8, ExpDecay(beta=5))
    path = saved.save_safetensors(tmp_path / "ema.safetensors")
    _rewrite(path, **changes)
    ema = ModelEMA(seeded(ConvNet), 0.9, ConstantDecay())
    _check_untouched(ema, path, error, match)


def test_another_shape_leaves_the_ema_untouched(tmp_path):
    path = ModelEMA(ConvNet(width=7), 0.9, ConstantDecay()).save_safetensors(tmp_path / "wide.safetensors")
    _check_untouched(ModelEMA(ConvNet(), 0.9, ConstantDecay()), path, RuntimeError, "'conv.weight' is \\[7, 3, 3, 3\\]")


def test_files_that_are_not_ema_files(tmp_path):
    ema = ModelEMA(ConvNet(), 0.9, ConstantDecay())
    plain = tmp_path / "plain.safetensors"
    save_file(state(ema.ema), str(plain))
    _check_untouched(ema, plain, ValueError, "not an EMA saved by save_safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    _check_untouched(ema, garbage, ValueError, "cannot be read as safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ema.load_safetensors(tmp_path / "missing.safetensors")


def test_sharded_ema_points_to_the_distributed_checkpoint(tmp_path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    from test_sharded import make_net, shard

    from ema_cuda.sharded import ShardedModelEMA

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ema = ShardedModelEMA(shard(make_net()), 0.9, ConstantDecay())
        with pytest.raises(NotImplementedError, match="save_sharded_checkpoint"):
            ema.save_safetensors(tmp_path / "ema.safetensors")
        with pytest.raises(NotImplementedError, match="load_sharded_checkpoint"):
            ema.load_safetensors(tmp_path / "ema.safetensors")
    finally:
        dist.destroy_process_group()
