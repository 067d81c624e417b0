"""An EMA's weights as a safetensors file, with what ``load_state_dict`` needs in the file's metadata.

The tensors are the entries of ``state_dict()["ema"]`` under their keys (the
averaged module's ``state_dict`` keys), so ``safetensors.torch.load_file``
reads them and ``model.load_state_dict(..., strict=True)`` takes them.  The
metadata (strings, as safetensors requires) holds::

    format           "pt" (what loaders of PyTorch safetensors files, such as
                     transformers, expect to find)
    ema_cuda.format  "ema_cuda.ema/1", the tag this module checks on load
    <key>            every other entry of ``state_dict()`` (decay,
                     decay_function, buffers, ema_dtype, update_every,
                     skip_nonfinite, async_update, num_updates, num_skipped,
                     step, version), each encoded as JSON

Files are written atomically (see :mod:`ema_cuda._fs`); safetensors is
imported on first use.
"""
from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any, Dict, Union

from ema_cuda._fs import write_safetensors

__all__ = ["FORMAT", "FORMAT_KEY", "STATE_KEYS", "save_ema_safetensors", "read_ema_state", "load_ema_safetensors"]

FORMAT_KEY = "ema_cuda.format"
FORMAT = "ema_cuda.ema/1"
#: The entries of ``state_dict()`` besides the weights that a file must hold (``async_update`` is informative:
#: ``load_state_dict`` keeps the EMA's own).
STATE_KEYS = ("version", "decay", "decay_function", "buffers", "ema_dtype", "update_every", "skip_nonfinite",
              "num_updates", "num_skipped", "step")
_RESERVED = ("format", FORMAT_KEY)

PathLike = Union[str, "os.PathLike[str]"]


def _json_number(value: Any) -> Any:
    # Schedules may keep numpy scalars among their parameters; JSON knows Python's numbers only.
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{type(value).__name__} {value!r} is not a JSON value")


def _refuse_sharded(ema: Any, method: str) -> None:
    from ema_cuda.ema.trees import ShardedTree

    if isinstance(ema._tree, ShardedTree):
        raise NotImplementedError(
            f"{type(ema).__name__}.{method}: each rank holds only its shards of the EMA; use "
            "ema_cuda.sharded.save_sharded_checkpoint and load_sharded_checkpoint (torch.distributed.checkpoint)"
        )


def save_ema_safetensors(ema: Any, path: PathLike) -> Path:
    """Writes ``ema.state_dict()`` to ``path`` as a safetensors file, atomically (see the module docstring)."""
    _refuse_sharded(ema, "save_safetensors")
    path = Path(path)
    where = f"{type(ema).__name__}.save_safetensors({str(path)!r})"
    state = ema.state_dict()
    tensors = state.pop("ema")  # views of flat buffers, tied keys: write_safetensors copies each
    metadata = {"format": "pt", FORMAT_KEY: FORMAT}
    for key, value in state.items():
        try:
            metadata[key] = json.dumps(value, default=_json_number, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{where}: state_dict()[{key!r}] cannot be saved as JSON ({e})") from None
    return write_safetensors(path, tensors, metadata)


def read_ema_state(path: PathLike, name: str = "ModelEMA") -> Dict[str, Any]:
    """The ``state_dict`` saved in ``path`` (weights on the CPU), its metadata checked; errors name the file."""
    from safetensors import safe_open

    path = Path(path)
    where = f"{name}.load_safetensors({str(path)!r})"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            weights = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{where}: cannot be read as safetensors ({e})") from e
    if metadata.get(FORMAT_KEY) != FORMAT:
        raise ValueError(f"{where}: not an EMA saved by save_safetensors (metadata {FORMAT_KEY!r} is "
                         f"{metadata.get(FORMAT_KEY)!r}, expected {FORMAT!r})")
    missing = [key for key in STATE_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"{where}: metadata lacks {', '.join(repr(k) for k in missing)}")
    state: Dict[str, Any] = {"ema": weights}
    for key, text in metadata.items():
        if key in _RESERVED:
            continue
        try:
            state[key] = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{where}: metadata {key!r} is not JSON: {text!r} ({e})") from None
    return state


def load_ema_safetensors(ema: Any, path: PathLike) -> None:
    """Loads a file of :func:`save_ema_safetensors` into ``ema`` through ``ema.load_state_dict``.

    Every check (the file, its metadata, then the weights and options in
    ``load_state_dict``) runs before anything is written.
    """
    _refuse_sharded(ema, "load_safetensors")
    name = type(ema).__name__
    state = read_ema_state(path, name)
    try:
        ema.load_state_dict(state)
    except (ValueError, RuntimeError, TypeError) as e:
        if type(e) not in (ValueError, RuntimeError, TypeError):
            raise
        # load_state_dict's messages name the entry; this adds the file.
        raise type(e)(f"{name}.load_safetensors({str(Path(path))!r}): {e}") from e
