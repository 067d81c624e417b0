"""The per-step cost of an EMA kept by a ``transformers.Trainer`` callback: EMACallback against naive callbacks.

transformers has no EMA of its own; training scripts that want one add a
callback whose ``on_step_end`` walks the parameters and updates each
parameter (``ema.mul_(d).add_(p, alpha=1 - d)``), or, a little better, one
``torch._foreach_lerp_`` over the lists.  This benchmark calls each
callback's ``on_step_end`` as the Trainer does after every optimizer step
(with the step advancing) on a GPT-2 model built from a config (GPT-2 small
by default: 12 layers, width 768, 124M parameters; nothing downloaded), in
interleaved rounds, and reports the median time per step, the bandwidth at 12
bytes per fp32 element (read EMA, read model, write EMA) and the ratio to
the naive callback.

    python -m benchmarks.fw_transformers                 # GPT-2 small
    python -m benchmarks.fw_transformers --layers 2 --width 128 --rounds 3   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.report import fmt_time  # noqa: E402


def _transformers():
    import transformers

    return transformers


def naive_callback(d: float):
    """The callback a training script writes: one ``mul_`` and one ``add_`` per parameter (ties counted once)."""
    transformers = _transformers()

    class NaiveEMACallback(transformers.TrainerCallback):
        def __init__(self):
            self.ema = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.ema = [p.detach().clone() for p in model.parameters()]

        def on_step_end(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                for e, p in zip(self.ema, model.parameters()):
                    e.mul_(d).add_(p, alpha=1 - d)

    return NaiveEMACallback()


def foreach_callback(d: float):
    """The better hand-written callback: one ``torch._foreach_lerp_`` over the lists of distinct tensors."""
    transformers = _transformers()

    class ForeachEMACallback(transformers.TrainerCallback):
        def __init__(self):
            self.ema, self.params = [], []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.params = [p for p in model.parameters() if p.is_floating_point()]  # distinct: ties counted once
            self.ema = [p.detach().clone() for p in self.params]

        def on_step_end(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, self.params, 1 - d)

    return ForeachEMACallback()


def fused_callback(d: float):
    from ema_cuda.integrations.transformers import EMACallback

    return EMACallback(decay=d, decay_type="constant")


VARIANTS: Dict[str, Callable[[float], Any]] = {
    "naive per-tensor callback": naive_callback,
    "foreach_lerp_ callback": foreach_callback,
    "EMACallback (ema_cuda)": fused_callback,
}
BASELINE = "naive per-tensor callback"


def run(layers: int, width: int, rounds: int, block_time: float, decay: float) -> Dict[str, Any]:
    transformers = _transformers()
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=50257,
                                     n_positions=1024)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    numel = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(output_dir=out, use_cpu=True, report_to=[])
    control = transformers.TrainerControl()
    steps: Dict[str, Callable[[], None]] = {}
    for name, make in VARIANTS.items():
        cb = make(decay)
        state = transformers.TrainerState(max_steps=10**9)
        cb.on_train_begin(args, state, control, model=model)

        def step(cb=cb, state=state):
            state.global_step += 1
            cb.on_step_end(args, state, control, model=model)

        steps[name] = step
    numbers = {}
    for name, step in steps.items():  # warm up, then calls per block so that a block lasts block_time
        step()
        t0 = time.perf_counter()
        step()
        numbers[name] = max(1, int(block_time / max(time.perf_counter() - t0, 1e-9)))
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):  # interleaved, so that a noisy neighbour hits every variant alike
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(numbers[name]):
                step()
            times[name].append((time.perf_counter() - t0) / numbers[name])
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "model": f"GPT-2 {layers} layers, width {width}", "parameters": numel, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "rounds": rounds,
        "per_step_s": medians, "all_s": times,
        "gb_per_s": {name: 12 * numel / t / 1e9 for name, t in medians.items()},
        "vs_naive": {name: medians[BASELINE] / t for name, t in medians.items()},
    }


def table(result: Dict[str, Any]) -> str:
    lines = [f"{result['model']} ({result['parameters'] / 1e6:.1f}M parameters, fp32), CPU, "
             f"{result['threads']} threads, torch {result['torch']}, transformers {result['transformers']}, "
             f"median of {result['rounds']} rounds",
             "", "| callback | per step | GB/s | speed-up vs naive |", "|---|---|---|---|"]
    for name, t in result["per_step_s"].items():
        lines.append(f"| {name} | {fmt_time(t)} | {result['gb_per_s'][name]:.1f} | {result['vs_naive'][name]:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block-time", type=float, default=0.5, help="seconds per timed block")
    parser.add_argument("--decay", type=float, default=0.9999)
    parser.add_argument("--json", help="also write the result here")
    ns = parser.parse_args(argv)
    result = run(ns.layers, ns.width, ns.rounds, ns.block_time, ns.decay)
    print(table(result))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
