"""EMA of the student of a distillation module: :class:`ModelEMA` with the student tree adapter."""
from __future__ import annotations

from ema_cuda.ema.model_ema import ModelEMA
from ema_cuda.ema.trees import StudentTree

__all__ = ["KDModelEMA"]


class KDModelEMA(ModelEMA):
    """EMA of the student of a knowledge-distillation module (one with ``.student`` and ``.teacher``).

    Use it in place of :class:`ModelEMA` when training a student against a
    frozen teacher: only the student is copied and averaged.  ``ema.ema`` is a
    shallow copy of the distillation module whose ``student`` is the EMA
    student and whose ``teacher`` is the model's own teacher (shared, not
    copied), so it runs like the training module.  :meth:`update`,
    :meth:`swapped` and :meth:`copy_to` pass the distillation module (possibly
    wrapped) and touch its student only; the teacher's tensors are never
    written (SuperGradients rewrites them with ``t * d + t * (1 - d)`` at every
    update, which drifts by rounding).
    """

    _tree_type = StudentTree


KDModelEMA.__module__ = "ema_cuda.ema"  # NOTE [pickled path] in model_ema.py
