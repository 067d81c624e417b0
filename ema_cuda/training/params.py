"""Training parameters: defaults, documentation and validation.

``Trainer.train`` takes ``training_params`` as a plain dict.  Every key must
be one of the fields of :class:`TrainingParams`; anything else is an error
that names the unknown keys and lists the known ones (a misspelt ``"emma"``
silently training without EMA would be worse).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = ["TrainingParams", "parse_training_params", "LR_MODES", "OPTIMIZERS", "LOSSES"]

LR_MODES = ("constant", "step", "cosine")
OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop")
LOSSES = ("cross_entropy", "kd_loss")
MIXED_PRECISION = (False, True, "bf16", "fp16")


@dataclass
class TrainingParams:
    """All training parameters, with their defaults.

    Schedule and optimisation
        ``max_epochs`` (required): number of epochs.
        ``initial_lr`` (``None``): the learning rate; required when
        ``optimizer`` is a name.  With an optimizer instance, ``None`` keeps
        each parameter group's own ``lr`` as its base rate, and a number
        overrides them all.
        ``lr_mode`` (``"constant"``): ``"constant"``, ``"step"`` (multiply by
        ``lr_decay_factor`` at every epoch listed in ``lr_updates``) or
        ``"cosine"`` (cosine from the base rate down to
        ``base * cosine_final_lr_ratio`` at the last batch).
        ``lr_updates`` (``()``), ``lr_decay_factor`` (``0.1``),
        ``cosine_final_lr_ratio`` (``0.01``): see ``lr_mode``.
        ``lr_warmup_epochs`` (``0``) / ``lr_warmup_steps`` (``0``, in
        batches): a linear warm-up from ``warmup_initial_lr`` (default: a
        tenth of the base rate) to the base rate, before any mode; give one
        of the two.  The rate is set before every batch.
        ``optimizer`` (``"SGD"``): ``"SGD"``, ``"Adam"``, ``"AdamW"``,
        ``"RMSprop"`` (case-insensitive) or a ``torch.optim.Optimizer``
        instance built on the model's parameters.
        ``optimizer_params`` (``{}``): keyword arguments for the optimizer
        built by name, e.g. ``{"momentum": 0.9, "weight_decay": 5e-4}``.
        ``loss`` (``"cross_entropy"``): a name (``"cross_entropy"``;
        ``"kd_loss"`` for :class:`~ema_cuda.training.KDTrainer`) or a module
        / callable ``loss(outputs, targets) -> scalar``.
        ``loss_params`` (``{}``): keyword arguments for the loss built by
        name (e.g. ``label_smoothing``; for ``kd_loss``: ``temperature``,
        ``distillation_weight``).
        ``batch_accumulate`` (``1``): batches per optimizer step.  Gradients
        of the batches of one step are averaged (each batch loss divided by
        the number of batches in its window).  Windows do not cross epoch
        boundaries: a last, shorter window at the end of an epoch still
        makes a step.
        ``mixed_precision`` (``False``): ``True`` means fp16 with a gradient
        scaler on CUDA and bf16 on the CPU; ``"bf16"`` or ``"fp16"`` pick
        explicitly (fp16 needs CUDA).
        ``clip_grad_norm`` (``None``): clip the gradients' global 2-norm to
        this value before each optimizer step (after unscaling).

    EMA
        ``ema`` (``False``): keep an exponential moving average of the
        weights (see :class:`~ema_cuda.ema.ModelEMA`).
        ``ema_params`` (``{}``): keyword arguments of
        :meth:`ModelEMA.from_params <ema_cuda.ema.ModelEMA.from_params>`,
        e.g. ``{"decay": 0.9999, "decay_type": "threshold"}``.  An unknown
        key is an error naming it and the closest valid one; ``ema_params``
        with ``ema`` off is a warning (they would have no effect).
        ``{"decay_type": "posthoc", "sigma_rels": [0.05, 0.10],
        "snapshot_every": 100}`` keeps a :class:`~ema_cuda.PostHocEMA`
        instead: the first ``sigma_rel`` is validated and kept, and every
        profile is snapshotted to ``<checkpoints>/posthoc`` (or
        ``snapshot_dir``) every ``snapshot_every`` steps (by the main process).
        ``validate_raw_weights`` (``True``): with EMA on, also validate the
        raw weights each epoch (logged as ``valid_raw_*``).

    Model selection and checkpoints
        ``metric_to_watch`` (``"accuracy"``): the validation metric that
        selects ``ckpt_best.pth``; ``"accuracy"``, ``"loss"``, or any key of
        the per-epoch metrics such as ``"valid_raw_accuracy"``.
        ``greater_metric_to_watch_is_better`` (``None``): ``None`` means
        ``False`` for metrics whose name ends in ``loss`` and ``True``
        otherwise.
        ``save_model`` (``True``): write ``ckpt_latest.pth`` each epoch and
        ``ckpt_best.pth`` when the watched metric improves.
        ``resume`` (``False``): continue from ``ckpt_latest.pth`` of this
        experiment (or from ``resume_path``).
        ``resume_path`` (``None``): an explicit checkpoint to resume from.
        ``overwrite`` (``False``): let a new run (not a resume) replace the
        checkpoints and metrics log an earlier run left in
        ``ckpt_root_dir/experiment_name``; without it that is an error, so
        that a second run under the same name cannot silently destroy the
        first one's checkpoints.

    Run
        ``seed`` (``42``): seeds torch, ``random`` and numpy at the start
        (``None``: leave the generators alone).
        ``device`` (``None``): where to train; ``None`` means CUDA when
        available, else the CPU.
        ``progress_bar`` (``True``): tqdm bars over epochs and batches.
        ``silent_mode`` (``False``): do not print the per-epoch summary line.
        ``tensorboard`` (``None``): TensorBoard events in
        ``ckpt_root_dir/experiment_name/tensorboard/`` (see
        :class:`~ema_cuda.training.logs.TensorBoardLog`): ``None`` writes
        them when TensorBoard is installed (else one INFO log line says it
        is off), ``True`` requires it (an error names ``pip install
        tensorboard``), ``False`` writes none.
    """

    max_epochs: Optional[int] = None
    initial_lr: Optional[float] = None
    lr_mode: str = "constant"
    lr_updates: Sequence[int] = ()
    lr_decay_factor: float = 0.1
    cosine_final_lr_ratio: float = 0.01
    lr_warmup_epochs: int = 0
    lr_warmup_steps: int = 0
    warmup_initial_lr: Optional[float] = None
    optimizer: Union[str, torch.optim.Optimizer] = "SGD"
    optimizer_params: Dict[str, Any] = field(default_factory=dict)
    loss: Union[str, Callable[..., torch.Tensor]] = "cross_entropy"
    loss_params: Dict[str, Any] = field(default_factory=dict)
    batch_accumulate: int = 1
    mixed_precision: Union[bool, str] = False
    clip_grad_norm: Optional[float] = None
    ema: bool = False
    ema_params: Dict[str, Any] = field(default_factory=dict)
    validate_raw_weights: bool = True
    metric_to_watch: str = "accuracy"
    greater_metric_to_watch_is_better: Optional[bool] = None
    save_model: bool = True
    resume: bool = False
    resume_path: Optional[str] = None
    overwrite: bool = False
    seed: Optional[int] = 42
    device: Optional[Union[str, torch.device]] = None
    progress_bar: bool = True
    silent_mode: bool = False
    tensorboard: Optional[bool] = None

    @classmethod
    def known_keys(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def greater_is_better(self) -> bool:
        if self.greater_metric_to_watch_is_better is not None:
            return bool(self.greater_metric_to_watch_is_better)
        return not self.metric_to_watch.endswith("loss")

    def to_log_dict(self) -> Dict[str, Any]:
        """A JSON-friendly summary (objects such as an optimizer instance become their type name)."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.device):
        return str(value)
    return f"<{type(value).__name__}>"


