"""Checkpoint I/O: atomic writes (including a writer killed mid-save), weights-only loading, clear errors."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from ema_cuda import checkpoint as ckpt_io
from ema_cuda.checkpoint import CheckpointError, load_checkpoint, load_checkpoint_to_model, save_checkpoint
from support import equal_states

REPO = Path(__file__).resolve().parents[1]


def _net():
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def _ckpt(net, ema_net=None, epoch=1):
    state = {"net": net.state_dict(), "epoch": epoch, "acc": 0.5, "metrics": {"valid_accuracy": 0.5}}
    if ema_net is not None:
        state["ema_net"] = ema_net.state_dict()
    return state


def _tmp_files(directory):
    return [p for p in Path(directory).iterdir() if p.name.endswith(".tmp")]


def test_roundtrip_weights_only_and_no_temp_left(tmp_path):
    net = _net()
    path = save_checkpoint(_ckpt(net), tmp_path / "sub" / "ckpt.pth")
    assert path == tmp_path / "sub" / "ckpt.pth"
    # The file must load under the strictest setting, independent of our loader.
    raw = torch.load(path, weights_only=True)
    for k, v in net.state_dict().items():
        assert torch.equal(raw["net"][k], v)
    assert load_checkpoint(path)["epoch"] == 1
    assert _tmp_files(path.parent) == []


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint({"net": {}}, tmp_path / "c.pth")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_failed_save_leaves_previous_file_and_no_temp(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"net": {"w": torch.ones(2)}, "epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"net": {"w": torch.zeros(2)}, "bad": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["net"]["w"], torch.ones(2))
    assert _tmp_files(tmp_path) == []


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file_error_names_file(tmp_path, damage):
    path = save_checkpoint(_ckpt(_net()), tmp_path / "ckpt.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="ckpt.pth"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="ckpt.pth"):
        load_checkpoint_to_model(_net(), path)


def test_non_weights_only_content_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"net": {}, "obj": Path("x")}, path)  # an arbitrary class: refused by weights_only
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_checkpoint(path)


def test_non_dict_checkpoint(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="list.pth.*list"):
        load_checkpoint(path)


@pytest.mark.parametrize("kwargs, expected", [({}, "net"), ({"load_ema_as_net": True}, "ema_net")])
def test_load_net_or_ema_net(tmp_path, kwargs, expected):
    # The default is the raw weights, as in SuperGradients.
    weights = {"net": _net(), "ema_net": _net()}
    path = save_checkpoint(_ckpt(weights["net"], weights["ema_net"]), tmp_path / "c.pth")
    target = _net()
    load_checkpoint_to_model(target, path, **kwargs)
    assert equal_states(target, weights[expected])


def test_load_is_in_place(tmp_path):
    net = _net()
    path = save_checkpoint(_ckpt(net), tmp_path / "c.pth")
    target = _net()
    ptrs = {k: v.data_ptr() for k, v in target.state_dict().items()}
    load_checkpoint_to_model(target, path)
    assert {k: v.data_ptr() for k, v in target.state_dict().items()} == ptrs


def test_load_ema_as_net_without_ema(tmp_path):
    path = save_checkpoint(_ckpt(_net()), tmp_path / "noema.pth")
    with pytest.raises(CheckpointError, match=r"noema\.pth.*'ema_net'"):
        load_checkpoint_to_model(_net(), path, load_ema_as_net=True)


def test_missing_net_entry(tmp_path):
    path = save_checkpoint({"epoch": 3}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"c\.pth.*'net'.*epoch"):
        load_checkpoint_to_model(_net(), path)


def test_shape_mismatch_names_file_entry_key_and_leaves_model_untouched(tmp_path):
    path = save_checkpoint(_ckpt(_net()), tmp_path / "c.pth")
    other = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 5))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"c\.pth.*'net'.*'2\.weight'.*\(2, 3\).*\(5, 3\)"):
        load_checkpoint_to_model(other, path)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "layers, match",
    [
        ((nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2), nn.Linear(2, 2)),
         r"c\.pth.*missing keys \['3\.weight', '3\.bias'\]"),
        ((nn.Linear(4, 3),), r"c\.pth.*unexpected keys \['1\.weight'"),
    ],
    ids=["bigger", "smaller"],
)
def test_missing_and_unexpected_keys(tmp_path, layers, match):
    saved = _net()
    path = save_checkpoint(_ckpt(saved), tmp_path / "c.pth")
    model = nn.Sequential(*layers)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint_to_model(model, path)
    load_checkpoint_to_model(model, path, strict=False)  # non-strict loads what matches
    assert torch.equal(model[0].weight, saved[0].weight)


def test_dataparallel_prefix_is_removed(tmp_path):
    net = _net()
    state = {"module." + k: v for k, v in net.state_dict().items()}
    path = save_checkpoint({"net": state}, tmp_path / "c.pth")
    target = _net()
    load_checkpoint_to_model(target, path)
    assert torch.equal(target[0].weight, net[0].weight)


@pytest.mark.parametrize(
    "checkpoint, expected",
    [({"net": {}, "ema_net": {}}, "ema_net"), ({"net": {}}, "net"), ({"net": {}, "ema_net": None}, "net")],
)
def test_pick_weights_key(checkpoint, expected):
    assert ckpt_io.pick_weights_key(checkpoint) == expected


def test_pick_weights_key_without_weights_names_both_entries():
    with pytest.raises(CheckpointError, match="'ema_net'.*'net'"):
        ckpt_io.pick_weights_key({"epoch": 1})


# --------------------------------------------------------------------------
# A writer killed while saving leaves the previous checkpoint loadable.

_KILL_SCRIPT = textwrap.dedent(
    """
    import io, os, sys, time
    import torch
    from ema_cuda import checkpoint as ckpt_io

    path, where = sys.argv[1], sys.argv[2]
    big = {"net": {"w": torch.full((1 << 20,), 2.0)}, "epoch": 2}
    real_save = torch.save

    def half_then_hang(obj, f):
        # Write half of the serialized bytes, make them visible, then wait to be killed.
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        print("HANG", flush=True)
        time.sleep(60)

    def hang_in_fsync(fd):
        print("HANG", flush=True)
        time.sleep(60)

    if where == "write":
        torch.save = half_then_hang
    elif where == "fsync":
        os.fsync = hang_in_fsync
    ckpt_io.save_checkpoint(big, path)
    print("DONE", flush=True)
    """
)


def _spawn(args, script=_KILL_SCRIPT):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, env=env)


def _sigkill(proc):
    """SIGKILLs ``proc`` and reaps it (also when the caller's checks failed first)."""
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, where):
    path = tmp_path / "ckpt_latest.pth"
    save_checkpoint({"net": {"w": torch.full((8,), 1.0)}, "epoch": 1}, path)
    proc = _spawn([str(path), where])
    try:
        assert proc.stdout.readline().strip() == "HANG"
        # The partially written temporary file exists next to the checkpoint ...
        assert len(_tmp_files(tmp_path)) == 1
    finally:
        _sigkill(proc)
    assert proc.returncode == -signal.SIGKILL
    # ... but the checkpoint itself is the previous one, intact.
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["net"]["w"], torch.full((8,), 1.0))


