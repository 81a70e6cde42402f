"""Hostile files: nothing lmlab loads can run code (issue #15 §4).

Each case plants a pickle that would create a marker file when unpickled in one place lmlab reads
(a run folder's files, a model or encoder folder, embeddings for invert, texts for the watermark
commands, data files, a sweep's results), runs the command line on it and checks that the marker
was not created and that the command ended with exit status 2 and one line on stderr (no
traceback). torch.load runs with weights_only=True, np.load with allow_pickle=False, everything
else is JSON, CSV, TOML or safetensors, and no model is loaded with trust_remote_code.
"""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from lmlab.cli import main


class Payload:
    """Unpickling this object runs ``open(marker, "w")``: the attack a pickle file allows."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def plant(path, marker, kind: str = "torch") -> None:
    """Write a hostile file at ``path``: torch.save's zip format (``torch``), a bare pickle
    (``pickle``), an object array (``npy``) or an .npz archive of one (``npz``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = Payload(marker)
    if kind == "torch":
        torch.save({"optimizer": payload, "rng": payload, "embeddings": payload}, path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(payload))
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.array([payload, "text"], dtype=object), allow_pickle=True)
    elif kind == "npz":
        with open(path, "wb") as f:
            np.savez(f, texts=np.array([payload], dtype=object))
    else:
        raise ValueError(kind)


def refused(argv, marker, capsys) -> str:
    """Run ``lmlab argv``: exit 2, one error line, no traceback, and the payload never ran."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert not marker.exists(), "the planted pickle ran"
    assert status == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("lmlab: error: "), err[-2000:]
    return lines[0]


FT = ["--max-iters", "2", "--eval-interval", "1", "--batch-size", "8", "--rank", "2", "--eval-limit", "4",
      "--no-progress", "--json"]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, toy_dataset, tmp_path_factory):
    """A finished tiny fine-tuning run (LoRA): best/, last/ with optimizer.pt, run.json, metrics."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["finetune", "--model", tiny_model_dir, "--dataset", toy_dataset, "--out-dir", str(out), *FT]) == 0
    return out


RUN_FILES = [  # (file in the run folder, what is planted, the command that reads it, the error)
    ("last/optimizer.pt", "torch", "resume", "not a tensor file"),
    ("last/optimizer.pt", "pickle", "resume", "not a tensor file"),
    ("last/trainable.safetensors", "torch", "resume", "not a safetensors file"),
    ("last/trainer_state.json", "pickle", "resume", "not valid JSON"),
    ("run.json", "pickle", "resume", "not valid JSON"),
    ("run.json", "pickle", "evaluate", "not valid JSON"),
    ("best/adapter_model.safetensors", "torch", "evaluate", "not a safetensors file"),
    ("best/adapter_config.json", "pickle", "evaluate", "not valid JSON"),
    ("last/adapter_model.safetensors", "pickle", "evaluate-last", "not a safetensors file"),
]


