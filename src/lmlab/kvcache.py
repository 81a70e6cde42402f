"""The KV cache of a token prefix every prompt shares (a template's instruction, few-shot
exemplars): it runs once, and each batch starts from copies of it instead of running it again.

A batch stays exactly as without the cache: prompts left-padded, row i padded by ``shifts[i]``
columns. The cache stands for the batch's first ``shared`` columns: in row i, ``shifts[i]``
columns of padding (hidden by the mask) and then the prefix, cut where the ``shared`` columns end;
the model runs on the columns after them, which for a padded row start with the rest of the
prefix. Causal attention makes the prefix's keys and values independent of what follows, and
positions come from the mask, so every row computes what it would without the cache, while the
ids that logits processors, stop strings and sliding windows see do not change at all.
"""

from __future__ import annotations

import copy

import torch

from lmlab.models import last_block_on_rows


def cache_arg(model, cache) -> dict:
    """``{name: cache}`` for ``model(...)`` and ``generate``: transformers >= 5.24 calls it ``cache``
    (``past_key_values`` still works there but warns), earlier 5.x releases ``past_key_values``."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def output_cache(out):
    """The KV cache a forward returned, under either name (see ``cache_arg``)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def shared_prefix_length(prompts: list[list[int]], minimum: int = 4) -> int:
    """Tokens at the start of every prompt, leaving each at least one of its own; 0 if < ``minimum``."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n if n >= minimum else 0


def prefix_cache(model, prefix: list[int]):
    """The KV cache of one row holding ``prefix`` (through the whole model, so its forward hooks
    run; the LM head on the last position only), or None if the model's cache cannot be moved
    column by column: a sliding-window layer keeps only its last window of the prefix."""
    from transformers.cache_utils import DynamicLayer

    from lmlab.devices import model_device

    ids = torch.tensor([prefix], device=model_device(model))
    with last_block_on_rows(model):  # the cache holds keys and values, made before o_proj and the MLP
        cache = output_cache(model(input_ids=ids, use_cache=True, logits_to_keep=1))
    layers = getattr(cache, "layers", None)
    return cache if layers and all(type(layer) is DynamicLayer for layer in layers) else None


def left_padded_cache(cache, shifts: list[int]):
    """A new cache with one row per entry of ``shifts``: the one-row prefix ``cache`` moved right
    by that row's left padding (zeros before it, which the mask hides), its end cut off."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(len(shifts))
    for layer in out.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name)  # (B, heads, shared, head_dim), every row the prefix
            moved = torch.zeros_like(tensor)
            for row, shift in enumerate(shifts):
                if shift < tensor.shape[2]:
                    moved[row, :, shift:] = tensor[row, :, :tensor.shape[2] - shift]
            setattr(layer, name, moved)
    return out
