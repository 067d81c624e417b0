"""The fused EMA op: ``ema[i] = ema[i] * decay + model[i] * (1 - decay)``, and its
multi-EMA form, K EMAs of one model in one pass (:func:`multi_ema_update_`,
:class:`MultiFusedUpdater`).

Two backends provide the same ops under ``torch.ops.ema_cuda``:

* ``"compiled"``: the C++/CUDA library ``ema_cuda._C``.  All tensors are updated
  in one kernel launch on CUDA and one parallel region on the CPU, from a
  chunk table cached per list signature.
* ``"fallback"``: pure PyTorch (:mod:`ema_cuda._fallback`: foreach multiply
  and add grouped by device and dtype pair, casting where dtypes differ).
  Used when the compiled library is missing (with a warning) or when
  ``EMA_CUDA_BACKEND=fallback``.

Both run the same checks (csrc/checks.cpp and :mod:`ema_cuda._checks`) and
raise the same errors.

``EMA_CUDA_BACKEND`` may be ``auto`` (default), ``compiled`` (an import error
is raised instead of falling back) or ``fallback``.  :func:`backend` tells
which one is running.
"""
from __future__ import annotations

import operator
import os
import warnings
from typing import List, Optional, Sequence, Union

import torch

from ema_cuda import _fallback
from ema_cuda._checks import (
    check_decay,
    check_decay_tensor,
    check_decays,
    check_decays_tensor,
    check_lists,
    check_multi_lists,
)

# Part of this module's API (the EMA layer packs its tensors by these rules).
from ema_cuda._checks import SUPPORTED_DTYPES, is_dense, same_layout  # noqa: F401

__all__ = [
    "ema_update_",
    "FusedUpdater",
    "multi_ema_update_",
    "MultiFusedUpdater",
    "backend",
    "cuda_kernel_available",
    "fallback_reason",
    "SUPPORTED_DTYPES",
    "release_captured_plans",
]

OP_NAME = _fallback.OP_NAME
MULTI_OP_NAME = _fallback.MULTI_OP_NAME
_BACKEND_ENV = "EMA_CUDA_BACKEND"
_C = None
_fallback_reason: Optional[str] = None


def _why_compiled_library_failed(exc: ImportError) -> str:
    """Why ``ema_cuda._C`` did not import, in plain words, with the command that fixes it.

    The two usual causes: a source checkout that was never built, and a library
    built against another torch release than the one running (pip's default
    build isolation compiles against a freshly downloaded torch; the library
    then fails to load, typically with an undefined symbol).  setup.py records
    the torch it built against in ``ema_cuda/_build_info.py``.
    """
    import importlib.machinery

    package_dir = os.path.dirname(os.path.abspath(__file__))
    # setup.py next to the package: an editable install or a checkout on sys.path.
    source_checkout = os.path.exists(os.path.join(os.path.dirname(package_dir), "setup.py"))
    fix = "pip install --no-build-isolation -e ." if source_checkout else "pip install --no-build-isolation ."
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    built = any(os.path.exists(os.path.join(package_dir, "_C" + suffix)) for suffix in suffixes)
    if not built:
        if source_checkout:
            return (
                f"the compiled extension ema_cuda._C is not built in this source checkout "
                f"({os.path.dirname(package_dir)}); build it there with `{fix}` (or `make build`)"
            )
        return (
            f"this installation has no compiled extension ema_cuda._C ({package_dir}); "
            f"reinstall it from the source tree with `{fix}`"
        )
    try:
        from ema_cuda._build_info import TORCH_VERSION as built_against
    except ImportError:
        built_against = None
    if built_against is not None and built_against != torch.__version__:
        return (
            f"the compiled extension ema_cuda._C was built against torch {built_against}, running torch "
            f"{torch.__version__}, and it only loads with the torch it was built against ({exc}). pip's "
            f"default build isolation builds against a newly downloaded torch instead of the installed one; "
            f"rebuild against the installed torch with `{fix}`"
        )
    return f"the compiled library ema_cuda._C could not be imported ({exc}); rebuild it with `{fix}`"


def _load_backend() -> None:
    global _C, _fallback_reason
    choice = os.environ.get(_BACKEND_ENV, "auto").strip().lower()
    if choice not in ("auto", "compiled", "fallback"):
        raise ValueError(f"{_BACKEND_ENV} must be 'auto', 'compiled' or 'fallback', got {choice!r}")
    if choice != "fallback":
        try:
            from ema_cuda import _C as compiled  # registers torch.ops.ema_cuda.*
        except ImportError as exc:
            reason = _why_compiled_library_failed(exc)
            if choice == "compiled":
                # The reason quotes the loader's message where it tells anything; the
                # chained error would only add "cannot import name '_C' from partially
                # initialized module ... (most likely due to a circular import)".
                raise ImportError(f"{_BACKEND_ENV}=compiled but {reason}") from None
            _fallback_reason = reason
        else:
            _C = compiled
            return
    else:
        _fallback_reason = f"{_BACKEND_ENV}=fallback"
    warnings.warn(
        f"ema_cuda is using its pure-PyTorch fallback because {_fallback_reason}. Updates are correct "
        "but run one launch per tensor group instead of one fused kernel.",
        RuntimeWarning,
        stacklevel=3,
    )
    _fallback.define_ops()


