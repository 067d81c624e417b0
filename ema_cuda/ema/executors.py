"""How an EMA's update runs.  Each EMA owns one executor, chosen by its options:

* :class:`EagerExecutor`: the plan's fused call(s) on the current stream,
  with a Python float decay.
* :class:`CapturableExecutor` (``capturable=True``): the step, the decay and
  the update counter live in 0-dim tensors on the EMA's device, and the
  schedule is evaluated there, so that an update holds no host value that
  changes from step to step (``torch.compile(fullgraph=True)``, CUDA graphs).
* :class:`SideStreamExecutor` (``async_update=True``): the parameters are
  averaged on a side stream of its own; it keeps the event of the update in
  flight and makes every reader wait for it (NOTE [side stream]).
"""
from __future__ import annotations

import numbers
import weakref
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

from ema_cuda.ops import ema_update_

__all__ = ["CudaStreams", "EagerExecutor", "CapturableExecutor", "SideStreamExecutor", "WaitHook", "integer_step",
           "make_executor", "recompiles_warning"]


def make_executor(where: str, options: Any, storage: Any, ema: nn.Module, counters: Mapping[str, Any]) -> Any:
    """The executor ``options`` ask for, for an EMA whose tensors are ``storage`` and whose module is ``ema``,
    with its counters from ``counters`` (see :meth:`EagerExecutor.counters`; empty for a new EMA)."""
    if options.capturable:
        executor: EagerExecutor = CapturableExecutor(storage.device(where, "capturable=True"),
                                                     counters.get("device_counters"))
    elif options.async_update:
        executor = SideStreamExecutor(storage.device(where, "async_update"), where)
        executor.install_wait_hook(ema)
    else:
        executor = EagerExecutor()
    if counters.get("device_counters") is None:  # else the device count is the one
        executor.set_count(int(counters.get("num_updates", 0)))
    # A new EMA counts from step 0; one unpickled from before the step was
    # kept does not know it (NOTE [elapsed steps] in ema_cuda.schedules_time).
    executor.last_step = counters.get("last_step", None if "num_updates" in counters else 0)
    return executor


def recompiles_warning(where: str) -> str:
    # The step and the decay reach the compiled code as Python numbers, so
    # every step is a new constant: a recompilation per step until the cache
    # limit, then eager execution.
    return (
        f"{where}.update runs inside torch.compile with capturable=False: the step and the decay are new Python "
        "numbers at every call, so the function recompiles every step; build the EMA with capturable=True "
        "(ModelEMA(..., capturable=True, total_steps=...)) to keep them in device tensors"
    )


def integer_step(where: str, step: Any) -> int:
    """``step`` as a Python int: ints, numpy integers and 0-dim integer tensors; anything else is an error."""
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
            raise TypeError(
                f"{where}.update: step must be an integer (an int, a numpy integer or a 0-dim integer tensor), got a "
                f"tensor of shape {list(step.shape)} and dtype {step.dtype}"
            )
        return int(step)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(
            f"{where}.update: step must be an integer (an int, a numpy integer or a 0-dim integer tensor), got "
            f"{step!r} ({type(step).__name__}); schedules and update_every count whole optimizer steps"
        )
    return int(step)


class EagerExecutor:
    """The plan's fused call(s) on the current stream; counts the updates."""

    #: Whether plans keep the parameters apart from the buffers (for a side stream).
    split_params = False
    #: The capturable mode's device tensors (none here).
    step_tensor: Optional[torch.Tensor] = None
    decay_tensor: Optional[torch.Tensor] = None

    def __init__(self) -> None:
        self.updates = 0
        #: The step of the last update applied; None when unknown (NOTE [elapsed steps] in ema_cuda.schedules_time).
        self.last_step: Optional[int] = 0
        #: The decay of the last update applied (None before the first).
        self.last_decay: Any = None

    def elapsed(self, step: int, update_every: int) -> int:
        """The steps an update at ``step`` stands for (NOTE [elapsed steps] in ema_cuda.schedules_time)."""
        last = self.last_step
        return step - last if last is not None and step > last else update_every

    def saved_step(self, options: Any) -> Optional[int]:
        """The ``step`` a state_dict records: the last one where the next update depends on it."""
        return self.last_step if callable(getattr(options.decay_function, "decay_over", None)) else None

    def decay_used(self) -> Optional[float]:
        """The decay of the last update applied, None before the first."""
        return None if self.last_decay is None else float(self.last_decay)

    def count(self) -> int:
        return self.updates

    def set_count(self, value: int) -> None:
        self.updates = value

    def counters(self) -> Dict[str, Any]:
        """What a pickled EMA keeps of this executor."""
        return {"num_updates": self.count(), "device_counters": None, "last_step": self.last_step}

    def adopt(self, plan: Any) -> None:
        """Takes a newly built plan (nothing to do here)."""

    def run(self, plan: Any, decay: Any, step: Optional[int] = None) -> None:
        """One update with ``decay``; ``step`` (when given) is what the next update counts elapsed steps from."""
        with torch.no_grad():
            if plan.main is not None:
                plan.main.update(decay)
            if plan.cast_ema:
                torch._foreach_copy_(plan.cast_ema, plan.cast_model)
        self.updates += 1
        self.last_decay = decay
        if step is not None:
            self.last_step = step

    def wait(self) -> None:
        """Nothing runs asynchronously here."""


