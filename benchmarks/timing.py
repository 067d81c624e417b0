"""Timing one method: blocks of updates, and on CUDA the kernel launches per update."""
from __future__ import annotations

import re
from typing import Callable, Dict

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BlockTimer:
    """Times blocks of ``number`` calls of one method: the unit of the interleaved rounds.

    On the CPU a ``torch.utils.benchmark.Timer`` on all of torch's threads
    (its default is one thread), whose ``blocked_autorange`` also warms up
    and picks ``number`` so that the timer's overhead stays below 0.1%; on
    CUDA, events around the block (the host only waits at the block's end).
    """

    def __init__(self, step: Callable[[], None], device: torch.device, block_time: float):
        self.step, self.device = step, device
        if device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            for _ in range(3):
                step()
            self.number = 1
            while True:  # double until a block lasts block_time (at least ~1 ms)
                t = self.block()
                if t >= max(block_time, 1e-3) or self.number >= 1 << 14:
                    break
                self.number *= 2
        else:
            from torch.utils.benchmark import Timer

            self._timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
            step()  # first-touch page faults, allocator, thread pool
            m = self._timer.blocked_autorange(min_run_time=block_time)
            per_call = m.median
            self.number = max(m.number_per_run, int(block_time / per_call) if per_call > 0 else 1)

    def block(self) -> float:
        """Seconds per call, averaged over one block."""
        if self.device.type == "cuda":
            self._start.record()
            for _ in range(self.number):
                self.step()
            self._end.record()
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3 / self.number
        return self._timer.timeit(self.number).raw_times[0] / self.number


def count_cuda_launches(step: Callable[[], None], device: torch.device, calls: int = 5) -> Dict[str, float]:
    """Kernel launches (host-side launch API calls) and GPU activities per update."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize(device)
    launch_apis = re.compile(r"^(cuda|cu)(LaunchKernel|LaunchKernelExC|LaunchCooperativeKernel|GraphLaunch|MemcpyAsync|MemsetAsync)")
    launches = gpu_ops = 0
    for ev in prof.events():
        if ev.device_type == DeviceType.CUDA:
            gpu_ops += 1
        elif launch_apis.match(ev.name):
            launches += 1
    return {"launches": launches / calls, "gpu_ops": gpu_ops / calls}
