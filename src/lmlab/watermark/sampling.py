"""Watermarked texts for a list of schemes at once, and which of them the model ended early.

``generate_schemes`` samples every prompt under each scheme in turn (no-e, hard, soft: the
60-string submission form is, for each scheme, all prompts' texts) with one model load. A text
is ``max_new_tokens`` tokens long unless the model drew an end-of-text token: each record carries
its count of new tokens (``lmlab.generate.sample_tokens`` returns the ids), and ``ended_early``
lists the texts the model ended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lmlab.watermark.redlist import RedListConfig


@dataclass(frozen=True)
class Generated:
    records: list[dict]  # prompt, sample, scheme, text, tokens, ended_by_eos: scheme by scheme, prompt by prompt
    seconds: float

    @property
    def ended_early(self) -> dict[str, int]:
        """Texts per scheme that the model ended before ``max_new_tokens`` (every scheme listed)."""
        counts = {r["scheme"]: 0 for r in self.records}
        for r in self.records:
            counts[r["scheme"]] += r["ended_by_eos"]
        return counts

    def early(self) -> list[dict]:
        """Position in the output, scheme, prompt index, sample and token count of each text the model ended."""
        return [{"index": i, "scheme": r["scheme"], "prompt_index": r["prompt_index"], "sample": r["sample"],
                 "tokens": r["tokens"]} for i, r in enumerate(self.records) if r["ended_by_eos"]]


def generate_schemes(model, tokenizer, prompts: list[str], schemes: list[str], sampling,
                     redlist: RedListConfig, progress: bool = True) -> Generated:
    """``sampling.samples`` texts per prompt under each scheme, in scheme order (see module docstring)."""
    from lmlab.generate import sample_tokens
    from lmlab.watermark import make_processor

    records = []
    t0 = time.perf_counter()
    for scheme in schemes:
        processor = make_processor(scheme, tokenizer, redlist)
        outputs = sample_tokens(model, tokenizer, prompts, sampling, progress=progress,
                                logits_processors=[processor] if processor else [])
        records += [{"prompt": p, "prompt_index": j, "sample": k, "scheme": scheme, "text": c.text,
                     "tokens": len(c.ids), "ended_by_eos": c.ended_by_eos}
                    for j, (p, row) in enumerate(zip(prompts, outputs)) for k, c in enumerate(row)]
    return Generated(records, time.perf_counter() - t0)
