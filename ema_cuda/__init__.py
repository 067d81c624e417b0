"""ema_cuda: a fused exponential moving average of PyTorch model weights."""
from ema_cuda import ops
from ema_cuda.ops import FusedUpdater, ema_update_

__version__ = "0.1.0"

__all__ = ["ops", "ema_update_", "FusedUpdater", "__version__"]
