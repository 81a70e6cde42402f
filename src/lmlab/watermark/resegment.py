"""The greenest tokenisation of a text: undoing re-tokenisation before telling hard from soft.

A detector sees text, not the sampled ids. Decoding and re-encoding splits some spans
differently from how they were generated ("Ġvivo" "dream" comes back as "Ġviv" "od" "ream"),
and each changed pair is green only by chance (γ), so hard-watermarked text can look 85 % green.
Among all ways to cut the text into vocabulary tokens, the one actually sampled was all green;
a dynamic programme over cut points finds the segmentation with the fewest red pairs. For hard
text that is ~100 % green; soft text gains only where luck allows (each alternative cut must be
green on both sides, ~γ² per try), so the two separate far better than on the canonical ids.

Works for byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3), whose tokens are exact substrings
of the text's byte-to-unicode form; for other tokenizers ``greenest_ids`` returns None.
"""

from __future__ import annotations

from functools import lru_cache

from lmlab.watermark.redlist import GreenLists

MAX_PIECE = 32  # longest token considered, in byte-unicode characters
SLACK = 2  # keep states within this many red pairs of the best at each cut point


@lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return tuple(table[b] for b in range(256))


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.pre_tokenizer).__name__ == "ByteLevel"


def greenest_ids(text: str, tokenizer, lists: GreenLists, max_chars: int = 4000) -> list[int] | None:
    """A segmentation of ``text`` into vocabulary ids with the fewest red (previous, current) pairs.

    Returns None for tokenizers that are not byte-level, texts over ``max_chars`` characters and
    lists seeded by more than one previous token.
    States ``(cut, last token)`` more than ``SLACK`` reds behind the best state at
    the same cut are pruned, which keeps the search linear in practice.
    """
    if not _is_byte_level(tokenizer) or len(text) > max_chars or lists.context > 1:
        return None  # (lists seeded by several previous tokens would need them all in the state)
    if lists.self_salt:  # hf-selfhash with width 1 or 2: the candidate (and the previous token)
        def green(prev: int, token: int) -> bool:
            return lists.is_green(prev, token)
    else:
        def green(prev: int, token: int) -> bool:
            return bool(lists.mask(prev)[token])
    chars = _byte_chars()
    s = "".join(chars[b] for b in text.encode("utf-8"))
    vocab = tokenizer.get_vocab()
    size = lists.config.vocab_size
    # states[i]: last token id -> (reds so far, back-pointer (cut, token)) for segmentations of s[:i]
    states: list[dict[int, tuple[int, tuple[int, int] | None]]] = [{} for _ in range(len(s) + 1)]
    for j in range(1, min(len(s), MAX_PIECE) + 1):
        token = vocab.get(s[:j])
        if token is not None and token < size:
            states[j][token] = (0, None)
    for i in range(1, len(s)):
        if not states[i]:
            continue
        best = min(cost for cost, _ in states[i].values())
        live = [(tok, cost) for tok, (cost, _) in states[i].items() if cost <= best + SLACK]
        for j in range(i + 1, min(len(s), i + MAX_PIECE) + 1):
            token = vocab.get(s[i:j])
            if token is None or token >= size:
                continue
            for prev, cost in live:
                new = cost + (0 if green(prev, token) else 1)
                if token not in states[j] or new < states[j][token][0]:
                    states[j][token] = (new, (i, prev))
    if not states[len(s)]:
        return None
    token, (cost, back) = min(states[len(s)].items(), key=lambda kv: kv[1][0])
    ids, cut = [token], len(s)
    while back is not None:
        cut, token = back
        ids.append(token)
        back = states[cut][token][1]
    return ids[::-1]
