"""Batched sampling through the shared-prefix KV cache (``lmlab.kvcache``) gives what it gives
without: greedy and sampled, on Llama (RoPE), GPT-2 (absolute positions) and a sliding-window
Mistral, with logits processors and stop strings that look back into the prompt. Temperature,
top-k and top-p draw the ids a hand-written sampler draws under the same seed. Devices: the
batch and the prefix reach a model on meta (standing in for a GPU) on meta; ``lmlab generate``
takes --device / --dtype, and a missing CUDA is one line."""

import json

import pytest
import torch

from lmlab.generate import SamplingConfig, sample
from lmlab.kvcache import left_padded_cache, prefix_cache, shared_prefix_length
from lmlab.models import build_model, preset_config

SHOTS = "Question: two plus two?\nAnswer: 4\n\nQuestion: three plus one?\nAnswer: 4\n\nQuestion:"
PROMPTS = [SHOTS + q for q in (" five minus two?\nAnswer:", " what is six times seven, if you count slowly?",
                               " a", " ten over two plus a half?\nAnswer:")]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lmlab.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


def sliding_mistral():
    from transformers import MistralConfig

    return MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, sliding_window=8, pad_token_id=2)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2", "mistral-window-8"])
def model(request):
    config = sliding_mistral() if request.param == "mistral-window-8" else preset_config(request.param)
    config.initializer_range = 0.3  # large enough weights that the text depends on the prompt
    return build_model(config).eval()


def both(model, tokenizer, config, **kwargs):
    cached = sample(model, tokenizer, PROMPTS, config, progress=False, **kwargs)
    return cached, sample(model, tokenizer, PROMPTS, config, progress=False, shared_prefix=False, **kwargs)


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
    cached, plain = both(model, tokenizer, SamplingConfig(max_new_tokens=6, temperature=0, batch_size=3))
    expected = [[alone(model, tokenizer, p, 6)] for p in PROMPTS]
    assert cached == plain == expected and len({t[0] for t in expected}) > 2


def test_sampling_through_the_prefix_cache_gives_the_same_samples(model, tokenizer):
    """Several samples per prompt: ``generate`` repeats each row but not the cache."""
    cached, plain = both(model, tokenizer, SamplingConfig(max_new_tokens=6, samples=2, seed=5, batch_size=2))
    assert cached == plain and all(len(t) == 2 for t in cached) and len({s for t in cached for s in t}) > 4


def test_processors_and_stop_strings_see_the_same_ids(model, tokenizer):
    """transformers' watermark hashing the 4 tokens before each new one, and a stop string that
    starts inside the shared prefix, must see the prompt, not padding."""
    from transformers import WatermarkLogitsProcessor

    first = [t[0] for t in sample(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=1, temperature=0),
                                  progress=False)]
    watermark = WatermarkLogitsProcessor(vocab_size=model.config.vocab_size, device="cpu", seeding_scheme="selfhash",
                                         context_width=4, bias=20.0)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0)
    cached, plain = both(model, tokenizer, greedy, logits_processors=[watermark])
    assert cached == plain
    stop = SamplingConfig(max_new_tokens=8, temperature=0, stop_strings=(":" + " a" + first[2],))
    cached, plain = both(model, tokenizer, stop)
    assert cached == plain and len(cached[2][0]) < len(cached[0][0]) + len(cached[1][0])


# --- temperature, top-k and top-p against a hand-written sampler -------------------------------


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution to sample from, written out: logits / T; only the k largest (0: all);
    then the smallest set of the most likely tokens whose probability reaches top_p (nucleus
    sampling, Holtzman et al. 2020: a token stays if the mass of the tokens above it is < p)."""
    scores = logits.float() / temperature  # (rows, V)
    if top_k:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        above = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the tokens ranked above
        drop = (above >= top_p).scatter(-1, order, above >= top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(-1)


def reference_sample(model, ids: list[int], config: SamplingConfig, eos: int) -> list[list[int]]:
    """``config.samples`` rows sampled one token at a time from full forwards (no cache) with
    ``reference_probs`` and ``torch.multinomial``, under ``config.seed``; a row that has ended
    repeats the end token, and all stop once every row has ended."""
    rows = torch.tensor([ids] * config.samples)
    done = torch.zeros(config.samples, dtype=torch.bool)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(config.seed)
        for _ in range(config.max_new_tokens):
            probs = reference_probs(model(rows).logits[:, -1], config.temperature, config.top_k, config.top_p)
            token = torch.multinomial(probs, 1)[:, 0].masked_fill(done, eos)
            rows, done = torch.cat([rows, token[:, None]], 1), done | (token == eos)
            if done.all():
                break
    return rows[:, len(ids):].tolist()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.7, 0, 1.0), (1.0, 7, 1.0),
                                                     (1.0, 0, 0.5), (1.3, 20, 0.8), (0.8, 1, 1.0)])
def test_reference_probs_equal_transformers_warpers(temperature, top_k, top_p):
    """The hand-written distribution is transformers' temperature -> top-k -> top-p chain (the
    order ``generate`` applies them), on logits with ties and a wide spread."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 4
    logits[0, :10] = 6.0  # ties at the top
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    theirs = warpers(torch.zeros(3, 1, dtype=torch.long), logits.clone()).softmax(-1)
    torch.testing.assert_close(reference_probs(logits, temperature, top_k, top_p), theirs)


