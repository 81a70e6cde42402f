"""Evaluation: label parsing, counting, exact accuracy of models whose answers are known (a scripted
one, a tiny model forced to one label), batched generation == one-by-one, scoring == naive likelihood,
on Llama (RoPE), GPT-2 (absolute positions) and Llama with LoRA (merged for evaluation, compared
with a merge_and_unload copy)."""

import copy

import pytest
import torch
from conftest import randomize

from lmlab import LmlabError
from lmlab.data import Example, TaskFormat, encode, subsample
from lmlab.evaluate import (
    evaluate_generation,
    evaluate_scoring,
    format_report,
    label_decided,
    label_logprobs,
    parse_label,
    summarize,
)
from lmlab.kvcache import shared_prefix_length
from lmlab.models import build_model, preset_config

TEXTS = ["a gripping , funny film", "dull", "the plot goes nowhere and the actors seem bored throughout",
         "one of the year's best", "meh .", "an overlong , self-indulgent mess that never finds its footing"]
EXAMPLES = [Example(t, i % 2) for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lmlab.models import embedded_model_dir

    # SmolLM2's: tiny-llama has the same 49,152 ids, tiny-gpt2's 50,257 include them all
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module", params=["llama", "gpt2", "llama+lora", "llama+prefix", "mistral-window-8"])
def tiny_lm(request, tokenizer):
    """A tiny random model with weights large enough (std 0.3, not 0.02) that what it generates and
    which label it prefers depend on the input. GPT-2's absolute positions catch wrong position
    ids (RoPE forgives a constant shift). "+lora" has random B and dropout and is left in train
    mode, so evaluation must switch it to eval; its reference is a merge_and_unload copy. "+prefix"
    has random virtual tokens in every attention layer, next to the shared-prefix KV cache; the
    Mistral's sliding window of 8 is shorter than every prompt.
    Returns (model, tokenizer, reference model)."""
    if request.param == "mistral-window-8":  # a sliding window shorter than the prompts
        from test_generate import sliding_mistral

        config = sliding_mistral()
    else:
        config = preset_config("tiny-gpt2" if request.param == "gpt2" else "tiny-llama")
    config.initializer_range = 0.3
    model = build_model(config)
    if request.param == "llama+lora":
        from lmlab.peft import lora

        lora.apply(model, lora.LoraConfig(r=4, dropout=0.5, target_modules=("q_proj", "v_proj", "down_proj")))
        randomize([p for n, p in model.named_parameters() if "lora_B" in n], std=0.3)
        return model.train(), tokenizer, lora.merge_and_unload(copy.deepcopy(model)).eval()
    if request.param == "llama+prefix":  # its virtual tokens live in attention, beside any KV cache
        from lmlab.peft import prefix

        prefix.apply(model, prefix.PrefixConfig(length=3))
        randomize([p for p in model.parameters() if p.requires_grad], std=0.3)
        return model.eval(), tokenizer, model
    return model.eval(), tokenizer, model


def greedy_alone(model, tok, fmt, example, max_new_tokens):
    """The reference: one unpadded prompt, no attention mask to get wrong."""
    ids = torch.tensor([encode(tok, fmt, [example])[0].prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def naive_scores(model, tok, fmt, example) -> list[float]:
    """log p(label tokens | prompt) from a full forward over prompt + label, no logits_to_keep."""
    prompt = encode(tok, fmt, [example])[0].prompt_ids
    scores = []
    for label in range(len(fmt.label_words)):
        completion = tok(fmt.completion(label), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
        scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion)))
    return scores


@pytest.mark.parametrize("text,expected", [
    ("positive", 1), (" Positive.", 1), ("\nnegative\nbecause", 0), ("NEGATIVE!", 0), ("positive, but", 1),
    ("posit", None), ("positively", None), ("positive_", None), ("I think positive", None), ("", None),
    ("neutral", None), ("  ", None),
])
def test_parse_label(text, expected):
    assert parse_label(text, ("negative", "positive")) == expected


@pytest.mark.parametrize("words,text,expected", [
    (("very bad", "quite good"), " Very  bad film", 0),
    (("very bad", "quite good"), "quite", None),
    (("good", "good enough"), "good enough.", 1),  # the longer word wins
    (("good", "good enough"), "good, enough", 0),
    (("1 star", "5 stars"), "5 stars!", 1),
])
def test_parse_label_multiword(words, text, expected):
    assert parse_label(text, words) == expected


@pytest.mark.parametrize("words,text,decided", [
    (("negative", "positive"), "", False), (("negative", "positive"), "  ", False),
    (("negative", "positive"), " posit", False), (("negative", "positive"), " positive", False),  # "positively"?
    (("negative", "positive"), " positive.", True), (("negative", "positive"), "Negative\n", True),
    (("negative", "positive"), " positively", True), (("negative", "positive"), " I", True),
    (("negative", "positive"), " positive\ufffd", False),  # half a UTF-8 character: maybe a letter
    (("very bad", "quite good"), " very ", False), (("very bad", "quite good"), " very b", False),
    (("very bad", "quite good"), " very bad!", True), (("very bad", "quite good"), " verybad", True),
    (("good", "good enough"), "good ", False), (("good", "good enough"), "good e", False),
    (("good", "good enough"), "good enough.", True), (("good", "good enough"), "good, ", True),
])
def test_label_decided(words, text, decided):
    assert label_decided(text, words) is decided


def test_no_early_stop_when_the_decoder_cleans_up_spaces(tokenizer):
    """transformers' clean-up can rewrite decoded text when a later token arrives (" a ' " then
    " ." decodes as " a '."), so such a tokenizer generates every token."""
    from lmlab.evaluate import _stop_when_decided

    assert _stop_when_decided(tokenizer, ("negative", "positive"), 10) is not None
    cleaning = copy.copy(tokenizer)
    cleaning.clean_up_tokenization_spaces = True
    assert _stop_when_decided(cleaning, ("negative", "positive"), 10) is None


SUFFIXES = ["", "ly", "s", " ", ".", "\n", "_x", " enough", " bad", "é", "ough", " n't"]
TEXTS_TO_CUT = [" ΘΕΤΙΚΟΣ.Ο", " Θετικός!", " positive. Great", " positively", "negative\n", " Neutral", "  posit", " I think",
                " very bad film", " very  badly", "good enough.", "good, enough", " good enough", "5 stars!"]


@pytest.mark.parametrize("words", [("negative", "positive"), ("very bad", "quite good"), ("good", "good enough"),
                                   ("1 star", "5 stars"), ("ΘΕΤΙΚΟΣ", "ΑΡΝΗΤΙΚΟΣ")])
def test_label_decided_means_no_continuation_changes_the_label(words):
    """Every prefix judged decided parses like each of its continuations (the whole text and a table
    of suffixes), and every whole text that ends in punctuation is decided."""
    checked = 0
    for whole in TEXTS_TO_CUT:
        for cut in range(len(whole) + 1):
            text = whole[:cut]
            if label_decided(text, words):
                checked += 1
                for later in [whole, *(text + s for s in SUFFIXES)]:
                    assert parse_label(later, words) == parse_label(text, words), (text, later)
        if whole[-1] in ".!\n":
            assert label_decided(whole, words)
    assert checked > 20


def test_summarize_counts_unparseable_as_wrong():
    r = summarize([1, 0, None, 1, None], [1, 1, 0, 1, 1], n_labels=2, generations=["x"] * 5, seconds=2.0)
    assert (r.correct, r.n, r.unparseable) == (2, 5, 2)
    assert r.accuracy == pytest.approx(0.4) and r.examples_per_s == pytest.approx(2.5)
    assert r.confusion == [[0, 0, 1], [1, 2, 1]]
    assert {"accuracy", "unparseable", "n", "confusion", "examples_per_s"} <= set(r.to_dict())
    report = format_report(r, ("negative", "positive")).splitlines()
    assert report[:2] == ["accuracy     40.0 % (2/5)", "unparseable  2"]
    assert report[-3:] == ["                  negative     positive  unparseable",
                           "negative                 0            0            1",
                           "positive                 1            2            1"]


def test_summarize_three_labels_and_empty():
    r = summarize([2, 2, 0], [2, 1, 0], n_labels=3)
    assert r.confusion == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]] and r.correct == 2
    assert summarize([], [], n_labels=2).accuracy == 0.0
    with pytest.raises(ValueError):
        summarize([0], [0, 1], n_labels=2)


