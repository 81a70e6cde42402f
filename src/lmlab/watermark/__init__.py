"""Watermarks for generated text: the no-'e' lipogram and Kirchenbauer et al.'s hard and soft red
lists, as transformers ``LogitsProcessor``s; their detector; and a classifier telling the four
kinds of text apart (``classify``)."""

from __future__ import annotations

from lmlab.errors import LmlabError
from lmlab.watermark.classify import (
    NAMES,
    ClassifyConfig,
    Decision,
    classify_text,
    classify_texts,
)
from lmlab.watermark.noe import NoELogitsProcessor, banned_mask
from lmlab.watermark.redlist import (
    DEFAULT_KEY,
    Detection,
    GreenLists,
    RedListConfig,
    RedListLogitsProcessor,
    detect_ids,
    green_ids,
    p_value,
    text_ids,
    z_score,
)

SCHEMES = ("none", "no-e", "hard", "soft")

__all__ = ["DEFAULT_KEY", "NAMES", "SCHEMES", "ClassifyConfig", "Decision", "Detection", "GreenLists",
           "NoELogitsProcessor", "RedListConfig", "RedListLogitsProcessor", "banned_mask", "classify_text",
           "classify_texts", "detect_ids", "detect_text", "green_ids", "make_processor", "p_value", "text_ids",
           "z_score"]


def make_processor(scheme: str, tokenizer, redlist: RedListConfig | None = None):
    """The ``LogitsProcessor`` of a scheme (None for "none"); red lists default to |V| = len(tokenizer)."""
    if scheme not in SCHEMES:
        raise LmlabError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "none":
        return None
    if scheme == "no-e":
        return NoELogitsProcessor(tokenizer)
    return RedListLogitsProcessor(redlist or RedListConfig(vocab_size=len(tokenizer)), hard=scheme == "hard")


def detect_text(text: str, tokenizer, lists: GreenLists, ignore_repeated: bool = False) -> Detection:
    """Red-list statistics of a text, tokenised as the reference detector does."""
    return detect_ids(text_ids(tokenizer, text), lists, ignore_repeated)
