"""Reading and writing training checkpoints.

A checkpoint is a ``dict`` saved with :func:`torch.save`.  The trainer writes
these entries (all of them plain tensors, numbers, strings, lists and dicts,
so that the file loads with ``torch.load(..., weights_only=True)``):

``net``
    the raw (trained) weights, ``model.state_dict()``;
``ema_net``
    the EMA weights, when EMA was on;
``ema_state``
    the full :class:`~ema_cuda.ema.ModelEMA` state (for an exact resume);
``epoch``
    the number of completed epochs;
``acc`` / ``metrics`` / ``best_metric``
    the watched metric of that epoch, all metrics of that epoch, and the best
    watched metric so far;
``optimizer_state_dict``, ``scaler_state_dict``, ``scheduler_state_dict``,
``rng_state``
    everything else a resumed run needs to continue bit-exactly.

:func:`save_checkpoint` writes atomically: the data goes to a temporary file in
the destination directory, which is flushed, fsync'ed and then renamed over
the destination with :func:`os.replace`.  A process killed at any point
leaves either the previous file or the new one, never a torn file.

Every file it writes carries a SHA-256 digest of its own bytes, stored in the
comment field at the end of the zip archive that :func:`torch.save` produces
(so ``torch.load`` and any zip reader still read the file as before).
:func:`load_checkpoint` checks it before unpickling anything: a file damaged
after it was written (one flipped byte is enough) raises
:class:`CheckpointError` instead of loading silently wrong weights.  Files
without a digest (written by ``torch.save`` directly, or by older versions)
still load, with a warning that their damage cannot be detected.
"""
from __future__ import annotations

import hashlib
import os
import struct
import warnings
from pathlib import Path
from typing import IO, Any, Dict, Mapping, Optional, Set, Union

import torch
from torch import nn

from ema_cuda._fs import atomic_write
from ema_cuda._modules import strip_wrapper_prefixes, unwrap_model

__all__ = [
    "CheckpointError",
    "is_dcp_checkpoint",
    "load_dcp_weights",
    "save_checkpoint",
    "load_checkpoint",
    "load_checkpoint_to_model",
    "load_state_dict_into_model",
    "NET_KEY",
    "EMA_NET_KEY",
]

PathLike = Union[str, "os.PathLike[str]"]

