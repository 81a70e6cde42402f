"""Batched sampling: prompts that share a prefix give the same texts through its KV cache as
without it, and greedy batches give what each prompt gives alone; on Llama (RoPE) and GPT-2
(absolute positions, which catch wrong position ids)."""

import pytest
import torch

from lmlab.generate import SamplingConfig, sample
from lmlab.kvcache import prefixed_left_pad, shared_prefix_length
from lmlab.models import build_model, preset_config

SHOTS = "Question: two plus two?\nAnswer: 4\n\nQuestion: three plus one?\nAnswer: 4\n\n"
PROMPTS = [SHOTS + f"Question: {q}\nAnswer:" for q in
           ("five minus two?", "what is six times seven, if you count slowly?", "one?", "ten over two plus a half?")]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lmlab.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def model(request):
    config = preset_config(request.param)
    config.initializer_range = 0.3  # large enough weights that the text depends on the prompt
    return build_model(config).eval()


def alone(model, tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_prompts_share_a_prefix(tokenizer):
    encoded = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert shared_prefix_length(encoded) >= len(tokenizer(SHOTS)["input_ids"]) - 1


def test_greedy_through_the_prefix_cache_equals_each_prompt_alone(model, tokenizer):
    config = SamplingConfig(max_new_tokens=6, temperature=0, batch_size=3)
    cached = [t[0] for t in sample(model, tokenizer, PROMPTS, config, progress=False)]
    plain = [t[0] for t in sample(model, tokenizer, PROMPTS, config, progress=False, shared_prefix=False)]
    expected = [alone(model, tokenizer, p, 6) for p in PROMPTS]
    assert cached == plain == expected and len(set(expected)) > 2


def test_sampling_through_the_prefix_cache_gives_the_same_samples(model, tokenizer):
    """Several samples per prompt: ``generate`` repeats each row but not the cache, which must
    have a row per sample."""
    config = SamplingConfig(max_new_tokens=6, temperature=1.0, samples=2, seed=5, batch_size=2)
    cached = sample(model, tokenizer, PROMPTS, config, progress=False)
    assert cached == sample(model, tokenizer, PROMPTS, config, progress=False, shared_prefix=False)
    assert all(len(texts) == 2 for texts in cached) and len({t for texts in cached for t in texts}) > 4


def test_prefixed_left_pad():
    ids, mask = prefixed_left_pad([[7, 8, 1], [7, 8, 2, 3, 4]], shared=2, pad_id=0)
    assert ids.tolist() == [[7, 8, 0, 0, 1], [7, 8, 2, 3, 4]]
    assert mask.tolist() == [[1, 1, 0, 0, 1], [1, 1, 1, 1, 1]]
    ids, mask = prefixed_left_pad([[5], [6, 7]], shared=0, pad_id=9)
    assert ids.tolist() == [[9, 5], [6, 7]] and mask.tolist() == [[0, 1], [1, 1]]