# --- exact accuracy on constructed cases: models whose answers are known ---------------------


class Scripted(torch.nn.Module):
    """A stand-in for a model whose generations are known: each prompt (found by its review text)
    is answered with a fixed reply, padded with ``pad_token_id`` as ``generate`` pads a finished row."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        from types import SimpleNamespace

        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the device evaluation reads
        self.tokenizer, self.replies, self.prompts = tokenizer, replies, []
        self.generation_config = SimpleNamespace(eos_token_id=tokenizer.eos_token_id)

    def forward(self, input_ids=None, past_key_values=None, **kwargs):
        raise AssertionError("a scripted model only generates")

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            self.prompts.append(prompt)
            (reply,) = [r for text, r in self.replies.items() if f"Text: {text}\n" in prompt]
            new = self.tokenizer(reply, add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(new + [pad_token_id] * (max_new_tokens - len(new)))
        return torch.cat([input_ids, torch.tensor(rows, dtype=input_ids.dtype)], 1)


def test_generation_accuracy_of_known_answers(tokenizer):
    """Six reviews (true labels 0 1 0 1 0 1) answered: negative (right), Positive. (right),
    positive (wrong), positively (unparseable), nothing (unparseable), positive! (right): 3 of 6
    right, 2 unparseable and counted wrong, in batches of 4 sorted by length."""
    replies = [" negative", " Positive.", " positive", " positively", "", " positive!"]
    model = Scripted(tokenizer, dict(zip(TEXTS, replies)))
    result = evaluate_generation(model, tokenizer, TaskFormat(), EXAMPLES, batch_size=4, max_new_tokens=4,
                                 progress=False, shared_prefix=False)
    assert len(model.prompts) == 6 and result.generations == replies
    assert result.predictions == [0, 1, 1, None, None, 1]
    assert (result.correct, result.n, result.unparseable, result.accuracy) == (3, 6, 2, 0.5)
    assert result.confusion == [[1, 1, 1], [0, 2, 1]]


@pytest.mark.parametrize("forced,correct,confusion", [(1, 4, [[0, 2, 0], [0, 4, 0]]),
                                                      (0, 2, [[2, 0, 0], [4, 0, 0]])])
@pytest.mark.parametrize("mode", ["generation", "scoring"])
def test_accuracy_of_a_model_forced_to_one_label(tokenizer, forced, correct, confusion, mode):
    """A tiny model whose LM head adds 30 to the logits of one label word's tokens answers that
    label to every review, generating or scoring: four reviews are positive and two negative, so
    the accuracy is exactly 4/6 or 2/6, with nothing unparseable."""
    from lmlab.data import label_token_ids

    model = build_model(preset_config("tiny-llama")).eval()
    fmt = TaskFormat()
    bias = torch.zeros(model.config.vocab_size)
    bias[label_token_ids(tokenizer, fmt)[forced]] = 30.0
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    examples = [Example(t, label) for t, label in zip(TEXTS, [1, 1, 1, 1, 0, 0])]
    if mode == "generation":
        result = evaluate_generation(model, tokenizer, fmt, examples, batch_size=4, progress=False)
        assert all(g.split()[0] == fmt.label_words[forced] for g in result.generations), result.generations
    else:
        result = evaluate_scoring(model, tokenizer, fmt, examples, batch_size=4, progress=False)
    assert result.predictions == [forced] * 6
    assert (result.correct, result.n, result.unparseable) == (correct, 6, 0)
    assert result.accuracy == pytest.approx(correct / 6) and result.confusion == confusion


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_batched_generation_equals_one_by_one(tiny_lm, shared_prefix):
    """Also through the template's shared-prefix KV cache, with the padding between it and each
    prompt's own tokens."""
    model, tok, reference = tiny_lm
    fmt, was_training = TaskFormat(), model.training
    expected = [greedy_alone(reference, tok, fmt, e, 4) for e in EXAMPLES]
    assert shared_prefix_length([it.prompt_ids for it in encode(tok, fmt, EXAMPLES)]) >= 4
    result = evaluate_generation(model, tok, fmt, EXAMPLES, batch_size=4, max_new_tokens=4, progress=False,
                                 shared_prefix=shared_prefix, stop_when_decided=False)
    assert result.generations == expected
    assert len(set(expected)) > 2  # the test would be vacuous if every prompt gave the same text
    assert model.training == was_training
    assert result.n == 6 and result.unparseable == 6  # a random model says no label word


