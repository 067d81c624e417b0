"""PostHocEMA: several power-function profiles in one update, background snapshots, resume, reconstruction quality."""
import math
import os

import pytest
import torch
from torch import nn

from ema_cuda import ModelEMA, PostHocEMA, ops
from ema_cuda.posthoc import PowerFunctionDecay, list_snapshots, read_snapshot, sigma_rel_to_gamma
from support import Net, Tied, assert_bit_identical, one_thread, require_package, seeded  # noqa: F401

SIGMAS = (0.05, 0.10)


def _train(model, steps, emas=(), seed=0, lr=0.1, start=1):
    """Noisy SGD on random regression batches; after each step every EMA in ``emas`` gets ``update(model)``."""
    g = torch.Generator().manual_seed(seed + start)
    torch.manual_seed(seed + start)  # dropout: a resumed run draws what the uninterrupted one drew
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 8, generator=g)
        loss = (model(x) - x[:, :3]).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        for e in emas:
            e.update(model)


def _snapshot_states(directory):
    return {s.path.name: read_snapshot(s.path)[1] for s in list_snapshots(directory)}


def test_each_profile_is_modelema_with_the_power_function_schedule():
    model = seeded(Net)
    ph = PostHocEMA(model, SIGMAS)
    refs = [ModelEMA(model, 1 - 1e-6, PowerFunctionDecay(sigma_rel=s)) for s in SIGMAS]

    class Step:
        t = 0

        def update(self, m):
            self.t += 1
            for r in refs:
                r.update(m, step=self.t, total_steps=20)

    _train(model, 20, [ph, Step()])
    assert ph.step == ph.num_updates == 20
    for k, s in enumerate(SIGMAS):
        assert_bit_identical(ph.emas[k], refs[k].ema)
        assert ph.ema_for(s) is ph.emas[k]
    assert ph.ema is ph.emas[0]
    assert ph.gammas == tuple(sigma_rel_to_gamma(s) for s in SIGMAS)


def test_first_update_copies_and_skipped_steps_stay_exact():
    # A scalar "model" whose value after the update at step t is known: the EMA
    # must be its power-function average, also when steps jump.
    model = nn.Linear(1, 1, bias=False)
    ph = PostHocEMA(model, (0.2,))
    gamma = ph.gammas[0]
    steps, values = [3, 4, 7, 8, 12], [1.0, -2.0, 5.0, 0.5, 3.0]
    for t, v in zip(steps, values):
        with torch.no_grad():
            model.weight.fill_(v)
        ph.update(model, step=t)
        if t == 3:
            assert ph.ema.weight.item() == v
    # Value v_i holds on (t_{i-1}, t_i]; the profile's mass there is (t_i^(g+1) - t_{i-1}^(g+1)) / T^(g+1).
    T, prev, expected = steps[-1], 0, 0.0
    for t, v in zip(steps, values):
        expected += v * ((t / T) ** (gamma + 1) - (prev / T) ** (gamma + 1))
        prev = t
    assert ph.ema.weight.item() == pytest.approx(expected, rel=1e-5)


def test_snapshots_every_n_steps_with_metadata(tmp_path):
    model = seeded(Net)
    ph = PostHocEMA(model, SIGMAS, snapshot_every=5, snapshot_dir=tmp_path / "snaps")
    _train(model, 12, [ph])
    infos = ph.snapshots()
    assert [(i.step, i.sigma_rel) for i in infos] == [(5, 0.05), (5, 0.10), (10, 0.05), (10, 0.10)]
    assert ph.last_snapshot_step == 10
    assert all(math.isclose(i.gamma, sigma_rel_to_gamma(i.sigma_rel)) for i in infos)
    assert not [p for p in os.listdir(tmp_path / "snaps") if p.startswith(".")]  # no temporary files left
    # The files hold the profiles as they were at the snapshot's step, not later.
    model2 = seeded(Net)
    ph2 = PostHocEMA(model2, SIGMAS)
    _train(model2, 10, [ph2])
    for k, s in enumerate(SIGMAS):
        info = next(i for i in infos if i.step == 10 and i.sigma_rel == s)
        assert_bit_identical(read_snapshot(info.path)[1], ph2.emas[k].state_dict())


