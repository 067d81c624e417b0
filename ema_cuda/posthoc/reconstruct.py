"""Post-hoc reconstruction: the EMA of any power-function profile from snapshots of others.

Each snapshot ``i`` (step ``t_i``, exponent ``g_i``) is the average of the
training weights against the density ``p_i(tau) = (g_i+1) tau^g_i /
t_i^(g_i+1)`` on ``[0, t_i]``.  A linear combination ``sum_i x_i snapshot_i``
is the average against ``sum_i x_i p_i``; the weights ``x`` are those that
bring that density closest to the requested one, ``p_r``, in the L2 norm on
time (NOTE [the reconstruction's norm]).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ema_cuda.posthoc.profiles import sigma_rel_to_gamma
from ema_cuda.posthoc.snapshots import SnapshotInfo, list_snapshots, read_snapshot

__all__ = ["Reconstruction", "combine_snapshots", "profile_inner_product", "reconstruct", "solve_weights"]

PathLike = Union[str, "os.PathLike[str]"]

# NOTE [the reconstruction's norm]
# The weights x minimise || sum_i x_i p_i - p_r ||_2 over time, with every
# density extended by 0 past its own t.  Why L2 on time:
# * it is exact for the discrete EMA: the weight the EMA of PowerFunctionDecay
#   gives to the model of step tau is the integral of p over [tau-1, tau]
#   (ema_cuda.posthoc.profiles), so the snapshots and the target are the
#   continuous averages of a piecewise-constant weight trajectory;
# * the error of the reconstructed weights is sum over time of (profile
#   error) x (weights), so by Cauchy-Schwarz it is at most the profile's L2
#   error times the L2 size of the weights' deviation from any constant
#   (the densities integrate to 1 and x is fitted, so a constant part mostly
#   cancels): a small L2 error means a small weight error whatever the run;
# * inner products of power functions have a closed form, so the normal
#   equations A x = b (A_ij = <p_i, p_j>, b_i = <p_i, p_r>) cost O(n^2) for
#   n snapshots, independent of the number of steps.
# For t_a <= t_b:  <p_a, p_b> = (g_a+1)(g_b+1)/(g_a+g_b+1) * (t_a/t_b)^g_b / t_b,
# written with the ratio t_a/t_b because t^(g+1) overflows for long runs.
# Times are divided by the largest one first (the problem is scale-free up to
# a common factor).  Snapshots of neighbouring steps and profiles are nearly
# collinear, so A is ill-conditioned: it is solved in float64 by an SVD-based
# least-squares solve (torch.linalg.lstsq, driver gelsd) that drops singular
# values below RCOND times the largest, giving the smallest-norm weights among
# near-equivalent ones; small weights keep the float32 rounding of the
# snapshots from being amplified.

#: Relative cut-off of singular values of A (NOTE [the reconstruction's norm]).
RCOND = 1e-12

#: A relative profile error above which :func:`reconstruct` warns (a few snapshots per profile give ~0.01).
WARN_PROFILE_ERROR = 0.1


def profile_inner_product(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """``<p_a, p_b>``, the L2 inner product over time of two power-function densities (float64 arithmetic)."""
    if t_a > t_b:
        t_a, g_a, t_b, g_b = t_b, g_b, t_a, g_a
    return (g_a + 1.0) * (g_b + 1.0) / (g_a + g_b + 1.0) * (t_a / t_b) ** g_b / t_b


@dataclass(frozen=True)
class Reconstruction:
    """The weights of a reconstruction: ``result = sum(weights[i] * snapshots[i])``.

    ``relative_error`` is ``||sum x_i p_i - p_r|| / ||p_r||``, the L2 distance
    between the reconstructed profile and the requested one relative to the
    requested one's norm.
    """

    step: int
    gamma: float
    sigma_rel: float
    snapshots: Tuple[SnapshotInfo, ...]
    weights: Tuple[float, ...]
    relative_error: float


def solve_weights(snapshots: Sequence[SnapshotInfo], sigma_rel: float, step: Optional[int] = None) -> Reconstruction:
    """The combination of ``snapshots`` (those up to ``step``) closest to profile ``sigma_rel`` at ``step``.

    ``step`` defaults to the last snapshot's; it must be an integer between
    the first snapshot's step and the last one's.
    """
    gamma = sigma_rel_to_gamma(sigma_rel)
    if not snapshots:
        raise ValueError("reconstruct: no snapshots")
    first, last = min(s.step for s in snapshots), max(s.step for s in snapshots)
    if step is None:
        step = last
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"reconstruct: step must be an integer or None, got {step!r}")
    if not first <= step <= last:
        raise ValueError(f"reconstruct: step={step} is outside the snapshots' steps [{first}, {last}]")
    used = tuple(s for s in snapshots if s.step <= step)
    scale = float(step)
    ts = [s.step / scale for s in used]
    gs = [s.gamma for s in used]
    n = len(used)
    a = torch.empty(n, n, dtype=torch.float64)
    b = torch.empty(n, 1, dtype=torch.float64)
    for i in range(n):
        b[i, 0] = profile_inner_product(ts[i], gs[i], 1.0, gamma)
        for j in range(i, n):
            a[i, j] = a[j, i] = profile_inner_product(ts[i], gs[i], ts[j], gs[j])
    x = torch.linalg.lstsq(a, b, rcond=RCOND, driver="gelsd").solution
    target = profile_inner_product(1.0, gamma, 1.0, gamma)
    sq = (x.T @ a @ x - 2.0 * (x.T @ b)).item() + target
    return Reconstruction(step, gamma, float(sigma_rel), used, tuple(x[:, 0].tolist()),
                          math.sqrt(max(sq, 0.0) / target))


def combine_snapshots(rec: Reconstruction) -> Dict[str, torch.Tensor]:
    """The state_dict ``sum(rec.weights[i] * snapshot_i)`` (floating tensors in float64, cast back; others from
    the latest snapshot used), reading one snapshot at a time."""
    return _combine(rec)


def _combine(rec: Reconstruction) -> Dict[str, torch.Tensor]:
    acc: Dict[str, torch.Tensor] = {}
    dtypes: Dict[str, torch.dtype] = {}
    reference: Optional[SnapshotInfo] = None
    # Non-floating entries (integer buffers) have no average: they come from the latest snapshot used.
    latest = max(rec.snapshots, key=lambda s: s.step)
    for info, w in zip(rec.snapshots, rec.weights):
        _, tensors = read_snapshot(info.path)
        if reference is None:
            reference = info
            for key, t in tensors.items():
                dtypes[key] = t.dtype
                acc[key] = torch.zeros(t.shape, dtype=torch.float64) if t.is_floating_point() else t
        if set(tensors) != set(acc):
            diff = sorted(set(tensors) ^ set(acc))
            raise ValueError(f"reconstruct: snapshot {str(info.path)!r} and {str(reference.path)!r} have different "
                             f"keys (e.g. {diff[:3]})")
        for key, t in tensors.items():
            if t.shape != acc[key].shape or t.dtype != dtypes[key]:
                raise ValueError(
                    f"reconstruct: {key!r} is {t.dtype} {list(t.shape)} in snapshot {str(info.path)!r} but "
                    f"{dtypes[key]} {list(acc[key].shape)} in {str(reference.path)!r}"
                )
            if t.is_floating_point():
                acc[key].add_(t.to(torch.float64), alpha=w)
            elif info is latest:
                acc[key] = t
    return {key: value.to(dtypes[key]) if dtypes[key].is_floating_point else value for key, value in acc.items()}


def reconstruct(snapshot_dir: PathLike, sigma_rel: float, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The EMA of profile ``sigma_rel`` at ``step`` (default: the last snapshot's), from a directory of snapshots.

    Floating tensors are combined in float64 with the weights of
    :func:`solve_weights` and cast back to the snapshots' dtype; other
    tensors (integer buffers) are taken from the latest snapshot used.
    Errors: an empty directory, a ``step`` outside the snapshots' steps,
    snapshots whose keys, shapes or dtypes differ (naming both files).  A
    warning when the closest profile is more than ``WARN_PROFILE_ERROR`` (in
    relative L2 norm) from the requested one: a ``step`` well past the last
    snapshot before it (the weights of the steps in between were never
    saved), or a ``sigma_rel`` far outside the tracked ones.
    """
    snapshots = list_snapshots(snapshot_dir)
    if not snapshots:
        raise ValueError(f"reconstruct: no snapshot (*.safetensors) in {str(snapshot_dir)!r}")
    rec = solve_weights(snapshots, sigma_rel, step)
    if rec.relative_error > WARN_PROFILE_ERROR:
        warnings.warn(
            f"reconstruct: the closest combination of the snapshots in {str(snapshot_dir)!r} to sigma_rel={sigma_rel} "
            f"at step {rec.step} is {rec.relative_error:.3g} from it (relative L2 norm of the profiles); "
            "the result is a poor approximation", stacklevel=2)
    return combine_snapshots(rec)
