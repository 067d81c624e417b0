"""Parameter sets the EMA benchmark runs on.

Every workload is a list of parameter shapes plus the dtypes of the EMA and of
the model.  The shapes of real models are generated from their architecture
(nothing is downloaded), so the tensor count and the size distribution match
what an EMA of that model updates each step:

* ``resnet50``: torchvision's ResNet-50, 161 tensors, 25.6M parameters (conv
  weights without bias, BN weight and bias, the classifier).
* ``vit_b16``: ViT-B/16 at 224 px, 152 tensors, 86.6M parameters.
* ``gpt2``: a GPT-2-small-like decoder (tied embeddings, so no separate
  output head), 148 tensors, 124.4M parameters.
* ``small``: 10,000 tensors of 1,000 elements, where per-tensor overhead
  dominates.  Deliberately not scaled by ``size_scale``: it measures a count,
  not a size.
* ``huge``: 4 tensors of 16M elements each, where only bandwidth matters.
* ``vit_b16_bf16``: the ViT-B/16 shapes with a bf16 model and an fp32 EMA,
  the mixed-precision case (a bf16 EMA with decay 0.9999 stalls, since the
  increment falls below bf16 resolution).

``size_scale`` multiplies the parameter count roughly by its value: the
transformer and ResNet widths grow by ``sqrt(size_scale)`` (the tensor count
stays that of the real architecture) and the huge tensors grow linearly.
``--size-scale 12`` turns ``gpt2`` into a 1.2B-parameter model for a GPU run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch

Shape = Tuple[int, ...]


@dataclass
class Workload:
    """A named parameter set: shapes plus the EMA and model dtypes."""

    name: str
    description: str
    shapes: List[Shape]
    ema_dtype: torch.dtype = torch.float32
    model_dtype: torch.dtype = torch.float32
    tags: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def bytes_per_element(self) -> int:
        """Memory traffic per element of one update: read + write the EMA, read the model."""
        return 2 * _itemsize(self.ema_dtype) + _itemsize(self.model_dtype)

    @property
    def bytes_per_update(self) -> int:
        return self.numel * self.bytes_per_element

    @property
    def mixed(self) -> bool:
        return self.ema_dtype != self.model_dtype

    def dtype_label(self) -> str:
        e, m = _short(self.ema_dtype), _short(self.model_dtype)
        return e if e == m else f"{e} EMA / {m} model"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")


def _width(base: int, scale: float, multiple: int) -> int:
    """``base * sqrt(scale)`` rounded to a multiple (at least one multiple)."""
    return max(multiple, int(round(base * math.sqrt(scale) / multiple)) * multiple)


# --------------------------------------------------------------------------- architectures


def resnet50_shapes(scale: float = 1.0, num_classes: int = 1000) -> List[Shape]:
    """Parameter shapes of torchvision's ResNet-50, in ``model.parameters()`` order."""
    base = _width(64, scale, 8)
    shapes: List[Shape] = [(base, 3, 7, 7), (base,), (base,)]
    inplanes = base
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = base * 2**stage
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(num_classes, inplanes), (num_classes,)]
    return shapes


def _transformer_block(d: int, mlp: int) -> List[Shape]:
    return [
        (d,), (d,),  # norm 1
        (3 * d, d), (3 * d,),  # qkv
        (d, d), (d,),  # attention output projection
        (d,), (d,),  # norm 2
        (mlp, d), (mlp,),  # fc1
        (d, mlp), (d,),  # fc2
    ]


