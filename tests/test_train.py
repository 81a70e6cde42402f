"""Fine-tuning end to end on a tiny model: outputs, best/ at the lowest validation loss, label-only
loss, resume after a kill, bad input."""

import json
import pytest
import torch
from conftest import tiny, two_processes

from lmlab import train as train_mod
from lmlab.cli import main
from lmlab.data import Encoded, left_pad_batch
from lmlab.io import load_tensors
from lmlab.train import read_metrics


def finetune(model_dir, data_dir, out, *extra):
    return main(["finetune", "--model", model_dir, "--dataset", data_dir, "--out-dir", str(out),
                 "--max-iters", "4", "--eval-interval", "2", "--batch-size", "8", "--rank", "4", "--alpha", "8",
                 "--no-progress", *extra])


def test_finetune_writes_checkpoints_metrics_and_plot(tiny_model_dir, small_dataset, tmp_path, capsys):
    assert finetune(tiny_model_dir, small_dataset, tmp_path / "run", "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [2, 4]
    assert {"step", "train_loss", "val_loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for ckpt in ("best", "last"):
        assert (run / ckpt / "adapter_model.safetensors").exists()
    assert summary["steps"] == 4 and not list(run.glob(".*tmp")), "no temporary folders left behind"


def test_best_holds_the_weights_of_the_lowest_validation_loss(tiny_model_dir, small_dataset, tmp_path, monkeypatch):
    """The validation loss the engine sees is scripted to fall, rise and fall again (lowest at step
    3 of 6); each evaluation also keeps a copy of the trainable weights and their real validation
    loss. best/ must hold step 3's weights (loaded back: its real loss), last/ step 6's, and
    metrics.jsonl and best/trainer_state.json the scripted losses and step."""
    from lmlab.train import load_checkpoint, validation_loss

    script = [3.0, 2.0, 1.0, 1.5, 2.5, 2.0]
    seen = []  # (task, trainable weights, real validation loss) per evaluation
    real_evaluate = train_mod.LabelTask.evaluate

    def scripted(task, model, device, indices):
        total, count = real_evaluate(task, model, device, indices)["loss"]
        seen.append((task, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                     float(total / count)))
        return {"loss": (script[len(seen) - 1], 1)}

    monkeypatch.setattr(train_mod.LabelTask, "evaluate", scripted)
    run = tmp_path / "run"
    assert finetune(tiny_model_dir, small_dataset, run, "--max-iters", "6", "--eval-interval", "1",
                    "--lr", "0.05") == 0
    assert [(r["step"], r["val_loss"]) for r in read_metrics(run)] == list(enumerate(script, 1))
    assert json.loads((run / "best" / "trainer_state.json").read_text()) == {"step": 3, "val_loss": 1.0}
    task = seen[0][0]
    for folder, step in (("best", 3), ("last", 6)):
        model, tokenizer, _ = load_checkpoint(run / folder)
        weights = {n: p for n, p in model.named_parameters() if "lora_" in n}
        assert weights.keys() == seen[step - 1][1].keys()
        assert all(torch.equal(weights[n], w) for n, w in seen[step - 1][1].items()), folder
        real = validation_loss(model, task.val_items, task.pad_id, 4)
        assert real == pytest.approx(seen[step - 1][2], rel=1e-5), folder
    assert not all(torch.equal(seen[2][1][n], w) for n, w in seen[5][1].items())  # best and last differ


def test_loss_is_on_label_tokens_only():
    """Changing prompt tokens' targets cannot change the loss; only label columns count."""
    model = tiny("tiny-llama").eval()
    items = [Encoded([5, 6, 7, 8], [9], 0), Encoded([5, 6], [10, 11], 1)]
    ids, mask, pos, labels = left_pad_batch(items, pad_id=0, device="cpu")
    assert labels.tolist() == [[-100, 9], [10, 11]]
    loss, n = train_mod.label_loss(model, ids, mask, pos, labels)
    full = model(ids, attention_mask=mask, position_ids=pos).logits.log_softmax(-1)
    expected = -(full[0, -2, 9] + full[1, -3, 10] + full[1, -2, 11]) / 3
    assert n == 3
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)


def test_resume_after_kill_matches_uninterrupted_run(tiny_model_dir, small_dataset, tmp_path, monkeypatch):
    args = ("--max-iters", "6", "--eval-interval", "2", "--lora-dropout", "0.1")
    assert finetune(tiny_model_dir, small_dataset, tmp_path / "straight", *args) == 0

    calls = {"n": 0}
    real = train_mod.label_loss

    def dies_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5 + 2:  # 4 training steps + 2 validation batches at step 2 ... then step 5 dies
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "label_loss", dies_at_step_5)
    assert finetune(tiny_model_dir, small_dataset, tmp_path / "killed", *args) == 130
    monkeypatch.setattr(train_mod, "label_loss", real)
    assert json.loads((tmp_path / "killed/last/trainer_state.json").read_text())["step"] == 4
    assert finetune(tiny_model_dir, small_dataset, tmp_path / "killed", *args, "--resume") == 0

    a = load_tensors(tmp_path / "straight/last/trainable.safetensors")
    b = load_tensors(tmp_path / "killed/last/trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "no step logged twice"


def test_existing_run_needs_resume(tiny_model_dir, small_dataset, tmp_path, capsys):
    assert finetune(tiny_model_dir, small_dataset, tmp_path / "r") == 0
    assert finetune(tiny_model_dir, small_dataset, tmp_path / "r") == 2
    assert "--resume" in capsys.readouterr().err


def test_unwritable_out_dir_is_one_line(tiny_model_dir, small_dataset, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert finetune(tiny_model_dir, small_dataset, blocker / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error: cannot write to out dir") and err.count("\n") == 1


@pytest.mark.parametrize("method", ["adapter", "prefix", "full"])
def test_other_methods_train(method, tiny_model_dir, small_dataset, tmp_path):
    if method == "prefix":
        pytest.importorskip("lmlab.peft.prefix")
    assert finetune(tiny_model_dir, small_dataset, tmp_path / method, "--method", method,
                    "--max-iters", "2") == 0
    assert (tmp_path / method / "best").is_dir()


def test_two_processes(tiny_model_dir, small_dataset, tmp_path):
    """DDP on 2 CPU processes (torchrun; accelerate reads its environment): one writer."""
    out = tmp_path / "ddp"
    done = two_processes("-m", "lmlab.cli", "finetune", "--model", tiny_model_dir, "--dataset", small_dataset,
                         "--out-dir", str(out), "--max-iters", "2", "--eval-interval", "2", "--batch-size", "4",
                         "--rank", "4", "--no-progress", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["processes"] == 2
    assert (out / "last" / "adapter_model.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2]  # one writer, not one per process
    assert len(done.stdout.strip().splitlines()) == 1  # one report


def test_report_to_tensorboard_writes_events(tiny_model_dir, small_dataset, tmp_path):
    pytest.importorskip("tensorboard")
    assert finetune(tiny_model_dir, small_dataset, tmp_path / "tb", "--max-iters", "2", "--report-to", "tensorboard") == 0
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_evaluate_checkpoint_json_and_other_model_error(tiny_model_dir, small_dataset, tmp_path, capsys):
    assert finetune(tiny_model_dir, small_dataset, tmp_path / "run") == 0
    capsys.readouterr()
    outs = {}
    for extra in ([], ["--full-text"], ["--scoring"]):
        assert main(["evaluate", str(tmp_path / "run"), "--limit", "8", "--no-progress", "--json", *extra]) == 0
        outs[tuple(extra)] = out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert {"accuracy", "unparseable", "n"} <= set(out) and out["n"] == 8
    stopped, full = outs[()], outs[("--full-text",)]
    assert stopped["predictions"] == full["predictions"]
    assert all(f.startswith(s) for s, f in zip(stopped["generations"], full["generations"]))
    other = tmp_path / "gpt2"
    tiny("tiny-gpt2").save_pretrained(other)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    assert main(["evaluate", str(tmp_path / "run" / "last"), "--model", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmlab: error:") and ("another model" in err[-1] or "does not fit" in err[-1])


def test_sigint_saves_the_completed_step_and_resume_matches(tiny_model_dir, small_dataset, tmp_path, monkeypatch,
                                                             capsys):
    """Ctrl-C mid-step: the step finishes, `last` is saved at it (not at the previous eval), exit 130."""
    import os
    import signal

    args = ("--max-iters", "5", "--eval-interval", "4", "--lora-dropout", "0.1")
    assert finetune(tiny_model_dir, small_dataset, tmp_path / "straight", *args) == 0
    calls = {"n": 0}
    real = train_mod.label_loss

    def ctrl_c_during_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "label_loss", ctrl_c_during_step_3)
    assert finetune(tiny_model_dir, small_dataset, tmp_path / "stopped", *args) == 130
    assert "stopped at step 3 of 5" in capsys.readouterr().err
    monkeypatch.setattr(train_mod, "label_loss", real)
    assert json.loads((tmp_path / "stopped/last/trainer_state.json").read_text())["step"] == 3
    assert finetune(tiny_model_dir, small_dataset, tmp_path / "stopped", *args, "--resume") == 0
    a = load_tensors(tmp_path / "straight/last/trainable.safetensors")
    b = load_tensors(tmp_path / "stopped/last/trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