class CapturableExecutor(EagerExecutor):
    """Device tensors of the capturable mode: the step of the last update, its decay (float64), the count."""

    def __init__(self, device: torch.device, tensors: Optional[tuple] = None):
        super().__init__()
        if tensors is None:
            tensors = (torch.zeros((), dtype=torch.int64, device=device),
                       torch.zeros((), dtype=torch.float64, device=device),
                       torch.zeros((), dtype=torch.int64, device=device))
        self.step_tensor, self.decay_tensor, self.num_updates = tensors

    def count(self) -> int:
        return int(self.num_updates)

    def saved_step(self, options: Any) -> Optional[int]:
        return int(self.step_tensor)

    def decay_used(self) -> Optional[float]:
        return float(self.decay_tensor) if self.count() else None

    def set_count(self, value: int) -> None:
        self.num_updates.fill_(value)

    def counters(self) -> Dict[str, Any]:
        return {"num_updates": self.count(), "device_counters": (self.step_tensor, self.decay_tensor, self.num_updates),
                "last_step": None}

    def update(self, where: str, plans: Any, src: nn.Module, options: Any, step: Any, total_steps: Any,
               warn_horizon: Callable[[Any], None]) -> None:
        """One capturable update of ``src`` (see ``ModelEMA.update``); ``warn_horizon`` sees the run's length."""
        tracing = self.tracing()
        plan = plans.traced(src) if tracing else plans.get(src, options.buffers)
        if plan is None:
            raise RuntimeError(
                f"{where}.update: no update plan for this model inside torch.compile or a CUDA graph capture; "
                "call update() once eagerly with this model first"
            )
        # The new step and its decay are computed before anything is written,
        # so that a failing schedule leaves the counter and the EMA as they were.
        new_step = self.new_step(where, step, tracing)
        total = options.total_steps if total_steps is None else total_steps
        if not tracing:
            warn_horizon(total)
        self.run_at(plan, options, new_step, total)

    def tracing(self) -> bool:
        """Inside torch.compile or a CUDA graph capture, where no host value may be read or frozen."""
        return torch.compiler.is_compiling() or (self.step_tensor.is_cuda and torch.cuda.is_current_stream_capturing())

    def new_step(self, where: str, step: Any, tracing: bool) -> torch.Tensor:
        """The step of this update as a device tensor; checked before anything is written."""
        if step is None:
            return self.step_tensor + 1
        if isinstance(step, torch.Tensor):
            if step.dim() != 0 or step.device != self.step_tensor.device:
                raise ValueError(
                    f"{where}.update: a step tensor must be 0-dim and on {self.step_tensor.device}, got shape "
                    f"{list(step.shape)} on {step.device}"
                )
            if step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
                # Checked on the dtype, without reading the value: a float
                # step would be truncated silently into the int64 counter.
                raise TypeError(f"{where}.update: a step tensor must have an integer dtype, got {step.dtype}")
            return step
        if tracing:
            raise TypeError(
                f"{where}.update: got the Python int step={step!r} inside torch.compile or a CUDA graph capture, "
                "where it would be frozen into the compiled code or the graph; leave step out (the EMA counts "
                "steps on the device) or pass a 0-dim tensor"
            )
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"{where}.update: step must be an integer >= 0 or a 0-dim tensor, got {step!r}")
        return torch.full_like(self.step_tensor, int(step))

    def run_at(self, plan: Any, options: Any, new_step: torch.Tensor, total_steps: Any) -> None:
        """One update at ``new_step``: the schedule on the device, then the plan with the decay tensor."""
        with torch.no_grad():
            fn = options.decay_function
            if callable(getattr(fn, "tensor_decay_over", None)):
                # NOTE [elapsed steps] in ema_cuda.schedules_time; the step tensor starts at 0.
                gap = new_step - self.step_tensor
                elapsed = torch.where(gap > 0, gap, options.update_every).to(torch.float64)
                decay = fn.tensor_decay_over(options.decay, new_step, total_steps, elapsed)
            else:
                decay = fn.tensor_value(options.decay, new_step, total_steps)
            self.step_tensor.copy_(new_step)
            # Item assignment, not copy_: torch.compile of torch 2.11 and 2.13
            # (not 2.14) drops a copy_ into a 0-dim float64 CPU tensor when
            # it restarts its analysis (tensorify_python_scalars): the decay
            # tensor then stayed 0 and the EMA copied the model.
            self.decay_tensor[()] = decay
            main = plan.main
            if main is not None and torch.compiler.is_compiling():
                # The list op is what torch.compile can trace; the updater
                # object is opaque to it.
                if main.ema:
                    ema_update_(main.ema, main.model, self.decay_tensor)
                if main.copy_ema:
                    torch._foreach_copy_(main.copy_ema, main.copy_model)
            elif main is not None:
                main.update(self.decay_tensor)
            if plan.cast_ema:
                torch._foreach_copy_(plan.cast_ema, plan.cast_model)
            self.num_updates.add_(1)


