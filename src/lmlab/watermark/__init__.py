"""Watermarks for generated text: the no-'e' lipogram and Kirchenbauer et al.'s hard and soft red
lists (any seeding scheme, or a user's own green lists: ``seeding``), as transformers
``LogitsProcessor``s; their detector; and a classifier telling the four kinds of text apart
(``classify``; with known counts per kind, by an optimal assignment: ``assign``)."""

from __future__ import annotations

from lmlab.errors import LmlabError
from lmlab.watermark.assign import assign_counts, hungarian
from lmlab.watermark.classify import (
    NAMES,
    ClassifyConfig,
    Decision,
    Features,
    class_costs,
    classify_counts,
    classify_text,
    classify_texts,
    text_features,
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
    scored_tokens,
    text_ids,
    z_score,
)
from lmlab.watermark.seeding import SCHEMES as SEEDING_SCHEMES
from lmlab.watermark.seeding import Seeding, load_green_list, seeding

SCHEMES = ("none", "no-e", "hard", "soft")

__all__ = ["DEFAULT_KEY", "NAMES", "SCHEMES", "SEEDING_SCHEMES", "ClassifyConfig", "Decision", "Detection",
           "Features", "GreenLists", "NoELogitsProcessor", "RedListConfig", "RedListLogitsProcessor", "Seeding",
           "assign_counts", "banned_mask", "class_costs", "classify_counts", "classify_text", "classify_texts",
           "detect_ids", "detect_text", "green_ids", "hungarian", "load_green_list", "make_processor", "p_value",
           "scored_tokens", "seeding", "text_features", "text_ids", "z_score"]


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
