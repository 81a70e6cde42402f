"""DPO: the loss on hand-made log-probs, log 2 at the start, loss and gradients equal TRL's DPOTrainer
(full fine-tuning with a frozen reference copy; LoRA against lmlab's adapter-disabled reference),
every trainable parameter moves, resume equals an uninterrupted run, bad input is one line."""

import copy
import json
import math
import shutil

import pytest
import torch
from conftest import stop_at_check, tiny

from lmlab.cli import main
from lmlab.dpo import Pair, dpo_loss, pair_logps, reference_logps
from lmlab.models import build_model, preset_config
from lmlab.peft import lora

PAIRS = [Pair([1, 5, 6, 7], [8, 9, 2], [10, 2]), Pair([1, 11], [12, 2], [13, 14, 15, 2]),
         Pair([1, 40, 41, 42, 43], [44, 2], [45, 46, 2])]


def test_loss_on_hand_made_logps():
    # chosen ratio -1 - (-2) = 1, rejected -3 - (-2) = -1; beta 0.1: -log sigmoid(0.1 * 2) = log(1 + e^-0.2) = 0.598139
    losses, chosen, rejected = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                        torch.tensor([-2.0]), beta=0.1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.2)))
    assert (chosen.item(), rejected.item()) == (pytest.approx(0.1), pytest.approx(-0.1))


def test_loss_is_log_2_when_the_policy_is_the_reference():
    model = lora.apply(build_model(preset_config("tiny-llama")), lora.LoraConfig(r=4))  # B = 0
    ref = reference_logps(model, PAIRS, pad_id=0, batch_size=2)
    chosen, rejected = pair_logps(model.train(), PAIRS, pad_id=0)
    losses, _, _ = dpo_loss(chosen, rejected, *ref, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)), atol=1e-6)


