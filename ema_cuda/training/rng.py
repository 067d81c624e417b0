"""Seeding, and capturing/restoring every random generator a training run draws from.

A resumed run must replay the same shuffles, dropout masks and augmentations
as an uninterrupted one.  Those come from the global torch generator (CPU and
CUDA), Python's ``random``, numpy's global generator, and any
``torch.Generator`` the train loader owns: ``DataLoader(generator=...)``
shuffles with its own generator and never touches the global one, so it has
to be saved separately.

Everything is stored as tensors, ints, lists and dicts so that a checkpoint
holding it loads with ``weights_only=True`` (numpy arrays would not).
"""
from __future__ import annotations

import random
import warnings
from typing import Any, Dict, List, Optional

import torch

__all__ = ["seed_everything", "capture_rng_state", "restore_rng_state", "loader_generators"]


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and all CUDA devices), Python's ``random`` and numpy."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    np = _numpy()
    if np is not None:
        np.random.seed(seed % (2**32))


def loader_generators(loader: Any) -> List[torch.Generator]:
    """The distinct ``torch.Generator`` objects a DataLoader (and its samplers) draw from."""
    found: List[torch.Generator] = []
    candidates = [
        getattr(loader, "generator", None),
        getattr(getattr(loader, "sampler", None), "generator", None),
        getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None),
    ]
    for g in candidates:
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def capture_rng_state(loader: Any = None) -> Dict[str, Any]:
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _python_state_to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    np = _numpy()
    if np is not None:
        s = np.random.get_state(legacy=False)
        state["numpy"] = {
            "bit_generator": s["bit_generator"],
            "key": torch.from_numpy(s["state"]["key"].astype("int64")),
            "pos": int(s["state"]["pos"]),
            "has_gauss": int(s["has_gauss"]),
            "gauss": float(s["gauss"]),
        }
    if loader is not None:
        state["loader_generators"] = [g.get_state() for g in loader_generators(loader)]
    return state


def restore_rng_state(state: Dict[str, Any], loader: Any = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_python_state_from_lists(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(
                f"checkpoint holds CUDA RNG states for {len(state['cuda'])} devices but "
                f"{torch.cuda.device_count()} are visible; CUDA random streams will differ from the original run",
                RuntimeWarning,
                stacklevel=3,
            )
    np = _numpy()
    if np is not None and "numpy" in state:
        s = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": s["bit_generator"],
                "state": {"key": s["key"].numpy().astype("uint32"), "pos": s["pos"]},
                "has_gauss": s["has_gauss"],
                "gauss": s["gauss"],
            }
        )
    if loader is not None:
        saved = state.get("loader_generators", [])
        gens = loader_generators(loader)
        if len(saved) != len(gens):
            warnings.warn(
                f"checkpoint holds {len(saved)} DataLoader generator states but the train loader has {len(gens)}; "
                "its shuffling will differ from the original run",
                RuntimeWarning,
                stacklevel=3,
            )
        for g, s in zip(gens, saved):
            g.set_state(s)


def _python_state_to_lists(state) -> List[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_lists(state: List[Any]):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
