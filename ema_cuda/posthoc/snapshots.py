"""Snapshot files of power-function EMA profiles: one safetensors file per profile and step.

A snapshot holds an EMA's tensors and, in the file's metadata (strings, as
safetensors requires), what reconstruction needs to know about it::

    format     "ema_cuda.posthoc/1"
    step       the number of updates the EMA had seen, an integer >= 1
    gamma      the profile's exponent, repr of a float
    sigma_rel  its relative width, repr of a float (agrees with gamma)

Files are written atomically (a temporary file renamed into place), so a
directory being written to by a training run only ever holds whole snapshots.
safetensors is imported on first use.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Tuple, Union

import torch

from ema_cuda._fs import write_safetensors
from ema_cuda.posthoc.profiles import gamma_to_sigma_rel

__all__ = ["FORMAT", "SnapshotInfo", "list_snapshots", "read_snapshot", "read_snapshot_info", "snapshot_filename",
           "write_snapshot"]

FORMAT = "ema_cuda.posthoc/1"
PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot file's metadata says: the step, the profile and the file."""

    step: int
    gamma: float
    sigma_rel: float
    path: Path


def snapshot_filename(step: int, sigma_rel: float) -> str:
    """A name that sorts by profile, then step: ``ema-0.100000-000001000.safetensors``."""
    return f"ema-{sigma_rel:.6f}-{int(step):09d}.safetensors"


def _checked_metadata(where: str, step, gamma, sigma_rel) -> Tuple[int, float, float]:
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{where}: step must be an integer >= 1, got {step!r}")
    try:
        expected = gamma_to_sigma_rel(gamma)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not math.isfinite(sigma_rel):
        raise ValueError(f"{where}: sigma_rel must be a finite number, got {sigma_rel!r}")
    if not math.isclose(sigma_rel, expected, rel_tol=1e-6):
        raise ValueError(f"{where}: sigma_rel={sigma_rel!r} does not match gamma={gamma!r} (sigma_rel {expected!r})")
    return step, float(gamma), float(sigma_rel)


def write_snapshot(path: PathLike, state_dict: Mapping[str, torch.Tensor], *, step: int, gamma: float,
                   sigma_rel: float) -> Path:
    """Writes ``state_dict`` with its profile's ``step``, ``gamma`` and ``sigma_rel`` to ``path``, atomically.

    Tensors are saved as they are (dtype and shape), from any device; tied
    weights and views of one buffer (an EMA's state) are fine.  Returns the path.
    """
    path = Path(path)
    where = f"write_snapshot({str(path)!r})"
    step, gamma, sigma_rel = _checked_metadata(where, step, gamma, sigma_rel)
    tensors: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        tensors[key] = value
    metadata = {"format": FORMAT, "step": str(step), "gamma": repr(gamma), "sigma_rel": repr(sigma_rel)}
    return write_safetensors(path, tensors, metadata)


def _parse(path: Path, metadata) -> SnapshotInfo:
    where = f"snapshot {str(path)!r}"
    if not metadata or metadata.get("format") != FORMAT:
        raise ValueError(f"{where}: not an ema_cuda post-hoc snapshot (metadata format is "
                         f"{(metadata or {}).get('format')!r}, expected {FORMAT!r})")
    try:
        step, gamma, sigma_rel = int(metadata["step"]), float(metadata["gamma"]), float(metadata["sigma_rel"])
    except KeyError as e:
        raise ValueError(f"{where}: metadata lacks {e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"{where}: unreadable metadata {dict(metadata)!r} ({e})") from None
    step, gamma, sigma_rel = _checked_metadata(where, step, gamma, sigma_rel)
    return SnapshotInfo(step, gamma, sigma_rel, path)


def read_snapshot_info(path: PathLike) -> SnapshotInfo:
    """The metadata of one snapshot file, validated (errors name the file); reads no tensor data."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"snapshot {str(path)!r}: cannot be read as safetensors ({e})") from e
    return _parse(path, metadata)


def read_snapshot(path: PathLike) -> Tuple[SnapshotInfo, Dict[str, torch.Tensor]]:
    """One snapshot file's metadata (validated) and tensors (on the CPU)."""
    from safetensors.torch import load_file

    info = read_snapshot_info(path)
    return info, load_file(str(info.path))


def list_snapshots(directory: PathLike) -> List[SnapshotInfo]:
    """Every ``*.safetensors`` snapshot of ``directory``, sorted by step, then sigma_rel, then file name.

    A file that is not a valid snapshot is an error naming it; hidden files
    (the temporary files of writes in progress) are not looked at.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"snapshot directory {str(directory)!r} does not exist or is not a directory")
    infos = [read_snapshot_info(p) for p in directory.glob("*.safetensors") if not p.name.startswith(".")]
    return sorted(infos, key=lambda i: (i.step, i.sigma_rel, i.path.name))
