"""Red-list watermarks (Kirchenbauer et al. 2023, "A Watermark for Large Language Models").

Before each token, the previous token seeds a PRNG that splits the vocabulary into a green list
(a fraction γ) and a red list (Alg. 2). The hard scheme samples green tokens only (Alg. 1); the
soft scheme subtracts δ from every red logit (Alg. 2 adds δ to green ones: the same distribution
after softmax). A detector counts green tokens and runs the one-proportion z test (Eq. 2).

The defaults are the reference implementation's ``simple_1`` / LeftHash scheme, bit for bit:
seed = 15485863 × previous token id on a CPU ``torch.Generator``, green list = the first
⌊γ·|V|⌋ entries of ``torch.randperm(|V|)``, γ = 0.25, δ = 2.0, |V| = the tokenizer's size.
transformers' ``WatermarkLogitsProcessor`` (lefthash) draws the same lists. Other seeding schemes
(the reference's and transformers' selfhash) and a user's own green-list function are in
``seeding.py``; ``GreenLists`` serves them all.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch

from lmlab.errors import LmlabError
from lmlab.watermark.seeding import Seeding, checked_green_ids, load_green_list, seeded_green_ids, seeding

DEFAULT_KEY = 15485863  # the millionth prime, the reference implementation's hash key


@dataclass(frozen=True, kw_only=True)
class RedListConfig:
    """The secret and the strength of a red-list watermark."""

    vocab_size: int  # |V|: the tokenizer's vocabulary; wider logits (padding rows) are always red
    gamma: float = 0.25  # green share of the vocabulary (with green_list: measured per list instead)
    delta: float = 2.0  # soft scheme: logit penalty of a red token
    key: int = DEFAULT_KEY
    seeding_scheme: str = "simple_1"  # simple_1 / lefthash, selfhash (the reference's), hf-selfhash
    context_width: int | None = None  # hf-selfhash only: tokens (the candidate included) seeding a list
    green_list: str | None = None  # "file.py:function" / "module:function": f(prev id, |V|) -> green ids

    def __post_init__(self):
        if self.vocab_size < 2:
            raise LmlabError(f"vocabulary size must be at least 2, got {self.vocab_size}")
        if not 0 < self.gamma < 1 or int(self.vocab_size * self.gamma) < 1:
            raise LmlabError(f"gamma must be in (0, 1) and leave a non-empty green list, got {self.gamma}")
        if self.delta < 0 or not math.isfinite(self.delta):
            raise LmlabError(f"delta must be a finite number >= 0, got {self.delta}")
        if self.green_list is not None and self.seeding_scheme != "simple_1":
            raise LmlabError("a green-list function replaces the seeding scheme: give one or the other")
        self.seeding  # validates the scheme name and width

    @property
    def green_size(self) -> int:
        return int(self.vocab_size * self.gamma)

    @property
    def seeding(self) -> Seeding:
        return seeding(self.seeding_scheme, self.context_width)


def green_ids(previous: int, config: RedListConfig) -> torch.Tensor:
    """The green list after token ``previous``: the reference's ``_get_greenlist_ids`` (simple_1).
    Always drawn on the CPU (whatever torch's default device), so every device gets the same list."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed((config.key * int(previous)) % (2**64 - 1))
    return torch.randperm(config.vocab_size, generator=rng, device="cpu")[:config.green_size]


class GreenLists:
    """Green lists of any scheme, computed once each (an LRU of ``capacity`` entries per device).

    A ``randperm`` of 49k ids costs ~0.4 ms; text repeats previous tokens often (spaces, "the",
    punctuation), so caching removes most of them from generation and detection alike. Every list
    is drawn on the CPU generator (the same lists on every device, as the reference's); a device's
    cache holds its own copies, so generating on a GPU copies a mask there once, not every step.

    Lists seeded by the previous token (simple_1, a user's function) are masks: ``mask(previous)``.
    Self-salted lists depend on the candidate too, so only ``is_green(previous, token)`` exists
    for them, cached as one bool per (window, token).
    """

    def __init__(self, config: RedListConfig, capacity: int = 4096):
        self.config, self.capacity = config, capacity
        self.scheme = config.seeding
        self.context, self.self_salt = self.scheme.context, self.scheme.self_salt
        self._function = load_green_list(config.green_list) if config.green_list else None
        self._caches: dict[torch.device, OrderedDict[int, torch.Tensor]] = {}
        self._salted: OrderedDict[tuple[int, ...], bool] = OrderedDict()
        self._gammas: dict[int, float] = {}  # a user's lists: green share by previous token
        if self._function is not None:
            self.ids((0,))  # fail now, in one line, if the function is broken

    def ids(self, window: tuple[int, ...]) -> torch.Tensor:
        """The green ids a window seeds (previous tokens, then the candidate when self-salted), on the CPU."""
        if self._function is not None:
            ids = checked_green_ids(self._function, self.config.green_list, int(window[-1]), self.config.vocab_size)
            self._gammas[int(window[-1])] = len(ids) / self.config.vocab_size
            return ids
        if not self.self_salt:
            return green_ids(window[-1], self.config)
        return seeded_green_ids(window, self.scheme, self.config.key, self.config.vocab_size, self.config.green_size)

    def gamma(self, previous: int | None = None) -> float:
        """The green share of the list after ``previous`` (a user's lists may differ in size)."""
        if self._function is None:
            return self.config.gamma  # as the reference's and transformers' z scores use it
        if previous not in self._gammas:
            self.mask(previous)
        return self._gammas[previous]

    def mask(self, previous: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(|V|,) bool on ``device``, True for green: the list after token ``previous``."""
        if self.self_salt:
            raise LmlabError(f"{self.scheme.name} lists depend on the candidate token: use is_green")
        device = torch.device(device)
        cache = self._caches.setdefault(device, OrderedDict())
        found = cache.get(previous)
        if found is not None:
            cache.move_to_end(previous)
            return found
        mask = torch.zeros(self.config.vocab_size, dtype=torch.bool, device="cpu")
        mask[self.ids((int(previous),))] = True
        cache[previous] = mask = mask.to(device)
        if len(cache) > self.capacity:
            cache.popitem(last=False)
        return mask

    def is_green(self, previous: int | tuple[int, ...], token: int) -> bool:
        """Is ``token`` green after ``previous`` (a token, or the preceding tokens: the last
        ``context`` are used)?"""
        if not 0 <= token < self.config.vocab_size:
            return False
        if isinstance(previous, int):
            previous = (previous,)
        if not self.self_salt:
            return bool(self.mask(previous[-1])[token])
        window = (*previous[len(previous) - self.context:], token) if self.context else (token,)
        found = self._salted.get(window)
        if found is None:
            found = self._salted[window] = bool((self.ids(window) == token).any())
            if len(self._salted) > 64 * self.capacity:
                self._salted.popitem(last=False)
        return found

    def batch_mask(self, previous: torch.Tensor, width: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(B, width) bool green masks for a batch of previous tokens, on ``device`` (default:
        ``previous``'s); columns >= |V| are red."""
        device = previous.device if device is None else torch.device(device)
        masks = torch.stack([self.mask(token, device) for token in previous.tolist()])  # (B, |V|)
        if width > self.config.vocab_size:
            return torch.cat([masks, masks.new_zeros(len(masks), width - self.config.vocab_size)], dim=1)
        return masks[:, :width]

    def self_salted_mask(self, input_ids: torch.Tensor, scores: torch.Tensor, hard: bool) -> torch.Tensor:
        """(B, W) bool on the CPU: the candidates among each row's ``scheme.candidates`` likeliest
        that lie in their own list (the reference's ``_score_rejection_sampling``; transformers'
        sorts the same way). ``hard``: if none of those is green (and finite), the search goes on
        down the ranking until one is, so a hard step always has a token to sample. A prefix
        shorter than the context leaves the row unmarked: all True (transformers skips it too)."""
        green = torch.zeros(scores.shape, dtype=torch.bool, device="cpu")
        if input_ids.shape[1] < self.context:
            return ~green
        for row, ids in enumerate(input_ids.tolist()):
            previous = tuple(ids[len(ids) - self.context:]) if self.context else ()
            row_scores = scores[row].cpu()  # (W,): one copy, not one device sync per candidate
            _, order = row_scores.sort(dim=-1, descending=True)
            found = False
            for rank, token in enumerate(order.tolist()):
                if rank >= self.scheme.candidates and (found or not hard):
                    break
                if self.is_green(previous, token):
                    green[row, token] = True
                    found = found or bool(torch.isfinite(row_scores[token]))
        return green


class RedListLogitsProcessor:
    """transformers ``LogitsProcessor``: ``hard`` bans red tokens, else red logits lose δ. The
    masks follow ``scores.device`` (the model's)."""

    def __init__(self, config: RedListConfig, hard: bool, lists: GreenLists | None = None):
        self.config, self.hard = config, hard
        self.lists = lists or GreenLists(config)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.lists.self_salt:
            green = self.lists.self_salted_mask(input_ids, scores, self.hard).to(scores.device)  # (B, W)
        else:
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


def scored_tokens(ids: list[int], context: int) -> list[tuple[tuple[int, ...], int]]:
    """(preceding ``context`` tokens, token) for every token that has that many before it: the
    n-grams the reference and transformers' detectors score (n = context + 1)."""
    return [(tuple(ids[i - context:i]), ids[i]) for i in range(context, len(ids))]


def detect_ids(ids: list[int], lists: GreenLists, ignore_repeated: bool = False) -> Detection:
    """Score every token after the first ``lists.context`` against its green list.

    ``ignore_repeated`` scores each distinct n-gram once, as the reference detector's
    ``ignore_repeated_ngrams`` does, so repeated phrases cannot inflate z. With a user's lists of
    varying size, z uses each list's own γ: (G − Σγ_i) / √Σγ_i(1 − γ_i) (Eq. 2 when all are equal).
    """
    items = scored_tokens(ids, lists.context)
    if not items:
        raise LmlabError(f"{len(ids)} token(s): nothing to score (need more than {lists.context})")
    if ignore_repeated:
        items = list(Counter(items))
    green = sum(lists.is_green(prev, cur) for prev, cur in items)
    if lists.config.green_list is None:
        z = z_score(green, len(items), lists.gamma())
    else:
        gammas = [lists.gamma(prev[-1]) for prev, _ in items]
        z = (green - sum(gammas)) / math.sqrt(sum(g * (1 - g) for g in gammas))
    return Detection(len(items), green, z, p_value(z))


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a text as the reference detector sees them: no special tokens, no leading BOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    return ids
