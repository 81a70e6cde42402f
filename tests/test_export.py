"""``lmlab export``: the exported folders load with plain transformers / peft (in a process where
lmlab cannot be imported) and give the logits lmlab's own checkpoint gives."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lmlab.cli import build_parser, main
from lmlab.export import base_model_id, lmlab_command
from lmlab.io import load_tensors, read_json, save_tensors, write_json

IDS = [[1, 17, 300, 42, 999, 5, 77]]

# Run with `python -I` (no PYTHONPATH, no script folder on sys.path) and lmlab made unimportable:
# the folders must load with transformers and peft alone.
LOADER = """
import json, sys
sys.modules["lmlab"] = None  # any `import lmlab...` now raises ImportError
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

merged, adapter, bf16, base, out = sys.argv[1:6]
ids = torch.tensor(json.loads(sys.argv[6]))
result = {}
with torch.no_grad():
    model = AutoModelForCausalLM.from_pretrained(merged)
    AutoTokenizer.from_pretrained(merged)
    result["merged"] = model(ids).logits
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    AutoTokenizer.from_pretrained(adapter)
    result["peft"] = peft_model(ids).logits
    low = AutoModelForCausalLM.from_pretrained(bf16, dtype="auto")
    result["bf16_dtype"] = str(next(low.parameters()).dtype)
    result["bf16"] = low(ids).logits.float()
    result["base"] = AutoModelForCausalLM.from_pretrained(base)(ids).logits
result["lmlab_imported"] = [m for m in sys.modules if m.split(".")[0] == "lmlab" and sys.modules[m] is not None]
torch.save(result, out)
"""


def _finetune(model_dir: str, dataset: str, out: Path, *extra: str) -> Path:
    assert main(["finetune", "--model", model_dir, "--dataset", dataset, "--max-iters", "1", "--eval-interval", "1",
                 "--eval-limit", "4", "--batch-size", "4", "--out-dir", str(out), "--no-progress", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, toy_dataset, tmp_path_factory):
    """A LoRA run whose best adapter holds random (not near-zero) weights, so merging changes the
    logits by far more than the tolerance; plus a sweep's result.json, as evaluation results."""
    run = _finetune(tiny_model_dir, toy_dataset, tmp_path_factory.mktemp("lora") / "run", "--rank", "2")
    weights = run / "best" / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_tensors(weights, {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in load_tensors(weights).items()})
    write_json(run / "result.json", {"acc_best": 0.625, "unparseable_best": 0})
    return run


def _export(*argv: str) -> int:
    return main(["export", *argv])