def test_generation_stops_once_every_label_is_decided(tiny_lm):
    """Label words taken from the model's own generations (one whole word, one cut short), so some
    rows parse and others are unparseable at different steps: stopping early gives the same
    predictions, and every text is a prefix of the full one, some strictly."""
    model, tok, _ = tiny_lm
    run = {"batch_size": 4, "max_new_tokens": 4, "progress": False}
    full = evaluate_generation(model, tok, TaskFormat(), EXAMPLES, stop_when_decided=False, **run).generations
    firsts = [g.split()[0] for g in full if g.split() and g.split()[0].isalpha() and len(g.split()[0]) > 1]
    assert len(firsts) >= 2, full  # two usable words, else the test could not exercise anything
    fmt = TaskFormat(label_words=(firsts[0], firsts[1][:-1]))
    slow = evaluate_generation(model, tok, fmt, EXAMPLES, stop_when_decided=False, **run)
    fast = evaluate_generation(model, tok, fmt, EXAMPLES, **run)
    assert fast.predictions == slow.predictions and 0 in fast.predictions and None in fast.predictions
    assert all(s.startswith(f) for f, s in zip(fast.generations, slow.generations))
    assert sum(map(len, fast.generations)) < sum(map(len, slow.generations))


@pytest.mark.parametrize("shared_prefix", [True, False])
@pytest.mark.parametrize("words", [("negative", "positive"), ("very bad", "quite good"),
                                   ("bad", "okay", "quite good indeed")])
