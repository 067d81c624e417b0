"""What a trainer trains: how a batch goes through the model, and which module holds the weights.

:class:`ClassificationTask` is the plain case (a model whose output is the
logits); :class:`~ema_cuda.training.kd.KDTask` is knowledge distillation (a
student and a frozen teacher).  The trainer, its batch loop and its
checkpoints ask the task and never look at the kind of model themselves, so a
new kind of training is a new task, not a new branch in each of them.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping

import torch
from torch import nn

from ema_cuda._modules import unwrap_model

__all__ = ["ClassificationTask"]


class ClassificationTask:
    """A classifier: ``net(inputs)`` returns logits and the loss is ``loss(logits, targets)``."""

    def default_params(self) -> Dict[str, Any]:
        """Training params that differ from :class:`~ema_cuda.training.TrainingParams`' defaults for this task."""
        return {}

    def build_named_loss(self, name: str, loss_params: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
        if name == "cross_entropy":
            return nn.CrossEntropyLoss(**loss_params)
        raise ValueError(f"training param 'loss': {name!r} needs KDTrainer; Trainer supports 'cross_entropy'")

    def trainable_parameters(self, net: nn.Module) -> List[nn.Parameter]:
        """What an optimizer built by name trains."""
        return [p for p in net.parameters() if p.requires_grad]

    def weights_module(self, net: nn.Module) -> nn.Module:
        """The module whose weights are checkpointed as ``net`` (and loaded by ``models.get``).

        Every wrapper is removed (DDP, DataParallel, ``torch.compile``), so
        the checkpoint's keys are the plain model's: no ``module.`` or
        ``_orig_mod.`` prefix that ``models.get`` and a resume would trip on.
        """
        return unwrap_model(net)

    def ema_weights_module(self, ema) -> nn.Module:
        """The module of ``ema`` holding the EMA weights that are checkpointed as ``ema_net``."""
        return ema.ema

    def build_ema(self, net: nn.Module, ema_params: Mapping[str, Any]):
        from ema_cuda.training.builders import build_ema

        return build_ema(net, ema_params)

    def forward(self, net: nn.Module, inputs: Any) -> Any:
        return net(inputs)

    def logits(self, outputs: Any) -> torch.Tensor:
        """The part of ``outputs`` that accuracy is measured on."""
        return outputs

    def compute_loss(self, loss_fn: Callable[..., Any], outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(outputs, targets)
        if isinstance(loss, (tuple, list)):  # losses that also return items to log
            loss = loss[0]
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(
                f"Trainer: the loss {type(loss_fn).__name__} must return a scalar tensor, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        return loss
