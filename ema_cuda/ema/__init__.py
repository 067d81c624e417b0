"""Exponential moving average of a model's weights: :class:`ModelEMA` and :class:`KDModelEMA`.

Keeping a moving average of the weights during training gives a model that
often evaluates better than the final weights, and does so without a separate
fine-tuning phase.  It helps most with strong augmentation, large learning
rates and long schedules (ImageNet classifiers, detectors, diffusion models).

Create the :class:`ModelEMA` after the model is on its device and before
wrapping it for distributed training (wrapping afterwards is fine too: the
wrapper is removed), then call :meth:`ModelEMA.update` after every optimizer
step::

    ema = ModelEMA.from_params(model, decay=0.9999, decay_type="threshold")
    for step, batch in enumerate(loader, start=1):
        ...; optimizer.step(); optimizer.zero_grad()
        ema.update(model, step=step, total_steps=total)
    with ema.swapped(model):        # model temporarily holds the EMA weights
        evaluate(model)
    ema.copy_to(model)              # end of training: model keeps the EMA weights

The semantics are SuperGradients' (3.7.1) with a few deliberate differences,
each noted where it applies: the decay is checked, entries are paired by name
and shape, integer buffers follow the model, and a distillation teacher is
never written.

The package's parts: :mod:`.options` (the options, validated once),
:mod:`.storage` (the EMA's tensors in flat buffers), :mod:`.plan` (pairing
and the plan validity rule), :mod:`.executors` (eager, capturable, side
stream), :mod:`.trees` (replicated, distillation student, FSDP2 shards),
:mod:`.state` (state_dict and pickles) and the facade :mod:`.model_ema`.
"""
from ema_cuda._modules import unwrap_model
from ema_cuda.ema.distill import KDModelEMA
from ema_cuda.ema.executors import WaitHook as _WaitHook  # the name pickles of asynchronous EMAs refer to
from ema_cuda.ema.model_ema import ModelEMA
from ema_cuda.ema.options import check_ema_params

__all__ = ["ModelEMA", "KDModelEMA", "unwrap_model", "check_ema_params"]