def test_scoring_equals_naive_likelihood(tiny_lm, words, shared_prefix):
    """Batched, left-padded, logits_to_keep (one-token labels) or one forward per label (several);
    one-token labels also through the template's shared-prefix KV cache (right-padded tails)."""
    model, tok, reference = tiny_lm
    fmt = TaskFormat(label_words=words)
    examples = [Example(e.text, i % len(words)) for i, e in enumerate(EXAMPLES)]
    expected = torch.tensor([naive_scores(reference, tok, fmt, e) for e in examples])  # (N, L)
    scores = label_logprobs(model, tok, fmt, examples, batch_size=4, shared_prefix=shared_prefix)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert (expected - expected.mean(0)).abs().max() > 0.1  # the scores depend on the input
    result = evaluate_scoring(model, tok, fmt, examples, batch_size=4, progress=False)
    assert result.predictions == scores.argmax(-1).tolist()
    assert result.unparseable == 0 and result.generations == []


def test_scoring_follows_an_unfolded_prefix_mlp_after_a_step(tokenizer):
    """Prefix tuning with its MLP recomputes the prefixes in a hook on the whole model: scoring
    (and its shared-prefix cache) must go through it, or it scores with the prefixes of before."""
    from lmlab.peft import prefix

    config = preset_config("tiny-llama")
    config.initializer_range = 0.3
    model = prefix.apply(build_model(config), prefix.PrefixConfig(length=3, hidden=8))
    fmt = TaskFormat(label_words=("good", "very good indeed"))
    label_logprobs(model, tokenizer, fmt, EXAMPLES[:3])  # builds whatever it caches
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    after = label_logprobs(model, tokenizer, fmt, EXAMPLES[:3])
    expected = torch.tensor([naive_scores(model.eval(), tokenizer, fmt, e) for e in EXAMPLES[:3]])
    assert torch.allclose(after, expected, atol=1e-4)


@pytest.mark.parametrize("prompts,expected", [
    ([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7, 8]], 5),
    ([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]], 4),  # every prompt keeps a token of its own
    ([[1, 2, 3, 9], [1, 2, 3, 8]], 0),  # under the minimum of 4: not worth a cache
    ([[5, 6, 7, 8, 9, 10]], 5),
])
def test_shared_prefix_length(prompts, expected):
    assert shared_prefix_length(prompts) == expected