@pytest.mark.parametrize("name, kind, command, message", RUN_FILES)
def test_run_folder_files(name, kind, command, message, run_dir, tiny_model_dir, toy_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    marker = tmp_path / "MARKER"
    plant(run / name, marker, kind)
    if command == "resume":
        argv = ["finetune", "--model", tiny_model_dir, "--dataset", toy_dataset, "--out-dir", run, "--resume",
                *FT[:-1], "--max-iters", "3", "--json"]
    else:
        argv = ["evaluate", run / "last" if command == "evaluate-last" else run, "--limit", "2", "--no-progress"]
    assert message in refused(argv, marker, capsys)


def test_unreadable_metrics_lines_are_dropped_on_resume(run_dir, tiny_model_dir, toy_dataset, tmp_path, capsys):
    """metrics.jsonl is JSON lines: a pickle there is bytes that are no row, dropped as a line cut
    short by a kill is; the resumed run goes on and rewrites the file."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    marker = tmp_path / "MARKER"
    plant(run / "metrics.jsonl", marker, "pickle")
    assert main(["finetune", "--model", tiny_model_dir, "--dataset", toy_dataset, "--out-dir", str(run), "--resume",
                 *FT[:-1], "--max-iters", "3", "--json"]) == 0
    assert not marker.exists()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [3]


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_model_folder(weights, tiny_model_dir, toy_dataset, tmp_path, capsys):
    """A model folder whose weights are a pickle: transformers reads .bin with weights_only."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    plant(model / weights, marker)
    refused(["evaluate", "--model", model, "--dataset", toy_dataset, "--limit", "2", "--no-progress"], marker, capsys)


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_encoder_folder(weights, tiny_model_dir, tmp_path, capsys):
    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_model_dir, encoder)
    (encoder / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    plant(encoder / weights, marker)
    targets = tmp_path / "targets.npy"
    np.save(targets, np.ones((1, 64), dtype=np.float32))
    line = refused(["invert", "--embeddings", targets, "--encoder", encoder, "--output", tmp_path / "out.txt",
                    "--device", "cpu"], marker, capsys)
    assert "cannot load encoder" in line


@pytest.mark.parametrize("suffix, kind", [(".pt", "torch"), (".pt", "pickle"), (".npy", "npy"), (".npy", "pickle"),
                                          (".npy", "npz"), (".npy", "torch"), (".safetensors", "torch")])
def test_invert_embeddings(suffix, kind, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    plant(tmp_path / f"targets{suffix}", marker, kind)
    refused(["invert", "--embeddings", tmp_path / f"targets{suffix}", "--output", tmp_path / "out.txt",
             "--device", "cpu"], marker, capsys)
    assert not (tmp_path / "out.txt").exists()


@pytest.mark.parametrize("command", ["detect", "classify"])
@pytest.mark.parametrize("suffix, kind", [(".npy", "npy"), (".npy", "pickle"), (".npy", "npz"), (".json", "pickle"),
                                          (".jsonl", "pickle")])
def test_watermark_texts(command, suffix, kind, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    texts = tmp_path / f"texts{suffix}"
    plant(texts, marker, kind)
    extra = ["--output", tmp_path / "guesses.npy"] if command == "classify" else []
    refused(["watermark", command, "--input", texts, *extra], marker, capsys)


def test_classification_data(tiny_model_dir, toy_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(toy_dataset, data)
    marker = tmp_path / "MARKER"
    plant(data / "train.jsonl", marker, "pickle")
    refused(["finetune", "--model", tiny_model_dir, "--dataset", data, "--out-dir", tmp_path / "run", *FT],
            marker, capsys)


def test_dpo_pairs_and_reference_cache(tiny_model_dir, tmp_path, capsys):
    """The pairs file, and the cached reference log-probabilities a resumed DPO run reads."""
    marker = tmp_path / "MARKER"
    bad = tmp_path / "bad.jsonl"
    plant(bad, marker, "pickle")
    dpo = ["dpo", "--model", tiny_model_dir, "--max-iters", "2", "--eval-interval", "2", "--batch-size", "4",
           "--rank", "4", "--no-progress", "--json"]
    refused([*dpo, "--data", bad, "--out-dir", tmp_path / "never"], marker, capsys)
    rows = [{"prompt": f"Review: film {i}.\nSentiment:", "chosen": " positive", "rejected": " negative"}
            for i in range(12)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dpo"
    assert main([*dpo, "--data", str(pairs), "--out-dir", str(out)]) == 0
    plant(out / "ref_logps.safetensors", marker, "torch")
    refused([*dpo, "--data", pairs, "--out-dir", out, "--resume", "--max-iters", "3"], marker, capsys)


def test_sweep_result_file(tmp_path, capsys):
    """A sweep reads each finished run's result.json (skipping the run): a pickle there is refused."""
    from lmlab.sweep import expand, run_dir

    marker = tmp_path / "MARKER"
    (only,) = expand([{"method": "lora", "rank": 2, "alpha": 4, "max_iters": 1}])
    plant(run_dir(tmp_path, only) / "result.json", marker, "pickle")
    capsys.readouterr()
    status = main(["sweep", "--run", "method=lora rank=2 alpha=4", "--common", "max_iters=1", "--out-dir",
                   str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and not marker.exists() and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("lmlab: error: ") and "not valid JSON" in err
