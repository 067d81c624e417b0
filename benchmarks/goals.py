"""The performance targets of the project, judged from one run's figures (benchmarks/RESULTS.md lists them)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from benchmarks.methods import FUSED, LIMIT


def evaluate_goals(device: torch.device, workloads: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The targets, met / not met, from this run's figures (None where not measured).

    On the CPU and on CUDA different ones: the CPU's limit is a flat ``lerp_``,
    a GPU's a copy, and only a GPU has kernel launches to count.
    """
    by_name = {w["name"]: w for w in workloads}

    def t(wname: str, key: str, stat: str) -> Optional[float]:
        w = by_name.get(wname)
        if w is None:
            return None
        if key == LIMIT and w.get("limit_s"):
            return w["limit_s"]  # JSON saved without it (before 2026-12-03): the flat lerp_ row below
        r = w["methods"].get(key)
        return r.get(stat) if r and r["status"] == "ok" else None

    def ratio(wname: str, slow: str, fast: str, stat: str = "median_s") -> Optional[float]:
        a, b = t(wname, slow, stat), t(wname, fast, stat)
        return a / b if a and b else None

    goals = []

    def add(name: str, target: float, measured: Optional[float], unit: str = "x", of_mins: Optional[float] = None):
        goals.append(
            {
                "goal": name,
                "target": target,
                "measured": measured,
                "unit": unit,
                "met": None if measured is None else measured >= target,
                # The same ratio from each method's fastest block: what the
                # run shows once bursts of load from elsewhere are set aside.
                "measured_of_mins": of_mins,
            }
        )

    def add_ratio(name: str, target: float, wname: str, slow: str, fast: str):
        add(name, target, ratio(wname, slow, fast), of_mins=ratio(wname, slow, fast, "min_s"))

    if device.type == "cpu":
        for wname in ("resnet50", "vit_b16"):
            add_ratio(f"fused >= 0.9x flat-buffer limit on {wname}", 0.9, wname, LIMIT, FUSED)
        add_ratio("fused >= 3x _foreach_lerp_ on 10k x 1k", 3.0, "small", "foreach", FUSED)
        add_ratio("ema_update_ with lists >= 2x _foreach_lerp_ on 10k x 1k", 2.0, "small", "foreach", "fused_list")
        add_ratio("fused >= 3x SG loop on ResNet-50", 3.0, "resnet50", "sg_loop", FUSED)
        add_ratio("bf16 model + fp32 EMA: fused >= 3x cast+foreach", 3.0, "vit_b16_bf16", "foreach", FUSED)
    else:
        launches = [
            w["methods"][FUSED].get("launches")
            for w in workloads
            if w["methods"].get(FUSED, {}).get("launches") is not None
        ]
        goals.append(
            {
                "goal": "fused: 1 kernel launch per update (every workload)",
                "target": 1,
                "measured": max(launches) if launches else None,
                "unit": "launches",
                "met": None if not launches else max(launches) <= 1,
            }
        )
        big = [w for w in workloads if w["elements"] >= 100e6 and w["ema_dtype"] == w["model_dtype"]]
        fracs = [ratio(w["name"], LIMIT, FUSED) for w in big]
        fracs = [f for f in fracs if f is not None]
        add("fused >= 90% of copy bandwidth at 100M+ parameters (worst workload)", 0.9,
            min(fracs) if fracs else None)
        add_ratio("fused >= 5x _foreach_lerp_ on 10k x 1k", 5.0, "small", "foreach", FUSED)
        add_ratio("bf16 model + fp32 EMA: fused >= 1.6x cast+foreach", 1.6, "vit_b16_bf16", "foreach", FUSED)
    return goals