def test_evaluation_leaves_weights_trainable(tokenizer):
    """Merging LoRA for evaluation must happen outside inference mode, or the merged weights
    become inference tensors that a later merge_and_unload + training cannot use."""
    from lmlab.peft import lora

    model = lora.apply(build_model(preset_config("tiny-llama")), lora.LoraConfig(r=2))
    model.train()
    evaluate_scoring(model, tokenizer, TaskFormat(), EXAMPLES[:2], progress=False)
    model.eval()  # stays merged
    merged = lora.merge_and_unload(copy.deepcopy(model))
    assert not any(p.is_inference() for p in merged.parameters())
    for p in merged.parameters():
        p.requires_grad_(True)
    merged(torch.tensor([[1, 2, 3]])).logits.sum().backward()


def test_no_examples_is_one_clear_error(tokenizer):
    with pytest.raises(LmlabError, match="no examples"):
        evaluate_scoring(build_model(preset_config("tiny-llama")), tokenizer, TaskFormat(), [], progress=False)


def test_subsample_is_fixed_and_ordered():
    examples = [Example(str(i), 0) for i in range(100)]
    a = subsample(examples, 10)
    assert a == subsample(examples, 10) and [int(e.text) for e in a] == sorted(int(e.text) for e in a)
    assert subsample(examples, None) is examples and subsample(examples, 500) is examples


# --- the real SmolLM2-135M-Instruct ------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    from conftest import RT, needs_shared

    from lmlab.data import load_splits
    from lmlab.models import load_model

    needs_shared()
    return (*load_model(), load_splits(RT, TaskFormat(), splits=("test",))["test"])


@pytest.mark.slow
def test_real_model_batched_generation_equals_one_by_one(real):
    """Left padding and the shared-prefix cache must not change what the real model (RoPE, GQA)
    generates; stopping once the labels are decided keeps a prefix of each text and its label."""
    model, tok, test = real
    examples = subsample(test, 6)
    alone = [greedy_alone(model, tok, TaskFormat(), e, 3) for e in examples]
    batched = evaluate_generation(model, tok, TaskFormat(), examples, batch_size=6, progress=False,
                                  stop_when_decided=False)
    assert batched.generations == alone
    stopped = evaluate_generation(model, tok, TaskFormat(), examples, batch_size=6, progress=False)
    assert stopped.predictions == batched.predictions
    assert all(a.startswith(s) for s, a in zip(stopped.generations, alone))


@pytest.mark.slow
def test_real_model_accuracy(real):
    """Both modes on 64 rotten_tomatoes reviews. Zero-shot, the model says "positive" to almost
    everything (scoring accuracy ~0.53 here, ~0.59 on 128), so the check that scoring reads
    sentiment is on the ranking: the margin log p(positive) - log p(negative) puts a positive
    review above a negative one in most pairs (AUROC)."""
    model, tok, test = real
    examples = subsample(test, 64)
    gen = evaluate_generation(model, tok, TaskFormat(), examples, progress=False)
    score = evaluate_scoring(model, tok, TaskFormat(), examples, progress=False)
    for name, r in (("generation", gen), ("scoring", score)):
        print(f"\n{name}: accuracy {r.accuracy:.3f}, unparseable {r.unparseable}/{r.n}, "
              f"{r.examples_per_s:.2f} examples/s\n{format_report(r, TaskFormat().label_words)}")
    labels = [e.label for e in examples]
    for r in (gen, score):  # the counts are the predictions' counts
        assert r.n == 64 and r.correct == sum(p == y for p, y in zip(r.predictions, labels))
        assert r.unparseable == r.predictions.count(None) and r.accuracy == r.correct / 64
    assert score.unparseable == 0 and len(gen.generations) == 64
    assert gen.predictions == [parse_label(g, TaskFormat().label_words) for g in gen.generations]
    assert gen.unparseable < 32  # the instruct model mostly answers with a label word

    scores = label_logprobs(model, tok, TaskFormat(), examples)
    assert score.predictions == scores.argmax(-1).tolist()
    margin = scores[:, 1] - scores[:, 0]
    labels = torch.tensor(labels)
    auroc = (margin[labels == 1, None] > margin[None, labels == 0]).float().mean().item()
    print(f"scoring margin AUROC {auroc:.3f}")
    assert auroc > 0.75
