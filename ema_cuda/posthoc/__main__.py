"""``python -m ema_cuda.posthoc``: list a snapshot directory, or reconstruct a profile from it.

    python -m ema_cuda.posthoc list DIR
    python -m ema_cuda.posthoc reconstruct DIR --sigma-rel 0.07 [--step N] --out ema.safetensors
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from ema_cuda.posthoc.reconstruct import combine_snapshots, solve_weights
from ema_cuda.posthoc.snapshots import list_snapshots, write_snapshot


def _list(args: argparse.Namespace) -> int:
    snapshots = list_snapshots(args.dir)
    if not snapshots:
        print(f"no snapshots in {args.dir}")
        return 0
    print(f"{'step':>10}  {'sigma_rel':>10}  {'gamma':>10}  file")
    for s in snapshots:
        print(f"{s.step:>10}  {s.sigma_rel:>10.6f}  {s.gamma:>10.4f}  {s.path.name}")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    snapshots = list_snapshots(args.dir)
    if not snapshots:
        raise ValueError(f"no snapshot (*.safetensors) in {args.dir!r}")
    rec = solve_weights(snapshots, args.sigma_rel, args.step)
    state = combine_snapshots(rec)
    write_snapshot(args.out, state, step=rec.step, gamma=rec.gamma, sigma_rel=rec.sigma_rel)
    print(f"sigma_rel={rec.sigma_rel} (gamma={rec.gamma:.4f}) at step {rec.step} from {len(rec.snapshots)} "
          f"snapshots: profile error {rec.relative_error:.3g} (relative L2); wrote {args.out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ema_cuda.posthoc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="the snapshots of a directory, sorted by step")
    p.add_argument("dir")
    p.set_defaults(run=_list)
    p = sub.add_parser("reconstruct", help="the EMA of a power-function profile, as a snapshot file")
    p.add_argument("dir")
    p.add_argument("--sigma-rel", type=float, required=True, help="the profile's relative width, e.g. 0.07")
    p.add_argument("--step", type=int, default=None, help="the step to reconstruct at (default: the last snapshot's)")
    p.add_argument("--out", required=True, help="the safetensors file to write")
    p.set_defaults(run=_reconstruct)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `list DIR | head`: the reader has gone, which is not an error
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
