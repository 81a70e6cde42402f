"""Recover short texts from their embeddings (the safety-filter inversion, Rando et al. 2022).

Stable Diffusion's safety filter publishes only the embeddings of its secret concept phrases;
with the encoder in hand, the phrases can be searched for. No trained inverter (vec2text, Morris
et al. 2023) is needed for short phrases: a discrete search over words, guided by cheap proxies
and re-ranked by the true cosine, does it.

1. Vocabulary: the encoder tokenizer's whole-word tokens (alphabetic, lower case), each encoded
   alone once and cached on disk per encoder.
2. Seeds: the words closest to the target.
3. Beam search over phrases: each beam phrase proposes insertions of a pool word at every
   position, substitutions and deletions of every word (the pool: the target's nearest words
   plus function words such as "a", "of", "the"), and word pieces proposed by the encoder's
   gradient (HotFlip) for words the vocabulary lacks: WordPiece "##" endings, or for CLIP's BPE
   the word starts that precede a "</w>" word end. A cheap proxy ranks the proposals; only
   the best are encoded for real, and the beams keep the best true cosines. Phrases grow to
   ``max_words`` and keep being refined until no step improves or the time budget is spent.
"""

from lmlab.invert.encoders import (
    TextEncoder,
    check_dimension,
    load_encoder,
    load_targets,
    pool,
)
from lmlab.invert.search import (
    FUNCTION_WORDS,
    Guess,
    InvertConfig,
    candidate_words,
    flip_sets,
    hotflip,
    invert,
    invert_one,
    is_piece,
    phrase_text,
    proxy_scores,
    rank_texts,
    vocabulary,
)

__all__ = ["FUNCTION_WORDS", "Guess", "InvertConfig", "TextEncoder", "candidate_words", "check_dimension", "flip_sets",
           "hotflip", "invert", "invert_one", "is_piece", "load_encoder", "load_targets", "phrase_text", "pool",
           "proxy_scores", "rank_texts", "vocabulary"]
