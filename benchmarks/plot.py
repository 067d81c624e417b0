"""The benchmark's bar plot: every method's share of the limit, one panel per workload."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from benchmarks.methods import FUSED, LIMIT, LIMIT_KEYS, OURS
from benchmarks.report import dtypes_label, fmt_time


def plot(result: Dict[str, Any], path: Path) -> Optional[str]:
    """One bar chart per workload (each method's % of the limit, its time as label); returns why not, if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    wls = result["workloads"]
    cols = min(3, len(wls)) or 1
    rows = (len(wls) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.3 * rows), squeeze=False)
    for ax, w in zip(axes.flat, wls):
        rs = [r for r in w["methods"].values() if r["status"] == "ok" and r["key"] not in LIMIT_KEYS]
        # JSON saved without limit_s (before 2026-12-03): the flat lerp_ row's fastest block stands in.
        limit_s = w.get("limit_s") or (w["methods"].get(LIMIT) or {}).get("min_s")
        if not rs or not limit_s:
            ax.set_title(f"{w['name']}: no limit measured", fontsize=8)
            continue
        # Percent of the limit on a linear axis: every bar is comparable with
        # the memory limit (100%), and the label gives the time itself.
        labels = ["cast + _foreach_lerp_" if r.get("note") == "cast+foreach" else r["label"] for r in rs]
        pct = [100.0 * limit_s / r["median_s"] for r in rs]
        colors = ["tab:red" if r["key"] == FUSED else ("tab:orange" if r["key"] in OURS else "0.6") for r in rs]
        y = list(range(len(rs)))
        ax.barh(y, pct, color=colors)
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(100, color="black", linestyle="--", linewidth=1)
        ax.set_xlim(0, max(105, max(pct) * 1.05))
        for yi, (v, r) in enumerate(zip(pct, rs)):
            ax.text(min(v, 100) + 1, yi, fmt_time(r["median_s"]), va="center", fontsize=6)
        ax.set_title(f"{w['name']}: {w['tensors']:,} tensors, {w['elements'] / 1e6:.1f}M, "
                     f"{dtypes_label(w)}", fontsize=8)
        ax.set_xlabel(f"% of the limit ({fmt_time(limit_s)}, dashed); labels: median time", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(wls):]:
        ax.axis("off")
    meta = result["meta"]
    fig.suptitle(f"EMA update, one step: {meta['device_name']}, torch {meta['torch']}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
