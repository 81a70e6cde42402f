"""Every tensor lmlab makes on the way to a model lands on the model's device.

PyTorch alone does not catch a stray tensor on a CPU-only machine (CPU token ids fed to a model on
the ``meta`` device run without complaint), so ``DeviceRecorder`` hooks every submodule's forward
and logs the device of every tensor that reaches it (arguments, keyword arguments, KV caches).
Two ways to make a wrong device visible without a GPU:

* the model on ``meta`` where no values are needed (a training step: batch, forward, backward):
  a batch left on the CPU shows up as ``cpu`` beside ``meta`` parameters;
* the model on the CPU while torch's default device is ``meta``, for whole paths that need values
  (fine-tuning, evaluation, generation, DPO): a tensor made without naming the model's device
  lands on ``meta`` and shows up there.
"""

import json

import pytest
import torch
from conftest import tiny

from lmlab import peft
from lmlab.data import Encoded, left_pad_batch


class DeviceRecorder:
    """Forward pre-hooks on ``model`` and all its submodules recording the device of every tensor
    they receive; ``strays()`` lists the (module, device) pairs that differ from the parameters'."""

    def __init__(self, model):
        self.model, self.seen = model, []
        self.expected = next(model.parameters()).device
        self.handles = [m.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                        for name, m in model.named_modules()]

    def _hook(self, name):
        def hook(module, args, kwargs):
            for t in _tensors((args, kwargs)):
                self.seen.append((name or "<model>", t.device))
        return hook

    def strays(self) -> list[tuple[str, torch.device]]:
        return sorted({(n, d) for n, d in self.seen if d != self.expected}, key=str)

    def close(self):
        for h in self.handles:
            h.remove()


def _tensors(obj, depth=0):
    """Tensors inside arguments: nested tuples, lists, dicts and KV caches (their layers' keys/values)."""
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, depth + 1)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, depth + 1)
    elif hasattr(obj, "layers") and isinstance(obj.layers, list):  # transformers Cache
        for layer in obj.layers:
            yield from _tensors([getattr(layer, "keys", None), getattr(layer, "values", None)], depth + 1)


