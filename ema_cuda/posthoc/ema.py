""":class:`PostHocEMA`: several power-function EMA profiles of one model, updated together, with snapshots.

Each profile is an averaged copy of the model laid out like a
:class:`~ema_cuda.ModelEMA`'s (:func:`ema_cuda.ema.storage.packed_copy`) and
paired with the model by :func:`ema_cuda.ema.plan.build_plan`; one update
reads the model once for all of them (NOTE [one read for K profiles]).
"""
from __future__ import annotations

import difflib
import math
import numbers
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ema_cuda import ops
from ema_cuda._modules import state_entries
from ema_cuda.ema.executors import integer_step
from ema_cuda.ema.plan import Plan, build_plan
from ema_cuda.ema.storage import EMAStorage
from ema_cuda.ema.trees import ReplicatedTree
from ema_cuda.posthoc.profiles import SIGMA_REL_MAX, PowerFunctionDecay, sigma_rel_to_gamma
from ema_cuda.posthoc.reconstruct import reconstruct
from ema_cuda.posthoc.snapshots import (SnapshotInfo, list_snapshots, serialize_packed, snapshot_filename,
                                        snapshot_metadata, write_packed)
from ema_cuda.posthoc.writer import SnapshotWriter, host_copy

__all__ = ["PostHocEMA", "STATE_FORMAT"]

PathLike = Union[str, "os.PathLike[str]"]

#: The ``format`` entry of :meth:`PostHocEMA.state_dict`.
STATE_FORMAT = "ema_cuda.PostHocEMA/1"

#: The keys :meth:`PostHocEMA.from_params` takes (besides ``decay_type="posthoc"``).
PARAM_NAMES = ("sigma_rels", "snapshot_every", "snapshot_dir", "ema_dtype")

# NOTE [one read for K profiles]: K EMAs of one model updated one after the
# other read every model tensor K times: 12K bytes per fp32 element.  One
# multi-EMA call reads it once and writes each profile: 4 + 8K bytes.  The
# profiles' plans pair the same model tensors in the same order (their
# module trees are copies of one model), so the K EMA lists line up with one
# model list.

# NOTE [power-function decay between updates]: the decay that keeps an EMA
# the exact power-function average (ema_cuda.posthoc.profiles) from the
# update at step s to the one at step t is (s / t) ** (gamma + 1): the
# weights of steps s+1..t (constant in between) then get the integral of the
# profile over (s, t].  That is PowerFunctionDecay's decay over t - s
# elapsed steps (NOTE [elapsed steps] in ema_cuda.schedules_time) with no cap,
# which is what decays_at asks it for.  Steps that skip (gradient
# accumulation: one update every few batches) stay exact, and the first
# update (s = 0) copies the model.


def _checked_sigma_rels(where: str, sigma_rels: Any) -> Tuple[float, ...]:
    if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence):
        raise TypeError(f"{where}: sigma_rels must be a sequence of numbers such as (0.05, 0.10), got {sigma_rels!r}")
    if not sigma_rels:
        raise ValueError(f"{where}: sigma_rels is empty; give at least one profile, e.g. (0.05, 0.10)")
    out: List[float] = []
    for i, s in enumerate(sigma_rels):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) \
                or not 0.0 < s <= SIGMA_REL_MAX:
            raise ValueError(f"{where}: sigma_rels[{i}]={s!r} is not a number in (0, {SIGMA_REL_MAX:.6f}]")
        if any(math.isclose(float(s), o, rel_tol=1e-6) for o in out):
            raise ValueError(f"{where}: sigma_rels {list(sigma_rels)!r} holds {s!r} twice")
        out.append(float(s))
    return tuple(out)


