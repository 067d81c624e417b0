"""Per-epoch metrics log (JSON lines), the epoch summary line and optional tqdm bars.

tqdm is imported only when a progress bar is requested, so importing
``ema_cuda`` stays light.
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from ema_cuda._fs import atomic_write

__all__ = ["MetricsLog", "METRICS_LOG_NAME", "progress", "format_epoch_summary", "emit"]

logger = logging.getLogger("ema_cuda.training")

METRICS_LOG_NAME = "metrics.jsonl"


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
