"""Model registry: build an architecture by name and optionally load a checkpoint into it.

:func:`get` builds a model from a registered name (or any factory callable)
and, given ``checkpoint_path``, loads the checkpoint's EMA weights
(``ema_net``) when the checkpoint has them and its raw weights (``net``)
otherwise, which is what you want after training with EMA::

    from ema_cuda import models
    net = models.get("digits_cnn", num_classes=10, checkpoint_path="checkpoints/digits/ckpt_best.pth")

Built-in names are ``digits_cnn`` (a small CNN for 8x8 single-channel images
such as scikit-learn's digits) and ``mlp``.  Your own architectures join the
registry with :func:`register`.  When torchvision or timm is installed, their
model names work too (``"torchvision:resnet18"``, ``"timm:resnet18"``, or the
bare name when only one of them has it: a name both have is an error listing
the qualified choices); weights are never downloaded.

The model is returned in eval mode, ready for inference; call ``.train()``
(or hand it to the Trainer, which does) to train it.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ema_cuda import checkpoint as _ckpt

__all__ = ["get", "register", "list_models", "DigitsCNN", "MLP", "digits_cnn", "mlp"]

ModelFactory = Callable[..., nn.Module]
_REGISTRY: Dict[str, ModelFactory] = {}


def register(name: Optional[Union[str, ModelFactory]] = None, factory: Optional[ModelFactory] = None, *,
             overwrite: bool = False):
    """Add an architecture to the registry.

    Use it directly, ``register("my_net", MyNet)``, or as a decorator, with or
    without a name (the default name is the factory's ``__name__``)::

        @models.register("my_net")
        def my_net(num_classes=10):
            return MyNet(num_classes)

    Registering a name twice is an error unless ``overwrite=True``: silently
    replacing an architecture would make old checkpoints load into a
    different network.
    """
    if callable(name) and factory is None:  # bare @register
        return register(None, name, overwrite=overwrite)

    def _add(fn: ModelFactory) -> ModelFactory:
        if not callable(fn):
            raise TypeError(f"models.register: factory for {name!r} must be callable, got {type(fn).__name__}")
        key = name if name is not None else getattr(fn, "__name__", None)
        if not isinstance(key, str) or not key:
            raise ValueError(f"models.register: cannot derive a name for {fn!r}; pass one explicitly")
        if key in _REGISTRY and not overwrite and _REGISTRY[key] is not fn:
            raise ValueError(f"models.register: {key!r} is already registered (pass overwrite=True to replace it)")
        _REGISTRY[key] = fn
        return fn

    if factory is not None:
        return _add(factory)
    return _add


# Why an optional package is unavailable, for error messages: not installed,
# or installed but failing to import (e.g. built for another torch).
_UNAVAILABLE: Dict[str, str] = {}


def _optional_module(name: str):
    """The module, or None when it is not installed or cannot be imported (the latter with a warning)."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        _UNAVAILABLE[name] = f"{name} is not installed"
        return None
    except Exception as exc:  # a broken install must not break the registry's own names
        _UNAVAILABLE[name] = f"{name} is installed but failed to import ({type(exc).__name__}: {exc})"
        warnings.warn(f"ema_cuda.models: {_UNAVAILABLE[name]}; its models are not available", RuntimeWarning,
                      stacklevel=3)
        return None
    _UNAVAILABLE.pop(name, None)
    return module


def _torchvision_names(tv) -> List[str]:
    try:
        return list(tv.models.list_models())
    except Exception:
        return []


def _timm_names(timm) -> List[str]:
    try:
        return list(timm.list_models())
    except Exception:
        return []


def list_models(include_external: bool = False) -> List[str]:
    """Registered names, sorted; with ``include_external`` also torchvision/timm names (prefixed)."""
    names = sorted(_REGISTRY)
    if include_external:
        tv = _optional_module("torchvision")
        if tv is not None:
            names += [f"torchvision:{n}" for n in _torchvision_names(tv)]
        timm = _optional_module("timm")
        if timm is not None:
            names += [f"timm:{n}" for n in _timm_names(timm)]
    return names


def _resolve(name: str) -> ModelFactory:
    if name in _REGISTRY:
        return _REGISTRY[name]
    source, _, bare = name.partition(":") if ":" in name else ("", "", name)
    if source not in ("", "torchvision", "timm"):
        raise ValueError(f"models.get: unknown model source {source!r} in {name!r}; use 'torchvision:' or 'timm:'")
    found: Dict[str, ModelFactory] = {}
    tv = timm = None
    if source in ("", "torchvision"):
        tv = _optional_module("torchvision")
        if tv is not None and bare in _torchvision_names(tv):
            # weights=None: never download; a checkpoint is loaded separately.
            found["torchvision"] = lambda **kw: tv.models.get_model(bare, **{"weights": None, **kw})
        elif source == "torchvision":
            why = _UNAVAILABLE["torchvision"] if tv is None else f"torchvision has no model {bare!r}"
            raise ValueError(f"models.get: {name!r}: {why}")
    if source in ("", "timm"):
        timm = _optional_module("timm")
        if timm is not None and bare in _timm_names(timm):
            found["timm"] = lambda **kw: timm.create_model(bare, **{"pretrained": False, **kw})
        elif source == "timm":
            why = _UNAVAILABLE["timm"] if timm is None else f"timm has no model {bare!r}"
            raise ValueError(f"models.get: {name!r}: {why}")
    if len(found) == 1:
        return next(iter(found.values()))
    if len(found) > 1:
        # The two packages' models of one name differ (layers, defaults), so
        # a checkpoint of one would not load into the other: no silent pick.
        choices = " or ".join(repr(f"{src}:{bare}") for src in found)
        raise ValueError(f"models.get: {name!r} is ambiguous: both torchvision and timm have it; use {choices}")
    # Only a bare name gets here, and both packages were looked up above.
    external = [n for n, mod in (("torchvision", tv), ("timm", timm)) if mod is not None]
    extra = f"; torchvision/timm names are also accepted ({', '.join(external)} installed)" if external else (
        "; install torchvision or timm for their architectures")
    raise ValueError(f"models.get: unknown model name {name!r}; registered names: {sorted(_REGISTRY)}{extra}")


def get(
    name_or_factory: Union[str, ModelFactory],
    checkpoint_path: Optional[Union[str, "os.PathLike[str]"]] = None,
    *,
    load_ema: bool = True,
    strict: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build a model and, given ``checkpoint_path``, load a checkpoint into it.

    ``name_or_factory`` is a registered name, a torchvision/timm name, or any
    callable returning an ``nn.Module`` (a class works).  ``kwargs`` go to the
    factory, e.g. ``num_classes=10``.  Registered names come first; a bare
    torchvision/timm name works when only one of the two packages has it,
    and is an error listing ``"torchvision:<name>"`` and ``"timm:<name>"``
    when both do.

    The model is returned in eval mode (``model.training`` is False), as a
    model loaded for inference should be: dropout off, BatchNorm using its
    running statistics.  Call ``model.train()`` to train it (the Trainer does
    so itself).

    With a checkpoint, the EMA weights (``ema_net``) are loaded when the
    checkpoint has them and ``load_ema`` is true (the default), and the raw
    weights (``net``) otherwise.  ``checkpoint_path`` may also be a
    distributed checkpoint directory written with
    :func:`ema_cuda.sharded.save_sharded_checkpoint` (e.g. by an FSDP2 run on
    any number of ranks): the consolidated EMA (or raw) weights are loaded.  The chosen entry is recorded on the
    returned model as ``model.loaded_checkpoint_key``.  A corrupt file, a
    missing entry or key, or a shape mismatch raises an error naming the
    file, the entry and the key.
    """
    if isinstance(name_or_factory, str):
        factory = _resolve(name_or_factory)
        label = repr(name_or_factory)
    elif callable(name_or_factory):
        factory = name_or_factory
        label = getattr(name_or_factory, "__name__", repr(name_or_factory))
    else:
        raise TypeError(f"models.get: expected a model name or a factory, got {type(name_or_factory).__name__}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"models.get: factory {label} returned a {type(model).__name__}, not an nn.Module")
    if checkpoint_path is not None and _ckpt.is_dcp_checkpoint(checkpoint_path):
        # A distributed (DCP) checkpoint, e.g. of an FSDP2 run: the EMA (or
        # raw) weights are consolidated from the shards in this process.
        key = _ckpt.NET_KEY
        weights = None
        if load_ema:
            try:
                weights = _ckpt.load_dcp_weights(checkpoint_path, "ema")
                key = _ckpt.EMA_NET_KEY
            except _ckpt.CheckpointError:
                weights = None
        if weights is None:
            weights = _ckpt.load_dcp_weights(checkpoint_path, "net")
        _ckpt.load_state_dict_into_model(
            model, weights, source=f"DCP checkpoint {str(checkpoint_path)!r}, {key!r} weights", strict=strict
        )
        model.loaded_checkpoint_key = key
    elif checkpoint_path is not None:
        ckpt = _ckpt.load_checkpoint(checkpoint_path)
        key = _ckpt.pick_weights_key(ckpt, checkpoint_path) if load_ema else _ckpt.NET_KEY
        if ckpt.get(key) is None:
            raise _ckpt.CheckpointError(
                f"checkpoint file {str(checkpoint_path)!r} has no {key!r} entry; its entries are {sorted(ckpt)}"
            )
        _ckpt.load_state_dict_into_model(
            model, ckpt[key], source=f"checkpoint file {str(checkpoint_path)!r}, entry {key!r}", strict=strict
        )
        model.loaded_checkpoint_key = key
    model.eval()
    return model


# --------------------------------------------------------------------------
# Built-in architectures (small, for examples and tests)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 single-channel images (scikit-learn's digits).

    Two 3x3 conv-BN-ReLU blocks at 8x8, a 2x2 max-pool, a third block at 4x4,
    global average pooling and a linear classifier.  Batch norm is there on
    purpose: its running statistics are buffers the EMA also averages.  Inputs
    may be ``(N, 1, 8, 8)`` or flat ``(N, 64)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, dropout: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        self.features = nn.Sequential(
            _conv_bn(in_channels, width),
            _conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # flat 64-pixel rows, as sklearn returns them
            x = x.view(x.shape[0], self.in_channels, 8, 8)
        return self.classifier(self.dropout(self.features(x)))


class MLP(nn.Module):
    """A multi-layer perceptron on flattened inputs (Linear-ReLU blocks, then a linear head)."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden_features: Sequence[int] = (128,),
                 dropout: float = 0.0):
        super().__init__()
        layers: List[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden_features:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register("digits_cnn")
def digits_cnn(num_classes: int = 10, **kwargs: Any) -> DigitsCNN:
    """:class:`DigitsCNN` (keyword arguments: ``in_channels``, ``width``, ``dropout``)."""
    return DigitsCNN(num_classes=num_classes, **kwargs)


@register("mlp")
def mlp(num_classes: int = 10, **kwargs: Any) -> MLP:
    """:class:`MLP` (keyword arguments: ``in_features``, ``hidden_features``, ``dropout``)."""
    return MLP(num_classes=num_classes, **kwargs)
