"""Evaluation: label parsing, batched generation == one-by-one, scoring == naive likelihood, counting."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmlab.data import Example, TaskFormat, encode, subsample
from lmlab.evaluate import evaluate_generation, evaluate_scoring, format_report, parse_label, summarize

TEXTS = ["a gripping , funny film", "dull", "the plot goes nowhere and the actors seem bored throughout",
         "one of the year's best", "meh .", "an overlong , self-indulgent mess that never finds its footing"]


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("text,expected", [
    ("positive", 1), (" Positive.", 1), ("\nnegative\nbecause", 0), ("NEGATIVE!", 0),
    ("posit", None), ("positively", None), ("I think positive", None), ("", None), ("neutral", None),
])
def test_parse_label(text, expected):
    assert parse_label(text, ("negative", "positive")) == expected


def test_summarize_counts_unparseable_as_wrong():
    r = summarize([1, 0, None, 1, None], [1, 1, 0, 1, 1], n_labels=2)
    assert (r.correct, r.n, r.unparseable) == (2, 5, 2)
    assert r.accuracy == pytest.approx(0.4)
    assert r.confusion == [[0, 0, 1], [1, 2, 1]]
    assert "unparseable  2" in format_report(r, ("negative", "positive"))
    assert {"accuracy", "unparseable", "n"} <= set(r.to_dict())


def test_batched_generation_equals_one_by_one(tiny_lm):
    model, tok = tiny_lm
    fmt = TaskFormat()
    examples = [Example(t, i % 2) for i, t in enumerate(TEXTS)]
    batched = evaluate_generation(model, tok, fmt, examples, batch_size=4, max_new_tokens=4, progress=False)
    for e, text in zip(examples, batched.generations):
        ids = torch.tensor([encode(tok, fmt, [e])[0].prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == text


@pytest.mark.parametrize("words", [("negative", "positive"), ("very bad", "quite good indeed")])
def test_scoring_equals_naive_likelihood(tiny_lm, words):
    model, tok = tiny_lm
    fmt = TaskFormat(label_words=words)
    examples = [Example(t, i % 2) for i, t in enumerate(TEXTS)]
    result = evaluate_scoring(model, tok, fmt, examples, batch_size=4, progress=False)
    for e, predicted in zip(examples, result.predictions):
        prompt = encode(tok, fmt, [e])[0].prompt_ids
        scores = []
        for label in range(len(words)):
            completion = tok(fmt.completion(label), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logp = model(ids).logits[0].log_softmax(-1)
            scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion)))
        assert predicted == max(range(len(words)), key=scores.__getitem__)
    assert result.unparseable == 0


def test_subsample_is_fixed_and_ordered():
    examples = [Example(str(i), 0) for i in range(100)]
    a = subsample(examples, 10)
    assert a == subsample(examples, 10) and [int(e.text) for e in a] == sorted(int(e.text) for e in a)
    assert subsample(examples, None) is examples and subsample(examples, 500) is examples


@pytest.mark.slow
def test_real_model_batched_generation_equals_one_by_one():
    """Left padding must not change what the real model (RoPE, GQA) generates."""
    from conftest import RT, needs_shared

    from lmlab.data import load_splits
    from lmlab.models import load_model

    needs_shared()
    model, tok = load_model()
    fmt = TaskFormat()
    examples = subsample(load_splits(RT, fmt, ("test",))["test"], 6)
    batched = evaluate_generation(model, tok, fmt, examples, batch_size=6, max_new_tokens=3, progress=False)
    for e, text in zip(examples, batched.generations):
        ids = torch.tensor([encode(tok, fmt, [e])[0].prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == text