def _checked_snapshots(where: str, every: Any, directory: Any) -> Tuple[Optional[int], Optional[Path]]:
    if every is None and directory is None:
        return None, None
    if every is None or directory is None:
        raise ValueError(f"{where}: snapshot_every and snapshot_dir go together, got snapshot_every={every!r} and "
                         f"snapshot_dir={directory!r}")
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"{where}: snapshot_every must be an integer >= 1, got {every!r}")
    try:
        path = Path(directory)
    except TypeError:
        raise TypeError(f"{where}: snapshot_dir must be a path, got {directory!r}") from None
    if path.exists() and not path.is_dir():
        raise ValueError(f"{where}: snapshot_dir {str(path)!r} exists and is not a directory")
    return int(every), path


def _checked_dtype(where: str, ema_dtype: Any) -> Optional[torch.dtype]:
    # Configuration files name dtypes as strings ("float32", "torch.float32"), as ModelEMA's options take them.
    if ema_dtype is None:
        return None
    dtype = getattr(torch, ema_dtype.replace("torch.", ""), None) if isinstance(ema_dtype, str) else ema_dtype
    if not isinstance(dtype, torch.dtype) or dtype not in ops.SUPPORTED_DTYPES:
        raise ValueError(f"{where}: ema_dtype must be None or one of {[str(d) for d in ops.SUPPORTED_DTYPES]}, "
                         f"got {ema_dtype!r}")
    return dtype


def _updater(plans: Sequence[Plan]) -> Tuple[Callable[[], bool], Callable[[List[float]], None]]:
    """``(ready, update)`` for the profiles' plans: one multi-EMA call (NOTE [one read for K profiles])."""
    mains = [p.main for p in plans if p.main is not None]
    if not mains:
        return (lambda: True), (lambda decays: None)
    multi = ops.MultiFusedUpdater([m.ema for m in mains], mains[0].model)
    copy_ema = [t for m in mains for t in m.copy_ema]
    copy_model = [t for m in mains for t in m.copy_model]

    def update(decays: List[float]) -> None:
        multi.update(decays)
        if copy_ema:  # integer buffers follow the model, as in ModelEMA
            torch._foreach_copy_(copy_ema, copy_model)

    return multi.ready, update


