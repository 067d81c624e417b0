"""The one place that knows how training wrappers nest a model, the key prefixes they leave, and how a
module tree registers its state.

Every part of the package that needs "the user's model" (the EMA, the
Trainer, checkpoints, the model registry) calls :func:`unwrap_model`, so that
they all agree on which module holds the weights and on the names of its
``state_dict`` keys.  A checkpoint never holds wrapper prefixes because its
weights always come from the unwrapped module; :func:`strip_wrapper_prefixes`
reads checkpoints written by other code that saved the wrapper itself.
:func:`state_entries` walks a module tree as ``state_dict`` does, for the
EMA and the distributed helpers.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Tuple

import torch
from torch import nn

__all__ = ["unwrap_model", "strip_wrapper_prefixes", "WRAPPER_PREFIXES", "Entry", "state_entries"]

#: Key prefixes of wrappers that hold the model as an attribute:
#: ``module.`` (DataParallel, DistributedDataParallel) and ``_orig_mod.``
#: (the OptimizedModule returned by ``torch.compile``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_PARALLEL_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside every DataParallel / DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrapper.

    Wrappers are removed repeatedly, in any order and nesting (a compiled
    DDP model, a DDP-wrapped compiled model, ...).  Models sharded with
    FSDP2's ``fully_shard`` need nothing removed: it changes the module's
    class in place and keeps its parameter names.
    """
    while True:
        if isinstance(model, _PARALLEL_WRAPPERS):
            model = model.module
            continue
        # torch.compile returns an OptimizedModule holding the real module as
        # `_orig_mod`; checked by attribute to avoid importing torch._dynamo.
        inner = model.__dict__.get("_modules", {}).get("_orig_mod") if isinstance(model, nn.Module) else None
        if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = inner
            continue
        return model


def strip_wrapper_prefixes(state_dict: Mapping[str, Any], model_keys: Iterable[str]) -> Dict[str, Any]:
    """``state_dict`` with the wrapper prefixes that every one of its keys has (and no model key has) removed.

    Checkpoints written from a wrapped model by other code have keys such as
    ``module.fc.weight`` or ``_orig_mod.fc.weight`` (``module._orig_mod.``
    for a compiled DDP model); the prefixes are removed one at a time while
    all keys share one.  A prefix that the model's own keys also have is
    kept, so a model that really has a child named ``module`` still loads.
    """
    model_keys = list(model_keys)
    out = dict(state_dict)
    while out:
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out) and not any(k.startswith(prefix) for k in model_keys):
                out = {k[len(prefix):]: v for k, v in out.items()}
                break
        else:
            return out
    return out


class Entry(NamedTuple):
    """A tensor of a module tree's ``state_dict``, with where it is registered."""

    key: str  # its state_dict key
    owner: Dict[str, Any]  # the registry holding it: a module's _parameters or _buffers
    name: str  # its name in that registry
    tensor: torch.Tensor
    is_param: bool


def state_entries(root: nn.Module) -> Tuple[List[Entry], List[nn.Module]]:
    """The tensors of ``root.state_dict()`` with their keys and owners, and the modules visited.

    Walks the module tree the way ``state_dict`` does (parameters, persistent
    buffers, children; shared modules and tied tensors appear under every
    name), but returns the live objects and where they are registered, so
    that a later step can check cheaply that nothing was replaced.
    """
    entries: List[Entry] = []
    modules: List[nn.Module] = []

    def visit(module: nn.Module, prefix: str) -> None:
        modules.append(module)
        for name, p in module._parameters.items():
            if p is not None:
                entries.append(Entry(prefix + name, module._parameters, name, p, True))
        skip = module._non_persistent_buffers_set
        for name, b in module._buffers.items():
            if b is not None and name not in skip:
                entries.append(Entry(prefix + name, module._buffers, name, b, False))
        for name, child in module._modules.items():
            if child is not None:
                visit(child, prefix + name + ".")

    visit(root, "")
    return entries, modules
