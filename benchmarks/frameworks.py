"""The second half of ``make bench``: several EMAs in one pass, and the EMA inside each framework.

``python -m benchmarks.frameworks`` runs, in one process and one after the
other, the benchmarks that compare ema_cuda with what users of a framework
have today, and prints each one's table:

==============  ==============================================================
``multi_ema``   K = 1, 2, 3 EMA profiles: the fused multi-EMA update against
                K separate fused updates and ema-pytorch's ``PostHocEMA``
                (:mod:`benchmarks.multi_ema`)
``lightning``   the callback's per-step cost against Lightning's
                ``EMAWeightAveraging`` (:mod:`benchmarks.fw_lightning`)
``dropins``     timm's ``ModelEmaV3`` and diffusers' ``EMAModel`` against
                their ema_cuda drop-ins (:mod:`benchmarks.fw_dropins`)
``transformers`` the per-step cost of the transformers callback against a
                naive and a ``_foreach_lerp_`` callback on GPT-2 small
                (:mod:`benchmarks.fw_transformers`)
==============  ==============================================================

A section whose framework is not installed says so and the others go on.
The rows of every section are written to ``frameworks.json`` in ``--out``
(default ``benchmarks/results/latest``, which git ignores), so that a run's
figures can be cited (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

Section = Callable[[bool], Tuple[Any, str]]


def _multi_ema(quick: bool) -> Tuple[Any, str]:
    from benchmarks import multi_ema
    from benchmarks.workloads import get_workload

    workloads = [get_workload(name, small_count=300 if quick else 10_000) for name in ("resnet50", "small")]
    rows = multi_ema.run(workloads, (1, 2, 3), min_time=0.05 if quick else 0.3, repeats=3 if quick else 7,
                         busy=not quick)
    return rows, multi_ema.table(rows)


def _lightning(quick: bool) -> Tuple[Any, str]:
    from benchmarks import fw_lightning

    rows = fw_lightning.rows(quick)
    return rows, fw_lightning.table(rows)


def _dropins(quick: bool) -> Tuple[Any, str]:
    from benchmarks import fw_dropins

    rows = fw_dropins.rows(quick)
    return rows, fw_dropins.table(rows)


def _transformers(quick: bool) -> Tuple[Any, str]:
    from benchmarks import fw_transformers

    layers, width = (2, 128) if quick else (12, 768)
    result = fw_transformers.run(layers, width, rounds=3 if quick else 7, block_time=0.1 if quick else 0.5,
                                 decay=0.9999)
    return result, fw_transformers.table(result)


SECTIONS: Dict[str, Tuple[str, Section]] = {
    "multi_ema": ("Several EMAs in one pass (fp32, CPU)", _multi_ema),
    "lightning": ("Per-step EMA cost in Lightning: EMACallback vs EMAWeightAveraging", _lightning),
    "dropins": ("Per-step EMA cost: timm ModelEmaV3 and diffusers EMAModel vs the ema_cuda drop-ins", _dropins),
    "transformers": ("Per-step EMA cost of a transformers.Trainer callback", _transformers),
}


def run(names: Sequence[str], quick: bool, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Runs the named sections; returns ``{name: rows}`` (``{"skipped": reason}`` for one that could not run)."""
    results: Dict[str, Any] = {}
    for name in names:
        title, section = SECTIONS[name]
        log(f"\n## {title}\n")
        start = time.perf_counter()
        try:
            rows, text = section(quick)
        except ImportError as exc:  # the framework is not installed: say so, go on
            results[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
            log(f"skipped: {exc} (`make bench` installs the frameworks)")
            continue
        results[name] = rows
        log(text)
        log(f"\n({time.perf_counter() - start:.0f} s)")
    return results


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.frameworks", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), metavar="NAME",
                   help=f"sections to run, from: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="shorter timing and smaller sizes: checks that it runs")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"),
                   help="directory for frameworks.json")
    p.add_argument("--no-save", action="store_true", help="print only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ema_cuda

    print(f"ema_cuda backend {ema_cuda.ops.backend()}, torch {torch.__version__}, {args.threads} threads")
    results = run(args.only, args.quick)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "frameworks.json"
        path.write_text(json.dumps({"torch": torch.__version__, "threads": args.threads, "quick": args.quick,
                                    "date": time.strftime("%Y-%m-%d"), "sections": results}, indent=1, default=str))
        print(f"\nwritten: {path}")
    return results


if __name__ == "__main__":
    main()