def _fail(key: str, value: Any, expected: str) -> None:
    raise ValueError(f"training param {key!r}: expected {expected}, got {value!r}")


def parse_training_params(training_params: Optional[Mapping[str, Any]]) -> TrainingParams:
    """Check ``training_params`` and return a :class:`TrainingParams` with defaults filled in.

    Unknown keys raise :class:`ValueError` naming them (with a "did you
    mean" hint) and listing the known keys; values of the wrong kind raise
    :class:`ValueError` naming the key and the value.
    """
    if training_params is None:
        training_params = {}
    if isinstance(training_params, TrainingParams):
        training_params = {f.name: getattr(training_params, f.name) for f in dataclasses.fields(TrainingParams)}
    if not isinstance(training_params, Mapping):
        raise TypeError(f"training_params must be a dict, got {type(training_params).__name__}")
    known = TrainingParams.known_keys()
    unknown = [k for k in training_params if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), known, n=1)
            if close:
                hints.append(f"{k!r} (did you mean {close[0]!r}?)")
            else:
                hints.append(repr(k))
        raise ValueError(
            f"unknown training param{'s' if len(unknown) > 1 else ''}: {', '.join(hints)}. "
            f"Known training params: {', '.join(known)}"
        )
    p = TrainingParams(**dict(training_params))

    if p.max_epochs is None:
        raise ValueError("training param 'max_epochs' is required")
    if isinstance(p.max_epochs, bool) or not isinstance(p.max_epochs, int) or p.max_epochs < 1:
        _fail("max_epochs", p.max_epochs, "a positive int")
    if p.initial_lr is not None and not (_is_number(p.initial_lr) and p.initial_lr >= 0 and math.isfinite(p.initial_lr)):
        _fail("initial_lr", p.initial_lr, "a finite number >= 0")
    if p.lr_mode is None:
        p.lr_mode = "constant"
    if not isinstance(p.lr_mode, str) or p.lr_mode.lower() not in LR_MODES:
        _fail("lr_mode", p.lr_mode, f"one of {LR_MODES}")
    p.lr_mode = p.lr_mode.lower()
    if not isinstance(p.lr_updates, (list, tuple)) or not all(_is_int(e) and e >= 0 for e in p.lr_updates):
        _fail("lr_updates", p.lr_updates, "a list of epoch numbers (ints >= 0)")
    p.lr_updates = tuple(sorted(int(e) for e in p.lr_updates))
    if not (_is_number(p.lr_decay_factor) and p.lr_decay_factor >= 0):
        _fail("lr_decay_factor", p.lr_decay_factor, "a number >= 0")
    if not (_is_number(p.cosine_final_lr_ratio) and 0 <= p.cosine_final_lr_ratio <= 1):
        _fail("cosine_final_lr_ratio", p.cosine_final_lr_ratio, "a number in [0, 1]")
    for key in ("lr_warmup_epochs", "lr_warmup_steps"):
        v = getattr(p, key)
        if not (_is_int(v) and v >= 0):
            _fail(key, v, "an int >= 0")
    if p.lr_warmup_epochs and p.lr_warmup_steps:
        raise ValueError(
            f"training params 'lr_warmup_epochs' ({p.lr_warmup_epochs}) and 'lr_warmup_steps' "
            f"({p.lr_warmup_steps}) are both set; give one of them"
        )
    if p.warmup_initial_lr is not None and not (_is_number(p.warmup_initial_lr) and p.warmup_initial_lr >= 0):
        _fail("warmup_initial_lr", p.warmup_initial_lr, "a number >= 0 or None")

    if isinstance(p.optimizer, str):
        names = {n.lower(): n for n in OPTIMIZERS}
        if p.optimizer.lower() not in names:
            _fail("optimizer", p.optimizer, f"one of {OPTIMIZERS} or a torch.optim.Optimizer instance")
        p.optimizer = names[p.optimizer.lower()]
        if p.initial_lr is None:
            raise ValueError(f"training param 'initial_lr' is required when 'optimizer' is a name ({p.optimizer!r})")
    elif not isinstance(p.optimizer, torch.optim.Optimizer):
        _fail("optimizer", p.optimizer, f"one of {OPTIMIZERS} or a torch.optim.Optimizer instance")
    if not isinstance(p.optimizer_params, Mapping):
        _fail("optimizer_params", p.optimizer_params, "a dict")
    if isinstance(p.loss, str):
        if p.loss not in LOSSES:
            _fail("loss", p.loss, f"one of {LOSSES} or a loss module/callable")
    elif not callable(p.loss):
        _fail("loss", p.loss, f"one of {LOSSES} or a loss module/callable")
    if not isinstance(p.loss_params, Mapping):
        _fail("loss_params", p.loss_params, "a dict")
    if not (_is_int(p.batch_accumulate) and p.batch_accumulate >= 1):
        _fail("batch_accumulate", p.batch_accumulate, "an int >= 1")
    if isinstance(p.mixed_precision, str):
        p.mixed_precision = p.mixed_precision.lower()
    if p.mixed_precision not in MIXED_PRECISION or (
        not isinstance(p.mixed_precision, (bool, str))
    ):
        _fail("mixed_precision", p.mixed_precision, "False, True, 'bf16' or 'fp16'")
    if p.clip_grad_norm is not None and not (_is_number(p.clip_grad_norm) and p.clip_grad_norm > 0):
        _fail("clip_grad_norm", p.clip_grad_norm, "a number > 0 or None")
    for key in ("ema", "validate_raw_weights", "save_model", "resume", "overwrite", "progress_bar", "silent_mode"):
        if not isinstance(getattr(p, key), bool):
            _fail(key, getattr(p, key), "True or False")
    if p.tensorboard not in (None, True, False) or not isinstance(p.tensorboard, (bool, type(None))):
        _fail("tensorboard", p.tensorboard, "None (on when TensorBoard is installed), True or False")
    if p.tensorboard:
        from ema_cuda.training.logs import summary_writer_class

        summary_writer_class(True)  # a missing TensorBoard fails here, before any work starts
    if p.ema_params is None:
        p.ema_params = {}
    if not isinstance(p.ema_params, Mapping):
        _fail("ema_params", p.ema_params, "a dict")
    if p.ema:
        # Checked here so that a misspelt key fails before any work starts.
        if p.ema_params.get("decay_type") == "posthoc":
            from ema_cuda.posthoc import PostHocEMA

            # The Trainer puts the snapshots in its checkpoint directory unless told otherwise.
            PostHocEMA.check_params(dict(p.ema_params), where="training param 'ema_params'", dir_given_later=True)
        else:
            from ema_cuda.ema import check_ema_params

            check_ema_params(dict(p.ema_params), where="training param 'ema_params'")
    elif p.ema_params:
        warnings.warn(
            f"training param 'ema_params' {dict(p.ema_params)!r} is set but 'ema' is False: no EMA is kept and "
            "they have no effect; set 'ema': True to use them",
            UserWarning,
            stacklevel=3,
        )
    if not isinstance(p.metric_to_watch, str) or not p.metric_to_watch:
        _fail("metric_to_watch", p.metric_to_watch, "a metric name such as 'accuracy' or 'loss'")
    if p.greater_metric_to_watch_is_better is not None and not isinstance(p.greater_metric_to_watch_is_better, bool):
        _fail("greater_metric_to_watch_is_better", p.greater_metric_to_watch_is_better, "True, False or None")
    if p.seed is not None and not _is_int(p.seed):
        _fail("seed", p.seed, "an int or None")
    if p.device is not None:
        try:
            p.device = torch.device(p.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"training param 'device': {p.device!r} is not a device ({exc})") from None
    return p


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