def backend() -> str:
    """``"compiled"`` when the C++/CUDA library is in use, else ``"fallback"``."""
    return "compiled" if _C is not None else "fallback"


def fallback_reason() -> Optional[str]:
    """Why the fallback is in use, or ``None`` when the compiled library is."""
    return _fallback_reason


def cuda_kernel_available() -> bool:
    """True when the compiled library contains the CUDA kernel."""
    return _C is not None and bool(_C.cuda_compiled())


_load_backend()


# Fake (meta) kernels: the op writes in place and allocates nothing, but the
# checks that need no data run here too, so a traced program rejects the same
# input as eager does.
@torch.library.register_fake("ema_cuda::ema_update_")
def _ema_update_fake(ema, model, decay):
    check_decay(OP_NAME, decay)
    check_lists(OP_NAME, ema, model)


@torch.library.register_fake("ema_cuda::ema_update_.Tensor")
def _ema_update_tensor_fake(ema, model, decay):
    check_decay_tensor(OP_NAME, decay, ema)
    check_lists(OP_NAME, ema, model)


@torch.library.register_fake("ema_cuda::multi_ema_update_")
def _multi_ema_update_fake(ema, model, decays):
    check_decays(MULTI_OP_NAME, decays)
    check_multi_lists(MULTI_OP_NAME, ema, model, len(decays))


@torch.library.register_fake("ema_cuda::multi_ema_update_.Tensor")
def _multi_ema_update_tensor_fake(ema, model, decays):
    check_decays_tensor(MULTI_OP_NAME, decays, ema)
    check_multi_lists(MULTI_OP_NAME, ema, model, decays.numel())


def _listed_calls() -> bool:
    """Whether :func:`ema_update_` may hand its lists to ``_C`` instead of ``torch.ops`` (NOTE [listed calls]).

    The same op through the dispatcher, without converting every list element
    to an IValue (about 0.1 us a tensor).  Not while torch.compile traces (it
    traces ``torch.ops``) or inside a torch function mode (``torch.ops`` calls
    it); ``_C`` itself declines lists holding tensor subclasses.
    """
    return _C is not None and not torch.compiler.is_compiling() and not torch._C._is_torch_function_mode_enabled()


# --------------------------------------------------------------------------- public API


def ema_update_(
    ema: Sequence[torch.Tensor],
    model: Sequence[torch.Tensor],
    decay: Union[float, torch.Tensor],
) -> None:
    """Updates every EMA tensor in place: ``ema[i] = ema[i] * decay + model[i] * (1 - decay)``.

    Args:
        ema: tensors to update, in float32, float64, bfloat16 or float16.
        model: tensors to average in, one per EMA tensor, same shape and
            memory layout, any of the same dtypes (an fp32 EMA of a bf16 model
            is fine).  Math runs in fp32, or fp64 when either side is fp64.
        decay: a Python float in ``[0, 1]``, or a 0-dim float32 or float64
            tensor on the tensors' device.  A CUDA tensor is read by the kernel (no host
            sync; capturable in a CUDA graph, and ``torch.compile`` does not
            recompile as its value changes); its range is therefore not
            checked.

    All tensors must be on one device, dense (contiguous or one permutation),
    and no EMA tensor may overlap another tensor.  Every check runs before any
    write: a rejected call leaves every EMA tensor unchanged.

    With the compiled backend the update is one kernel launch (CUDA) or one
    parallel region (CPU) whatever the number of tensors; the chunk table is
    cached per ``(data_ptr, numel, dtype, device)`` signature of the lists.
    Lists of plain tensors (``torch.Tensor``, ``nn.Parameter``) reach the op
    through the dispatcher without ``torch.ops``' conversion of each element;
    tensor subclasses, torch function modes and ``torch.compile`` go through
    ``torch.ops``.  For a per-step update of the same lists,
    :class:`FusedUpdater` also skips passing the lists at all.
    """
    ema = list(ema)
    model = list(model)
    if not ema and not model and not isinstance(decay, torch.Tensor):
        # No tensor to dispatch on (torch's foreach ops reject empty lists);
        # an empty update is still a checked no-op here.
        check_decay(OP_NAME, float(decay))
        return
    if isinstance(decay, torch.Tensor):
        if not (_listed_calls() and _C.update_listed_tensor(ema, model, decay)):
            torch.ops.ema_cuda.ema_update_.Tensor(ema, model, decay)
    else:
        decay = float(decay)
        if not (_listed_calls() and _C.update_listed(ema, model, decay)):
            torch.ops.ema_cuda.ema_update_.default(ema, model, decay)


