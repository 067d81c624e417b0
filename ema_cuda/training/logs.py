"""Per-epoch metrics log (JSON lines), TensorBoard events, the epoch summary line and optional tqdm bars.

tqdm and TensorBoard are imported only when a run uses them, so importing
``ema_cuda`` stays light.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ema_cuda._fs import atomic_write

__all__ = ["MetricsLog", "METRICS_LOG_NAME", "TensorBoardLog", "TENSORBOARD_DIR", "summary_writer_class", "progress",
           "format_epoch_summary", "emit"]

logger = logging.getLogger("ema_cuda.training")

METRICS_LOG_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; write null so the file stays parseable by strict readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """``metrics.jsonl`` beside the checkpoints: one JSON object per completed epoch.

    Each line has ``epoch`` (completed epochs, 1-based), ``lr``, the train
    metrics (``train_loss``, ``train_accuracy``) and the validation metrics
    (``valid_loss``, ``valid_accuracy``: the EMA weights when EMA is on;
    ``valid_raw_loss``, ``valid_raw_accuracy``: the raw weights).
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / METRICS_LOG_NAME

    def reset(self) -> None:
        if self.path.exists():
            self.path.unlink()

    def truncate_after(self, epoch: int) -> None:
        """Drop lines of epochs after ``epoch`` (written after the checkpoint a run resumes from)."""
        if not self.path.exists():
            return
        kept = [line for line in self.read() if int(line.get("epoch", 0)) <= epoch]
        # Atomic: the log of the epochs kept must survive an interrupted rewrite.
        with atomic_write(self.path, "w") as f:
            for line in kept:
                f.write(json.dumps(line) + "\n")

    def append(self, record: Dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")
            f.flush()

    def read(self) -> List[Dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    # A line cut short by a kill; everything before it is intact.
                    break
        return out


def summary_writer_class(setting: Optional[bool]) -> Any:
    """``torch.utils.tensorboard.SummaryWriter`` for the ``tensorboard`` training param, or None (off).

    ``None`` turns logging on when TensorBoard is installed and logs one INFO
    line when it is not; ``True`` makes a missing TensorBoard an error.
    """
    if setting is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if setting:
            raise ImportError(
                f"training param 'tensorboard' is True but TensorBoard cannot be imported ({exc}); "
                "pip install tensorboard, or set 'tensorboard': False"
            ) from None
        logger.info("TensorBoard logging is off: the tensorboard package is not installed (pip install tensorboard)")
        return None
    return SummaryWriter


class TensorBoardLog:
    """TensorBoard events of a run, under ``<run_dir>/tensorboard/``: two runs, ``raw`` and ``ema``.

    Tags (the x axis is SuperGradients' step, the 1-based global batch
    index, which the EMA's schedule also sees; per-epoch values sit at the
    step of the epoch's last batch):

    * ``raw``: ``train/loss`` and ``train/lr`` per batch, ``train/epoch_loss``
      and ``train/epoch_accuracy`` per epoch, and ``val/<metric>`` of the raw
      weights per epoch (all validation metrics when there is no EMA).
    * ``ema``: ``val/<metric>`` of the EMA weights per epoch and
      ``ema/decay``, the decay each EMA update applied, at its step.

    NOTE [raw and EMA side by side]: TensorBoard draws one chart per tag and
    one line per run in it, so the raw and the EMA weights' ``val/accuracy``,
    written by two runs under the same tag, share one chart in the default
    Scalars dashboard, with the run names as the legend and the usual run
    filter; two tags (``val/accuracy``, ``val_ema/accuracy``) would be two
    charts.

    Per-batch values are kept as tensors and written once per epoch
    (:meth:`flush_steps`), so logging adds no host synchronisation per batch.
    A resumed run opens the writers with ``purge_step`` at the first step
    after its checkpoint, so that TensorBoard drops what a killed run wrote
    after it: no step appears twice.
    """

    def __init__(self, writer_class: Any, directory: Path, has_ema: bool, purge_step: Optional[int]):
        self.directory = Path(directory) / TENSORBOARD_DIR
        if purge_step is None and self.directory.exists():
            # A new run replaces an earlier one's events, as it does its metrics log.
            shutil.rmtree(self.directory)
        self.raw = writer_class(str(self.directory / "raw"), purge_step=purge_step)
        self.ema = writer_class(str(self.directory / "ema"), purge_step=purge_step) if has_ema else None
        self._steps: List[Tuple[int, Any, float]] = []
        self._decays: List[Tuple[int, Any]] = []

    @classmethod
    def open(cls, setting: Optional[bool], directory: Path, has_ema: bool,
             purge_step: Optional[int]) -> Optional["TensorBoardLog"]:
        """The log of the ``tensorboard`` training param ``setting``, or None when it is off (see
        :func:`summary_writer_class`); ``purge_step`` is None for a new run, the first step to write for a
        resumed one."""
        writer_class = summary_writer_class(setting)
        return None if writer_class is None else cls(writer_class, directory, has_ema, purge_step)

    def add_step(self, step: int, loss: Any, lr: float) -> None:
        """A batch's loss (a tensor or a number) and learning rate, written at the next :meth:`flush_steps`."""
        self._steps.append((step, loss.detach() if hasattr(loss, "detach") else loss, float(lr)))

    def add_decay(self, step: int, decay: Any) -> None:
        """The decay an EMA update at ``step`` applied (a number, or a device tensor read at the next flush)."""
        self._decays.append((step, decay))

    def flush_steps(self) -> None:
        """Writes the per-batch values kept since the last call (one read from the device for all of them)."""
        steps, decays = self._steps, self._decays
        self._steps, self._decays = [], []
        for (step, _, lr), loss in zip(steps, _as_floats([loss for _, loss, _ in steps])):
            self.raw.add_scalar("train/loss", loss, step)
            self.raw.add_scalar("train/lr", lr, step)
        if self.ema is not None:
            for (step, _), decay in zip(decays, _as_floats([d for _, d in decays])):
                self.ema.add_scalar("ema/decay", decay, step)

    def add_epoch(self, step: int, record: Dict[str, Any], has_ema: bool) -> None:
        """An epoch's metrics (the keys of :class:`MetricsLog` lines) at ``step``, its last batch."""
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key.startswith("train_"):
                self.raw.add_scalar(f"train/epoch_{key[len('train_'):]}", value, step)
            elif key.startswith("valid_raw_"):
                self.raw.add_scalar(f"val/{key[len('valid_raw_'):]}", value, step)
            elif key.startswith("valid_"):
                writer = self.ema if has_ema and self.ema is not None else self.raw
                writer.add_scalar(f"val/{key[len('valid_'):]}", value, step)
        self.flush()

    def flush(self) -> None:
        for writer in (self.raw, self.ema):
            if writer is not None:
                writer.flush()

    def close(self) -> None:
        """Writes what is kept and closes the event files; also after a failed epoch (its steps help to see why)."""
        try:
            self.flush_steps()
        finally:
            for writer in (self.raw, self.ema):
                if writer is not None:
                    writer.close()


def _as_floats(values: List[Any]) -> List[float]:
    """Numbers and 0-dim tensors as floats, reading the tensors of each device back in one transfer."""
    out: List[Any] = list(values)
    by_device: Dict[Any, List[int]] = {}
    for i, v in enumerate(values):
        if hasattr(v, "device"):
            by_device.setdefault(v.device, []).append(i)
    if by_device:
        import torch

        for indices in by_device.values():
            read = torch.stack([values[i].reshape(()).double() for i in indices]).tolist()
            for i, v in zip(indices, read):
                out[i] = v
    return [float(v) for v in out]


def progress(iterable: Iterable, enabled: bool, **kwargs: Any):
    """``tqdm(iterable, **kwargs)`` when enabled and tqdm is installed, else ``iterable``."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress_bar=True but tqdm is not installed; training without progress bars",
                      RuntimeWarning, stacklevel=2)
        return iterable
    return tqdm(iterable, **kwargs)


def emit(message: str, use_tqdm: bool) -> None:
    """Print a line without breaking an active tqdm bar, and log it at INFO."""
    logger.info(message)
    if use_tqdm:
        try:
            from tqdm.auto import tqdm

            tqdm.write(message)
            return
        except ImportError:
            pass
    print(message, flush=True)


def _fmt(v: Optional[float], pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{100 * v:.2f}%" if pct else f"{v:.4f}"


def format_epoch_summary(record: Dict[str, Any], max_epochs: int, has_ema: bool, best: bool) -> str:
    parts = [f"epoch {record['epoch']}/{max_epochs}", f"lr {record['lr']:.3g}",
             f"train loss {_fmt(record.get('train_loss'))} acc {_fmt(record.get('train_accuracy'), True)}"]
    if has_ema:
        if "valid_raw_accuracy" in record:
            parts.append(f"valid acc raw {_fmt(record.get('valid_raw_accuracy'), True)}")
        parts.append(f"EMA {_fmt(record.get('valid_accuracy'), True)} (loss {_fmt(record.get('valid_loss'))})")
    else:
        parts.append(f"valid loss {_fmt(record.get('valid_loss'))} acc {_fmt(record.get('valid_accuracy'), True)}")
    if best:
        parts.append("* best")
    return " | ".join(parts)
