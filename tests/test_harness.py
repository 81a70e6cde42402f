"""lm-evaluation-harness (lm-eval, in the test extra) on lmlab's in-memory models: lmlab's
rotten_tomatoes task, read from a local jsonl folder, scores every example as ``evaluate --scoring``
does (the same log-likelihoods, the same prediction), on base models, LoRA left in train mode and
prefix tuning; ``--limit`` picks the same examples; the command line prints no library warning."""

import copy
import json

import pytest
import torch
from conftest import randomize

from lmlab import LmlabError, harness
from lmlab.cli import main
from lmlab.data import Example, TaskFormat, subsample
from lmlab.evaluate import label_logprobs
from lmlab.models import build_model, preset_config

TEXTS = ["a gripping , funny film", "dull", "the plot goes nowhere and the actors seem bored throughout",
         "one of the year's best", "meh .", "an overlong , self-indulgent mess that never finds its footing",
         "i loved every minute", "a waste of a good cast", "charming", "tedious and loud"]
EXAMPLES = [Example(t, i % 2) for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lmlab.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rt-harness")
    (path / "test.jsonl").write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in EXAMPLES))
    return str(path)


def varied(name: str):
    """A tiny random model with weights large enough (std 0.3) that the preferred label depends on
    the review; "+lora" has random B and dropout and stays in train mode (evaluation must merge it
    and hand it back in train mode), "+prefix" random virtual tokens in every attention layer."""
    config = preset_config("tiny-gpt2" if name == "gpt2" else "tiny-llama")
    config.initializer_range = 0.3
    model = build_model(config)
    if name == "llama+lora":
        from lmlab.peft import lora

        lora.apply(model, lora.LoraConfig(r=4, dropout=0.5, target_modules=("q_proj", "v_proj", "down_proj")))
        randomize([p for n, p in model.named_parameters() if "lora_B" in n], std=0.3)
        return model.train()
    if name == "llama+prefix":
        from lmlab.peft import prefix

        prefix.apply(model, prefix.PrefixConfig(length=3))
        randomize([p for n, p in model.named_parameters() if p.requires_grad], std=1.0)
    return model.eval()


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama+lora", "llama+prefix"])
def test_harness_scores_as_lmlab_scoring(name, tokenizer, data_dir):
    """Per example, lm-eval's log-likelihood of " " + each label word after the prompt equals
    lmlab's ``label_logprobs`` (lm-eval tokenizes prompt + label together and splits, lmlab each
    alone: the same ids where the prompt ends in ":"), so its ``acc`` and choices are lmlab's."""
    model = varied(name)
    was_training = model.training
    config = harness.HarnessConfig(tasks=("rotten_tomatoes",), dataset=data_dir, limit=8, batch_size=3,
                                   progress=False)
    result = harness.run(model, tokenizer, harness.load_tasks(config), config)
    assert model.training == was_training
    examples = subsample(EXAMPLES, 8)
    reference = copy.deepcopy(model)
    scores = label_logprobs(reference, tokenizer, TaskFormat(), examples, batch_size=4)  # (N, 2)
    rows = result["samples"]["rotten_tomatoes"]
    assert [r["doc_id"] for r in rows] == subsample(list(range(len(EXAMPLES))), 8)
    assert [r["target"] for r in rows] == [e.label for e in examples]
    torch.testing.assert_close(torch.tensor([r["responses"] for r in rows]), scores, rtol=1e-4, atol=1e-4)
    predictions = scores.argmax(-1).tolist()
    assert harness.predictions(result)["rotten_tomatoes"] == predictions
    assert 0 in predictions and 1 in predictions  # else the agreement would be vacuous
    acc = result["results"]["rotten_tomatoes"]
    assert acc["n"] == 8
    assert acc["metrics"]["acc"]["value"] == pytest.approx(sum(p == e.label for p, e in zip(predictions, examples)) / 8)


def test_cli_harness_equals_scoring(tiny_model_dir, small_dataset, capfd):
    """``evaluate --harness rotten_tomatoes --limit`` and ``evaluate --scoring --limit`` on the same
    data choose the same label for the same examples; nothing but the result reaches stdout, and
    stderr stays empty (lm-eval's and datasets' warnings and bars are off)."""
    common = ["--model", tiny_model_dir, "--dataset", small_dataset, "--limit", "10", "--json", "--no-progress"]
    assert main(["evaluate", "--harness", "rotten_tomatoes", *common]) == 0
    out, err = capfd.readouterr()
    assert err == ""
    ours = json.loads(out)
    assert main(["evaluate", "--scoring", *common]) == 0
    scoring = json.loads(capfd.readouterr().out)
    assert ours["predictions"]["rotten_tomatoes"] == scoring["predictions"]
    assert ours["results"]["rotten_tomatoes"]["n"] == scoring["n"] == 10
    assert ours["results"]["rotten_tomatoes"]["metrics"]["acc"]["value"] == pytest.approx(scoring["accuracy"])
    assert main(["evaluate", "--harness", "rotten_tomatoes", *common[:-2], "--no-progress"]) == 0
    out, err = capfd.readouterr()
    assert err == "" and out.splitlines()[1].split() == ["task", "n", "metric", "value", "stderr"]
    assert out.splitlines()[2].split()[:3] == ["rotten_tomatoes", "10", "acc"]


@pytest.mark.parametrize("argv,message", [
    (["--harness", "rotten_tomatoe", "--dataset", "."], "did you mean rotten_tomatoes?"),
    (["--harness", "hellaswagg"], "did you mean hellaswag?"),  # lm-eval's ~15k task names are searched
    (["--harness", "rotten_tomatoes", "--scoring", "--dataset", "."], "drop --scoring"),
    (["--harness", ","], "needs task names"),
    (["--harness", "rotten_tomatoes", "--dataset", "/no/such/folder"], "no such folder"),
    (["--harness", "sciq", "--dataset", "."], "lm-eval's tasks read their own data"),
])
def test_bad_harness_options_are_one_line(argv, message, capfd):
    assert main(["evaluate", "--model", "tiny-llama", *argv]) == 2
    out, err = capfd.readouterr()
    assert out == "" and message in err and len(err.strip().splitlines()) == 1, err


def test_without_lm_eval_it_says_how_to_install(monkeypatch, data_dir, capfd):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(LmlabError, match=r"pip install -e '\.\[harness\]'"):
        harness.load_tasks(harness.HarnessConfig(tasks=("rotten_tomatoes",), dataset=data_dir))
    assert main(["evaluate", "--harness", "rotten_tomatoes", "--dataset", data_dir]) == 2
    err = capfd.readouterr().err
    assert "pip install -e '.[harness]'" in err and len(err.strip().splitlines()) == 1
