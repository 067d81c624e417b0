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
"""
from __future__ import annotations

import os
import secrets
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

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


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> Path:
    """Write ``state`` to ``path`` atomically and return the path.

    The parent directory is created when missing.  The bytes are written to a
    uniquely named hidden file next to ``path`` (a rename is only atomic within
    one file system), flushed and fsync'ed, then moved over ``path`` with
    :func:`os.replace`; finally the directory itself is fsync'ed so that the
    rename survives a power loss.  If anything fails before the rename, the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open with an explicit mode (rather than tempfile.mkstemp, which uses
    # 0600) so that the final file gets the same permissions as any file the
    # user creates.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)
    return path


def _fsync_directory(directory: Path) -> None:
    # Not every platform lets a directory be opened (Windows does not); the
    # rename is still atomic there, only its durability is weaker.
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises :class:`FileNotFoundError` when the file is missing and
    :class:`CheckpointError` (naming the file) when it cannot be read: a
    truncated or corrupt file, an object ``weights_only`` loading refuses, or
    something that is not a ``dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
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
    return checkpoint


def _unwrap(model: nn.Module) -> nn.Module:
    # One level of DataParallel / DistributedDataParallel, as the EMA does.
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def _adapt_prefix(state_dict: Mapping[str, Any], model_keys) -> Dict[str, Any]:
    """Remove a ``module.`` prefix left by DataParallel/DDP when the model has none."""
    keys = list(state_dict.keys())
    if keys and all(k.startswith("module.") for k in keys) and not any(k.startswith("module.") for k in model_keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


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
    model = _unwrap(model)
    own = model.state_dict()
    state_dict = _adapt_prefix(state_dict, own.keys())
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
