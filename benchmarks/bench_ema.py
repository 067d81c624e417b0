"""Times one EMA update of a model's weights, fused vs the ways people do it today.

``python -m benchmarks.bench_ema`` (what ``make bench`` runs) times every
method of :mod:`benchmarks.methods` on every workload of
:mod:`benchmarks.workloads`, in one process and on the same tensors, with the
protocol of :mod:`benchmarks.runner` (each method checked against an fp64
reference first, then timed in interleaved rounds).  On the CPU it then runs
the busy-CPU scenario (:mod:`benchmarks.busy`); everywhere the end-to-end
share of a training step (:mod:`benchmarks.end_to_end`) and the goals
(:mod:`benchmarks.goals`).

Prints one compact table per workload, the busy-CPU scenario, the end-to-end
share and the goals: under 80 lines.  Writes ``<device>-<date>.json``, the
full markdown tables (``.md``, :mod:`benchmarks.report`) and a bar plot per
workload (``.png``, :mod:`benchmarks.plot`, when matplotlib is installed) to
``benchmarks/results/latest/``, which git ignores; the reference run that
RESULTS.md cites is written with ``--out benchmarks/results``.  ``--quick``
runs three reduced workloads in seconds (for checking that everything works,
not for figures).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

import ema_cuda
from ema_cuda import ops
from benchmarks.busy import BUSY_METHODS, busy_table, run_busy
from benchmarks.end_to_end import run_end_to_end
from benchmarks.goals import evaluate_goals
from benchmarks.methods import DEFAULT_METHOD_KEYS, FOREACH, FUSED, LIMIT, LIMIT_FUSED, METHOD_KEYS, METHODS, NAIVE, OURS
from benchmarks.plot import plot
from benchmarks.report import COMPACT_HEADER, fmt_time, goals_lines, report, workload_table, wrong_results
from benchmarks.runner import run_workload
from benchmarks.workloads import WORKLOAD_NAMES, Workload, get_workload

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_WORKLOADS = ("resnet50", "small", "vit_b16_bf16")
_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` ones (their help says what they mean)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_ema",
        description=(
            "Time one EMA update of model weights: ema_cuda's fused op vs the SuperGradients loop, "
            "per-tensor loops, torch._foreach_lerp_, AveragedModel, timm ModelEmaV3 and the "
            "bandwidth limit. Every method is checked against an fp64 reference first."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--workloads", nargs="+", default=None, choices=WORKLOAD_NAMES, metavar="NAME",
        help=f"workloads to run, from: {', '.join(WORKLOAD_NAMES)} (default: all; with --quick: {', '.join(QUICK_WORKLOADS)})",
    )
    p.add_argument(
        "--dtypes", nargs="+", default=None, metavar="EMA[/MODEL]",
        help="run every workload with these dtype pairs instead of its own, e.g. fp32 fp32/bf16 bf16 "
        "(EMA dtype / model dtype; fp32, fp64, bf16, fp16)",
    )
    p.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHOD_KEYS), choices=METHOD_KEYS + ("all",), metavar="NAME",
        help=f"methods to run, from: {', '.join(METHOD_KEYS)}, or all (keep '{FUSED}', '{NAIVE}', '{FOREACH}' "
        f"and the limits '{LIMIT}', '{LIMIT_FUSED}' for the ratios)",
    )
    p.add_argument("--size-scale", type=float, default=None,
                   help="multiply the parameter count of the model and huge workloads, e.g. 12 for a 1.2B-parameter "
                   "GPT-2 (default 1, or 0.02 with --quick)")
    p.add_argument("--small-count", type=int, default=None,
                   help="number of 1,000-element tensors in the 'small' workload (default 10000, 300 with --quick)")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed blocks per method, taken in interleaved rounds over the methods; medians over blocks")
    p.add_argument("--min-time", type=float, default=0.35,
                   help="seconds of timing per method, split into the blocks (a block holds at least one update)")
    p.add_argument("--decay", type=float, default=0.999, help="EMA decay (does not change the speed)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke run: size scale 0.02, 300 small tensors, short timing, nothing saved "
                   "unless --out is given")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training-step measurement")
    p.add_argument("--no-busy", action="store_true",
                   help="skip the busy-CPU scenario (foreach / ema_update_ / FusedUpdater on small and resnet50 at "
                   "1 and 2 threads, quiet and beside one spinning process)")
    p.add_argument("--verbose", action="store_true", help="also print every method's timing as it is measured")
    p.add_argument("--e2e-steps", type=int, default=20, help="timed training steps per end-to-end variant")
    p.add_argument("--e2e-batch", type=int, default=64, help="batch size of the end-to-end training step")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the JSON, the full markdown report and the PNG (default: "
                   "benchmarks/results/latest, which git ignores; the reference run RESULTS.md cites is written "
                   "with --out benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="print only; write no files")
    p.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                   help="run nothing: print the tables of a saved result (and redraw its plot next to it)")
    args = p.parse_args(argv)
    # --quick checks that every part runs (seconds, for the smoke test), so
    # it keeps one workload of each kind and sizes where the slow loops
    # (the SG loop at 0.6 s per update on a full GPT-2) take milliseconds.
    if args.workloads is None:
        args.workloads = list(QUICK_WORKLOADS if args.quick else WORKLOAD_NAMES)
    if args.size_scale is None:
        args.size_scale = 0.02 if args.quick else 1.0
    if args.small_count is None:
        args.small_count = 300 if args.quick else 10_000
    if "all" in args.methods:
        args.methods = list(METHOD_KEYS)
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.min_time = min(args.min_time, 0.005)
        args.e2e_steps = min(args.e2e_steps, 1)
        args.e2e_batch = min(args.e2e_batch, 8)
        if args.out is None:
            args.no_save = True
    if args.out is None:
        args.out = RESULTS_DIR / "latest"
    return args


def _dtype_pairs(specs: Optional[Sequence[str]]) -> Optional[List[Tuple[torch.dtype, torch.dtype]]]:
    if not specs:
        return None
    pairs = []
    for s in specs:
        parts = s.lower().split("/")
        if len(parts) > 2 or any(p not in _DTYPES for p in parts):
            raise SystemExit(f"--dtypes: cannot parse {s!r}; use EMA or EMA/MODEL from {', '.join(_DTYPES)}")
        pairs.append((_DTYPES[parts[0]], _DTYPES[parts[-1]]))
    return pairs


def build_workloads(args: argparse.Namespace) -> List[Workload]:
    wls = [get_workload(n, args.size_scale, args.small_count) for n in args.workloads]
    pairs = _dtype_pairs(args.dtypes)
    if pairs is None:
        return wls
    out = []
    for w in wls:
        for e, m in pairs:
            v = copy.copy(w)
            v.ema_dtype, v.model_dtype = e, m
            v.name = f"{w.name}[{v.dtype_label().replace(' ', '')}]"
            out.append(v)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return _replay(args.from_json)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to this torch build")
    # CUDA-only rows would only say "skipped" on the CPU.
    methods = [m for m in METHODS if m.key in args.methods and not (m.key == "cuda_graph" and device.type != "cuda")]
    meta = run_meta(args, device)
    _print_preamble(args, meta)
    log = print if args.verbose else (lambda *_: None)

    workloads = []
    for i, wl in enumerate(build_workloads(args)):
        w = run_workload(wl, device, methods, args.decay, args.min_time, args.repeats, args.seed, log=log)
        workloads.append(w)
        if i == 0:
            print(COMPACT_HEADER)
        print(workload_table(w), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    busy = None
    if not args.no_busy and device.type == "cpu":
        names = ["small"] if args.quick else ["small", "resnet50"]
        bwls = [get_workload(n, args.size_scale, args.small_count) for n in names]
        busy = run_busy(bwls, [m for m in METHODS if m.key in BUSY_METHODS],
                        min_time=args.min_time, repeats=args.repeats, decay=args.decay)
        print("\nBusy CPU: the same run, quiet and beside one spinning process (a Python busy loop), "
              "medians per update")
        print(busy_table(busy))

    e2e = None
    if not args.no_e2e:
        e2e = run_end_to_end(device, args.e2e_steps, args.e2e_batch, args.decay, log=log)
        shares = ", ".join(f"{v['label']} {fmt_time(v['ema_s'])} = {100 * v['ema_share']:.1f}%"
                           for k, v in e2e["variants"].items() if k != "none" and v["status"] == "ok")
        print(f"\nEnd to end: one SGD step of a {e2e['ema_elements'] / 1e6:.1f}M-parameter CNN, batch {e2e['batch']}, "
              f"{fmt_time(e2e['variants']['none'].get('step_s'))} without EMA; EMA update and its share of the step:"
              f"\n  {shares}")

    goals = evaluate_goals(device, workloads)
    meta["loadavg_end"] = _loadavg()
    result = {"meta": meta, "workloads": workloads, "end_to_end": e2e, "goals": goals, "busy": busy}
    measured = [g for g in goals if g["met"] is not None]
    print(f"\nGoals ({sum(g['met'] for g in measured)} of {len(measured)} met; targets and earlier runs: "
          "benchmarks/RESULTS.md):")
    print("\n".join(goals_lines(goals)))
    wrong = wrong_results(result)
    if wrong:
        print("WRONG RESULTS (not timed): " + "; ".join(f"{lbl} on {wn}" for wn, _, lbl in wrong))
    if not args.no_save:
        _save(result, args.out, device)
    return 1 if any(key in OURS for _, key, _ in wrong) else 0


def run_meta(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """What the run was: machine, versions, options, and how busy the machine was at the start."""
    return {
        "date": _dt.date.today().isoformat(),
        "datetime": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "ema_cuda": ema_cuda.__version__,
        "backend": ops.backend(),
        "cuda_kernel": ops.cuda_kernel_available(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        # Other processes on the machine disturb the timings: the 1-minute
        # load average before and after the run says how busy it was.
        "loadavg_start": _loadavg(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def _print_preamble(args: argparse.Namespace, meta: Dict[str, Any]) -> None:
    print(f"# EMA update benchmark: {meta['device_name']}; torch {torch.__version__}, ema_cuda '{ops.backend()}' "
          f"backend, {meta['date']}" + (f", size scale {args.size_scale:g}" if args.size_scale != 1 else ""))
    if ops.backend() != "compiled":
        print(f"WARNING: the fused rows run the pure-PyTorch fallback ({ops.fallback_reason()})")
    if args.quick:
        print("--quick: reduced sizes, mostly cache-resident, and short timing: checks that everything runs; "
              "its figures are not measurements.")
    print("Median time per update. x naive / x foreach: how many times faster than the SG loop / "
          "torch._foreach_lerp_.\n%limit: the limit's time / this time; the limit is the fastest block of the "
          "faster of a flat lerp_ and the fused op over one flat buffer, moving the same bytes.")


def _save(result: Dict[str, Any], out: Path, device: torch.device) -> None:
    meta = result["meta"]
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{_slug(device.type if device.type == 'cpu' else 'cuda-' + meta['device_name'])}-{meta['date']}"
    jpath = out / f"{stem}.json"
    jpath.write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(report(result) + "\n")
    why = plot(result, out / f"{stem}.png")
    print(f"\nWrote {jpath}, the full tables ({stem}.md)" + (f"; plot skipped: {why}" if why else " and the plot"))


def _replay(path: Path) -> int:
    """``--from-json``: the tables of a saved run, and its plot redrawn next to it."""
    result = json.loads(path.read_text())
    # Goals are re-derived from the timings, so a saved run is judged by today's rules.
    result["goals"] = evaluate_goals(torch.device(result["meta"]["device"]), result["workloads"])
    print(report(result))
    why = plot(result, path.with_suffix(".png"))
    print(f"\nPlot: {why}; skipped" if why else f"\nWrote {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
