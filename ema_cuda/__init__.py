"""ema_cuda: a fused exponential moving average of PyTorch model weights."""
from ema_cuda import ops
from ema_cuda.ops import FusedUpdater, ema_update_
from ema_cuda import ema_decay_schedules
from ema_cuda.ema import KDModelEMA, ModelEMA
# Registers the "power_function" schedule (it subclasses IDecayFunction, so ema_decay_schedules cannot import it).
from ema_cuda import posthoc
from ema_cuda.posthoc import PostHocEMA

__version__ = "0.1.0"

__all__ = ["ops", "ema_update_", "FusedUpdater", "__version__", "ModelEMA", "KDModelEMA", "PostHocEMA", "ema_decay_schedules",
           "posthoc"]

# The trainer, the model registry, checkpoint I/O and the distributed pieces load on first use, so
# that `import ema_cuda` costs no more than the op and the EMA.
__all__ += ["Trainer", "KDTrainer", "models", "checkpoint", "training", "ShardedModelEMA", "distributed", "sharded"]


def __getattr__(name):
    if name in ("Trainer", "KDTrainer"):
        from ema_cuda import training

        return getattr(training, name)
    if name == "ShardedModelEMA":
        from ema_cuda.sharded import ShardedModelEMA

        return ShardedModelEMA
    if name in ("training", "models", "checkpoint", "distributed", "sharded"):
        import importlib

        return importlib.import_module(f"ema_cuda.{name}")
    raise AttributeError(f"module 'ema_cuda' has no attribute {name!r}")
