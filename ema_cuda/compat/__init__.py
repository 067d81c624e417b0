"""Drop-in replacements for other frameworks' EMA classes, backed by the fused update.

* :class:`ema_cuda.compat.timm.ModelEmaV3` for ``timm.utils.ModelEmaV3``;
* :class:`ema_cuda.compat.diffusers.EMAModel` for
  ``diffusers.training_utils.EMAModel``.

Each takes the same constructor arguments, has the same methods and
attributes and writes the same ``state_dict`` as the class it replaces, so
changing the import is the whole migration (docs/dropins.md).  Neither
imports its framework: import the submodule you need.
"""
__all__ = ["timm", "diffusers"]