SAMPLING = [(0.5, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.6), (1.5, 10, 0.7)]


@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLING)
def test_sampling_equals_the_reference_sampler(model, tokenizer, monkeypatch, temperature, top_k, top_p):
    """The ids ``sample`` draws for 3 samples of a prompt are the ids of the hand-written sampler
    under the same seed: temperature, top-k and top-p reach the sampler, applied as defined."""
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    config = SamplingConfig(max_new_tokens=8, samples=3, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    drawn = []
    real = model.generate

    def generate(**kwargs):
        out = real(**kwargs)
        drawn.extend(out[:, kwargs["input_ids"].shape[1]:].tolist())
        return out

    monkeypatch.setattr(model, "generate", generate)
    sample(model, tokenizer, [prompt], config, progress=False)
    eos = model.generation_config.eos_token_id
    expected = reference_sample(model, prompt, config, eos if eos is not None else tokenizer.eos_token_id)
    assert drawn == expected
    with torch.no_grad():  # the settings matter here: the case is not vacuous
        logits = model(torch.tensor([prompt])).logits[:, -1]
    probs, plain = reference_probs(logits, temperature, top_k, top_p), logits.softmax(-1)
    if top_k or top_p < 1:
        assert 1 < (probs > 0).sum() < probs.shape[-1] / 2
    elif temperature != 1:
        assert (probs - plain).abs().max() > 1e-3


def test_sampling_settings_change_the_samples(model, tokenizer):
    """Another temperature, top-k, top-p or seed gives other samples of the same prompt."""
    prompt = [tokenizer(PROMPTS[1])["input_ids"]]
    settings = [{}, {"temperature": 0.5}, {"top_k": 5}, {"top_p": 0.6}, {"seed": 1}]
    outs = [tuple(sample(model, tokenizer, prompt, SamplingConfig(max_new_tokens=8, samples=3, **setting),
                         progress=False)[0]) for setting in settings]
    assert len(set(outs)) == len(settings), outs


def test_left_padded_cache_moves_each_row_right(model, tokenizer):
    ids = tokenizer(SHOTS)["input_ids"]
    with torch.no_grad():
        cache = prefix_cache(model, ids)
    if getattr(model.config, "sliding_window", None):
        assert cache is None  # its layers keep only the window: nothing to move, no prefix cache
        return
    moved = left_padded_cache(cache, [0, 3, len(ids) + 2])
    keys, out = cache.layers[0].keys, moved.layers[0].keys  # (rows, heads, len, head_dim)
    assert out.shape[0] == 3 and torch.equal(out[0], keys[0])
    assert torch.equal(out[1, :, 3:], keys[0, :, :-3]) and not out[1, :, :3].any() and not out[2].any()
    assert cache.layers[0].keys.shape[0] == 1  # the original still serves the next batch


# --- devices: meta stands in for a GPU (a CPU tensor mixed with a meta one is a device error) --


class _Stop(Exception):
    """Raised by a forward pre-hook once it has seen the model's inputs (meta models cannot run)."""


def test_sample_builds_its_batch_on_the_models_device(tokenizer):
    model = build_model(preset_config("tiny-llama")).to("meta")
    seen = []

    def generate(input_ids, attention_mask, past_key_values=None, **options):  # a stand-in: meta holds no ids
        seen.append((input_ids.device.type, attention_mask.device.type))
        rows = input_ids.shape[0] * options["num_return_sequences"]
        return torch.zeros(rows, input_ids.shape[1] + 2, dtype=torch.long)

    model.generate = generate
    config = SamplingConfig(max_new_tokens=2, samples=2, batch_size=3)
    out = sample(model, tokenizer, PROMPTS, config, progress=False, shared_prefix=False)
    assert [len(t) for t in out] == [2] * 4 and seen == [("meta", "meta")] * 2

    def hook(module, args, kwargs):
        seen.append(kwargs["input_ids"].device.type)
        raise _Stop

    model.register_forward_pre_hook(hook, with_kwargs=True)
    with pytest.raises(_Stop):  # the shared prefix runs through the model first
        sample(model, tokenizer, PROMPTS, config, progress=False)
    assert seen[-1] == "meta"


def test_cli_generate_on_a_chosen_device_and_dtype(tiny_model_dir, tmp_path, capsys):
    from lmlab.cli import main

    (tmp_path / "p.txt").write_text("The weather today\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", tiny_model_dir, "--prompts", str(tmp_path / "p.txt"), "--output", str(out),
                 "--max-new-tokens", "3", "--device", "cpu", "--dtype", "fp32", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == 1 and len(out.read_text().splitlines()) == 1


@pytest.mark.parametrize("device,message", [
    ("tpu", "device must be one of"),
    pytest.param("cuda", "--device cuda: this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_cli_generate_missing_device_is_one_line(tmp_path, capsys, device, message):
    from lmlab.cli import main

    (tmp_path / "p.txt").write_text("The weather today\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--prompts", str(tmp_path / "p.txt"), "--output", str(out), "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmlab: error: ") and message in err[0], err
    assert not out.exists()


def test_greedy_with_several_samples_is_one_line(tiny_model_dir, tmp_path, capsys):
    from lmlab.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", tiny_model_dir, "--prompts", str(prompts), "--samples", "3",
                 "--temperature", "0", "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error: --temperature 0 is greedy") and err.count("\n") == 1
    assert not out.exists()
