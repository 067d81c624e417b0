"""Knowledge distillation: a student learns from a frozen teacher, with an EMA of the student.

``KDTrainer.train(student, teacher, training_params, train_loader,
valid_loader)`` wraps both in a :class:`KDModule` whose forward returns a
:class:`KDOutput` ``(student_output, teacher_output)``.  The teacher is put
in eval mode, gets ``requires_grad=False`` and runs under ``no_grad``; the
optimizer sees only the student's parameters.  With EMA on, a
:class:`~ema_cuda.ema.KDModelEMA` averages the student only (the teacher is
never written); with ``decay_type="posthoc"`` a
:class:`~ema_cuda.posthoc.KDPostHocEMA` keeps the student's profiles and
snapshots.  Checkpoints hold the student: ``net`` its raw weights,
``ema_net`` its EMA weights, so ``models.get(student_arch,
checkpoint_path=...)`` loads the distilled student directly.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ema_cuda._modules import unwrap_model
from ema_cuda.training.task import ClassificationTask
from ema_cuda.training.trainer import Trainer

__all__ = ["KDTrainer", "KDTask", "KDModule", "KDOutput", "KDLoss"]


class KDOutput(NamedTuple):
    """The outputs of a :class:`KDModule`: the student's logits and the teacher's."""

    student_output: torch.Tensor
    teacher_output: torch.Tensor


class KDModule(nn.Module):
    """A student and a frozen teacher; ``forward`` returns :class:`KDOutput`.

    The teacher is kept in eval mode whatever ``train()`` is called with, so
    its batch-norm statistics and dropout never change.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = teacher
        teacher.requires_grad_(False)
        teacher.eval()

    def train(self, mode: bool = True) -> "KDModule":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x: Any) -> KDOutput:
        student_out = self.student(x)
        with torch.no_grad():
            teacher_out = self.teacher(x)
        return KDOutput(student_out, teacher_out)


class KDLoss(nn.Module):
    """Hinton et al.'s distillation loss plus a hard-label term.

    ``loss = distillation_weight * T^2 * KL(softmax(t / T) || softmax(s / T))
    + (1 - distillation_weight) * CE(s, targets)``, with the KL divergence
    averaged over the batch (``batchmean``) and ``T = temperature``.  The
    ``T^2`` factor keeps the soft term's gradients on the scale of the hard
    term's when the temperature changes.  ``label_smoothing`` applies to the
    hard term.
    """

    def __init__(self, temperature: float = 4.0, distillation_weight: float = 0.5, label_smoothing: float = 0.0):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"KDLoss: temperature must be > 0, got {temperature!r}")
        if not (isinstance(distillation_weight, (int, float)) and 0.0 <= distillation_weight <= 1.0):
            raise ValueError(f"KDLoss: distillation_weight must be in [0, 1], got {distillation_weight!r}")
        self.temperature = float(temperature)
        self.distillation_weight = float(distillation_weight)
        self.hard_loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, output: KDOutput, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, KDOutput):
            raise TypeError(f"KDLoss expects a KDOutput (student_output, teacher_output), got {type(output).__name__}")
        s = output.student_output.float()
        t = output.teacher_output.float()
        T = self.temperature
        soft = F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1),
                        reduction="batchmean", log_target=True) * (T * T)
        hard = self.hard_loss(s, targets)
        return self.distillation_weight * soft + (1.0 - self.distillation_weight) * hard


class KDTask(ClassificationTask):
    """Distillation through a :class:`KDModule`: the student is what is optimised, averaged and checkpointed."""

    def default_params(self) -> Dict[str, Any]:
        return {"loss": "kd_loss"}

    def build_named_loss(self, name: str, loss_params: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
        if name == "kd_loss":
            return KDLoss(**loss_params)
        raise ValueError(
            f"training param 'loss': KDTrainer supports 'kd_loss' or a callable loss(kd_output, targets), got {name!r}"
        )

    def weights_module(self, net: nn.Module) -> nn.Module:
        # The student may be compiled itself: checkpoints hold the plain student's keys.
        return unwrap_model(unwrap_model(net).student)

    def ema_weights_module(self, ema) -> nn.Module:
        ema_model = ema.ema
        return getattr(ema_model, "student", ema_model)

    def trainable_parameters(self, net: nn.Module) -> List[nn.Parameter]:
        return [p for p in unwrap_model(net).student.parameters() if p.requires_grad]

    def build_ema(self, net: nn.Module, ema_params: Mapping[str, Any]):
        if ema_params.get("decay_type") == "posthoc":
            from ema_cuda.posthoc import KDPostHocEMA

            return KDPostHocEMA.from_params(net, **dict(ema_params))
        from ema_cuda.ema import KDModelEMA

        return KDModelEMA.from_params(net, **dict(ema_params))

    def compute_loss(self, loss_fn: Callable[..., Any], outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, KDOutput):
            # A standalone student (e.g. ``test(model=student)``): there is no
            # teacher output, so the loss reported is the hard-label one.
            return F.cross_entropy(outputs.float(), targets)
        return super().compute_loss(loss_fn, outputs, targets)

    def logits(self, outputs: Any) -> torch.Tensor:
        return outputs.student_output if isinstance(outputs, KDOutput) else outputs


class KDTrainer(Trainer):
    """:class:`~ema_cuda.training.Trainer` for knowledge distillation (see the module docstring).

    The default loss is ``"kd_loss"`` (:class:`KDLoss`; ``loss_params``
    sets ``temperature``, ``distillation_weight`` and ``label_smoothing``).
    A custom loss is called as ``loss(kd_output, targets)``.  Accuracy is the
    student's; evaluating a bare student (``test(model=student)``) reports
    the hard-label cross-entropy as its loss.  After training, ``trainer.net`` is the :class:`KDModule` and
    ``trainer.student`` the student, which holds the EMA weights when EMA
    was on.
    """

    task = KDTask()

    def __init__(self, experiment_name: str, ckpt_root_dir="checkpoints"):
        super().__init__(experiment_name, ckpt_root_dir)
        self.student: Optional[nn.Module] = None
        self.teacher: Optional[nn.Module] = None

    def train(  # type: ignore[override]
        self,
        student: nn.Module,
        teacher: nn.Module,
        training_params: Optional[Mapping[str, Any]] = None,
        train_loader: Optional[Any] = None,
        valid_loader: Optional[Any] = None,
    ) -> List[Dict[str, Any]]:
        """Distil ``teacher`` into ``student`` (in place); returns the per-epoch metrics."""
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError("KDTrainer.train: student and teacher must be nn.Modules")
        if student is teacher:
            raise ValueError("KDTrainer.train: student and teacher are the same module")
        self.student, self.teacher = student, teacher
        return super().train(KDModule(student, teacher), training_params, train_loader, valid_loader)
