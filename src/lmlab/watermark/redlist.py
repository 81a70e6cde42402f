"""Red-list watermarks (Kirchenbauer et al. 2023, "A Watermark for Large Language Models").

Before each token, the previous token seeds a PRNG that splits the vocabulary into a green list
(a fraction γ) and a red list (Alg. 2). The hard scheme samples green tokens only (Alg. 1); the
soft scheme subtracts δ from every red logit (Alg. 2 adds δ to green ones: the same distribution
after softmax). A detector counts green tokens and runs the one-proportion z test (Eq. 2).

The defaults are the reference implementation's ``simple_1`` / LeftHash scheme, bit for bit:
seed = 15485863 × previous token id on a CPU ``torch.Generator``, green list = the first
⌊γ·|V|⌋ entries of ``torch.randperm(|V|)``, γ = 0.25, δ = 2.0, |V| = the tokenizer's size.
transformers' ``WatermarkLogitsProcessor`` (lefthash) draws the same lists.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch

from lmlab.errors import LmlabError

DEFAULT_KEY = 15485863  # the millionth prime, the reference implementation's hash key


@dataclass(frozen=True, kw_only=True)
class RedListConfig:
    """The secret and the strength of a red-list watermark."""

    vocab_size: int  # |V|: the tokenizer's vocabulary; wider logits (padding rows) are always red
    gamma: float = 0.25  # green share of the vocabulary
    delta: float = 2.0  # soft scheme: logit penalty of a red token
    key: int = DEFAULT_KEY

    def __post_init__(self):
        if self.vocab_size < 2:
            raise LmlabError(f"vocabulary size must be at least 2, got {self.vocab_size}")
        if not 0 < self.gamma < 1 or int(self.vocab_size * self.gamma) < 1:
            raise LmlabError(f"gamma must be in (0, 1) and leave a non-empty green list, got {self.gamma}")
        if self.delta < 0 or not math.isfinite(self.delta):
            raise LmlabError(f"delta must be a finite number >= 0, got {self.delta}")

    @property
    def green_size(self) -> int:
        return int(self.vocab_size * self.gamma)


def green_ids(previous: int, config: RedListConfig) -> torch.Tensor:
    """The green list after token ``previous``: the reference's ``_get_greenlist_ids`` (simple_1).
    Always drawn on the CPU (whatever torch's default device), so every device gets the same list."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed((config.key * int(previous)) % (2**64 - 1))
    return torch.randperm(config.vocab_size, generator=rng, device="cpu")[:config.green_size]


class GreenLists:
    """Green-list masks by previous token, computed once each (an LRU of ``capacity`` masks per device).

    A ``randperm`` of 49k ids costs ~0.4 ms; text repeats previous tokens often (spaces, "the",
    punctuation), so caching removes most of them from generation and detection alike. Every list
    is drawn on the CPU generator (the same lists on every device, as the reference's); a device's
    cache holds its own copies, so generating on a GPU copies a mask there once, not every step.
    """

    def __init__(self, config: RedListConfig, capacity: int = 4096):
        self.config, self.capacity = config, capacity
        self._caches: dict[torch.device, OrderedDict[int, torch.Tensor]] = {}

    def mask(self, previous: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(|V|,) bool on ``device``, True for green."""
        device = torch.device(device)
        cache = self._caches.setdefault(device, OrderedDict())
        found = cache.get(previous)
        if found is not None:
            cache.move_to_end(previous)
            return found
        mask = torch.zeros(self.config.vocab_size, dtype=torch.bool, device="cpu")
        mask[green_ids(previous, self.config)] = True
        cache[previous] = mask = mask.to(device)
        if len(cache) > self.capacity:
            cache.popitem(last=False)
        return mask

    def is_green(self, previous: int, token: int) -> bool:
        return 0 <= token < self.config.vocab_size and bool(self.mask(previous)[token])

    def batch_mask(self, previous: torch.Tensor, width: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(B, width) bool green masks for a batch of previous tokens, on ``device`` (default:
        ``previous``'s); columns >= |V| are red."""
        device = previous.device if device is None else torch.device(device)
        masks = torch.stack([self.mask(token, device) for token in previous.tolist()])  # (B, |V|)
        if width > self.config.vocab_size:
            return torch.cat([masks, masks.new_zeros(len(masks), width - self.config.vocab_size)], dim=1)
        return masks[:, :width]


class RedListLogitsProcessor:
    """transformers ``LogitsProcessor``: ``hard`` bans red tokens, else red logits lose δ. The
    masks follow ``scores.device`` (the model's)."""

    def __init__(self, config: RedListConfig, hard: bool, lists: GreenLists | None = None):
        self.config, self.hard = config, hard
        self.lists = lists or GreenLists(config)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        green = self.lists.batch_mask(input_ids[:, -1], scores.shape[-1], scores.device)  # (B, W)
        if self.hard:
            return scores.masked_fill(~green, float("-inf"))
        return torch.where(green, scores, scores - self.config.delta)


@dataclass(frozen=True)
class Detection:
    """One text's red-list statistics: ``scored`` tokens (each after a previous one), how many
    were green, and the one-proportion z test of that count against γ."""

    scored: int
    green: int
    z: float
    p_value: float

    @property
    def green_fraction(self) -> float:
        return self.green / self.scored if self.scored else 0.0


def z_score(green: int, scored: int, gamma: float) -> float:
    """(|s|_G − γT) / √(T γ (1 − γ)), Kirchenbauer et al. 2023, Eq. 2."""
    return (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))


def p_value(z: float) -> float:
    """One-sided p-value of a standard-normal z (the chance of at least this many green tokens)."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def detect_ids(ids: list[int], lists: GreenLists, ignore_repeated: bool = False) -> Detection:
    """Score every token after the first against the green list of its predecessor.

    ``ignore_repeated`` scores each distinct (previous, current) pair once, as the reference
    detector's ``ignore_repeated_bigrams`` does, so repeated phrases cannot inflate z.
    """
    pairs = list(itertools.pairwise(ids))
    if not pairs:
        raise LmlabError("fewer than two tokens: nothing to score")
    if ignore_repeated:
        pairs = list(Counter(pairs))
    green = sum(lists.is_green(prev, cur) for prev, cur in pairs)
    z = z_score(green, len(pairs), lists.config.gamma)
    return Detection(len(pairs), green, z, p_value(z))


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a text as the reference detector sees them: no special tokens, no leading BOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    return ids