def test_kill_at_random_points_never_tears_the_file(tmp_path):
    # No hooks: a writer that saves continuously is killed at a few arbitrary
    # moments; every time, the file is one complete version.
    script = textwrap.dedent(
        """
        import sys, torch
        from ema_cuda.checkpoint import save_checkpoint
        path = sys.argv[1]
        i = 0
        print("START", flush=True)
        while True:
            i += 1
            save_checkpoint({"net": {"w": torch.full((1 << 19,), float(i))}, "epoch": i}, path)
        """
    )
    path = tmp_path / "ckpt_latest.pth"
    save_checkpoint({"net": {"w": torch.full((1 << 19,), 0.0)}, "epoch": 0}, path)
    for delay in (0.05, 0.2, 0.35):
        proc = _spawn([str(path)], script)
        try:
            assert proc.stdout.readline().strip() == "START"
            time.sleep(delay)
        finally:
            _sigkill(proc)
        ckpt = load_checkpoint(path)
        w = ckpt["net"]["w"]
        assert torch.equal(w, torch.full_like(w, float(ckpt["epoch"])))


# --------------------------------------------------------------------------
# Integrity: a digest recorded at save time, checked before anything is unpickled.


def test_flipped_byte_anywhere_is_a_checkpoint_error(tmp_path):
    import random

    path = save_checkpoint(_ckpt(_net(), _net()), tmp_path / "ckpt.pth")
    data = path.read_bytes()
    rng = random.Random(14)
    # 50 random positions, plus the end of the file where the digest and the
    # zip record announcing it live.
    positions = rng.sample(range(len(data)), 50) + list(range(len(data) - 110, len(data)))
    damaged = tmp_path / "damaged.pth"
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        damaged.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="damaged.pth"):
            load_checkpoint(damaged)
    assert load_checkpoint(path)["epoch"] == 1


def test_digest_mismatch_message_names_both_digests(tmp_path):
    path = save_checkpoint(_ckpt(_net()), tmp_path / "ckpt.pth")
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ckpt.pth' is damaged: its SHA-256 is [0-9a-f]{64}, but '[0-9a-f]{64}'"):
        load_checkpoint_to_model(_net(), path)


def test_checkpoint_without_digest_loads_with_one_warning(tmp_path):
    import warnings

    net = _net()
    path = tmp_path / "plain.pth"
    torch.save(_ckpt(net), path)  # an older file, or torch.save directly
    with pytest.warns(UserWarning, match=r"plain.pth' has no integrity digest"):
        ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["net"]["0.weight"], net[0].weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(path)  # once per file


def test_keyboard_interrupt_during_save_leaves_previous_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"net": {"w": torch.ones(2)}, "epoch": 1}, path)

    def interrupted(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"net": {"w": torch.zeros(2)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["net"]["w"], torch.ones(2))
    assert _tmp_files(tmp_path) == []


def test_one_atomic_write_in_the_package():
    # Every rename-into-place goes through ema_cuda/_fs.py, which cleans up on any exception.
    package = REPO / "ema_cuda"
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "os.replace(" in p.read_text())
    assert users == ["_fs.py"]


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_removed_on_load(tmp_path, prefix):
    net = _net()
    state = {"net": {prefix + k: v for k, v in net.state_dict().items()}}
    path = save_checkpoint(state, tmp_path / "wrapped.pth")
    target = _net()
    load_checkpoint_to_model(target, path)
    assert torch.equal(target[0].weight, net[0].weight)
    # Loading into the wrapped model works too: the wrapper is removed first.
    again = _net()
    load_checkpoint_to_model(torch.compile(again, backend="eager"), path)
    assert torch.equal(again[0].weight, net[0].weight)
