"""The benchmark runs end to end on tiny workloads, and its check rejects a wrong method.

No speed is asserted here: speed targets are the benchmark's business
(benchmarks/RESULTS.md); this only keeps the benchmark itself working.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` without `python -m` does not add the repo root
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_ema  # noqa: E402
from benchmarks.end_to_end import run_end_to_end  # noqa: E402
from benchmarks.methods import LIMIT_KEYS, METHODS, Method, Runner  # noqa: E402
from benchmarks.report import e2e_table  # noqa: E402
from benchmarks.runner import run_workload  # noqa: E402
from benchmarks.workloads import WORKLOAD_NAMES, custom_workload, get_workload  # noqa: E402

FAST = dict(min_time=0.002, repeats=2, log=lambda *_: None)


def _wrong_method(ctx):
    # Swaps decay and 1 - decay: fast, plausible-looking, wrong.
    ema, model, d = ctx.ema, ctx.model, ctx.decay

    def step():
        with torch.no_grad():
            torch._foreach_lerp_(ema, model, d)

    return Runner(step, ema)


def _by_key(keys):
    return [m for m in METHODS if m.key in keys]


def test_workload_shapes_match_the_architectures():
    counts = {n: (get_workload(n).num_tensors, get_workload(n).numel) for n in WORKLOAD_NAMES}
    assert counts["resnet50"] == (161, 25_557_032)  # torchvision's ResNet-50
    assert counts["vit_b16"] == (152, 86_567_656)  # timm's vit_base_patch16_224
    assert counts["gpt2"] == (148, 124_439_808)  # GPT-2 small, tied head
    assert counts["small"] == (10_000, 10_000_000)
    assert get_workload("vit_b16_bf16").bytes_per_element == 10
    assert get_workload("gpt2", size_scale=12).numel > 1e9


def test_check_catches_a_wrong_method_and_passes_the_others():
    wl = custom_workload("tiny", [(7, 5), (1000,), (3, 3, 3), (1,)])
    methods = _by_key(["sg_loop", "mul_add", "lerp_loop", "foreach", "averaged_model", "fused_list", "fused", "limit",
                       "limit_fused"])
    methods.append(Method("wrong", "wrong on purpose", _wrong_method))
    out = run_workload(wl, torch.device("cpu"), methods, **FAST)
    status = {k: r["status"] for k, r in out["methods"].items()}
    assert status.pop("wrong") == "wrong"
    assert out["methods"]["wrong"]["median_s"] is None  # a wrong answer is never timed
    assert set(status.values()) == {"ok"}, out["methods"]
    fused = out["methods"]["fused"]
    assert fused["median_s"] > 0 and fused["fused_speedup"] == pytest.approx(1.0)
    # The limit is the fastest block of the faster limit row, so no limit
    # row's median can be above 100% of it.
    limits = [out["methods"][k] for k in LIMIT_KEYS]
    assert out["limit_s"] == min(r["min_s"] for r in limits)
    assert out["limit_key"] in LIMIT_KEYS
    assert all(r["pct_of_limit"] <= 100.0 for r in limits)
    assert fused["x_naive"] == pytest.approx(out["methods"]["sg_loop"]["median_s"] / fused["median_s"])


def test_mixed_dtypes_fp32_ema_of_bf16_model():
    wl = custom_workload("tiny_bf16", [(64, 3), (513,)], torch.float32, torch.bfloat16)
    out = run_workload(wl, torch.device("cpu"), _by_key(["mul_add", "foreach", "fused", "limit"]), **FAST)
    assert {r["status"] for r in out["methods"].values()} == {"ok"}, out["methods"]
    assert out["methods"]["foreach"]["note"] == "cast+foreach"


def test_cli_writes_json_and_reports_goals(tmp_path, capsys):
    rc = bench_ema.main(
        [
            "--workloads", "small", "huge",
            "--size-scale", "0.0005", "--small-count", "30",
            "--min-time", "0.002", "--repeats", "2", "--no-e2e", "--no-busy",
            "--out", str(tmp_path),
        ]
    )
    assert rc == 0
    files = list(tmp_path.glob("cpu-*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert [w["name"] for w in result["workloads"]] == ["small", "huge"]
    assert result["meta"]["torch"] == torch.__version__
    goals = {g["goal"]: g for g in result["goals"]}
    assert len(goals) == 6
    assert goals["fused >= 3x _foreach_lerp_ on 10k x 1k"]["measured"] > 0
    assert goals["ema_update_ with lists >= 2x _foreach_lerp_ on 10k x 1k"]["measured"] > 0
    printed = capsys.readouterr().out
    assert "small: 30 tensors" in printed and "Goals" in printed
    assert (tmp_path / files[0].with_suffix(".md").name).exists()  # the full markdown tables
    # The tables can be re-rendered from the saved JSON alone.
    assert bench_ema.main(["--from-json", str(files[0])]) == 0
    assert "| workload | tensors | elements |" in capsys.readouterr().out


def test_end_to_end_runs():
    def tiny():
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10),
        )

    out = run_end_to_end(torch.device("cpu"), steps=2, batch=2, decay=0.99, log=lambda *_: None,
                                   model_fn=tiny)
    for key in ("none", "sg_loop", "fused"):
        assert out["variants"][key]["status"] == "ok"
        assert 0 <= out["variants"][key]["ema_share"] < 1


    table = e2e_table(out)
    assert "launches" not in table   # counted on CUDA only
    # A CUDA run's record carries launches per EMA update: the table shows them.
    out["variants"]["fused"]["launches"] = 1.0
    out["variants"]["sg_loop"]["launches"] = 12.0
    rows = {line.split("|")[1].strip(): line for line in e2e_table(out).splitlines() if line.startswith("| ")}
    assert rows["EMA"].rstrip().endswith("launches / EMA update |")
    assert rows["FusedUpdater"].rstrip().endswith("| 1 |")
    assert rows["SG loop"].rstrip().endswith("| 12 |")
    assert rows["no EMA"].rstrip().endswith("| - |")


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        bench_ema.parse_args(["--help"])
    text = capsys.readouterr().out
    for opt in ("--device", "--dtypes", "--workloads", "--repeats", "--size-scale", "--quick"):
        assert opt in text


def test_quick_run_is_compact_and_complete(tmp_path, capsys):
    # What `--quick` is for: every part of `make bench` runs (workload tables,
    # busy CPU, end to end, goals, files), in seconds.  Timings are not checked.
    rc = bench_ema.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    assert len(lines) < 80, out
    for name in bench_ema.QUICK_WORKLOADS:
        assert any(line.startswith(f"{name}: ") and "limit" in line for line in lines), name
    busy = [line.split() for line in lines if line.startswith("small ")]
    assert sorted((b[1], b[2]) for b in busy) == [("1", "busy"), ("1", "quiet"), ("2", "busy"), ("2", "quiet")]
    assert "End to end" in out and "Goals" in out
    stem = next(tmp_path.glob("cpu-*.json")).stem
    assert {p.name for p in tmp_path.iterdir()} == {f"{stem}.json", f"{stem}.md", f"{stem}.png"}
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert {(r["threads"], r["state"]) for r in result["busy"]} == {(1, "quiet"), (1, "busy"), (2, "quiet"), (2, "busy")}
    assert torch.get_num_threads() == result["meta"]["threads"]  # the busy scenario restores the thread count


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(pid, 0); it no longer runs.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_spinner_is_stopped_on_error():
    from benchmarks.busy import Spinner

    with pytest.raises(RuntimeError, match="inside"):
        with Spinner() as sp:
            pid = sp.procs[0].pid
            assert _alive(pid)
            raise RuntimeError("an error inside the busy scenario")
    assert not _alive(pid)


def test_spinner_ends_when_the_benchmark_is_killed(tmp_path):
    # A benchmark killed without running its finally blocks (os._exit here)
    # must not leave a process spinning: the spinner watches its parent.
    import subprocess
    import time

    code = (
        "import sys, os; sys.path.insert(0, %r)\n"
        "from benchmarks.busy import Spinner\n"
        "sp = Spinner().__enter__()\n"
        "print(sp.procs[0].pid, flush=True)\n"
        "os._exit(0)\n" % str(ROOT)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