NET_KEY = "net"
EMA_NET_KEY = "ema_net"


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read, or does not fit the model."""


# The integrity trailer: the zip archive's comment holds this marker and the
# hex SHA-256 of every byte of the file before the comment.  The end-of-central
# -directory record (22 bytes, signature PK\x05\x06) that precedes the comment
# records the comment's length.  A file has a digest when either the marker or
# a record announcing exactly this comment length sits where it belongs, so
# one damaged byte can never make a file with a digest look like one without.
_DIGEST_MARKER = b"ema_cuda-sha256:"
_TRAILER_LEN = len(_DIGEST_MARKER) + 64
_EOCD_SIG = b"PK\x05\x06"
_EOCD_LEN = 22
_HASH_CHUNK = 1 << 20
_WARNED_NO_DIGEST: Set[str] = set()


def _sha256_of(f: IO[bytes], length: int) -> str:
    h = hashlib.sha256()
    f.seek(0)
    left = length
    while left > 0:
        chunk = f.read(min(_HASH_CHUNK, left))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _append_digest(f: IO[bytes]) -> bool:
    """Records the SHA-256 of the zip archive ``f`` (just written) in its comment; False if it is not one."""
    f.flush()
    size = f.seek(0, os.SEEK_END)
    if size < _EOCD_LEN:
        return False
    f.seek(size - _EOCD_LEN)
    eocd = f.read(_EOCD_LEN)
    # torch.save writes no comment; anything else is a format this does not know.
    if eocd[:4] != _EOCD_SIG or eocd[20:22] != b"\x00\x00":
        return False
    f.seek(size - 2)
    f.write(struct.pack("<H", _TRAILER_LEN))
    f.flush()
    digest = _sha256_of(f, size)
    f.seek(0, os.SEEK_END)
    f.write(_DIGEST_MARKER + digest.encode("ascii"))
    return True


def _verify_digest(f: IO[bytes], path: Path) -> bool:
    """Raises CheckpointError when the recorded digest does not match; False when the file has none."""
    size = f.seek(0, os.SEEK_END)
    trailer = b""
    eocd = b""
    if size >= _TRAILER_LEN + _EOCD_LEN:
        f.seek(size - _TRAILER_LEN - _EOCD_LEN)
        eocd = f.read(_EOCD_LEN)
        trailer = f.read(_TRAILER_LEN)
    has_marker = trailer[: len(_DIGEST_MARKER)] == _DIGEST_MARKER
    has_record = eocd[:4] == _EOCD_SIG and eocd[20:22] == struct.pack("<H", _TRAILER_LEN)
    if not (has_marker or has_record):
        return False
    recorded = trailer[len(_DIGEST_MARKER):]
    actual = _sha256_of(f, size - _TRAILER_LEN)
    if not (has_marker and has_record) or recorded != actual.encode("ascii"):
        shown = recorded.decode("ascii", "replace")
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is damaged: its SHA-256 is {actual}, but {shown!r} was recorded when "
            "it was written (the file changed on disk or in transfer; use another copy or an earlier checkpoint)"
        )
    return True


def _warn_no_digest(path: Path) -> None:
    key = str(path.resolve())
    if key not in _WARNED_NO_DIGEST:
        _WARNED_NO_DIGEST.add(key)
        warnings.warn(
            f"checkpoint file {str(path)!r} has no integrity digest (written by torch.save directly or by an older "
            "ema_cuda): it loaded, but damage to it cannot be detected; save it again with "
            "ema_cuda.checkpoint.save_checkpoint to add one",
            UserWarning,
            stacklevel=3,
        )


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> Path:
    """Write ``state`` to ``path`` atomically, with an integrity digest, and return the path.

    The parent directory is created when missing.  The bytes are written to a
    uniquely named hidden file next to ``path`` (a rename is only atomic within
    one file system), followed by the SHA-256 of the archive (checked by
    :func:`load_checkpoint`), flushed and fsync'ed, then moved over ``path``
    with :func:`os.replace`; finally the directory itself is fsync'ed so that
    the rename survives a power loss.  If anything fails or interrupts the
    write before the rename (``KeyboardInterrupt`` included), the temporary
    file is removed and ``path`` is untouched.  The file still loads with
    plain ``torch.load(path, weights_only=True)``.
    """
    path = Path(path)
    with atomic_write(path, "w+b") as f:
        torch.save(dict(state), f)
        _append_digest(f)
    return path


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises :class:`FileNotFoundError` when the file is missing and
    :class:`CheckpointError` (naming the file) when it cannot be trusted or
    read: bytes that do not match the SHA-256 recorded at save time, a
    truncated or corrupt file, an object ``weights_only`` loading refuses, or
    something that is not a ``dict``.  A file without a digest (written by
    ``torch.save`` directly) loads with a warning, once per file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        # The digest is checked before torch.load sees a byte: unpickling a
        # damaged file can fail anywhere, or worse, succeed with wrong values.
        has_digest = _verify_digest(f, path)
        f.seek(0)
        try:
            checkpoint = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt files
            raise CheckpointError(
                f"could not read checkpoint file {str(path)!r} "
                f"(corrupt, truncated, or not a weights-only torch.save file): {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"checkpoint file {str(path)!r} holds a {type(checkpoint).__name__}, expected a dict with a "
            f"{NET_KEY!r} entry"
        )
    if not has_digest:
        # Only a file that loads is worth the warning: one that does not is
        # an error anyway (a truncated file has lost its digest with its end).
        _warn_no_digest(path)
    return checkpoint


def load_state_dict_into_model(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    source: str = "state dict",
    strict: bool = True,
) -> None:
    """Copy ``state_dict`` into ``model`` in place, with errors that name ``source`` and the key.

    Every shape is checked before anything is copied, so a mismatch leaves the
    model untouched.  With ``strict`` (the default) missing and unexpected
    keys are errors too.  ``source`` is a description used in messages, such
    as ``"checkpoint 'ckpt_best.pth', entry 'ema_net'"``.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source} is a {type(state_dict).__name__}, expected a state dict (a mapping)")
    model = unwrap_model(model)
    own = model.state_dict()
    state_dict = strip_wrapper_prefixes(state_dict, own.keys())
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short_list(unexpected)}")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    for key, value in state_dict.items():
        if key not in own:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}, key {key!r}: expected a tensor, found {type(value).__name__}")
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{source}, key {key!r}: shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(own[key].shape)} in the model"
            )
    # load_state_dict copies into the existing tensors, so storages (and any
    # optimizer or EMA that holds them) stay attached.
    model.load_state_dict(state_dict, strict=strict)


