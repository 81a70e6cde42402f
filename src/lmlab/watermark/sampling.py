"""Watermarked texts for a list of schemes at once, and which of them the model ended early.

``generate_schemes`` samples every prompt under each scheme in turn (no-e, hard, soft: the
60-string submission form is, for each scheme, all prompts' texts) with one model load. A text
is ``max_new_tokens`` long unless the model drew an end-of-text token; ``EosWatch`` counts those.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lmlab.watermark.redlist import RedListConfig


class EosWatch:
    """A pass-through ``LogitsProcessor`` that counts the rows whose new tokens include an
    end-of-text id, over every ``generate`` call it sees (a call starts when the ids get shorter).

    It sees each step's ids before the step's token is drawn, so the last token of a call is
    unseen: a call that stopped before ``max_new_tokens`` steps stopped because every row had
    ended, and all its rows count; a row whose end-of-text token is the very last of a full-length
    call is missed (its text is then ``max_new_tokens`` − 1 tokens long).
    """

    def __init__(self, eos_ids: set[int], max_new_tokens: int):
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
        self.max_new_tokens, self.ended = max_new_tokens, 0
        self._done: torch.Tensor | None = None  # (rows,) bool of the current call
        self._width = self._steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._done is None or input_ids.shape[1] <= self._width or len(input_ids) != len(self._done):
            self.finish()
            self._done, self._steps = torch.zeros(len(input_ids), dtype=torch.bool), 0
        else:
            self._done |= torch.isin(input_ids[:, -1].cpu(), self.eos)
        self._width, self._steps = input_ids.shape[1], self._steps + 1
        return scores

    def finish(self) -> int:
        """Close the current call; the total count so far."""
        if self._done is not None:
            self.ended += len(self._done) if self._steps < self.max_new_tokens else int(self._done.sum())
            self._done = None
        return self.ended


def eos_ids(model, tokenizer) -> set[int]:
    """Every end-of-text id the model's generation config or the tokenizer names."""
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(found if isinstance(found, (list, tuple)) else [] if found is None else [found])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@dataclass(frozen=True)
class Generated:
    records: list[dict]  # prompt, sample, scheme, text: scheme by scheme, prompt by prompt
    ended_early: dict[str, int]  # texts per scheme the model ended before max_new_tokens
    seconds: float


def generate_schemes(model, tokenizer, prompts: list[str], schemes: list[str], sampling,
                     redlist: RedListConfig, progress: bool = True) -> Generated:
    """``sampling.samples`` texts per prompt under each scheme, in scheme order (see module docstring)."""
    from lmlab.generate import sample
    from lmlab.watermark import make_processor

    records, ended = [], {}
    t0 = time.perf_counter()
    for scheme in schemes:
        processor = make_processor(scheme, tokenizer, redlist)
        watch = EosWatch(eos_ids(model, tokenizer), sampling.max_new_tokens)
        outputs = sample(model, tokenizer, prompts, sampling, progress=progress,
                         logits_processors=[watch] + ([processor] if processor else []))
        ended[scheme] = watch.finish()
        records += [{"prompt": p, "sample": k, "scheme": scheme, "text": text}
                    for p, texts in zip(prompts, outputs) for k, text in enumerate(texts)]
    return Generated(records, ended, time.perf_counter() - t0)