def test_snapshot_when_a_multiple_is_crossed(tmp_path):
    model = nn.Linear(2, 2)
    ph = PostHocEMA(model, (0.1,), snapshot_every=4, snapshot_dir=tmp_path)
    for t in (3, 6, 9, 12, 13):  # one update every 3 steps: 4 and 8 are passed over
        ph.update(model, step=t)
    assert [i.step for i in ph.snapshots()] == [6, 9, 12]


def test_tied_weights_and_integer_buffers(tmp_path):
    model = Tied()
    ph = PostHocEMA(model, SIGMAS, snapshot_every=1, snapshot_dir=tmp_path)
    ph.update(model)
    assert ph.ema.out.weight is ph.ema.embed.weight
    bn_model = seeded(Net)
    ph2 = PostHocEMA(bn_model, SIGMAS)
    _train(bn_model, 3, [ph2])
    for e in ph2.emas:
        assert e.bn.num_batches_tracked.item() == 3
    assert len(ph.snapshots()) == 2


def test_resume_continues_bit_identically(tmp_path):
    full_model = seeded(Net)
    full = PostHocEMA(full_model, SIGMAS, snapshot_every=4, snapshot_dir=tmp_path / "full")
    _train(full_model, 10, [full])
    _train(full_model, 10, [full], start=11)

    model = seeded(Net)
    first = PostHocEMA(model, SIGMAS, snapshot_every=4, snapshot_dir=tmp_path / "resumed")
    _train(model, 10, [first])
    path = tmp_path / "ema.pt"
    torch.save({"net": model.state_dict(), "ema": first.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    model = seeded(Net, seed=1)
    model.load_state_dict(ckpt["net"])
    resumed = PostHocEMA(model, SIGMAS, snapshot_every=4, snapshot_dir=tmp_path / "resumed")
    resumed.load_state_dict(ckpt["ema"])
    assert (resumed.step, resumed.num_updates, resumed.last_snapshot_step) == (10, 10, 8)
    _train(model, 10, [resumed], start=11)
    for a, b in zip(full.emas, resumed.emas):
        assert_bit_identical(a, b)
    resumed.wait()
    full.wait()
    got, want = _snapshot_states(tmp_path / "resumed"), _snapshot_states(tmp_path / "full")
    assert got.keys() == want.keys() and len(got) == 10
    for name in want:
        assert_bit_identical(got[name], want[name])
    state = resumed.state_dict()
    assert state["sigma_rels"] == list(SIGMAS) and state["snapshot_every"] == 4
    assert state["snapshot_dir"] == str(tmp_path / "resumed")


@pytest.mark.parametrize("sigma_rels, match", [
    ((), "empty"),
    ((0.05, 0.05), "twice"),
    ((0.05, 0.4), r"sigma_rels\[1\]=0.4"),
    ((0.0,), r"sigma_rels\[0\]=0.0"),
    ((float("nan"),), "sigma_rels"),
])
def test_bad_sigma_rels(sigma_rels, match):
    with pytest.raises(ValueError, match=match):
        PostHocEMA(nn.Linear(2, 2), sigma_rels)


def test_bad_snapshot_settings(tmp_path):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="snapshot_every must be an integer >= 1, got 0"):
        PostHocEMA(model, snapshot_every=0, snapshot_dir=tmp_path)
    with pytest.raises(ValueError, match="go together"):
        PostHocEMA(model, snapshot_every=10)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        PostHocEMA(model, snapshot_every=10, snapshot_dir=afile)
    with pytest.raises(TypeError, match="sigma_rels must be a sequence"):
        PostHocEMA(model, 0.05)
    with pytest.raises(ValueError, match="ema_dtype must be None or one of .* got 'float33'"):
        PostHocEMA(model, ema_dtype="float33")


def test_float32_profiles_of_a_bf16_model():
    model = seeded(Net).to(torch.bfloat16)
    ph = PostHocEMA(model, SIGMAS, ema_dtype="float32")
    ph.update(model)
    assert ph.ema.fc1.weight.dtype == torch.float32
    assert torch.equal(ph.ema.fc1.weight, model.fc1.weight.float())
    with ph.swapped(model):
        assert model.fc1.weight.dtype == torch.bfloat16


def test_bad_steps_and_models_write_nothing():
    model = seeded(Net)
    ph = PostHocEMA(model, SIGMAS)
    _train(model, 3, [ph])
    before = [e.state_dict() for e in ph.emas]
    before = [{k: v.clone() for k, v in s.items()} for s in before]
    with pytest.raises(ValueError, match="step=3 is not after the last update's step 3"):
        ph.update(model, step=3)
    with pytest.raises(TypeError, match="step must be an integer"):
        ph.update(model, step=4.0)
    with pytest.raises(RuntimeError, match="does not match the EMA"):
        ph.update(nn.Linear(2, 2))
    with pytest.raises(KeyError, match=r"sigma_rel=0.07.*tracked: \[0.05, 0.1\]"):
        ph.ema_for(0.07)
    for e, s in zip(ph.emas, before):
        assert_bit_identical(e.state_dict(), s)
    assert ph.step == 3


def test_load_state_dict_checks_before_writing():
    model = seeded(Net)
    ph = PostHocEMA(model, SIGMAS)
    _train(model, 3, [ph])
    state = {k: v for k, v in ph.state_dict().items()}
    other = PostHocEMA(seeded(Net, seed=2), SIGMAS)
    kept = {k: v.clone() for k, v in other.ema.state_dict().items()}
    with pytest.raises(ValueError, match=r"sigma_rels \[0.05, 0.1\], this EMA \[0.05, 0.2\]"):
        PostHocEMA(seeded(Net), (0.05, 0.2)).load_state_dict(state)
    bad = dict(state, ema={k: v[..., :1] if k == "1.fc1.weight" else v for k, v in state["ema"].items()})
    with pytest.raises(ValueError, match=r"profile sigma_rel=0.1 entry 'fc1.weight' is \[16, 1\] in the state"):
        other.load_state_dict(bad)
    bad = dict(state, ema={k: v for k, v in state["ema"].items() if k != "0.bn.running_var"})
    with pytest.raises(ValueError, match="differing: \\[\"profile sigma_rel=0.05 entry 'bn.running_var'\"\\]"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="not a PostHocEMA state"):
        other.load_state_dict({"format": "something else"})
    assert_bit_identical(other.ema.state_dict(), kept)
    assert other.step == 0


def test_failed_write_is_raised_on_the_next_update(tmp_path):
    model = nn.Linear(2, 2)
    snaps = tmp_path / "snaps"
    ph = PostHocEMA(model, SIGMAS, snapshot_every=1, snapshot_dir=snaps)
    snaps.rmdir()
    snaps.write_text("in the way")  # the writer cannot create its files
    ph.update(model)
    with pytest.raises(RuntimeError, match="writing a snapshot failed"):
        ph.wait()
        ph.update(model)
    snaps.unlink()
    ph.update(model)  # raised once, then the writer goes on
    ph.wait()
    assert [i.step for i in list_snapshots(snaps)] == [2, 2]


def test_swapped_and_copy_to_choose_a_profile():
    model = seeded(Net)
    ph = PostHocEMA(model, SIGMAS)
    _train(model, 10, [ph])
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with ph.swapped(model, sigma_rel=0.10):
        assert torch.equal(model.fc1.weight, ph.emas[1].fc1.weight)
        with pytest.raises(RuntimeError, match="inside swapped"):
            ph.update(model)
    assert_bit_identical(model.state_dict(), raw)
    ph.copy_to(model)
    assert_bit_identical(model.state_dict(), ph.emas[0].state_dict())


def test_one_multi_ema_call_per_update(monkeypatch):
    # Every profile moves in one fused multi-EMA call; no per-profile update runs.
    calls = []

    class Spy(ops.MultiFusedUpdater):
        def update(self, decays):
            calls.append(list(decays))
            super().update(decays)

    def no_single_update(self, decay):
        raise AssertionError("a per-profile FusedUpdater.update ran")

    want_model = seeded(Net)
    want = PostHocEMA(want_model, SIGMAS)
    _train(want_model, 5, [want])
    monkeypatch.setattr(ops, "MultiFusedUpdater", Spy)
    monkeypatch.setattr(ops.FusedUpdater, "update", no_single_update)
    model = seeded(Net)
    got = PostHocEMA(model, SIGMAS)
    _train(model, 5, [got])
    assert len(calls) == 5 and calls[0] == [0.0, 0.0]
    for a, b in zip(got.emas, want.emas):
        assert_bit_identical(a, b)


# ---------------------------------------------------------------- reconstruction quality

def _flat(module):
    return torch.cat([v.detach().double().flatten() for v in module.state_dict().values() if v.is_floating_point()])


def _flat_state(state, like):
    """``state``'s floating tensors flattened in the order of ``like``'s state_dict (files sort their keys)."""
    return torch.cat([state[k].double().flatten() for k, v in like.state_dict().items() if v.is_floating_point()])


def test_reconstructing_0_07_against_tracking_it_and_ema_pytorch(tmp_path):
    """300 noisy SGD steps of a small MLP; snapshots of 0.05 and 0.10 every 10 steps.

    The error of the reconstructed 0.07 is measured against a 0.07 profile
    tracked directly, relative to the distance between the tracked 0.05 and
    0.10 profiles (the scale of what choosing sigma_rel changes).  ema-pytorch's
    PostHocEMA follows the same trajectory (fp32 checkpoints, an update every
    step) and is judged against its own directly tracked 0.07.
    """
    ema_pytorch = require_package("ema_pytorch")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    ours = PostHocEMA(model, SIGMAS, snapshot_every=10, snapshot_dir=tmp_path / "ours")
    direct = PostHocEMA(model, (0.07,))
    _train(model, 300, [ours, direct], lr=0.05)

    # ema-pytorch's EMAs hold their model: a second model follows the same trajectory (same seeds).
    torch.manual_seed(0)
    replay = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    theirs = ema_pytorch.PostHocEMA(replay, sigma_rels=SIGMAS, update_every=1, checkpoint_every_num_steps=10,
                                    checkpoint_folder=str(tmp_path / "theirs"), checkpoint_dtype=torch.float32)
    their_direct = ema_pytorch.KarrasEMA(replay, sigma_rel=0.07, update_every=1)

    class Theirs:
        def update(self, m):
            theirs.update()
            their_direct.update()

    _train(replay, 300, [Theirs()], lr=0.05)
    assert torch.equal(_flat(replay), _flat(model))  # the same trajectory

    scale = (_flat(ours.emas[0]) - _flat(ours.emas[1])).norm().item()
    rec = _flat_state(ours.reconstruct(0.07), model)
    our_error = (rec - _flat(direct.ema)).norm().item() / scale
    synth = theirs.synthesize_ema_model(sigma_rel=0.07)
    their_error = (_flat(synth.ema_model) - _flat(their_direct.ema_model)).norm().item() / scale
    their_vs_our_direct = (_flat(synth.ema_model) - _flat(direct.ema)).norm().item() / scale
    print(f"\nreconstructed sigma_rel=0.07 vs tracked 0.07, relative to |EMA(0.05) - EMA(0.10)| = {scale:.4g}: "
          f"ema_cuda {our_error:.3e}; ema-pytorch {their_error:.3e} (vs its own tracked 0.07), "
          f"{their_vs_our_direct:.3e} (vs ema_cuda's tracked 0.07)")
    assert our_error < 0.01
    assert our_error <= their_error * 1.05
