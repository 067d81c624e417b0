"""The benchmark's tables from its JSON-ready results.

What a run prints (:func:`workload_table` per workload, :func:`goals_lines`)
and the full markdown report it saves (:func:`report`: a summary, every
method of every workload, the end-to-end share, the goals), which
``--from-json`` re-renders from a saved run.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from benchmarks.methods import FUSED, LIMIT_KEYS


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _cell(r: Dict[str, Any]) -> str:
    if r is None:
        return "-"
    if r["status"] == "ok":
        return fmt_time(r["median_s"])
    return r["status"]


def summary_table(workloads: List[Dict[str, Any]]) -> str:
    lines = [
        "| workload | tensors | elements | dtypes | naive (SG loop) | foreach | fused | fused vs naive "
        "| fused vs foreach | % of limit |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w in workloads:
        m = w["methods"]
        fused = m.get(FUSED)
        dt = w["ema_dtype"].replace("torch.", "")
        if w["model_dtype"] != w["ema_dtype"]:
            dt = f"{dt} EMA, {w['model_dtype'].replace('torch.', '')} model"
        lines.append(
            f"| {w['name']} | {w['tensors']:,} | {w['elements'] / 1e6:.1f}M | {dt} | {_cell(m.get('sg_loop'))} "
            f"| {_cell(m.get('foreach'))} | {_cell(fused)} "
            f"| {fmt_x((m.get('sg_loop') or {}).get('fused_speedup'))} "
            f"| {fmt_x((m.get('foreach') or {}).get('fused_speedup'))} "
            f"| {'-' if not fused or fused.get('pct_of_limit') is None else format(fused['pct_of_limit'], '.0f') + '%'} |"
        )
    return "\n".join(lines)


def detail_table(w: Dict[str, Any], cuda: bool) -> str:
    head = "| method | median | min | GB/s | fused is x faster | % of limit | check |"
    sep = "|---|---:|---:|---:|---:|---:|---|"
    if cuda:
        head += " launches / update |"
        sep += "---:|"
    lines = [f"**{w['name']}**: {w['description']}", "", head, sep]
    for r in w["methods"].values():
        label = r["label"] + (f" ({r['note']})" if r.get("note") else "")
        if r["status"] == "ok":
            check = "n/a" if r["key"] in LIMIT_KEYS else "ok"
            row = (
                f"| {label} | {fmt_time(r['median_s'])} | {fmt_time(r.get('min_s'))} | {r['gb_s']:.1f} "
                f"| {fmt_x(r['fused_speedup'])} "
                f"| {'-' if r.get('pct_of_limit') is None else format(r['pct_of_limit'], '.0f') + '%'} | {check} |"
            )
        else:
            detail = (r.get("detail") or "").replace("|", "/")
            row = f"| {label} | {r['status']} | - | - | - | - | {detail} |"
        if cuda:
            row += f" {'-' if r.get('launches') is None else format(r['launches'], 'g')} |"
        lines.append(row)
    return "\n".join(lines)


def dtypes_label(w: Dict[str, Any]) -> str:
    e, m = (w[k].replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16") for k in ("ema_dtype", "model_dtype"))
    return e if e == m else f"{e} EMA of a {m} model"


def workload_table(w: Dict[str, Any]) -> str:
    """The compact plain-text table of one workload: methods as rows, the limit named in the title."""
    limit = "no limit measured"
    if w.get("limit_s"):
        limit = (f"limit {fmt_time(w['limit_s'])} = {w['bytes_per_update'] / w['limit_s'] / 1e9:.1f} GB/s "
                 f"({w['limit_label']})")
    lines = [f"{w['name']}: {w['tensors']:,} tensors, {w['elements'] / 1e6:.1f}M, {dtypes_label(w)}; {limit}"]
    for r in w["methods"].values():
        if r["key"] in LIMIT_KEYS:
            continue
        label = "cast + _foreach_lerp_" if r.get("note") == "cast+foreach" else r["label"]
        if r["status"] != "ok":
            lines.append(f"  {label:<30} {r['status']}: {(r.get('detail') or '')[:60]}")
            continue
        pct = r.get("pct_of_limit")
        lines.append(
            f"  {label:<30} {fmt_time(r['median_s']):>9} {fmt_x(r.get('x_naive')):>8} "
            f"{fmt_x(r.get('x_foreach')):>9} {'-' if pct is None else f'{pct:.0f}%':>6}"
        )
    return "\n".join(lines)


COMPACT_HEADER = f"  {'method':<30} {'time':>9} {'x naive':>8} {'x foreach':>9} {'%limit':>6}"


def goals_lines(goals: List[Dict[str, Any]]) -> List[str]:
    out = []
    for g in goals:
        if g["measured"] is None:
            out.append(f"  {g['goal']}: not measured")
            continue
        meas = f"{g['measured']:.2f}x" if g["unit"] == "x" else f"{g['measured']:.2f} {g['unit']}"
        out.append(f"  {g['goal']}: {meas} ({'met' if g['met'] else 'not met'})")
    return out


def goals_table(goals: List[Dict[str, Any]]) -> str:
    lines = [
        "| goal | measured (medians) | met | same ratio from fastest blocks |",
        "|---|---:|---|---:|",
    ]
    for g in goals:
        mins = g.get("measured_of_mins")
        mins = "-" if mins is None else f"{mins:.2f}x"
        if g["measured"] is None:
            meas, met = "not measured", "-"
        else:
            meas = f"{g['measured']:.2f} {g['unit']}" if g["unit"] != "x" else f"{g['measured']:.2f}x"
            met = "met" if g["met"] else f"**not met** ({g['measured'] / g['target']:.0%} of target)"
        lines.append(f"| {g['goal']} | {meas} | {met} | {mins} |")
    return "\n".join(lines)


def e2e_table(e2e: Dict[str, Any]) -> str:
    lines = [
        f"{e2e['model']} ({e2e['ema_elements'] / 1e6:.2f}M EMA elements incl. BN buffers), batch {e2e['batch']}, "
        f"SGD with momentum, median of {e2e['steps']} steps",
        "",
    ]
    # Launches per EMA update: counted on CUDA only.
    launches = any(v.get("launches") is not None for v in e2e["variants"].values())
    head, rule = "| EMA | step (train + EMA) | EMA update | EMA share of step |", "|---|---:|---:|---:|"
    lines += [head + (" launches / EMA update |" if launches else ""), rule + ("---:|" if launches else "")]
    for v in e2e["variants"].values():
        if v["status"] != "ok":
            row = f"| {v['label']} | {v['status']} | - | {v.get('detail', '')} |" + (" - |" if launches else "")
        else:
            row = f"| {v['label']} | {fmt_time(v['step_s'])} | {fmt_time(v['ema_s'])} | {100 * v['ema_share']:.1f}% |"
            if launches:
                row += f" {'-' if v.get('launches') is None else format(v['launches'], 'g')} |"
        lines.append(row)
    return "\n".join(lines)


def wrong_results(result: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    return [
        (w["name"], r["key"], r["label"])
        for w in result["workloads"]
        for r in w["methods"].values()
        if r["status"] == "wrong"
    ]


def report(result: Dict[str, Any]) -> str:
    """All the markdown tables of a run (also from a saved JSON: ``--from-json``)."""
    meta, workloads = result["meta"], result["workloads"]
    cuda = meta["device"].startswith("cuda")
    load = ""
    if meta.get("loadavg_start") is not None:
        load = f" Load average {meta['loadavg_start']} at the start, {meta.get('loadavg_end')} at the end."
    parts = [
        f"# Results: {meta['device_name']}, torch {meta['torch']}, {meta['date']}",
        "",
        f"ema_cuda {meta.get('ema_cuda')} ({meta.get('backend')} backend), {meta.get('threads')} threads, "
        f"size scale {meta['args'].get('size_scale')}, {meta['args'].get('repeats')} rounds.{load}",
        "",
        summary_table(workloads),
        "",
        "fused = FusedUpdater.update; naive = SG loop; foreach = torch._foreach_lerp_ (cast+foreach for a bf16 "
        "model); % of limit = limit time / fused time. Medians.",
        "",
    ]
    for w in workloads:
        parts += [detail_table(w, cuda), ""]
    if result.get("end_to_end"):
        parts += ["## End to end", "", e2e_table(result["end_to_end"]), ""]
    parts += ["## Goals", ""]
    if meta["args"].get("quick") or meta["args"].get("size_scale") != 1.0 or meta["args"].get("small_count") != 10_000:
        parts += ["Sizes differ from the goals' workloads (--quick, --size-scale or --small-count): indicative only.", ""]
    parts += [goals_table(result["goals"])]
    wrong = wrong_results(result)
    if wrong:
        parts += ["", "WRONG RESULTS (not timed): " + "; ".join(f"{lbl} on {wn}" for wn, _, lbl in wrong)]
    return "\n".join(parts)
