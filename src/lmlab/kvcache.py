"""The KV cache of a token prefix every prompt shares (a template's instruction, few-shot
exemplars): it runs once, and each batch starts from a copy of it instead of running it again.

A batch of prompts then holds, per row, [prefix | padding | the prompt's own tokens]. The padding
sits between the prefix and each prompt's own tokens and the attention mask hides it, so every
prompt still ends in the last column, where generation continues, and transformers' ``generate``,
which derives position ids from the mask, gives each row the positions it would have alone.
"""

from __future__ import annotations

import copy

import torch


def shared_prefix_length(prompts: list[list[int]], minimum: int = 4) -> int:
    """Tokens at the start of every prompt, leaving each at least one of its own; 0 if < ``minimum``."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n if n >= minimum else 0


def prefix_cache(model, prefix: list[int]):
    """The KV cache of one row holding ``prefix`` (the body only: no logits are needed)."""
    return model.base_model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values


def repeat_cache(cache, rows: int):
    """A copy of a one-row KV cache with ``rows`` rows (the original serves every batch)."""
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(rows)
    return cache


def prefixed_left_pad(prompts: list[list[int]], shared: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (B, shared + T) of prompts whose first ``shared`` tokens are the
    same: that prefix, then left padding, then each prompt's own tokens. ``shared = 0`` is plain
    left padding."""
    tails = [p[shared:] for p in prompts]
    width = max(map(len, tails))
    prefix = prompts[0][:shared]
    ids = torch.tensor([prefix + [pad_id] * (width - len(t)) + t for t in tails])
    mask = torch.tensor([[1] * shared + [0] * (width - len(t)) + [1] * len(t) for t in tails])
    return ids, mask
