"""benchmarks/frameworks.py, the second half of ``make bench``: every section runs, one whose framework is missing
is reported as skipped and the others go on, and the rows land in frameworks.json.  (Each section's own module has
its smoke test beside the integration it measures; no speed is asserted here.)"""
import json

from benchmarks import frameworks


def _fake_sections(monkeypatch, calls):
    def ok(quick):
        calls.append(("ok", quick))
        return [{"workload": "tiny", "speedup": 2.0}], "| tiny | 2.0x |"

    def missing(quick):
        calls.append(("missing", quick))
        raise ImportError("No module named 'lightning'")

    monkeypatch.setattr(frameworks, "SECTIONS", {"missing": ("A framework that is not installed", missing),
                                                 "ok": ("One that is", ok)})


def test_a_missing_framework_is_skipped_and_the_rest_runs(monkeypatch):
    calls, printed = [], []
    _fake_sections(monkeypatch, calls)
    results = frameworks.run(["missing", "ok"], quick=True, log=printed.append)
    assert calls == [("missing", True), ("ok", True)]
    assert results["missing"] == {"skipped": "ImportError: No module named 'lightning'"}
    assert results["ok"] == [{"workload": "tiny", "speedup": 2.0}]
    text = "\n".join(printed)
    assert "skipped: No module named 'lightning'" in text and "| tiny | 2.0x |" in text


def test_main_writes_the_rows(monkeypatch, tmp_path, capsys):
    calls = []
    _fake_sections(monkeypatch, calls)
    frameworks.main(["--only", "ok", "--quick", "--out", str(tmp_path), "--threads", "1"])
    saved = json.loads((tmp_path / "frameworks.json").read_text())
    assert saved["quick"] is True and saved["threads"] == 1
    assert saved["sections"] == {"ok": [{"workload": "tiny", "speedup": 2.0}]}
    assert calls == [("ok", True)]
    assert "frameworks.json" in capsys.readouterr().out


def test_every_section_names_a_module_that_exists():
    import importlib

    for name in ("multi_ema", "fw_lightning", "fw_dropins", "fw_transformers"):
        importlib.import_module(f"benchmarks.{name}")
    assert list(frameworks.SECTIONS) == ["multi_ema", "lightning", "dropins", "transformers"]
