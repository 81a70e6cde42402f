"""bench/gpu_check.py: a failing section is recorded and the run goes on; the JSON is written."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_failing_section_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    gpu_check = _module()
    monkeypatch.setattr(gpu_check, "setup", lambda ctx: {})

    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "sec_evaluate", broken)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--smoke", "--device", "cpu", "--only", "evaluate,qlora", "--json", str(out)]) == 0
    sections = json.loads(out.read_text())["sections"]
    assert sections["evaluate"]["error"] == "RuntimeError: boom"
    assert "seconds" in sections["evaluate"]
    assert sections["qlora"]["skipped"].startswith("needs CUDA")
