"""Post-hoc EMA (Karras et al., EDM2): power-function profiles, snapshots, and reconstruction of any profile.

* :func:`sigma_rel_to_gamma`, :func:`gamma_to_sigma_rel`, and the schedule
  :class:`PowerFunctionDecay` (``EMA_DECAY_FUNCTIONS["power_function"]``);
* :func:`write_snapshot`, :func:`read_snapshot`, :func:`list_snapshots`:
  safetensors files of a profile's EMA with its step, gamma and sigma_rel;
* :func:`reconstruct`: the EMA of another profile from a directory of
  snapshots; ``python -m ema_cuda.posthoc`` lists and reconstructs;
* :class:`PostHocEMA`: several profiles of one model updated in one fused
  call, with snapshots written in the background; :class:`KDPostHocEMA`
  the same for the student of a distillation module.

See docs/posthoc.md.
"""
from ema_cuda.posthoc.profiles import GAMMA_MIN, SIGMA_REL_MAX, PowerFunctionDecay, gamma_to_sigma_rel, sigma_rel_to_gamma
from ema_cuda.posthoc.ema import PostHocEMA
from ema_cuda.posthoc.distill import KDPostHocEMA
from ema_cuda.posthoc.reconstruct import Reconstruction, combine_snapshots, profile_inner_product, reconstruct, solve_weights
from ema_cuda.posthoc.snapshots import (
    SnapshotInfo,
    list_snapshots,
    read_snapshot,
    read_snapshot_info,
    snapshot_filename,
    write_snapshot,
)

__all__ = [
    "GAMMA_MIN", "KDPostHocEMA", "SIGMA_REL_MAX", "PostHocEMA", "PowerFunctionDecay", "Reconstruction", "SnapshotInfo", "combine_snapshots",
    "gamma_to_sigma_rel",
    "list_snapshots", "profile_inner_product", "read_snapshot", "read_snapshot_info", "reconstruct",
    "sigma_rel_to_gamma", "snapshot_filename", "solve_weights", "write_snapshot",
]