def _lmlab_logits(checkpoint) -> torch.Tensor:
    from lmlab.train import load_checkpoint

    model, _, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def _front_matter(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_lora_merged_and_peft_folders_load_without_lmlab(lora_run, tiny_model_dir, tmp_path, capsys):
    merged, adapter, bf16 = tmp_path / "merged", tmp_path / "adapter", tmp_path / "bf16"
    assert _export(str(lora_run), "--output", str(merged), "--merge", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "transformers" and result["merged"] and result["dtype"] == "fp32"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} \
        <= set(os.listdir(merged))
    assert _export(str(lora_run), "--output", str(adapter), "--json") == 0
    assert json.loads(capsys.readouterr().out)["format"] == "peft"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(adapter))
    assert read_json(adapter / "adapter_config.json")["base_model_name_or_path"] == tiny_model_dir
    assert _export(str(lora_run), "--output", str(bf16), "--merge", "--dtype", "bf16") == 0
    assert read_json(bf16 / "config.json")["dtype"] == "bfloat16"
    assert {v.dtype for v in load_tensors(bf16 / "model.safetensors").values()} == {torch.bfloat16}

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    out = tmp_path / "logits.pt"
    done = subprocess.run([sys.executable, "-I", "-c", LOADER, str(merged), str(adapter), str(bf16), tiny_model_dir,
                           str(out), json.dumps(IDS)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = torch.load(out, weights_only=True)
    assert got["lmlab_imported"] == []
    ours = _lmlab_logits(lora_run)
    assert (ours - got["base"]).abs().max() > 1e-2  # the adapter matters: the comparisons are not vacuous
    torch.testing.assert_close(got["merged"], ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["peft"], ours, atol=1e-5, rtol=0)
    assert got["bf16_dtype"] == "torch.bfloat16"
    assert (got["bf16"] - ours).abs().max() < 0.05  # bf16 rounding (0.012 measured; the adapter moves them ~1)


def test_model_card_records_the_run(lora_run, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert _export(str(lora_run), "--output", str(out)) == 0
    assert capsys.readouterr().out.strip() == str(out)
    front = _front_matter(out)
    assert front["library_name"] == "peft" and {"lmlab", "lora"} <= set(front["tags"])
    assert "base_model" not in front  # a local folder is no hub id; the card's text names it
    record, run_info = front["lmlab"], read_json(lora_run / "run.json")
    assert record["method"]["method"] == "lora" and record["method"]["r"] == 2
    assert record["data"]["dataset"] == run_info["dataset"]
    best = read_json(lora_run / "best" / "trainer_state.json")
    assert record["metrics"]["best_val_loss"] == pytest.approx(best["val_loss"])
    assert record["metrics"]["best_step"] == best["step"] == 1
    assert record["metrics"]["evaluation"]["result.json"]["acc_best"] == 0.625
    argv = shlex.split(record["command"])[1:]  # the command repeats the run's settings
    parsed = vars(build_parser().parse_args(argv))
    differ = [k for k, v in run_info["options"].items() if v is not None and parsed[k] != v]
    assert differ == ["no_progress"], argv  # how the run was shown, not what it did, is left out
    merged = tmp_path / "merged"
    assert _export(str(lora_run), "--output", str(merged), "--merge") == 0
    front = _front_matter(merged)
    assert front["library_name"] == "transformers" and "merged" in front["tags"]


def test_embedded_model_is_named_by_its_hub_id():
    assert base_model_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("/some/folder") == "/some/folder"
    assert lmlab_command({"task": "dpo", "options": {"beta": 0.1, "json": True, "use_dora": True, "x": None}}) \
        == "lmlab dpo --beta 0.1 --use-dora"


def test_full_run_exports_as_a_plain_model(tiny_model_dir, toy_dataset, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run = _finetune(tiny_model_dir, toy_dataset, tmp_path / "run", "--method", "full", "--lr", "1e-2")
    capsys.readouterr()
    out = tmp_path / "out"
    assert _export(str(run), "--output", str(out), "--json") == 0  # no --merge needed: plain weights
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "transformers" and result["method"] == "full"
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out)(torch.tensor(IDS)).logits
    torch.testing.assert_close(got, _lmlab_logits(run), atol=1e-5, rtol=0)


@pytest.fixture
def prefix_run(tiny_model_dir, tmp_path):
    """The files that mark a prefix-tuning run (export refuses --merge before loading anything)."""
    run = tmp_path / "prefix-run"
    (run / "best").mkdir(parents=True)
    write_json(run / "run.json", {"model": tiny_model_dir, "method": "prefix"})
    write_json(run / "best" / "prefix_config.json", {"method": "prefix", "length": 2})
    return run


@pytest.mark.parametrize("argv,message", [
    (["{tmp}/no-run", "--output", "{tmp}/out"], "no run or checkpoint at"),
    (["{prefix}", "--output", "{tmp}/out", "--merge"], "prefix cannot be merged into a plain transformers model"),
    (["{lora}", "--output", "{tmp}/out", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["{lora}", "--output", "{lora}/best"], "already exists"),
    (["{lora}", "--output", "{lora}", "--overwrite"], "would replace the run it exports"),
])
def test_bad_input_is_one_line(argv, message, lora_run, prefix_run, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, prefix=prefix_run, lora=lora_run) for a in argv]
    try:
        code = _export(*argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_adapter_method_refuses_merge_and_exports_its_lmlab_files(tiny_model_dir, toy_dataset, tmp_path, capsys):
    run = _finetune(tiny_model_dir, toy_dataset, tmp_path / "run", "--method", "adapter", "--bottleneck", "4")
    capsys.readouterr()
    assert _export(str(run), "--output", str(tmp_path / "merged"), "--merge") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "adapter cannot be merged" in err and "MLP" in err
    assert not (tmp_path / "merged").exists()
    out = tmp_path / "files"
    assert _export(str(run), "--output", str(out), "--json") == 0
    assert json.loads(capsys.readouterr().out)["format"] == "lmlab"
    assert _front_matter(out)["library_name"] == "lmlab"
    from lmlab.train import load_checkpoint

    model, _, _ = load_checkpoint(out, tiny_model_dir)  # what its card says
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor(IDS)).logits, _lmlab_logits(run), atol=1e-6, rtol=0)


def test_push_to_hub(lora_run, tmp_path, capsys, monkeypatch):
    """Offline: one line at once, nothing written, the hub never called. Reachable (faked here, no
    network): the folder goes to create_repo / upload_folder."""
    import huggingface_hub

    from lmlab import hub

    calls = []

    def never(*args, **kwargs):
        raise AssertionError("the hub was called")

    monkeypatch.setattr(huggingface_hub, "create_repo", never)
    monkeypatch.setattr(huggingface_hub, "upload_folder", never)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    assert _export(str(lora_run), "--output", str(tmp_path / "out"), "--push-to-hub", "me/tiny") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hub is unreachable" in err
    assert not (tmp_path / "out").exists()

    class Repo:
        repo_id = "me/tiny"

    class Commit:
        commit_url = "https://huggingface.co/me/tiny/commit/abc"

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, exist_ok: calls.append(repo) or Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder",
                        lambda repo_id, folder_path, commit_message: calls.append(sorted(os.listdir(folder_path)))
                        or Commit())
    assert _export(str(lora_run), "--output", str(tmp_path / "out"), "--push-to-hub", "me/tiny", "--json") == 0
    assert json.loads(capsys.readouterr().out)["pushed"] == Commit.commit_url
    assert calls[0] == "me/tiny" and "adapter_model.safetensors" in calls[1]

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, exist_ok: (_ for _ in ()).throw(
        PermissionError("401 Client Error: no token")))
    assert _export(str(lora_run), "--output", str(tmp_path / "out"), "--push-to-hub", "me/tiny", "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PermissionError" in err and "is written" in err
