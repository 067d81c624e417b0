"""Training with an exponential moving average of the weights.

:class:`Trainer` trains a classifier with checkpoints, a metrics log and,
with ``"ema": True`` in its training params, an EMA of the weights
(SuperGradients' semantics; see ``docs/training.md``).  :class:`KDTrainer`
does the same for knowledge distillation.  The accepted training params and
their defaults are documented on :class:`TrainingParams`.
"""
from ema_cuda.training.kd import KDLoss, KDModule, KDOutput, KDTrainer
from ema_cuda.training.lr_schedules import LRScheduler
from ema_cuda.training.metrics import MetricTracker
from ema_cuda.training.params import TrainingParams, parse_training_params
from ema_cuda.training.trainer import CKPT_BEST, CKPT_LATEST, Trainer

__all__ = [
    "Trainer",
    "KDTrainer",
    "KDLoss",
    "KDModule",
    "KDOutput",
    "TrainingParams",
    "parse_training_params",
    "LRScheduler",
    "MetricTracker",
    "CKPT_LATEST",
    "CKPT_BEST",
]