def trl_loss_and_grads(model, ref_model, pairs, beta):
    """TRL's DPOTrainer.compute_loss on the same token ids, collated by TRL's own collator."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from lmlab.models import load_tokenizer

    tokenizer = load_tokenizer()
    args = DPOConfig(output_dir="/tmp/lmlab-trl-test", beta=beta, per_device_train_batch_size=len(pairs),
                     report_to=[], use_cpu=True, bf16=False)
    data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs])
    model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def ours_loss_and_grads(model, ref, pairs, beta):
    model.zero_grad()
    chosen, rejected = pair_logps(model, pairs, pad_id=0)
    losses, _, _ = dpo_loss(chosen, rejected, *ref, beta)
    losses.mean().backward()
    return losses.mean().item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_full_fine_tuning_equals_trl():
    torch.manual_seed(0)
    reference = build_model(preset_config("tiny-llama"))
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy that has moved away from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = reference_logps(reference, PAIRS, 0, 8)
    ours, our_grads = ours_loss_and_grads(policy.train(), ref, PAIRS, 0.1)
    theirs, their_grads = trl_loss_and_grads(policy, copy.deepcopy(reference).eval(), PAIRS, 0.1)
    assert ours == pytest.approx(theirs, rel=1e-5) and abs(ours - math.log(2)) > 1e-3
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-7)


def test_lora_reference_is_the_adapter_disabled_model():
    """TRL with the base model as an explicit reference copy; lmlab with the adapter disabled."""
    torch.manual_seed(0)
    base = build_model(preset_config("tiny-llama"))
    policy = lora.apply(copy.deepcopy(base), lora.LoraConfig(r=4, alpha=16.0, dropout=0.0,  # TRL runs no dropout
                                                             target_modules=("q_proj", "v_proj")))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ref = reference_logps(policy, PAIRS, 0, 8)
    ours, our_grads = ours_loss_and_grads(policy.train(), ref, PAIRS, 0.5)
    theirs, their_grads = trl_loss_and_grads(policy, base.eval(), PAIRS, 0.5)
    assert ours == pytest.approx(theirs, rel=1e-5) and set(our_grads) == set(their_grads)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-7)


@pytest.fixture
def pairs_file(tmp_path):
    rows = [{"prompt": f"Review: a film about thing {i}.\nSentiment:", "chosen": " positive", "rejected": " negative"}
            for i in range(24)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tiny_model_dir, pairs_file, out, *extra):
    return main(["dpo", "--model", tiny_model_dir, "--data", str(pairs_file), "--out-dir", str(out), "--rank", "4",
                 "--batch-size", "4", "--eval-interval", "2", "--lr", "1e-2", "--no-progress", "--json", *extra])


def test_cli_trains_and_every_trainable_parameter_moves(tiny_model_dir, pairs_file, tmp_path, capsys, monkeypatch):
    """Every trainable parameter (each LoRA A and B) is compared with its value before the first
    step. LoRA starts with B = 0, so at step 1 the gradient of every A (through B) is exactly 0 and
    AdamW without weight decay leaves A as it was: after 1 step exactly the B matrices have moved;
    after 4 steps (B no longer 0) every A and every B has."""
    from lmlab import engine
    from lmlab.io import load_tensors

    starts = []
    real_fit = engine.fit

    def fit(model, *args, **kwargs):  # the trainable weights as the engine receives them
        starts.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(engine, "fit", fit)
    assert run(tiny_model_dir, pairs_file, tmp_path / "run", "--max-iters", "4") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "train_margin", "train_accuracy", "train_chosen_reward", "val_margin"} <= set(rows[-1])
    assert rows[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 1 starts at the reference
    assert rows[-1]["val_margin"] > 0 and rows[-1]["val_accuracy"] == 1.0  # lr 1e-2 on one preference
    start = starts[0]
    kinds = {n.split(".lora_")[1].split(".")[0] for n in start if ".lora_" in n}
    assert kinds == {"A", "B"} and len(start) == 2 * sum(".lora_A" in n for n in start), sorted(start)
    assert all(not start[n].any() for n in start if ".lora_B" in n)  # B = 0 at the start
    weights = load_tensors(tmp_path / "run" / "last" / "trainable.safetensors")
    assert weights.keys() == start.keys()
    unmoved = [n for n in start if torch.equal(weights[n], start[n])]
    assert unmoved == [], unmoved
    assert run(tiny_model_dir, pairs_file, tmp_path / "one", "--max-iters", "1") == 0
    assert len(starts) == 2 and all(torch.equal(starts[1][n], start[n]) for n in start)  # --seed: same start
    one = load_tensors(tmp_path / "one" / "last" / "trainable.safetensors")
    assert [n for n in start if not torch.equal(one[n], start[n])] == [n for n in start if ".lora_B" in n]
    assert (tmp_path / "run" / "dpo.png").exists() and (tmp_path / "run" / "best" / "adapter_model.safetensors").exists()


def test_resume_equals_uninterrupted(tiny_model_dir, pairs_file, tmp_path, capsys, monkeypatch):
    """Stop after step 2 of 4 (as Ctrl-C would), resume, and end where an uninterrupted run ends."""
    from lmlab import engine
    from lmlab.io import load_tensors

    assert run(tiny_model_dir, pairs_file, tmp_path / "whole", "--max-iters", "4") == 0
    monkeypatch.setattr(engine, "_stop_requests", stop_at_check(2))
    assert run(tiny_model_dir, pairs_file, tmp_path / "cut", "--max-iters", "4") == 130
    monkeypatch.undo()
    assert json.loads((tmp_path / "cut" / "last" / "trainer_state.json").read_text())["step"] == 2
    assert run(tiny_model_dir, pairs_file, tmp_path / "cut", "--max-iters", "4", "--resume") == 0
    capsys.readouterr()
    whole = load_tensors(tmp_path / "whole" / "last" / "trainable.safetensors")
    resumed = load_tensors(tmp_path / "cut" / "last" / "trainable.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0)


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "p", "chosen": "a"}], "missing 'rejected'"),
    ([{"prompt": "p", "chosen": " ", "rejected": "b"}], "empty 'chosen'"),
    ([{"chosen": "a", "rejected": "b"}], "missing 'prompt'"),
])
def test_bad_pairs_are_one_line(tiny_model_dir, tmp_path, capsys, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 10))
    assert run(tiny_model_dir, path, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "run" / "last").exists()


def test_prompt_longer_than_the_limit(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"prompt": "word " * 300, "chosen": "a", "rejected": "b"}) + "\n"
                            for _ in range(10)))
    assert run(tiny_model_dir, path, tmp_path / "run", "--max-length", "64") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "over the limit of 64" in err[0]


def test_ref_model_of_another_vocabulary_is_one_line(tiny_model_dir, pairs_file, tmp_path, capsys):
    from transformers import AutoTokenizer

    other = tmp_path / "other-vocab"
    shutil.copytree(tiny_model_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<an-extra-token>"])
    tokenizer.save_pretrained(other)
    assert run(tiny_model_dir, pairs_file, tmp_path / "run", "--ref-model", str(other)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another vocabulary" in err[0] and "1 entries differ" in err[0]
    assert not (tmp_path / "run" / "last").exists() and not (tmp_path / "run" / "ref_logps.safetensors").exists()


def test_ref_model_is_used_for_the_reference_log_probs(tiny_model_dir, pairs_file, tmp_path, capsys):
    """--ref-model naming the policy's own folder gives the default reference's log-probs; another
    model of the same vocabulary gives its own, and the first step's loss is then not log 2."""
    from lmlab.io import load_tensors

    assert run(tiny_model_dir, pairs_file, tmp_path / "default", "--max-iters", "1") == 0
    assert run(tiny_model_dir, pairs_file, tmp_path / "same", "--max-iters", "1", "--ref-model", tiny_model_dir) == 0
    default, same = (load_tensors(tmp_path / d / "ref_logps.safetensors") for d in ("default", "same"))
    for key in default:
        torch.testing.assert_close(same[key], default[key])
    other = tmp_path / "other-weights"
    shutil.copytree(tiny_model_dir, other)
    model = tiny("tiny-llama", seed=1)
    model.save_pretrained(other)
    assert run(tiny_model_dir, pairs_file, tmp_path / "other", "--max-iters", "1", "--ref-model", str(other)) == 0
    capsys.readouterr()
    theirs = load_tensors(tmp_path / "other" / "ref_logps.safetensors")
    assert not torch.allclose(theirs["train_chosen"], default["train_chosen"])
    first = json.loads((tmp_path / "other" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train_loss"] != pytest.approx(math.log(2), abs=1e-3)


@pytest.mark.parametrize("method", ["adapter", "prefix", "full"])
def test_every_method_trains_with_dpo(method, tiny_model_dir, pairs_file, tmp_path, capsys):
    """The shared engine trains any method; the reference is the model before the first step, so
    the first step's loss is log 2 and the held-out margin grows on one preference."""
    assert run(tiny_model_dir, pairs_file, tmp_path / method, "--max-iters", "4", "--method", method) == 0
    rows = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[-1]["val_margin"] > 0
    assert (tmp_path / method / "best").is_dir()


def test_trainer_state_is_valid_json(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """Before any evaluation the best loss is infinite: written as null (strict JSON), read back as inf."""
    from lmlab import engine

    monkeypatch.setattr(engine, "_stop_requests", stop_at_check(1))
    assert run(tiny_model_dir, pairs_file, tmp_path / "r", "--max-iters", "4") == 130
    text = (tmp_path / "r" / "last" / "trainer_state.json").read_text()
    state = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert state["step"] == 1 and state["best_val_loss"] is None
    monkeypatch.undo()
    assert run(tiny_model_dir, pairs_file, tmp_path / "r", "--max-iters", "4", "--resume") == 0