def vit_b16_shapes(scale: float = 1.0, image: int = 224, patch: int = 16, num_classes: int = 1000) -> List[Shape]:
    """Parameter shapes of ViT-B/16 (12 layers, width 768, MLP 3072) at ``image`` px."""
    d = _width(768, scale, 64)
    tokens = (image // patch) ** 2 + 1
    shapes: List[Shape] = [(d, 3, patch, patch), (d,), (1, 1, d), (1, tokens, d)]
    for _ in range(12):
        shapes += _transformer_block(d, 4 * d)
    shapes += [(d,), (d,), (num_classes, d), (num_classes,)]
    return shapes


def gpt2_shapes(scale: float = 1.0, vocab: int = 50257, context: int = 1024) -> List[Shape]:
    """Parameter shapes of a GPT-2-small-like decoder (12 layers, width 768, tied head)."""
    d = _width(768, scale, 64)
    shapes: List[Shape] = [(vocab, d), (context, d)]
    for _ in range(12):
        shapes += _transformer_block(d, 4 * d)
    shapes += [(d,), (d,)]
    return shapes


def small_shapes(count: int = 10_000, numel: int = 1_000) -> List[Shape]:
    return [(numel,)] * count


def huge_shapes(scale: float = 1.0, count: int = 4, numel: int = 16 * 2**20) -> List[Shape]:
    return [(max(1, int(numel * scale)),)] * count


# --------------------------------------------------------------------------- registry

_BUILDERS: Dict[str, Callable[[float, int], Workload]] = {
    "resnet50": lambda s, n: Workload(
        "resnet50", "ResNet-50 parameters", resnet50_shapes(s), tags=("cnn",)
    ),
    "vit_b16": lambda s, n: Workload(
        "vit_b16", "ViT-B/16 parameters", vit_b16_shapes(s), tags=("transformer",)
    ),
    "gpt2": lambda s, n: Workload(
        "gpt2", "GPT-2-small-like transformer parameters", gpt2_shapes(s), tags=("transformer",)
    ),
    "small": lambda s, n: Workload(
        "small", f"{n:,} tensors x 1,000 elements", small_shapes(n), tags=("many-small",)
    ),
    "huge": lambda s, n: Workload(
        "huge", "4 tensors x 16M elements", huge_shapes(s), tags=("huge",)
    ),
    "vit_b16_bf16": lambda s, n: Workload(
        "vit_b16_bf16",
        "ViT-B/16 parameters, bf16 model, fp32 EMA",
        vit_b16_shapes(s),
        ema_dtype=torch.float32,
        model_dtype=torch.bfloat16,
        tags=("transformer", "mixed"),
    ),
}

WORKLOAD_NAMES: Tuple[str, ...] = tuple(_BUILDERS)


def get_workload(name: str, size_scale: float = 1.0, small_count: int = 10_000) -> Workload:
    """Builds the named workload.

    ``size_scale`` multiplies its parameter count (see the module docs);
    ``small_count`` is the number of 1,000-element tensors of ``small``.
    """
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOAD_NAMES)}") from None
    if not (size_scale > 0 and math.isfinite(size_scale)):
        raise ValueError(f"size_scale must be a positive number, got {size_scale}")
    return builder(size_scale, small_count)


def custom_workload(
    name: str,
    shapes: Sequence[Shape],
    ema_dtype: torch.dtype = torch.float32,
    model_dtype: torch.dtype = torch.float32,
) -> Workload:
    """A workload from explicit shapes (used by the smoke test)."""
    return Workload(name, f"{len(shapes)} custom tensors", [tuple(s) for s in shapes], ema_dtype, model_dtype)


def make_tensors(
    workload: Workload, device: torch.device, seed: int = 0
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Random (EMA, model) tensors for a workload, each separately allocated.

    Separately allocated and in the order a real run allocates them: first
    every model parameter, then every EMA tensor (a ``deepcopy`` of the
    model).  Views of one flat buffer would hide the cost of jumping between
    tensors (the hardware prefetcher restarts at every tensor, about 2x on
    10,000 x 1,000 on the CPU); allocating each EMA tensor right after its
    model tensor would exaggerate it (each stream then skips over the other's
    pages at every tensor).  Values are standard normal, never zeros,
    so no method is timed on a trivially cheap input.
    """
    device = torch.device(device)
    # Drawn where they live: a 1B-parameter GPU workload would take minutes
    # to draw on the CPU.
    g = torch.Generator(device=device).manual_seed(seed)

    def draw(dtype: torch.dtype) -> List[torch.Tensor]:
        out = []
        for shape in workload.shapes:
            t = torch.randn(shape, generator=g, dtype=torch.float32, device=device)
            out.append(t if dtype == torch.float32 else t.to(dtype))
        return out

    model = draw(workload.model_dtype)
    ema = draw(workload.ema_dtype)
    return ema, model
