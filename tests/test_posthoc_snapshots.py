"""Snapshot files (safetensors with step, gamma and sigma_rel), their listing, and the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ema_cuda.posthoc import (
    list_snapshots,
    read_snapshot,
    read_snapshot_info,
    reconstruct,
    sigma_rel_to_gamma,
    snapshot_filename,
    write_snapshot,
)
from ema_cuda.posthoc.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g),
        "half": torch.randn(5, generator=g).to(torch.bfloat16),
        "count": torch.tensor(7, dtype=torch.int64),
        "strided": torch.randn(4, 3, generator=g).t(),
    }


def _write(directory, step, sigma_rel, state=None):
    path = Path(directory) / snapshot_filename(step, sigma_rel)
    return write_snapshot(path, state if state is not None else _state(step), step=step,
                          gamma=sigma_rel_to_gamma(sigma_rel), sigma_rel=sigma_rel)


def test_round_trip(tmp_path):
    state = _state()
    path = _write(tmp_path, 100, 0.1, state)
    info, loaded = read_snapshot(path)
    assert (info.step, info.path) == (100, path)
    assert info.gamma == sigma_rel_to_gamma(0.1) and info.sigma_rel == 0.1
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    assert read_snapshot_info(path) == info
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_failed_write_keeps_the_old_file(tmp_path):
    path = _write(tmp_path, 10, 0.1)
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"state_dict\['x'\] is a str"):
        write_snapshot(path, {"x": "not a tensor"}, step=20, gamma=sigma_rel_to_gamma(0.1), sigma_rel=0.1)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"step": 0}, "step must be an integer >= 1"),
    ({"step": 1.5}, "step must be an integer >= 1"),
    ({"gamma": -0.9}, "gamma must be >="),
    ({"sigma_rel": 0.2}, "does not match gamma"),
    ({"sigma_rel": float("nan")}, "sigma_rel must be a finite number"),
])
def test_write_checks_metadata(tmp_path, kwargs, match):
    args = {"step": 5, "gamma": sigma_rel_to_gamma(0.1), "sigma_rel": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_snapshot(tmp_path / "s.safetensors", {"w": torch.zeros(2)}, **args)
    assert not list(tmp_path.iterdir())


def test_reader_names_the_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match=r"plain\.safetensors.*not an ema_cuda post-hoc snapshot"):
        read_snapshot_info(plain)
    partial = tmp_path / "partial.safetensors"
    save_file({"w": torch.zeros(2)}, str(partial), metadata={"format": "ema_cuda.posthoc/1", "step": "3"})
    with pytest.raises(ValueError, match=r"partial\.safetensors.*lacks 'gamma'"):
        read_snapshot_info(partial)
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad), metadata={"format": "ema_cuda.posthoc/1", "step": "three",
                                                         "gamma": "1.0", "sigma_rel": "0.2"})
    with pytest.raises(ValueError, match=r"bad\.safetensors.*unreadable metadata"):
        read_snapshot_info(bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match=r"garbage\.safetensors.*cannot be read as safetensors"):
        read_snapshot_info(garbage)
    # The listing stops at the first bad file, naming it.
    with pytest.raises(ValueError, match=r"\.safetensors"):
        list_snapshots(tmp_path)


def test_listing_is_sorted_and_skips_hidden_files(tmp_path):
    for step in (300, 100, 200):
        for sigma_rel in (0.1, 0.05):
            _write(tmp_path, step, sigma_rel)
    (tmp_path / ".ema-0.1-000000400.safetensors.123.abcd.tmp").write_bytes(b"partial")
    (tmp_path / ".hidden.safetensors").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not a snapshot")
    infos = list_snapshots(tmp_path)
    assert [(i.step, i.sigma_rel) for i in infos] == [(s, r) for s in (100, 200, 300) for r in (0.05, 0.1)]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_snapshots(tmp_path / "missing")


def test_cli_list_and_reconstruct(tmp_path, capsys):
    for step in (100, 200):
        for sigma_rel in (0.05, 0.1):
            _write(tmp_path, step, sigma_rel)
    assert main(["list", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "sigma_rel", "gamma", "file"]
    assert [line.split()[:2] for line in lines[1:]] == [["100", "0.050000"], ["100", "0.100000"],
                                                        ["200", "0.050000"], ["200", "0.100000"]]
    assert lines[1].split()[3] == snapshot_filename(100, 0.05)

    out = tmp_path / "out" / "ema.safetensors"
    assert main(["reconstruct", str(tmp_path), "--sigma-rel", "0.1", "--out", str(out)]) == 0
    assert "profile error" in capsys.readouterr().out
    info, state = read_snapshot(out)
    assert (info.step, info.sigma_rel) == (200, 0.1)
    expected = reconstruct(tmp_path, sigma_rel=0.1)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    # Reconstructing a tracked profile at a snapshot's step gives that snapshot.
    _, tracked = read_snapshot(tmp_path / snapshot_filename(200, 0.1))
    for k in tracked:
        torch.testing.assert_close(state[k], tracked[k], rtol=1e-6, atol=1e-6)

    assert main(["reconstruct", str(tmp_path), "--sigma-rel", "0.1", "--step", "50", "--out", str(out)]) == 2
    assert "step=50 is outside the snapshots' steps [100, 200]" in capsys.readouterr().err


def test_cli_subprocess(tmp_path):
    _write(tmp_path, 10, 0.1)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "ema_cuda.posthoc", "list", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert snapshot_filename(10, 0.1) in run.stdout
    run = subprocess.run([sys.executable, "-m", "ema_cuda.posthoc", "reconstruct", str(tmp_path / "none"),
                          "--sigma-rel", "0.1", "--out", str(tmp_path / "x.safetensors")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "does not exist" in run.stderr


def test_a_snapshot_of_an_ema_with_tied_weights(tmp_path):
    # The EMA's state holds views of one flat buffer and a tied weight under
    # two keys: safetensors refuses overlapping tensors unless each is copied.
    from torch import nn

    from ema_cuda import ModelEMA

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    ema = ModelEMA.from_params(model, decay_type="power_function", sigma_rel=0.1, decay=1 - 1e-9)
    state = ema.state_dict()["ema"]
    path = write_snapshot(tmp_path / "tied.safetensors", state, step=1, gamma=ema.decay_function.gamma,
                          sigma_rel=0.1)
    info, loaded = read_snapshot(path)
    assert info.step == 1 and set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_packed_files_read_back_with_safetensors(tmp_path):
    # Snapshots are written by safetensors from views of one packed buffer (NOTE [packed snapshots]): every dtype,
    # shape and stride reads back with safetensors' own reader, tied keys each under their name.
    from safetensors import safe_open

    g = torch.Generator().manual_seed(3)
    shared = torch.randn(3, generator=g)
    state = {
        "b.mask": torch.tensor([True, False, True]),
        "a.w": torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
        "half": torch.randn(3, generator=g).half(),
        "bf": torch.randn(5, generator=g).bfloat16(),
        "count": torch.tensor(7, dtype=torch.int64),
        "small": torch.arange(3, dtype=torch.int8),
        "f64": torch.randn(2, generator=g, dtype=torch.float64),
        "strided": torch.randn(6, generator=g)[::2],
        "empty": torch.zeros(0, 4),
        "tied.one": shared,
        "tied.two": shared,
        "u8": torch.arange(5, dtype=torch.uint8),
    }
    path = _write(tmp_path, 4, 0.1, state)
    info, loaded = read_snapshot(path)
    assert info.step == 4 and loaded.keys() == state.keys()
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape and torch.equal(loaded[key], value)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["step"] == "4"
        assert set(f.keys()) == set(state)


def test_pack_state_is_a_copy_with_views_at_their_element_size(tmp_path):
    from ema_cuda.posthoc.snapshots import pack_state

    state = {"n": torch.tensor(3, dtype=torch.int8), "w": torch.randn(2, 3), "d": torch.randn(2, dtype=torch.float64)}
    packed = pack_state(state)
    assert packed.data.dtype == torch.uint8 and packed.data.numel() == 1 + 6 * 4 + 2 * 8
    views = packed.tensors()
    assert all(torch.equal(views[k], v) for k, v in state.items())
    for key, dtype, shape, begin, end in packed.entries:  # largest element size first: each view aligned
        assert begin % dtype.itemsize == 0 and end - begin == state[key].numel() * dtype.itemsize
    packed.data.zero_()  # a copy: the state keeps its values
    assert state["w"].abs().sum() > 0
    assert read_snapshot(_write(tmp_path, 2, 0.1, {}))[1] == {}  # a snapshot without tensors