def record_on_meta(monkeypatch, owner, name: str, recorders: list) -> list:
    """Replace ``owner.name`` (a function taking the model first: ``fit``, ``reference_logps``) by one
    that hooks a ``DeviceRecorder`` on the model and runs with torch's default device ``meta``; the
    model is loaded by then (``from_pretrained`` refuses a meta default). Returns ``recorders``."""
    real = getattr(owner, name)

    def recording(model, *args, **kwargs):
        recorders.append(DeviceRecorder(model))
        with torch.device("meta"):
            return real(model, *args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return recorders


ITEMS = [Encoded([5, 6, 7, 8], [9], 0), Encoded([5, 6], [10, 11], 1), Encoded([5, 6, 7], [12], 0)]


def meta_model(name="tiny-llama", method="lora"):
    from lmlab.models import build_model, preset_config

    config = preset_config(name)
    config._attn_implementation = "eager"  # sdpa's mask shortcut reads mask values, which meta has none of
    model = build_model(config, device="meta")
    peft.apply(model, peft.make_config(method) if method != "lora" else peft.make_config("lora", r=4, alpha=8.0))
    return model.train()


# --- the model on meta: no values needed -----------------------------------------------------------


def test_the_recorder_catches_a_batch_left_on_the_cpu():
    """The bug lmlab had: the model on the accelerator, the batch built on the CPU and never moved.
    PyTorch runs it on meta without a word; the recorder names it."""
    from lmlab.train import label_loss

    model = meta_model()
    recorder = DeviceRecorder(model)
    try:  # the embedding runs on meta without a word; the attention mask may then trip a check
        label_loss(model, *left_pad_batch(ITEMS, 0, device="cpu"))
    except RuntimeError as exc:
        assert "device" in str(exc)
    strays = recorder.strays()
    assert ("<model>", torch.device("cpu")) in strays and any(n.endswith("embed_tokens") for n, _ in strays)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("method", ["lora", "adapter", "full"])  # prefix: below, on the CPU (its attention reads the mask)
def test_a_training_step_of_each_method_stays_on_the_models_device(name, method):
    from lmlab.train import LabelTask

    model = meta_model(name, method)
    task = LabelTask(ITEMS, ITEMS, pad_id=0, eval_batch_size=2)
    recorder = DeviceRecorder(model)
    loss, metrics, tokens = task.loss(model, task.collate([0, 1, 2], torch.device("meta")))
    loss.backward()
    assert recorder.seen and recorder.strays() == []
    assert tokens.device.type == "meta" and metrics["loss"].device.type == "meta"


def test_a_dpo_step_stays_on_the_models_device():
    from lmlab.dpo import DpoConfig, DpoTask, Pair

    model = meta_model()
    pairs = [Pair([5, 6, 7], [9], [10, 11]), Pair([5, 6], [12, 13], [14])]
    ref = (torch.zeros(2), torch.zeros(2))  # the cached reference log-probs live on the CPU
    task = DpoTask(pairs, pairs, ref, ref, pad_id=0, config=DpoConfig(), eval_batch_size=2)
    recorder = DeviceRecorder(model)
    loss, metrics, _ = task.loss(model, task.collate([0, 1], torch.device("meta")))
    loss.backward()
    assert recorder.strays() == [] and metrics["margin"].device.type == "meta"


# --- the model on the CPU, torch's default device meta: whole paths with values -------------------


@pytest.fixture
def stray_tensors_land_on_meta():
    """While the test runs, a tensor created without a device lands on ``meta``, not the CPU."""
    with torch.device("meta"):
        yield


def test_the_sentinel_catches_a_tensor_made_without_a_device(stray_tensors_land_on_meta):
    model = tiny("tiny-llama")
    recorder = DeviceRecorder(model)
    ids = torch.tensor([[5, 6, 7]])  # the mistake: no device named
    try:
        model(input_ids=ids)
    except RuntimeError:
        pass
    assert ("<model>", torch.device("meta")) in recorder.strays()


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_finetune_and_evaluate_make_nothing_off_the_models_device(method, tiny_model_dir, toy_dataset, tmp_path,
                                                                 monkeypatch):
    from lmlab import finetune, train
    from lmlab.data import TaskFormat, load_splits
    from lmlab.evaluate import evaluate_generation, evaluate_scoring
    from lmlab.finetune import FinetuneConfig

    recorders = record_on_meta(monkeypatch, train, "fit", [])  # train imported engine.fit by name
    config = FinetuneConfig(model=tiny_model_dir, dataset=toy_dataset, out_dir=str(tmp_path / "run"), method=method, rank=4,
                            alpha=8.0, max_iters=2, eval_interval=1, batch_size=4, no_progress=True, json=True,
                            device="cpu")
    finetune.run(config)
    assert recorders[0].seen and recorders[0].strays() == []

    model, tokenizer, _ = train.load_checkpoint(tmp_path / "run")
    examples = load_splits(toy_dataset, TaskFormat(), ("test",))["test"][:6]
    two_token = TaskFormat(label_words=("very negative", "very positive"))
    recorder = DeviceRecorder(model)
    with torch.device("meta"):
        evaluate_generation(model, tokenizer, TaskFormat(), examples, batch_size=4, progress=False)
        evaluate_scoring(model, tokenizer, two_token, examples, batch_size=4, progress=False)
    assert recorder.seen and recorder.strays() == []


def test_generation_and_its_processors_see_the_models_device(tiny_model_dir):
    from transformers import LogitsProcessor

    from lmlab.generate import SamplingConfig, sample
    from lmlab.models import load_model

    class Record(LogitsProcessor):
        devices = set()

        def __call__(self, input_ids, scores):
            self.devices |= {input_ids.device, scores.device}
            return scores

    model, tokenizer = load_model(tiny_model_dir)
    recorder = DeviceRecorder(model)
    prompts = ["Classify the sentiment: a fine film", "Classify the sentiment: a dull one, really"]
    for temperature in (0.0, 0.7):
        config = SamplingConfig(max_new_tokens=3, temperature=temperature, top_k=5, top_p=0.9,
                                samples=1 if temperature == 0 else 2)
        with torch.device("meta"):
            sample(model, tokenizer, prompts, config, logits_processors=[Record()], progress=False)
    assert recorder.seen and recorder.strays() == []
    assert Record.devices == {torch.device("cpu")}


def test_dpo_makes_nothing_off_the_models_device(tiny_model_dir, tmp_path, monkeypatch):
    from lmlab import dpo, engine
    from lmlab.cli import main

    recorders = record_on_meta(monkeypatch, dpo, "reference_logps", [])  # the reference pass, before training
    record_on_meta(monkeypatch, engine, "fit", recorders)  # dpo.train_dpo looks it up when it runs
    rows = [{"prompt": f"Review: film {i}.\nSentiment:", "chosen": " positive", "rejected": " negative"}
            for i in range(12)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["dpo", "--model", tiny_model_dir, "--data", str(data), "--out-dir", str(tmp_path / "dpo"),
                 "--max-iters", "2", "--eval-interval", "1", "--batch-size", "4", "--rank", "4", "--no-progress",
                 "--json", "--device", "cpu"])
    assert code == 0 and len(recorders) == 3 and all(r.seen and r.strays() == [] for r in recorders)
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # the right cached reference rows were used
