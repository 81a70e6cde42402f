"""The no-'e' scheme: a lipogram watermark that never emits a token whose text contains e or E.

Visible to anyone who counts letters (English prose has ~12 % e's), so it marks text without
any key. The banned set depends on the tokenizer only and is computed once per tokenizer (on the
CPU); the processor keeps one copy per logits width and device, so no step copies it again.
"""

from __future__ import annotations

import torch

BANNED_LETTERS = "eE"


def banned_mask(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """(|V|,) bool, True for tokens whose decoded text contains a banned letter.

    Special tokens (end of text, chat markers) stay allowed: they never reach the decoded text,
    and banning the end-of-text token would force every generation to its maximum length.
    """
    vocab_size = vocab_size or len(tokenizer)
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    mask = torch.zeros(vocab_size, dtype=torch.bool, device="cpu")
    for token_id, piece in enumerate(pieces):
        if token_id in special or piece is None:
            continue
        text = tokenizer.convert_tokens_to_string([piece])
        mask[token_id] = any(letter in text for letter in BANNED_LETTERS)
    return mask


class NoELogitsProcessor:
    """transformers ``LogitsProcessor``: banned tokens get −inf; logits wider than the tokenizer
    (padding rows, never real tokens) are banned too. Works on any device: the mask follows
    ``scores.device``."""

    def __init__(self, tokenizer):
        self.banned = banned_mask(tokenizer)  # (|V|,) on the CPU
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}  # (width, device) -> (width,) bool

    def mask(self, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(width,) bool on ``device``, True where banned; made once per (width, device)."""
        device = torch.device(device)
        found = self._masks.get((width, device))
        if found is None:
            size = len(self.banned)
            banned = torch.ones(width, dtype=torch.bool, device="cpu")
            banned[:min(width, size)] = self.banned[:width]
            found = self._masks[(width, device)] = banned.to(device)
        return found

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores.masked_fill(self.mask(scores.shape[-1], scores.device), float("-inf"))
