"""Byte-level byte-pair encoding (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019).

Training: split the corpus into pre-tokens with GPT-2's regex (so merges never cross a word
boundary), count each distinct pre-token once, start from its UTF-8 bytes, and repeatedly merge
the most frequent adjacent pair into a new token. Pair counts are kept up to date incrementally
(a pair -> count table, a pair -> words index and a max-heap with stale entries skipped), so a
merge costs the words it touches, not a recount of the corpus. Ties go to the pair of smaller
token ids, numbered as the Hugging Face trainer numbers them, so both learn the same merges.

Encoding applies the merges to each pre-token in the order they were learned (lowest rank first),
as GPT-2 does, with a per-pre-token cache. Decoding joins the tokens' bytes.

Files: ``merges.json`` (a list of [left, right] token strings in GPT-2's byte-to-unicode alphabet,
like Hugging Face's merges.txt), ``vocab.json`` (token string -> id: bytes 0-255 first, then one id
per merge) and ``tokenizer.json``, which the Hugging Face ``tokenizers`` library loads as is.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from lmlab.errors import LmlabError

# GPT-2's pre-tokenizer pattern (also the one of Hugging Face's ByteLevel pre-tokenizer).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def _pattern():
    import regex

    return regex.compile(GPT2_PATTERN)


@lru_cache(maxsize=1)
def byte_chars() -> tuple[str, ...]:
    """GPT-2's printable stand-in character for each byte (``bytes_to_unicode``)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return tuple(table[b] for b in range(256))


def to_text(token: bytes) -> str:
    """A token's bytes in GPT-2's byte-to-unicode alphabet (e.g. b' the' -> 'Ġthe')."""
    chars = byte_chars()
    return "".join(chars[b] for b in token)


def pretokenize(text: str) -> list[str]:
    return _pattern().findall(text)


@dataclass
class Tokenizer:
    """A trained byte-level BPE: ``merges[i]`` made token id 256 + i."""

    merges: list[tuple[bytes, bytes]]
    counts: list[int] = field(default_factory=list)  # each merge's pair count when it was made (training only)
    _ranks: dict = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._ranks = {pair: i for i, pair in enumerate(self.merges)}
        self.tokens = [bytes([b]) for b in range(256)] + [a + b for a, b in self.merges]
        self._ids = {t: i for i, t in enumerate(self.tokens)}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def _encode_word(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [bytes([b]) for b in word.encode("utf-8")]
        while len(parts) > 1:
            ranked = [(self._ranks.get((a, b), len(self._ranks)), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
            rank, _ = min(ranked)
            if rank == len(self._ranks):
                break
            pair, merged, i = self.merges[rank], [], 0
            while i < len(parts):  # merge every occurrence of the pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self._ids[p] for p in parts]
        if len(self._cache) < 200_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        return [i for word in pretokenize(text) for i in self._encode_word(word)]

    def decode(self, ids: list[int]) -> str:
        try:
            data = b"".join(self.tokens[i] for i in ids)
        except (IndexError, TypeError):
            raise LmlabError(f"token ids must be integers in 0..{self.vocab_size - 1}") from None
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        """merges.json, vocab.json and a Hugging Face tokenizer.json, written as one folder atomically."""
        from lmlab.io import atomic_dir, write_json, write_text

        vocab = {to_text(t): i for i, t in enumerate(self.tokens)}
        merges = [[to_text(a), to_text(b)] for a, b in self.merges]
        with atomic_dir(directory) as tmp:
            write_json(tmp / "merges.json", merges)
            write_json(tmp / "vocab.json", vocab)
            write_text(tmp / "tokenizer.json", _hf_tokenizer_json(vocab, merges))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        from lmlab.io import read_json

        merges = read_json(Path(directory) / "merges.json")
        unchars = {c: b for b, c in enumerate(byte_chars())}
        try:
            return cls([(bytes(unchars[c] for c in a), bytes(unchars[c] for c in b)) for a, b in merges])
        except (KeyError, TypeError, ValueError):
            raise LmlabError(f"{directory}/merges.json is not a list of [left, right] byte-level tokens") from None


def _hf_tokenizer_json(vocab: dict, merges: list) -> str:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf.to_str(pretty=True)


def train(text: str, vocab_size: int, progress: bool = False) -> Tokenizer:
    """Learn ``vocab_size - 256`` merges from ``text`` (fewer if the corpus runs out of pairs)."""
    from lmlab.progress import bar as progress_bar

    if vocab_size < 256:
        raise LmlabError(f"vocab size must be at least 256 (the byte alphabet), got {vocab_size}")
    if not text:
        raise LmlabError("the corpus is empty")
    counts = Counter(pretokenize(text))
    words = [[bytes([b]) for b in w.encode("utf-8")] for w in counts]
    freqs = list(counts.values())
    pair_counts: dict[tuple[bytes, bytes], int] = defaultdict(int)
    where: dict[tuple[bytes, bytes], set[int]] = defaultdict(set)
    for wi, word in enumerate(words):
        for pair in itertools.pairwise(word):
            pair_counts[pair] += freqs[wi]
            where[pair].add(wi)
    # Ties go to the pair of smaller token ids, as in the Hugging Face trainer: the 256 bytes are
    # numbered in code-point order of their byte-level characters, then each merge takes the next id.
    order = {bytes([b]): i for i, b in enumerate(sorted(range(256), key=lambda b: byte_chars()[b]))}

    def entry(pair: tuple[bytes, bytes]) -> tuple:
        return -pair_counts[pair], order[pair[0]], order[pair[1]], pair

    heap = [entry(pair) for pair in pair_counts]
    heapq.heapify(heap)
    merges: list[tuple[bytes, bytes]] = []
    made: list[int] = []
    with progress_bar(total=vocab_size - 256, enabled=progress, desc="merges") as bar:
        while len(merges) < vocab_size - 256 and heap:
            neg, _, _, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -neg or -neg <= 0:
                continue  # stale entry: the count changed since it was pushed
            order[pair[0] + pair[1]] = 256 + len(merges)
            merges.append(pair)
            made.append(-neg)
            bar.update(1)
            touched: set[tuple[bytes, bytes]] = set()
            for wi in where.pop(pair):
                word, f = words[wi], freqs[wi]
                for old in itertools.pairwise(word):
                    pair_counts[old] -= f
                    touched.add(old)
                merged, i = [], 0
                while i < len(word):
                    if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                words[wi] = merged
                for new in itertools.pairwise(merged):
                    pair_counts[new] += f
                    where[new].add(wi)
                    touched.add(new)
            del pair_counts[pair]
            for p in touched:
                if p != pair and pair_counts.get(p, 0) > 0:
                    heapq.heappush(heap, entry(p))
    return Tokenizer(merges, made)


def read_corpus(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"corpus {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LmlabError(f"corpus {path} is not UTF-8 (byte {exc.start})") from None
    if not text:
        raise LmlabError(f"corpus {path} is empty")
    return text
