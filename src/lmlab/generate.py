"""Batched sampling from a causal LM: prompts in, ``samples`` continuations per prompt out.

One loop serves ``lmlab generate`` (SFT samples) and ``lmlab watermark generate``: the watermark
schemes are transformers ``LogitsProcessor``s passed through ``logits_processors``. transformers
runs user processors before its temperature / top-k / top-p warpers, as the reference watermark
code expects (the red list is applied to the raw logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmlab.errors import LmlabError
from lmlab.models import last_block_on_rows


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to sample. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` switch
    those filters off, so the defaults are plain sampling from the model's distribution."""

    max_new_tokens: int = 100
    min_new_tokens: int = 0  # the end-of-text token is banned before this many new tokens
    samples: int = 1  # continuations per prompt
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8  # prompts per batch; each brings ``samples`` rows
    chat: bool = False  # wrap each prompt in the tokenizer's chat template as a user turn
    stop_strings: tuple[str, ...] = ()  # a row stops once its new text contains one of these

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.samples < 1 or self.batch_size < 1:
            raise LmlabError("max_new_tokens, samples and batch_size must be positive")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise LmlabError("min_new_tokens must be between 0 and max_new_tokens")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise LmlabError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        if self.temperature == 0 and self.samples > 1:
            raise LmlabError(f"--temperature 0 is greedy: all {self.samples} samples of a prompt would be the same "
                             "text; use --samples 1, or a temperature above 0")


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of one prompt: raw text (with the tokenizer's BOS if it adds one), or a user turn of
    the chat template ready for the reply, rendered as ``finetune --task chat`` renders it."""
    if chat:
        from lmlab.chat import has_template, user_turn_ids

        if not has_template(tokenizer):
            raise LmlabError("this tokenizer has no chat template; use --chat-template off")
        return user_turn_ids(tokenizer, prompt, True)
    return tokenizer(prompt)["input_ids"]


@dataclass(frozen=True)
class Continuation:
    """One sampled continuation: its decoded text, its new token ids (up to, not including, the
    first end-of-text id; padding after it dropped) and whether the model ended it with that id."""

    text: str
    ids: tuple[int, ...]
    ended_by_eos: bool


def eos_token_ids(model) -> set[int]:
    """The end-of-text ids ``generate`` stops a row at: those of the model's generation config."""
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(found if isinstance(found, (list, tuple)) else [] if found is None else [found])


def _cut_at_eos(row: list[int], eos: set[int]) -> tuple[tuple[int, ...], bool]:
    """(new ids before the first end-of-text id, whether there was one)."""
    for k, token in enumerate(row):
        if token in eos:
            return tuple(row[:k]), True
    return tuple(row), False


def sample(model, tokenizer, prompts: list[str] | list[list[int]], config: SamplingConfig, *, logits_processors=(),
           progress: bool = True, shared_prefix: bool = True) -> list[list[str]]:
    """``config.samples`` decoded continuations (new tokens only) per prompt, in prompt order.
    A prompt is a string or a list of token ids (taken as is). Encoder-decoder models (T5) work too.

    Prompts are sorted by length and left-padded in batches; the global RNG is forked, seeded and
    restored, so the same seed gives the same texts and the caller's random state is untouched.
    With ``shared_prefix`` (decoder-only models), the tokens every prompt starts with (few-shot
    exemplars, an instruction) run once and each batch starts from their KV cache (``lmlab.kvcache``).
    ``sample_tokens`` gives the token ids as well.
    """
    return [[c.text for c in row] for row in sample_tokens(model, tokenizer, prompts, config,
                                                           logits_processors=logits_processors, progress=progress,
                                                           shared_prefix=shared_prefix)]


def sample_tokens(model, tokenizer, prompts: list[str] | list[list[int]], config: SamplingConfig, *,
                  logits_processors=(), progress: bool = True,
                  shared_prefix: bool = True) -> list[list[Continuation]]:
    """``sample`` with each continuation's new token ids and whether an end-of-text id ended it:
    a continuation is ``config.max_new_tokens`` ids long unless it did (or a stop string cut the
    whole batch short)."""
    from transformers import LogitsProcessorList

    from lmlab.evaluate import _inference, _pad_id
    from lmlab.kvcache import cache_arg, left_padded_cache, prefix_cache, shared_prefix_length
    from lmlab.progress import bar as progress_bar

    if not prompts:
        raise LmlabError("no prompts")
    encoded = [p if isinstance(p, list) else prompt_ids(tokenizer, p, config.chat) for p in prompts]
    if any(not ids for ids in encoded):
        raise LmlabError("a prompt is empty after tokenisation (the model needs at least one token to continue)")
    decoder_only = not getattr(model.config, "is_encoder_decoder", False)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and decoder_only and max(map(len, encoded)) + config.max_new_tokens > limit:
        raise LmlabError(f"a prompt of {max(map(len, encoded))} tokens + {config.max_new_tokens} new tokens "
                         f"exceeds the model's context of {limit}")
    pad = _pad_id(tokenizer)
    greedy = config.temperature == 0
    options = {"max_new_tokens": config.max_new_tokens, "min_new_tokens": config.min_new_tokens,
                   "do_sample": not greedy, "num_return_sequences": config.samples, "pad_token_id": pad,
                   "logits_processor": LogitsProcessorList(logits_processors)}
    if not greedy:
        options.update(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    if config.stop_strings:
        options.update(stop_strings=list(config.stop_strings), tokenizer=tokenizer)
    shared = shared_prefix_length(encoded) if shared_prefix and decoder_only and len(encoded) > 1 else 0
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[list[Continuation]] = [[] for _ in prompts]
    eos = eos_token_ids(model)
    from lmlab.devices import model_device

    device = model_device(model)
    # fork (and seed) the generator of the device that samples too, so GPU texts follow --seed as well
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked, device_type=device.type if forked else "cuda"), _inference(model), \
            progress_bar(total=len(prompts) * config.samples, enabled=progress, desc="generating", unit="text") as bar:
        prefix = prefix_cache(model, encoded[0][:shared]) if shared else None
        torch.manual_seed(config.seed)
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            width = max(len(encoded[i]) for i in idx)
            # decoder-only: left padding, so every row continues from the last column; an encoder (BART's
            # learned absolute positions) reads its prompt right-padded, as seq2seq.collate trains it
            def padded(row: list[int], fill: int) -> list[int]:
                gap = [fill] * (width - len(row))
                return gap + row if decoder_only else row + gap

            ids = torch.tensor([padded(encoded[i], pad) for i in idx], device=device)  # (B, T)
            mask = torch.tensor([padded([1] * len(encoded[i]), 0) for i in idx], device=device)
            # generate repeats each row ``samples`` times, but not a cache: its rows come repeated
            shifts = [width - len(encoded[i]) for i in idx for _ in range(config.samples)]
            cache = left_padded_cache(prefix, shifts) if prefix is not None else None
            with last_block_on_rows(model):  # generate's forwards keep one position's logits (logits_to_keep=1)
                out = model.generate(input_ids=ids, attention_mask=mask, **cache_arg(model, cache),
                                     **options)  # (B * samples, T + new)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:] if decoder_only else out, skip_special_tokens=True)
            new_ids = (out[:, ids.shape[1]:] if decoder_only else out[:, 1:]).tolist()  # T5: drop the start id
            done = [Continuation(text, *_cut_at_eos(row, eos)) for text, row in zip(texts, new_ids)]
            for row, i in enumerate(idx):
                outputs[i] = done[row * config.samples:(row + 1) * config.samples]
            bar.update(len(idx) * config.samples)
    return outputs