def _short_list(keys, limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"


def load_checkpoint_to_model(
    model: nn.Module,
    path: PathLike,
    load_ema_as_net: bool = False,
    *,
    strict: bool = True,
    map_location: Any = "cpu",
) -> Dict[str, Any]:
    """Load the weights of checkpoint ``path`` into ``model`` in place and return the checkpoint.

    With ``load_ema_as_net=False`` (the default, as in SuperGradients) the
    raw weights under ``net`` are loaded; with ``True`` the EMA weights under
    ``ema_net`` are, and a checkpoint without them is an error.  (To take the
    EMA when there is one and the raw weights otherwise, use
    :func:`ema_cuda.models.get`.)  Errors name the file, the entry and the
    offending key.
    """
    checkpoint = load_checkpoint(path, map_location=map_location)
    key = EMA_NET_KEY if load_ema_as_net else NET_KEY
    if key not in checkpoint or checkpoint[key] is None:
        hint = " (EMA was probably off in that run; load 'net' instead)" if key == EMA_NET_KEY else ""
        raise CheckpointError(
            f"checkpoint file {str(path)!r} has no {key!r} entry{hint}; its entries are {sorted(checkpoint)}"
        )
    load_state_dict_into_model(
        model, checkpoint[key], source=f"checkpoint file {str(path)!r}, entry {key!r}", strict=strict
    )
    return checkpoint


def pick_weights_key(checkpoint: Mapping[str, Any], path: Optional[PathLike] = None) -> str:
    """``"ema_net"`` when the checkpoint holds EMA weights, else ``"net"`` (error if neither)."""
    if checkpoint.get(EMA_NET_KEY) is not None:
        return EMA_NET_KEY
    if checkpoint.get(NET_KEY) is not None:
        return NET_KEY
    where = f"checkpoint file {str(path)!r}" if path is not None else "checkpoint"
    raise CheckpointError(
        f"{where} has neither an {EMA_NET_KEY!r} nor a {NET_KEY!r} entry; its entries are {sorted(checkpoint)}"
    )


# --------------------------------------------------------------------------- DCP checkpoints

#: Where :func:`ema_cuda.sharded.save_sharded_checkpoint` states keep the weights:
#: ``{"model": model.state_dict(), "ema": ema.state_dict(), ...}``.
DCP_NET_PATH = ("model",)
DCP_EMA_PATH = ("ema", "ema")


def _dcp_directory(path: PathLike) -> Optional[Path]:
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    pointer = path / "LATEST"
    if pointer.is_file():
        candidate = path / pointer.read_text().strip()
        if (candidate / ".metadata").is_file():
            return candidate
        raise CheckpointError(f"{str(pointer)!r} names {candidate.name!r}, which holds no complete DCP checkpoint")
    return None


def is_dcp_checkpoint(path: PathLike) -> bool:
    """True for a directory written by ``torch.distributed.checkpoint`` (or a root with a ``LATEST`` file)."""
    path = Path(path)
    return path.is_dir() and ((path / ".metadata").is_file() or (path / "LATEST").is_file())


def load_dcp_weights(path: PathLike, which: str = "ema") -> Dict[str, torch.Tensor]:
    """The full (consolidated) weights of a DCP checkpoint, as a state dict of plain CPU tensors.

    Works in a single process with no process group, whatever number of ranks
    wrote the checkpoint: DCP assembles every tensor from its shards.  ``path``
    is a checkpoint directory or a root written by
    :func:`ema_cuda.sharded.save_sharded_checkpoint` (its ``LATEST`` is
    read).  ``which`` is ``"ema"`` (the EMA weights, saved as
    ``{"ema": ema.state_dict()}``) or ``"net"`` (the raw weights, saved as
    ``{"model": model.state_dict()}``).  Raises :class:`CheckpointError` when
    the checkpoint holds no such weights.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if which not in ("ema", "net"):
        raise ValueError(f"load_dcp_weights: which must be 'ema' or 'net', got {which!r}")
    directory = _dcp_directory(path)
    if directory is None:
        raise FileNotFoundError(f"{str(path)!r} is not a DCP checkpoint directory (no .metadata, no LATEST)")
    prefix = DCP_EMA_PATH if which == "ema" else DCP_NET_PATH
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    paths = metadata.planner_data or {}
    templates: Dict[str, torch.Tensor] = {}
    names: Dict[str, str] = {}
    for flat_key, meta in metadata.state_dict_metadata.items():
        where = tuple(paths.get(flat_key, (flat_key,)))
        if len(where) == len(prefix) + 1 and where[: len(prefix)] == prefix and isinstance(meta, TensorStorageMetadata):
            templates[flat_key] = torch.empty(meta.size, dtype=meta.properties.dtype)
            names[flat_key] = where[-1]
    if not templates:
        raise CheckpointError(
            f"DCP checkpoint {str(directory)!r} holds no {which} weights under {'.'.join(prefix)!r}; "
            f"its entries start with {sorted({str(p[0]) for p in paths.values()})}"
        )
    with warnings.catch_warnings():
        # DCP warns that it assumes a single process even when told so.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(templates, checkpoint_id=directory, no_dist=True)
    return {names[k]: v for k, v in templates.items()}
