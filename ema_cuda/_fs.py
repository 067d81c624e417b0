"""One atomic file write for the whole package (checkpoints, the ``LATEST`` pointer, the metrics log).

:func:`atomic_write` yields a file object for a hidden temporary file next to
the destination; when the ``with`` block ends normally the file is flushed,
fsync'ed and renamed over the destination with :func:`os.replace` (atomic
within one file system), and the directory is fsync'ed so that the rename
survives a power loss.  When the block raises anything at all, including
``KeyboardInterrupt`` and ``SystemExit``, the temporary file is removed and
the exception propagates, so the destination keeps its previous content and
no ``.tmp`` file is left behind.  A process killed outright (SIGKILL, power
loss) can only leave the temporary file, never a torn destination.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Dict, Iterator, Mapping, Union

__all__ = ["atomic_write", "fsync_directory", "temporary_name", "write_safetensors"]

PathLike = Union[str, "os.PathLike[str]"]


def temporary_name(path: Path) -> Path:
    """``.<name>.<pid>.<random>.tmp`` next to ``path``: hidden, unique per writer, recognisable as debris."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def fsync_directory(directory: PathLike) -> None:
    """Makes a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
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


@contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Writes ``path`` atomically: yields the temporary file, renames it into place on success.

    ``mode`` is ``"wb"``, ``"w+b"`` (the writer may read back what it wrote,
    e.g. to hash it) or ``"w"`` (text, UTF-8).  The parent directory is
    created when missing.  The file gets the permissions of any file the
    user creates (``0o666`` minus the umask), unlike ``tempfile.mkstemp``'s
    ``0o600``.
    """
    if mode not in ("wb", "w+b", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb', 'w+b' or 'w', got {mode!r}")
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    flags = (os.O_RDWR if "+" in mode else os.O_WRONLY) | os.O_CREAT | os.O_EXCL
    fd = os.open(tmp, flags, 0o666)
    try:
        # BaseException, not Exception: a KeyboardInterrupt in the middle of
        # a long checkpoint write must not leave the temporary file behind.
        try:
            f = os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {}))
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)


def write_safetensors(path: PathLike, tensors: Mapping[str, Any], metadata: Dict[str, str]) -> Path:
    """Writes ``tensors`` (from any device) and string ``metadata`` to ``path`` as safetensors, atomically.

    Each tensor is written from its own contiguous CPU copy: safetensors
    refuses tensors whose memory overlaps, and an EMA's tensors are views of
    shared flat buffers, a tied weight one tensor under several keys (the
    file then holds it once per key).  safetensors is imported on first use.
    """
    import torch
    from safetensors.torch import save

    copies = {key: torch.empty(t.shape, dtype=t.dtype).copy_(t.detach()) for key, t in tensors.items()}
    data = save(copies, metadata=metadata)
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)