class PostHocEMA:
    """Power-function EMAs of a model for several ``sigma_rels``, with snapshots to choose the length afterwards.

    Construct it after the model is on its device, call :meth:`update` after
    every optimizer step, and afterwards reconstruct the EMA of any other
    ``sigma_rel`` from the snapshots (:meth:`reconstruct`,
    :func:`ema_cuda.posthoc.reconstruct`, ``python -m ema_cuda.posthoc``);
    see docs/posthoc.md.  Profile ``k`` after updates at steps ``t_1 < ... <
    t_n`` is the power-function average (exponent ``gammas[k]``) of the
    model over ``[0, t_n]`` (NOTE [power-function decay between updates]);
    one update is one fused multi-EMA call over all profiles.

    Every ``snapshot_every`` steps (when an update's step reaches the next
    multiple) each profile's EMA is written to ``snapshot_dir`` as
    ``ema-<sigma_rel>-<step>.safetensors`` with its step, gamma and sigma_rel
    in the metadata (:func:`~ema_cuda.posthoc.write_snapshot`).  The tensors
    are copied at that step and written by a background thread (NOTE
    [background snapshots] in :mod:`ema_cuda.posthoc.writer`): a failed
    write raises on the next :meth:`update` or on :meth:`wait`.

    Args:
        model: the model being trained (DataParallel, DDP and
            ``torch.compile`` wrappers are removed).
        sigma_rels: the profiles' relative widths, each in ``(0, 0.3003]``,
            no two equal.  The first is the one :attr:`ema`,
            :meth:`swapped` and :meth:`copy_to` use by default (the Trainer
            validates and keeps it).  EDM2 tracks 0.05 and 0.10.
        snapshot_every: steps between snapshots (with ``snapshot_dir``; both
            ``None``: no snapshots).  A reconstruction is only as good as the
            snapshots are dense: take a few dozen per profile over the run
            at least (docs/posthoc.md has measured errors).
        snapshot_dir: the directory of the snapshots (created when missing;
            a file there is an error).
        ema_dtype: the EMAs' floating dtype (``None``: the model's; a dtype
            or its name, e.g. ``"float32"``), as for :class:`~ema_cuda.ModelEMA`:
            keep float32 EMAs of a bf16 model.
    """

    #: Always False: the decays are Python floats computed per update (the Trainer reads this as it does
    #: ModelEMA's).
    capturable = False
    #: What of the model the profiles average (KDPostHocEMA: the student of a distillation module).
    _tree_type = ReplicatedTree

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10), *,
                 snapshot_every: Optional[int] = None, snapshot_dir: Optional[PathLike] = None,
                 ema_dtype: Optional[torch.dtype] = None):
        where = type(self).__name__
        self.sigma_rels = _checked_sigma_rels(where, sigma_rels)
        self.snapshot_every, self.snapshot_dir = _checked_snapshots(where, snapshot_every, snapshot_dir)
        self.ema_dtype = ema_dtype = _checked_dtype(where, ema_dtype)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self._profiles = tuple(PowerFunctionDecay(gamma=g) for g in self.gammas)
        self._tree = self._tree_type(where)
        src = self._tree.source(model)
        self._storages = [EMAStorage(self._tree.copy(src, ema_dtype)) for _ in self.sigma_rels]
        self._all = nn.ModuleList([s.module for s in self._storages])
        if self.snapshot_dir is not None:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        #: The step of the last update (0 before the first).
        self.step = 0
        #: The number of updates applied.
        self.num_updates = 0
        #: The step of the last snapshot taken, or None.
        self.last_snapshot_step: Optional[int] = None
        self._plans: Optional[List[Plan]] = None
        self._ready: Callable[[], bool] = lambda: False
        self._update: Callable[[List[float]], None] = lambda decays: None
        self._swap_depth = 0
        self._writer = SnapshotWriter(write_packed, where)
        # Checked once here: a snapshot only puts its step in (it runs on the training thread).
        self._metadata = [snapshot_metadata(where, step=1, gamma=g, sigma_rel=s) for s, g in zip(self.sigma_rels,
                                                                                                  self.gammas)]
        self._dir_checked = False

    # ------------------------------------------------------------------ configuration values

    @staticmethod
    def check_params(params: Dict[str, Any], where: str = "ema_params", dir_given_later: bool = False) -> None:
        """Raises the error :meth:`from_params` would raise for ``params``, building nothing (no model needed).

        ``dir_given_later``: a ``snapshot_every`` without ``snapshot_dir`` is
        fine (the Trainer puts the snapshots beside its checkpoints).
        """
        params = dict(params)
        if params.pop("decay_type", "posthoc") != "posthoc":
            raise ValueError(f"{where}: PostHocEMA takes decay_type='posthoc'")
        unknown = [k for k in params if k not in PARAM_NAMES]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), PARAM_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown key {unknown[0]!r} for decay_type='posthoc'{hint}; it takes "
                             f"{list(PARAM_NAMES)}")
        _checked_sigma_rels(where, params.get("sigma_rels", (0.05, 0.10)))
        _checked_dtype(where, params.get("ema_dtype"))
        every, directory = params.get("snapshot_every"), params.get("snapshot_dir")
        if dir_given_later and every is not None and directory is None:
            directory = "."
        _checked_snapshots(where, every, directory)

    @classmethod
    def from_params(cls, model: nn.Module, decay_type: str = "posthoc", **params: Any) -> "PostHocEMA":
        """Builds a PostHocEMA from configuration values (the Trainer's ``ema_params`` with
        ``decay_type="posthoc"``): ``sigma_rels``, ``snapshot_every``, ``snapshot_dir``, ``ema_dtype``.

        An unknown key is a ``ValueError`` naming it and the closest valid one.
        """
        cls.check_params(dict(params, decay_type=decay_type), where=f"{cls.__name__}.from_params")
        sigma_rels = params.pop("sigma_rels", (0.05, 0.10))
        return cls(model, sigma_rels, **params)

    # ------------------------------------------------------------------ the profiles

    @property
    def emas(self) -> Tuple[nn.Module, ...]:
        """The averaged module of each profile, in the order of :attr:`sigma_rels` (eval mode, no grad)."""
        return tuple(s.module for s in self._storages)

    @property
    def ema(self) -> nn.Module:
        """The first profile's averaged module (what the Trainer validates and checkpoints as ``ema_net``)."""
        return self._storages[0].module

    @property
    def averaged_module(self) -> nn.Module:
        """Every profile's module in one ``nn.ModuleList`` (index ``k``: ``sigma_rels[k]``), for code that walks
        all the EMA's tensors, such as the distributed helpers (keys ``"<k>.<model key>"``)."""
        return self._all

    def _index(self, sigma_rel: Optional[float]) -> int:
        if sigma_rel is None:
            return 0
        for k, s in enumerate(self.sigma_rels):
            if isinstance(sigma_rel, numbers.Real) and math.isclose(float(sigma_rel), s, rel_tol=1e-6):
                return k
        raise KeyError(f"{type(self).__name__}: no profile with sigma_rel={sigma_rel!r}; tracked: "
                       f"{list(self.sigma_rels)} (reconstruct others from the snapshots)")

    def ema_for(self, sigma_rel: float) -> nn.Module:
        """The averaged module of the tracked profile ``sigma_rel`` (a ``KeyError`` naming the tracked ones)."""
        return self._storages[self._index(sigma_rel)].module

    def decays_at(self, step: int) -> List[float]:
        """The decay of each profile for an update at ``step`` after the last one (NOTE [power-function decay
        between updates])."""
        return [profile.decay_over(1.0, step, None, step - self.step) for profile in self._profiles]

    # ------------------------------------------------------------------ the update

    def _plans_for(self, model: nn.Module) -> List[Plan]:
        src = self._tree.source(model)
        plans = self._plans
        if plans is not None and plans[0].src is src and all(p.watch.unchanged(self._tree.map_tensor) for p in plans) \
                and self._ready():
            return plans
        self._plans = None  # a failed build leaves no stale plan behind
        where = type(self).__name__
        plans = [build_plan(where, src, s.module, "average", False, self._tree.map_tensor, s.relayout)
                 for s in self._storages]
        lists = [p.main.model if p.main is not None else [] for p in plans]
        if any(len(m) != len(lists[0]) or any(a is not b for a, b in zip(m, lists[0])) for m in lists[1:]):
            raise RuntimeError(f"{where}: the profiles' copies of the model no longer have the same structure")
        self._ready, self._update = _updater(plans)
        self._plans = plans
        return plans

    def update(self, model: nn.Module, step: Any = None, total_steps: Any = None) -> None:
        """Moves every profile towards ``model`` in one fused call; takes the snapshots when one is due.

        ``step`` is the 1-based optimizer step (an integer greater than the
        last update's); ``None`` means the next one.  ``total_steps`` is
        accepted for the Trainer and not used: the profiles depend on the
        step only.  An error of an earlier background write is raised here,
        before anything is written; so is a model that no longer matches the
        EMAs by name and shape.
        """
        where = type(self).__name__
        if self._swap_depth:
            raise RuntimeError(f"{where}.update: called inside swapped(); the model holds an EMA's weights there")
        t = self.step + 1 if step is None else integer_step(where, step)
        if t <= self.step:
            raise ValueError(f"{where}.update: step={t} is not after the last update's step {self.step}; steps "
                             "count up from 1")
        self._writer.raise_error()
        plans = self._plans_for(model)
        self._update(self.decays_at(t))
        for p in plans:  # entries that change dtype or layout (ModelEMA's cast copies)
            if p.cast_ema:
                with torch.no_grad():
                    torch._foreach_copy_(p.cast_ema, p.cast_model)
        previous, self.step = self.step, t
        self.num_updates += 1
        if self.snapshot_every is not None and t // self.snapshot_every > previous // self.snapshot_every:
            self.snapshot()

    def snapshot(self) -> List[Path]:
        """Copies every profile now and queues their files for the background writer; returns their paths."""
        if self.snapshot_dir is None:
            raise ValueError(f"{type(self).__name__}.snapshot: no snapshot_dir was given")
        if self.step < 1:
            raise ValueError(f"{type(self).__name__}.snapshot: no update yet (a snapshot needs step >= 1)")
        if not self._dir_checked:
            self._dir_checked = True
            self._warn_about_later_snapshots()
        jobs, from_cuda = [], False
        for s, metadata, storage in zip(self.sigma_rels, self._metadata, self._storages):
            packed, cuda = host_copy({e.key: e.tensor for e in storage.entries()})
            from_cuda = from_cuda or cuda
            path = self.snapshot_dir / snapshot_filename(self.step, s)
            metadata = dict(metadata, step=str(self.step))
            # NOTE [packed snapshots]: serialised here unless a copy from CUDA is still on its way.
            jobs.append((path, packed if cuda else serialize_packed(packed, metadata), metadata))
        event = None
        if from_cuda:  # one event after the last copy covers all of them
            event = torch.cuda.Event()
            event.record()
        self._writer.submit(jobs, event)
        self.last_snapshot_step = self.step
        return [path for path, _, _ in jobs]

    def _warn_about_later_snapshots(self) -> None:
        # Files of a later step come from another run (or the abandoned part of
        # a resumed one): a reconstruction over the directory would mix them in.
        later = [p.name for p in self.snapshot_dir.glob("ema-*.safetensors")
                 if p.stem.rsplit("-", 1)[-1].isdigit() and int(p.stem.rsplit("-", 1)[-1]) > self.step]
        if later:
            warnings.warn(
                f"{type(self).__name__}: snapshot_dir {str(self.snapshot_dir)!r} already holds {len(later)} snapshots "
                f"of steps after {self.step} (e.g. {sorted(later)[0]!r}), from another run; remove them or use "
                "another directory, or a reconstruction will mix them in", UserWarning, stacklevel=4)

    def wait(self) -> None:
        """Blocks until every snapshot taken so far is on disk; raises the error of a failed write."""
        self._writer.wait()

    def close(self) -> None:
        """Writes the pending snapshots and ends the writer thread (also done at interpreter exit)."""
        self._writer.close()

    # ------------------------------------------------------------------ after training

    def snapshots(self) -> List[SnapshotInfo]:
        """The snapshots in ``snapshot_dir`` (after writing the pending ones), sorted by step."""
        self.wait()
        if self.snapshot_dir is None:
            raise ValueError(f"{type(self).__name__}.snapshots: no snapshot_dir was given")
        return list_snapshots(self.snapshot_dir)

    def reconstruct(self, sigma_rel: float, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """The state_dict of profile ``sigma_rel`` at ``step`` (default: the last snapshot's), from the snapshots
        (:func:`ema_cuda.posthoc.reconstruct`); writes the pending snapshots first."""
        self.wait()
        if self.snapshot_dir is None:
            raise ValueError(f"{type(self).__name__}.reconstruct: no snapshot_dir was given")
        return reconstruct(self.snapshot_dir, sigma_rel, step)

    @contextmanager
    def swapped(self, model: nn.Module, sigma_rel: Optional[float] = None) -> Iterator[nn.Module]:
        """Lets ``model`` hold profile ``sigma_rel``'s weights (default: the first) inside a ``with`` block,
        as :meth:`ModelEMA.swapped <ema_cuda.ModelEMA.swapped>` (no copies; evaluate in eval mode)."""
        k = self._index(sigma_rel)
        plans = self._plans_for(model)
        self._swap_depth += 1
        try:
            with self._tree.swap(plans[k].pairs):
                yield model
        finally:
            self._swap_depth -= 1

    def copy_to(self, model: nn.Module, sigma_rel: Optional[float] = None) -> None:
        """Writes profile ``sigma_rel``'s values (default: the first) into ``model``'s tensors in place."""
        if self._swap_depth:
            raise RuntimeError(f"{type(self).__name__}.copy_to: called inside swapped()")
        k = self._index(sigma_rel)
        pairs = self._plans_for(model)[k].pairs
        if pairs:
            with torch.no_grad():
                torch._foreach_copy_([m for m, _ in pairs], [e for _, e in pairs])

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """The profiles' weights, the step, the sigma_rels and the snapshot settings, for a bit-exact resume.

        ``state["ema"]`` holds every profile's tensors under
        ``"<k>.<model key>"`` (``k`` the index in ``sigma_rels``), as
        :attr:`averaged_module`'s ``state_dict``.

        Pending snapshots are written first, so that a checkpoint never
        records a snapshot that is not on disk.  The tensors share memory
        with the EMAs; ``torch.load(..., weights_only=True)`` reads it back.
        """
        self.wait()
        return {
            "format": STATE_FORMAT,
            "sigma_rels": list(self.sigma_rels),
            "gammas": list(self.gammas),
            "ema": {e.key: e.tensor.detach() for e in state_entries(self._all)[0]},
            "step": self.step,
            "num_updates": self.num_updates,
            "snapshot_every": self.snapshot_every,
            "snapshot_dir": None if self.snapshot_dir is None else str(self.snapshot_dir),
            "last_snapshot_step": self.last_snapshot_step,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; everything is checked before anything is written.

        The saved ``sigma_rels`` must be this EMA's, and the weights must
        match its profiles by name and shape.  The snapshot settings stay
        those given to the constructor (a resumed run may write elsewhere).
        """
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{where}: not a PostHocEMA state (format {got!r}, expected {STATE_FORMAT!r})")
        missing = [k for k in ("sigma_rels", "ema", "step", "num_updates", "last_snapshot_step") if k not in state]
        if missing:
            raise ValueError(f"{where}: the state lacks {missing}")
        saved = state["sigma_rels"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.sigma_rels) or not all(
                isinstance(a, numbers.Real) and math.isclose(a, b, rel_tol=1e-6) for a, b in zip(saved, self.sigma_rels)):
            raise ValueError(f"{where}: the state has sigma_rels {saved!r}, this EMA {list(self.sigma_rels)!r}")
        for key in ("step", "num_updates"):
            v = state[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}: {key!r} must be an integer >= 0, got {v!r}")
        last = state["last_snapshot_step"]
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= state["step"]):
            raise ValueError(f"{where}: 'last_snapshot_step' must be None or an integer in [1, step], got {last!r}")
        weights = state["ema"]
        current = {e.key: e.tensor for e in state_entries(self._all)[0]}

        def named(key: str) -> str:
            k, _, rest = key.partition(".")
            return f"profile sigma_rel={self.sigma_rels[int(k)]} entry {rest!r}" if k.isdigit() and \
                int(k) < len(self.sigma_rels) else f"entry {key!r}"

        if not isinstance(weights, dict) or set(weights) != set(current):
            diff = sorted(set(weights) ^ set(current)) if isinstance(weights, dict) else []
            raise ValueError(f"{where}: the weights do not match this EMA's profiles (differing: "
                             f"{[named(k) for k in diff[:4]]})")
        targets = []
        for key, t in current.items():
            w = weights[key]
            if not isinstance(w, torch.Tensor) or w.shape != t.shape:
                shape = list(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                raise ValueError(f"{where}: {named(key)} is {shape} in the state but {list(t.shape)} here")
            targets.append((t, w))
        self.wait()
        with torch.no_grad():
            for t, w in targets:
                t.copy_(w)
        self.step, self.num_updates, self.last_snapshot_step = state["step"], state["num_updates"], last

    def __getstate__(self) -> Dict[str, Any]:
        # The writer thread cannot be pickled or copied; state_dict() holds everything a resume needs.
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied (it owns a writer thread); save "
                        "state_dict() and restore it with load_state_dict()")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sigma_rels={list(self.sigma_rels)}, snapshot_every={self.snapshot_every}, "
                f"snapshot_dir={None if self.snapshot_dir is None else str(self.snapshot_dir)!r}, "
                f"ema_dtype={self.ema_dtype}, step={self.step})")