class CudaStreams:
    """The stream operations of the asynchronous update, in one place (tests substitute a recording fake)."""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def side_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def stream(self, stream: Any) -> Any:
        return torch.cuda.stream(stream)

    def new_event(self) -> Any:
        return torch.cuda.Event()

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)


class WaitHook:
    """Forward pre-hook of ``ema.ema``: a forward pass reads the EMA, so it waits for an update in flight."""

    def __init__(self, executor: Optional["SideStreamExecutor"]):
        self.ref = weakref.ref(executor) if executor is not None else None

    def __call__(self, module: nn.Module, args: Any) -> None:
        executor = self.ref() if self.ref is not None else None
        if executor is not None:
            executor.wait()

    def __reduce__(self):
        # A copied module gets an inert hook; the copied EMA installs its own.
        return (WaitHook, (None,))


class SideStreamExecutor(EagerExecutor):
    """The parameters' update on a side stream (NOTE [side stream]).

    NOTE [side stream]: the update only reads the parameters, which nothing
    writes until the next optimizer step, so it can overlap the next forward
    pass.  The side stream waits for the current one before each update (the
    optimizer wrote the parameters there); an event marks the update's end,
    and the current stream waits for it before anything that reads the EMA
    or writes the parameters: the next ``optimizer.step()`` of any
    ``torch.optim`` optimizer (a step pre-hook this executor registers, and
    removes when it is collected), a forward pass of ``ema.ema``
    (:class:`WaitHook`), and every read of the EMA in the EMA's own methods.
    Buffers, which the next forward pass writes, are updated on the current
    stream.  The tensors the side stream uses are recorded with the caching
    allocator once per plan, so their blocks are not handed out again while
    it may still use them.
    """

    split_params = True
    #: The stream API an executor talks to unless given one; tests substitute a recording fake.
    default_streams: Any = CudaStreams()

    def __init__(self, device: torch.device, where: str, streams: Any = None):
        self.streams = streams if streams is not None else type(self).default_streams
        if not self.streams.supports(device):
            raise ValueError(f"{where}: async_update needs the EMA on a CUDA device, it is on {device}")
        self.device = device
        self.stream: Any = None
        self.pending: Any = None
        ref = weakref.ref(self)

        def wait_before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            executor = ref()
            if executor is not None:
                executor.wait()

        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.hook = register_optimizer_step_pre_hook(wait_before_step)
        weakref.finalize(self, self.hook.remove)

    def install_wait_hook(self, module: nn.Module) -> None:
        """Makes a forward pass of ``module`` wait for this executor's updates (replacing copied, inert hooks)."""
        hooks = module._forward_pre_hooks
        for key in [k for k, h in hooks.items() if isinstance(h, WaitHook)]:
            del hooks[key]
        module.register_forward_pre_hook(WaitHook(self))

    def side_stream(self) -> Any:
        if self.stream is None:
            self.stream = self.streams.side_stream(self.device)
        return self.stream

    def adopt(self, plan: Any) -> None:
        if plan.side is not None:
            side = self.side_stream()
            for t in plan.side.ema + plan.side.model:
                self.streams.record_stream(t, side)

    def run(self, plan: Any, decay: Any, step: Optional[int] = None) -> None:
        if plan.side is not None:
            streams, side = self.streams, self.side_stream()
            side.wait_stream(streams.current_stream(self.device))
            with torch.no_grad(), streams.stream(side):
                plan.side.update(decay)
            event = streams.new_event()
            event.record(side)
            self.pending = event
        super().run(plan, decay, step)

    def wait(self) -> None:
        """Makes the current stream wait for the update in flight, if any (the host does not block)."""
        event = self.pending
        if event is not None:
            self.streams.current_stream(self.device).wait_event(event)
            self.pending = None