class FusedUpdater:
    """Holds two tensor lists and updates one from the other, step after step.

    ``FusedUpdater(ema, model).update(decay)`` does what
    ``ema_update_(ema, model, decay)`` does, but the lists are validated and the
    chunk table built once, here; each ``update`` then only compares the live
    tensors' addresses with the table (a tensor whose storage was replaced, by
    ``p.data = ...`` or ``module.to()``, triggers a full re-validation and a
    new table) and launches the kernel.  This is the hot path
    :class:`ema_cuda.ModelEMA` uses.  With the fallback backend every update
    checks the lists again, then runs the fallback's foreach arithmetic (and
    ``torch._foreach_copy_`` for the copies).

    ``copy_ema[j] := copy_model[j]`` is done in the same launch: pairs that
    follow the model instead of being averaged, such as BatchNorm's integer
    ``num_batches_tracked``.  A copied pair may have any dtype, but one dtype
    for both tensors (no casts), one shape and one memory layout; it is on
    the device of the other tensors, and like an averaged EMA tensor must not
    overlap another tensor.  Every check of every pair runs before any write.
    """

    def __init__(
        self,
        ema: Sequence[torch.Tensor],
        model: Sequence[torch.Tensor],
        copy_ema: Sequence[torch.Tensor] = (),
        copy_model: Sequence[torch.Tensor] = (),
    ):
        self.ema = list(ema)
        self.model = list(model)
        self.copy_ema = list(copy_ema)
        self.copy_model = list(copy_model)
        # Both hold their own copies of the lists and check them alike
        # (ema_cuda/_checks.py mirrors csrc/checks.cpp).
        updater = _C.ListUpdater if _C is not None else _fallback.ListUpdater
        self._impl = updater(self.ema, self.model, self.copy_ema, self.copy_model)

    def ready(self) -> bool:
        """True when :meth:`update` would run now; False when the lists can no longer be updated.

        A tensor whose storage was replaced by one of the same shape, dtype,
        device and layout is taken (the table is rebuilt here, once).  One
        moved to another device, shape or memory layout makes this False,
        with nothing written: the owner rebuilds its lists (ModelEMA relays
        its EMA out like the model) instead of catching the update's error.
        """
        return bool(self._impl.ready())

    def update(self, decay: Union[float, torch.Tensor]) -> None:
        """One EMA step with ``decay`` (a float, or a 0-dim tensor on the tensors' device)."""
        if isinstance(decay, torch.Tensor):
            self._impl.update_tensor(decay)
        else:
            self._impl.update(float(decay))

    def __len__(self) -> int:
        return len(self.ema)


def _flatten_profiles(
    name: str, emas: Sequence[Sequence[torch.Tensor]], model: Sequence[torch.Tensor], decays=None
) -> List[torch.Tensor]:
    """``emas`` (K lists, each pairing ``model[i]`` with ``emas[k][i]``) as the op's profile-major list."""
    emas = [list(e) for e in emas]
    if decays is not None:
        count = decays.numel() if isinstance(decays, torch.Tensor) and decays.dim() == 1 else None
        if not isinstance(decays, torch.Tensor):
            count = len(decays)
        if count is not None and count != len(emas):
            raise RuntimeError(f"{name}: got {len(emas)} EMA lists but {count} decays; one decay per EMA list")
    for k, e in enumerate(emas):
        if len(e) != len(model):
            raise RuntimeError(
                f"{name}: ema[{k}] has {len(e)} tensors but model has {len(model)}; each EMA list pairs one tensor "
                "with each model tensor"
            )
    return [t for e in emas for t in e]


