"""Reconstruction: tracked profiles come back from their own snapshots; an untracked one (0.07) from snapshots
of 0.05 and 0.10 matches a ModelEMA that tracked it directly; errors for bad directories and steps."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from ema_cuda import ModelEMA
from ema_cuda.posthoc import (
    PowerFunctionDecay,
    list_snapshots,
    profile_inner_product,
    reconstruct,
    sigma_rel_to_gamma,
    snapshot_filename,
    solve_weights,
    write_snapshot,
)
from support import Net, dataset
from support import one_thread  # noqa: F401  (autouse: one torch thread for this module)

NEAR_ONE = 1 - 1e-9  # a cap the runs here never reach



def _write(directory, step, sigma_rel, state):
    write_snapshot(directory / snapshot_filename(step, sigma_rel), state, step=step,
                   gamma=sigma_rel_to_gamma(sigma_rel), sigma_rel=sigma_rel)


def _relative_error(got, want, model):
    """||got - want|| / ||want - model|| over all floating entries: the error as a fraction of how far the EMA is
    from the model it averages."""
    num = sum(((got[k].double() - want[k].double()) ** 2).sum() for k in want if want[k].is_floating_point())
    den = sum(((want[k].double() - model[k].double()) ** 2).sum() for k in want if want[k].is_floating_point())
    return (num / den).sqrt().item()


def test_inner_product_closed_form():
    # Against a midpoint sum of the densities' product on [0, max(t)].
    for (ta, ga, tb, gb) in [(1.0, 6.94, 1.0, 16.97), (0.3, 0.0, 1.0, 2.5), (1.0, 3.0, 0.6, 3.0)]:
        n = 400_000
        x = (torch.arange(n, dtype=torch.float64) + 0.5) / n * max(ta, tb)
        pa = torch.where(x <= ta, (ga + 1) * x ** ga / ta ** (ga + 1), 0.0)
        pb = torch.where(x <= tb, (gb + 1) * x ** gb / tb ** (gb + 1), 0.0)
        numeric = (pa * pb).sum().item() * max(ta, tb) / n
        assert profile_inner_product(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)
        assert profile_inner_product(ta, ga, tb, gb) == profile_inner_product(tb, gb, ta, ga)
    # Long runs: no overflow of t^(g+1).
    assert profile_inner_product(1e7, 16.97, 2e7, 6.94) > 0


def _trajectory(steps=2000, dim=64):
    g = torch.Generator().manual_seed(1)
    walk = torch.cumsum(torch.randn(steps, dim, generator=g, dtype=torch.float64) * 0.05, 0)
    return walk + torch.linspace(0, 1, steps, dtype=torch.float64)[:, None]


def _power_ema(theta, sigma_rel, every):
    fn, ema, snaps = PowerFunctionDecay(sigma_rel=sigma_rel), None, {}
    for t in range(1, len(theta) + 1):
        d = fn(NEAR_ONE, t, None)
        ema = theta[t - 1].clone() if ema is None else ema * d + theta[t - 1] * (1 - d)
        if t % every == 0:
            snaps[t] = ema.clone()
    return snaps


def test_tracked_profile_comes_back(tmp_path):
    theta, every = _trajectory(), 100
    tracked = {s: _power_ema(theta, s, every) for s in (0.05, 0.1)}
    for s, snaps in tracked.items():
        for t, v in snaps.items():
            _write(tmp_path, t, s, {"w": v})
    for s in (0.05, 0.1):
        for step in (500, 2000):
            got = reconstruct(tmp_path, sigma_rel=s, step=step)
            err = _relative_error(got, {"w": tracked[s][step]}, {"w": theta[step - 1]})
            assert err < 1e-9, (s, step, err)
    # An untracked profile, against its EMA computed directly: measured 3.2e-4 at step 2000, 6.0e-4 at 1500.
    direct = _power_ema(theta, 0.07, every)
    for step, bound in ((2000, 1e-3), (1500, 2e-3)):
        got = reconstruct(tmp_path, sigma_rel=0.07, step=step)
        err = _relative_error(got, {"w": direct[step]}, {"w": theta[step - 1]})
        assert err < bound, (step, err)
    rec = solve_weights(list_snapshots(tmp_path), 0.07)
    assert rec.relative_error < 0.01 and len(rec.snapshots) == 40 and rec.step == 2000
    # A step far past the last snapshot before it cannot be reconstructed well: a warning says so.
    with pytest.warns(UserWarning, match="poor approximation"):
        reconstruct(tmp_path, sigma_rel=0.07, step=1550)


def test_small_model_three_emas(tmp_path):
    # A small model trained 400 steps with a ModelEMA per profile; snapshots of 0.05 and 0.10 every 25 steps.
    torch.manual_seed(0)
    model = Net(dropout=0.0)
    data = dataset(64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    emas = {s: ModelEMA.from_params(model, decay_type="power_function", sigma_rel=s, decay=NEAR_ONE)
            for s in (0.05, 0.07, 0.1)}
    steps, every = 400, 25
    g = torch.Generator().manual_seed(0)
    for t in range(1, steps + 1):
        idx = torch.randint(0, len(data), (16,), generator=g)
        x, y = data[idx]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for ema in emas.values():
            ema.update(model, t, steps)
        if t % every == 0:
            for s in (0.05, 0.1):
                _write(tmp_path, t, s, emas[s].state_dict()["ema"])
    want = emas[0.07].state_dict()["ema"]
    got = reconstruct(tmp_path, sigma_rel=0.07)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype for k in want)
    assert torch.equal(got["bn.num_batches_tracked"], want["bn.num_batches_tracked"])  # copied, not averaged
    err = _relative_error(got, want, model.state_dict())
    assert err < 2e-3, err  # measured 9.9e-4 (profile error 3.8e-3)
    # The tracked ones come back up to float32 rounding.
    for s in (0.05, 0.1):
        back = reconstruct(tmp_path, sigma_rel=s)
        assert _relative_error(back, emas[s].state_dict()["ema"], model.state_dict()) < 1e-5


@pytest.mark.filterwarnings("ignore:reconstruct.*poor approximation:UserWarning")
def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no snapshot"):
        reconstruct(tmp_path, sigma_rel=0.1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reconstruct(tmp_path / "missing", sigma_rel=0.1)
    _write(tmp_path, 100, 0.1, {"w": torch.zeros(3), "b": torch.zeros(2)})
    _write(tmp_path, 200, 0.1, {"w": torch.ones(3), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"step=50 is outside the snapshots' steps \[100, 200\]"):
        reconstruct(tmp_path, sigma_rel=0.1, step=50)
    with pytest.raises(ValueError, match=r"step=201 is outside"):
        reconstruct(tmp_path, sigma_rel=0.1, step=201)
    with pytest.raises(TypeError, match="step must be an integer"):
        reconstruct(tmp_path, sigma_rel=0.1, step=150.0)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        reconstruct(tmp_path, sigma_rel=0.5)
    _write(tmp_path, 300, 0.05, {"w": torch.ones(4), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"'w' is torch.float32 \[4\] in snapshot .*ema-0.050000-000000300"):
        reconstruct(tmp_path, sigma_rel=0.1)
    _write(tmp_path, 300, 0.05, {"w": torch.ones(3, dtype=torch.float64), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"'w' is torch.float64 \[3\]"):
        reconstruct(tmp_path, sigma_rel=0.1)
    _write(tmp_path, 300, 0.05, {"w": torch.ones(3)})
    with pytest.raises(ValueError, match=r"different keys \(e.g. \['b'\]\)"):
        reconstruct(tmp_path, sigma_rel=0.1)
