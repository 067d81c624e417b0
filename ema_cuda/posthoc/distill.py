"""Post-hoc EMA of the student of a knowledge-distillation module."""
from __future__ import annotations

from typing import Any

from torch import nn

from ema_cuda.ema.trees import StudentTree
from ema_cuda.posthoc.ema import PostHocEMA


class KDPostHocEMA(PostHocEMA):
    """:class:`PostHocEMA` of the student of a distillation module (one with ``.student`` and ``.teacher``), as
    :class:`~ema_cuda.ema.KDModelEMA` is :class:`~ema_cuda.ModelEMA`'s.

    Every profile, snapshot and state entry holds the student's tensors only
    (its own keys, so a snapshot or a reconstruction loads into a bare
    student); :meth:`update`, :meth:`swapped` and :meth:`copy_to` take the
    distillation module (possibly wrapped) and touch its student only.
    :attr:`ema` is a shallow copy of the distillation module whose
    ``student`` is the first profile and whose ``teacher`` is the model's
    own (shared, never copied or averaged); :attr:`emas` are the students.
    """

    _tree_type = StudentTree

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any):
        super().__init__(model, *args, **kwargs)
        self._shell = self._tree.wrap(model, self.emas[0])

    @property
    def ema(self) -> nn.Module:
        """The distillation module holding the first profile's student (what the KDTrainer validates)."""
        return self._shell


KDPostHocEMA.__module__ = "ema_cuda.posthoc"