def multi_ema_update_(
    emas: Sequence[Sequence[torch.Tensor]],
    model: Sequence[torch.Tensor],
    decays: Union[Sequence[float], torch.Tensor],
) -> None:
    """Updates K EMAs of one model in one pass: ``emas[k][i] = lerp(emas[k][i], model[i], 1 - decays[k])``.

    Each model element is read once for all K EMAs (fp32: 4 + 8K bytes per
    element instead of 12K); per EMA the arithmetic is :func:`ema_update_`'s,
    and the result is bit-identical to K calls of it with the same decays.

    Args:
        emas: K lists of EMA tensors (1 <= K <= 16), ``emas[k][i]`` pairing
            with ``model[i]`` under :func:`ema_update_`'s rules (dtypes,
            shape, layout, device).  No EMA tensor may overlap another, in the
            same list or another, or a model tensor.
        model: the tensors averaged in, read once.
        decays: K Python floats in ``[0, 1]``, or a 1-dim float32/float64
            tensor of K elements on the tensors' device (read by the CUDA
            kernel: no host sync, capturable in a CUDA graph; its range is then
            not checked).

    Flattens to one call of ``torch.ops.ema_cuda.multi_ema_update_`` with the
    EMAs profile-major (``emas[k][i]`` at ``k * len(model) + i``); its errors
    name ``ema[k][i]``.  Every check runs before any write.  For a per-step
    update of the same lists, :class:`MultiFusedUpdater` is the hot path.
    """
    model = list(model)
    if not isinstance(decays, torch.Tensor):
        decays = [float(d) for d in decays]
    flat = _flatten_profiles(MULTI_OP_NAME, emas, model, decays)
    if not flat and not model and not isinstance(decays, torch.Tensor):
        # No tensor to dispatch on: still a checked no-op (as ema_update_).
        check_decays(MULTI_OP_NAME, decays)
        return
    if isinstance(decays, torch.Tensor):
        if not (_listed_calls() and _C.multi_update_listed_tensor(flat, model, decays)):
            torch.ops.ema_cuda.multi_ema_update_.Tensor(flat, model, decays)
    elif not (_listed_calls() and _C.multi_update_listed(flat, model, decays)):
        torch.ops.ema_cuda.multi_ema_update_.default(flat, model, decays)


class MultiFusedUpdater:
    """:class:`FusedUpdater` for K EMAs of one model: ``update(decays)`` does what
    ``multi_ema_update_(emas, model, decays)`` does, from a plan built once.

    ``emas`` is K lists (1 <= K <= 16), ``emas[k][i]`` pairing with
    ``model[i]``; each update reads every model element once for all K EMAs,
    in one kernel launch (CUDA) or one parallel region (CPU), and checks per
    call only that the live tensors still match the plan (NOTE [plan
    validity]).  ``decays`` is K floats, or a 1-dim float32/float64 tensor of
    K elements on the tensors' device (the form a CUDA graph captures).
    ``len()`` is the number of model tensors, :attr:`profiles` is K.
    """

    def __init__(self, emas: Sequence[Sequence[torch.Tensor]], model: Sequence[torch.Tensor]):
        self.emas = [list(e) for e in emas]
        self.model = list(model)
        flat = _flatten_profiles(_fallback.MULTI_UPDATER_NAME, self.emas, self.model)
        updater = _C.MultiListUpdater if _C is not None else _fallback.MultiListUpdater
        self._impl = updater(flat, self.model, len(self.emas))

    @property
    def profiles(self) -> int:
        """K, the number of EMAs of each model tensor."""
        return len(self.emas)

    def ready(self) -> bool:
        """True when :meth:`update` would run now; False when the lists can no longer be updated
        (as :meth:`FusedUpdater.ready`)."""
        return bool(self._impl.ready())

    def update(self, decays: Union[Sequence[float], torch.Tensor]) -> None:
        """One step of every EMA: ``emas[k]`` with ``decays[k]`` (K floats, or a 1-dim tensor of K)."""
        if isinstance(decays, torch.Tensor):
            self._impl.update_tensor(decays)
        else:
            self._impl.update([float(d) for d in decays])

    def __len__(self) -> int:
        return len(self.model)


def entries_unchanged(owners: tuple, keys: tuple, objects: tuple, registries: tuple, sizes: tuple) -> bool:
    """True while ``owners[i].get(keys[i]) is objects[i]`` for every i and ``len(registries[j]) == sizes[j]`` for every j.

    The per-step test that a module tree still holds the tensors and children
    a cached plan was built from (owners and registries are the modules'
    ``_parameters``, ``_buffers`` and ``_modules`` dicts).  Compiled, it costs
    about 10 ns per entry; the fallback runs the same test through ``map``.
    """
    if _C is not None:
        return bool(_C.watched_entries_unchanged(owners, keys, objects, registries, sizes))
    return all(map(operator.is_, map(dict.get, owners, keys), objects)) and tuple(map(len, registries)) == tuple(sizes)


def release_captured_plans() -> int:
    """Lets go of the chunk tables held for captured CUDA graphs; returns how many.

    A CUDA graph that captured an update replays it with the addresses of that
    update's chunk table, and nothing tells ema_cuda when the graph is
    destroyed.  So the table is owned by the process-wide plan cache from the
    moment of capture, whoever held it before (a :class:`FusedUpdater`, a
    :class:`ema_cuda.ModelEMA`, the op's cache), and lives until this call or
    the end of the process.  Call it only after every graph that captured an
    update has been destroyed (replaying one afterwards would read freed
    memory).  At most 1024 such tables are held: capturing more raises an
    error that points here.  With the fallback backend there are none.
    """
    if _C is None:
        return 0
    return int(torch.ops.ema_cuda._release_captured_plans())
