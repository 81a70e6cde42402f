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


def test_newer_section_runs_every_part_in_smoke_mode(tmp_path, monkeypatch, tiny_model_dir):
    """The section for what lmlab gained since (bench/gpu_check_newer.py) on the CPU with tiny models:
    T5 and BART summarization and ROUGE, watermark schemes' token counts, key-free classification,
    CLIP inversion; each part is there and none failed."""
    gpu_check = _module()

    def tiny_setup(ctx):
        ctx.model = tiny_model_dir
        return {"model_dir": tiny_model_dir}

    monkeypatch.setattr(gpu_check, "setup", tiny_setup)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--smoke", "--device", "cpu", "--only", "newer", "--json", str(out)]) == 0
    newer = json.loads(out.read_text())["sections"]["newer"]
    parts = ("seq2seq_t5", "seq2seq_bart", "schemes", "key_free", "clip")
    assert "error" not in newer and all(p in newer and "error" not in newer[p] for p in parts), \
        {p: newer.get(p, {}).get("error") for p in parts}
    assert newer["seq2seq_t5"]["model_type"] == "t5" and newer["seq2seq_bart"]["model_type"] == "bart"
    assert all(newer[p]["steps"] == 2 and newer[p]["rouge"]["n"] == 2 for p in parts[:2])
    schemes = newer["schemes"]
    assert schemes["texts"] == schemes["expected_texts"] == 8 and schemes["in_order"] and schemes["counts_consistent"]
    assert newer["key_free"]["texts"] == 8 and 0 <= newer["key_free"]["agreement"] <= 1
    assert newer["clip"]["targets"] == 2 and newer["clip"]["dtype"] == "torch.bfloat16"
