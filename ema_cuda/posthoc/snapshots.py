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

NOTE [packed snapshots]: a snapshot's tensors are copied into one byte buffer
(:func:`pack_state`, one ``cat`` per dtype) and serialised by safetensors from
that buffer (:func:`serialize_packed`: no copy and no torch call per tensor).  For
:class:`~ema_cuda.PostHocEMA` on the CPU both run on the training thread and
the background thread only writes the bytes: serialising is Python work under
the interpreter lock, and on the writer thread the training thread waited for
it at every lock hand-over, several times its own length (measured in
docs/posthoc.md).  From CUDA the copy to pinned memory is asynchronous and the
writer serialises once it has landed.  Tensors are ordered by element size,
largest first, so that each view starts at a multiple of its element size.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch

from ema_cuda._fs import atomic_write
from ema_cuda.posthoc.profiles import gamma_to_sigma_rel

__all__ = ["FORMAT", "PackedState", "SnapshotInfo", "list_snapshots", "pack_state", "read_snapshot",
           "read_snapshot_info", "serialize_packed", "snapshot_filename", "write_packed", "write_snapshot"]

FORMAT = "ema_cuda.posthoc/1"
PathLike = Union[str, "os.PathLike[str]"]


class PackedState(NamedTuple):
    """A state_dict's tensors copied into one byte buffer (NOTE [packed snapshots]).

    ``entries`` holds ``(key, dtype, shape, begin, end)`` per key, the byte
    range of its row-major values in ``data`` (a 1-D ``uint8`` tensor).
    """

    data: torch.Tensor
    entries: Tuple[Tuple[str, torch.dtype, Tuple[int, ...], int, int], ...]

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The state_dict again: views of ``data`` (each entry starts at a multiple of its element size)."""
        return {key: self.data[begin:end].view(dtype).view(shape) for key, dtype, shape, begin, end in self.entries}


def pack_state(state_dict: Mapping[str, torch.Tensor]) -> PackedState:
    """Copies ``state_dict``'s tensors into one new byte buffer, on their device (a tied tensor once per key).

    Tensors on several devices are gathered on the CPU.
    """
    # One allocation and one cat per dtype (of flat views, whatever their strides) into its part of the buffer: few
    # dispatcher calls per tensor and no intermediate copy, as this runs on the training thread.
    several_devices = len({t.device for t in state_dict.values()}) > 1
    groups: Dict[torch.dtype, List[Tuple[str, torch.Tensor]]] = {}
    for key, t in state_dict.items():
        groups.setdefault(t.dtype, []).append((key, t.cpu() if several_devices else t))
    device = next(iter(state_dict.values())).device if state_dict and not several_devices else torch.device("cpu")
    entries, parts, begin = [], [], 0
    for dtype in sorted(groups, key=lambda d: -d.itemsize):
        start = begin
        for key, t in groups[dtype]:
            end = begin + t.numel() * dtype.itemsize
            entries.append((key, dtype, tuple(t.shape), begin, end))
            begin = end
        parts.append((dtype, start, begin))
    data = torch.empty(begin, dtype=torch.uint8, device=device)
    with torch.no_grad():
        for dtype, start, end in parts:
            torch.cat([t.reshape(-1) for _, t in groups[dtype]], out=data[start:end].view(dtype))
    return PackedState(data, tuple(entries))


def serialize_packed(packed: PackedState, metadata: Dict[str, str]) -> bytes:
    """A :class:`PackedState` on the CPU and string ``metadata`` as the bytes of a safetensors file.

    safetensors' serializer reads each tensor from its range of the packed
    buffer (its ``TensorSpec`` API: no copy and no torch call per tensor;
    with a safetensors release without it, from views of the buffer).
    """
    try:
        from safetensors import TensorSpec, serialize
    except ImportError:  # a safetensors release before TensorSpec
        from safetensors.torch import save

        return save(packed.tensors(), metadata=metadata)
    # The specs point into packed.data, which the argument keeps alive through the call.
    base = packed.data.data_ptr()
    specs = {key: TensorSpec(dtype=str(dtype).rpartition(".")[2], shape=list(shape), data_ptr=base + begin,
                             data_len=end - begin)
             for key, dtype, shape, begin, end in packed.entries}
    return bytes(serialize(specs, metadata=metadata))


def write_packed(path: PathLike, packed: Union[PackedState, bytes], metadata: Optional[Dict[str, str]] = None) -> Path:
    """Writes a snapshot to ``path`` atomically: a :class:`PackedState` on the CPU with its string ``metadata``,
    or the bytes :func:`serialize_packed` made of them."""
    data = packed if isinstance(packed, bytes) else serialize_packed(packed, metadata)
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


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
    metadata = snapshot_metadata(path, step=step, gamma=gamma, sigma_rel=sigma_rel)
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"write_snapshot({str(Path(path))!r}): state_dict[{key!r}] is a {type(value).__name__}, "
                            "not a tensor")
    packed = pack_state(state_dict)
    if packed.data.is_cuda:
        packed = packed._replace(data=packed.data.cpu())
    return write_packed(path, packed, metadata)


def snapshot_metadata(path: PathLike, *, step: int, gamma: float, sigma_rel: float) -> Dict[str, str]:
    """The metadata strings of a snapshot, checked (errors name ``path``)."""
    step, gamma, sigma_rel = _checked_metadata(f"write_snapshot({str(Path(path))!r})", step, gamma, sigma_rel)
    return {"format": FORMAT, "step": str(step), "gamma": repr(gamma), "sigma_rel": repr(sigma_rel)}


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
