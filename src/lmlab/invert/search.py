"""The search: a cached candidate vocabulary, beam search over phrases, HotFlip proposals.

Phrases are tuples of whole words and word pieces, in one notation for both kinds of tokenizer:
WordPiece's endings keep their "##" in front and glue to the word before (nu ##dity = nudity);
CLIP's BPE pieces that begin a word (tokens without "</w>") get "##" behind and glue to the word
after (nu## dity = nudity). So "##" marks the side a piece joins, a guess never begins or ends
inside a word, and its text is the words joined by spaces.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from lmlab.errors import LmlabError
from lmlab.invert.encoders import TextEncoder, pool

FUNCTION_WORDS = ("a", "an", "the", "of", "in", "on", "at", "with", "and", "or", "for", "to", "from", "by", "is",
                  "are", "his", "her", "their", "my", "its", "this", "that", "some", "two", "three", "one", "no",
                  "not", "under", "over", "near", "inside", "next")


@dataclass(frozen=True, kw_only=True)
class InvertConfig:
    """The search. Deterministic for a given ``seed`` when the time budget is not what stops it:
    ``max_steps`` bounds the work by a count of beam-search steps instead, which no machine's
    speed changes (tests and reproducible runs give it with a time budget that is never reached)."""

    max_words: int = 8
    beam: int = 8
    pool: int = 48  # words per slot that the proxy ranks best, over the whole vocabulary
    proposals: int = 192  # proxy-ranked proposals encoded for real per step (doubling while stuck)
    flips: int = 8  # HotFlip candidates per slot (8x as many for a word start before a "##" ending)
    flip_beams: int = 3  # the best beam phrases that get HotFlip proposals and word moves
    time_budget: float = 60.0  # seconds per target
    max_steps: int | None = None  # beam-search steps per target (None: no limit but patience and time)
    patience: int = 4  # steps without improvement before stopping (each one doubles the proposals)
    seed: int = 0  # breaks ties among equal proxy scores
    runners_up: int = 4
    vocab_words: int | None = None  # search with the N most frequent whole words only (None: all; BPE ids)

    def __post_init__(self):
        if min(self.max_words, self.beam, self.pool, self.proposals, self.flips, self.flip_beams) < 1:
            raise LmlabError("max_words, beam, pool, proposals, flips and flip_beams must be positive")
        if self.time_budget <= 0:
            raise LmlabError(f"time budget must be positive, got {self.time_budget}")
        if self.vocab_words is not None and self.vocab_words < 1:
            raise LmlabError(f"vocab words must be positive (or None), got {self.vocab_words}")
        if self.max_steps is not None and self.max_steps < 1:
            raise LmlabError(f"max steps must be positive (or None), got {self.max_steps}")


# --- the vocabulary and its cached embeddings ------------------------------------------------


def candidate_words(tokenizer, limit: int = 50000) -> list[str]:
    """Whole lower-case alphabetic words among the tokenizer's tokens (BERT "##", GPT-2 "Ġ",
    SentencePiece "▁" and CLIP "</w>" styles), the ``limit`` first by token id (BPE: most frequent)."""
    vocab = tokenizer.get_vocab()
    clip_style = any(t.endswith("</w>") for t in vocab)  # there, a token without "</w>" begins a longer word
    words: dict[str, None] = {}
    for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
        if token.startswith(("##", "[", "<")) or (clip_style and not token.endswith("</w>")):
            continue
        word = token.removeprefix("Ġ").removeprefix("▁").removesuffix("</w>")
        if word.isalpha() and word.isascii() and word.islower() and (len(word) > 1 or word in ("a", "i")):
            words[word] = None
    return sorted(list(words)[:limit])


def vocabulary(encoder: TextEncoder, progress: bool = True, limit: int | None = None
               ) -> tuple[list[str], torch.Tensor]:
    """The candidate words (the ``limit`` first by token id when given) and their embeddings (on the
    encoder's device), from the on-disk cache when this encoder's were made before (on any device:
    fp32 results agree to ~1e-6)."""
    from lmlab.io import load_tensors, save_tensors
    from lmlab.models import cache_dir

    words = candidate_words(encoder.tokenizer, **({"limit": limit} if limit else {}))
    if not words:
        raise LmlabError(f"encoder {encoder.source}: its tokenizer has no whole-word tokens to search with")
    key = hashlib.sha256(("\n".join(words) + encoder.kind + encoder.pooling).encode() + encoder.weight_probe)
    path = cache_dir() / "invert" / f"{key.hexdigest()[:20]}.safetensors"
    if path.exists():
        return words, load_tensors(path)["embeddings"].to(encoder.device)
    from lmlab.progress import bar

    chunks = []
    for start in bar(range(0, len(words), 1024), enabled=progress, desc="encoding vocabulary", unit="k words"):
        chunks.append(encoder.encode(words[start:start + 1024]))
    embeddings = torch.cat(chunks)
    save_tensors(path, {"embeddings": embeddings.cpu()})
    return words, embeddings


# --- the search ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Guess:
    text: str
    cosine: float
    runners_up: list[tuple[str, float]]
    seconds: float
    steps: int = 0  # beam-search steps taken (after the seeds)


def phrase_text(phrase: tuple[str, ...]) -> str:
    """Words joined by spaces, "##" word endings glued to the word before (nu ##dity -> nudity) and
    CLIP's word starts to the word after (nu## dity -> nudity)."""
    return " ".join(phrase).replace(" ##", "").replace("## ", "")


def is_piece(token: str) -> bool:
    """A word piece (a WordPiece "##ending" or a CLIP "start##"), not a word."""
    return token.startswith("##") or token.endswith("##")


def _orphaned(phrase: tuple[str, ...]) -> bool:
    """A piece left with no word to join: an ending first, or a CLIP word start last."""
    return bool(phrase) and (phrase[0].startswith("##") or phrase[-1].endswith("##"))


def clip_style(vocab) -> bool:
    """CLIP's BPE: a token ending in "</w>" ends a word, any other begins or continues one."""
    return any(t.endswith("</w>") for t in vocab)


def _lower_word(text: str) -> bool:
    return text.isalpha() and text.isascii() and text.islower()


def token_id(tokenizer, token: str, vocab: dict[str, int] | None = None) -> int | None:
    """The id of a phrase token: CLIP's "x" is "x</w>" and its "x##" is "x"; WordPiece's as written
    ([UNK] if absent; None for CLIP, whose unknown token is its end token)."""
    vocab = vocab if vocab is not None else tokenizer.get_vocab()
    if f"{token}</w>" in vocab:
        return vocab[f"{token}</w>"]
    if token.endswith("##") and token[:-2] in vocab:
        return vocab[token[:-2]]
    return vocab.get(token, None if tokenizer.unk_token_id == tokenizer.eos_token_id else tokenizer.unk_token_id)


def proxy_scores(target: torch.Tensor, vectors: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """cos(target, b + v_w) for every base b (K, d) and vocabulary vector v_w (V, d), as (K, V).

    The bag-of-words proxy of a phrase edit: a phrase embedding is roughly the normalised sum of its
    words' embeddings, so inserting w into a phrase of n words with embedding e is scored with
    b = n * e, and replacing its word u with b = n * e - v_u. Written out so no (K, V, d) tensor
    exists: |b + v|^2 = |b|^2 + 2 b.v + 1 for unit v.
    """
    dots = bases @ vectors.T  # (K, V)
    norms = (bases.pow(2).sum(1, keepdim=True) + 2 * dots + 1).clamp(min=1e-12).sqrt()
    return ((bases @ target)[:, None] + (vectors @ target)[None, :]) / norms


def flip_sets(tokenizer, device: torch.device | str = "cpu") -> dict[str, tuple[list[str], torch.Tensor]] | None:
    """HotFlip's candidate tokens in phrase notation: "words" (WordPiece word starts; CLIP's word
    ends, "x</w>"), "pieces" (WordPiece "##" endings; CLIP's word starts written "x##") and "short"
    (words of one or two letters, tried exhaustively beside a piece, where the gradient ranks them
    poorly). None for tokenizers with neither convention. Their ids are on ``device`` (the
    encoder's), made once per search rather than once per flip."""
    vocab = tokenizer.get_vocab()
    if clip_style(vocab):
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            return None
        words = [t[:-4] for t in vocab if t.endswith("</w>") and _lower_word(t[:-4])]
        pieces = [t + "##" for t in vocab if _lower_word(t)]
    elif None not in (tokenizer.mask_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id):
        pieces = [t for t in vocab if t.startswith("##") and t[2:].isalpha()]
        words = [t for t in vocab if _lower_word(t)]
    else:
        return None
    if not pieces:
        return None
    short = [t for t in words if len(t) <= 2]
    return {name: (tokens, torch.tensor([token_id(tokenizer, t, vocab) for t in tokens], device=device))
            for name, tokens in (("pieces", pieces), ("words", words), ("short", short))}


def _pieces_follow(sets) -> bool:
    """True when pieces join the word before them (WordPiece "##x"), False for CLIP's "x##"."""
    return sets is None or sets["pieces"][0][0].startswith("##")


def hotflip(encoder: TextEncoder, sets, tokens: tuple[str, ...], target: torch.Tensor, slot: int, insert: bool,
            pieces: bool, k: int) -> list[str]:
    """HotFlip (Ebrahimi et al. 2018; GCG, Zou et al. 2023, evaluates its top-k the same way): the
    k tokens whose first-order effect on cos(target, encode(phrase)) is largest when placed at
    ``slot`` (inserted before token ``slot``, or replacing it), from the gradient at that input
    embedding. ``pieces`` picks among the word pieces (words the vocabulary lacks: nu + ##dity =
    nudity, or CLIP's nu## + dity), else among whole words. The slot holds [MASK] where the
    tokenizer has one, else (CLIP) the mean token embedding. Nothing past the encoder's length."""
    if sets is None:
        return []
    tok, model = encoder.tokenizer, encoder.model
    names, candidate_ids = sets["pieces" if pieces else "words"]
    body = [token_id(tok, t, encoder.vocab) for t in tokens]
    first = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    last = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    hole = tok.mask_token_id if tok.mask_token_id is not None else first  # CLIP: overwritten by the mean embedding
    body = body[:slot] + [hole] + body[slot + (0 if insert else 1):]
    ids = [first, *body, last]
    if len(ids) > encoder.max_length or None in ids:
        return []
    table = model.get_input_embeddings().weight
    if encoder.kind == "clip":
        from lmlab.invert.clip import clip_slot_gradient

        grad = clip_slot_gradient(encoder, ids, slot + 1, target, fill=tok.mask_token_id is None)
    else:
        with torch.enable_grad():
            embeds = table[torch.tensor([ids], device=table.device)].detach().requires_grad_(True)  # (1, T, h)
            mask = torch.ones(1, len(ids), dtype=torch.long, device=table.device)
            hidden = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (1, T, d)
            vector = torch.nn.functional.normalize(pool(hidden, mask, encoder.pooling).float(), dim=-1)[0]
            (grad,) = torch.autograd.grad(vector @ target, embeds)  # fp32 cosine, as encode's
        grad = grad[0, slot + 1]  # + 1: [CLS]
    # (e_c - e_hole) . grad, less a constant
    gains = table[candidate_ids.to(table.device)].detach().float() @ grad.float()  # fp32: bf16 gains tie
    return [names[i] for i in torch.topk(gains, min(k, len(names))).indices.tolist()]


def span_moves(phrase: tuple[str, ...], max_span: int = 2) -> list[tuple[str, ...]]:
    """Every phrase made by moving a run of up to ``max_span`` whole words (a word keeps its pieces)
    to another place: word-order repairs ("at night the tower" -> "the tower at night")."""
    groups: list[tuple[str, ...]] = []
    for t in phrase:
        if groups and (t.startswith("##") or groups[-1][-1].endswith("##")):
            groups[-1] += (t,)
        else:
            groups.append((t,))
    out = []
    for i in range(len(groups)):
        for span in range(1, max_span + 1):
            if i + span > len(groups):
                break
            moved, rest = groups[i:i + span], groups[:i] + groups[i + span:]
            out += [sum(rest[:j] + moved + rest[j:], ()) for j in range(len(rest) + 1) if j != i]
    return out


def _n_words(phrase: tuple[str, ...]) -> int:
    return sum(not is_piece(t) for t in phrase)


def invert_one(target: torch.Tensor, encoder: TextEncoder, words: list[str], vectors: torch.Tensor,
               config: InvertConfig, sets=None) -> Guess:
    """Beam search for the phrase whose embedding is closest to ``target`` (a unit vector).

    Phrases are tuples of vocabulary words and "##" endings. Each step, every beam phrase proposes
    (a) the ``pool`` words the bag-of-words proxy ranks best for insertion at each position and for
    substitution of each word, over the whole vocabulary; the best ``proposals`` of these by proxy
    are encoded for real; (b) function words ("a", "of", ...) inserted anywhere, deletions, and for
    the best ``flip_beams`` phrases HotFlip substitutions and "##" endings and moves of one word
    (word order), all encoded for real. Beams keep the best true cosines (PEZ's lesson, Wen et al.
    2023: project onto real tokens and score there). Stops at cosine 1, after ``patience`` steps
    without gain, after ``max_steps`` steps, or at the time budget. ``target`` and ``vectors`` are
    moved to the encoder's device (no copy when already there); the proxies' tie-breaking stays on
    the CPU generator.
    """
    start = time.perf_counter()
    target, vectors = target.to(encoder.device, torch.float32), vectors.to(encoder.device, torch.float32)
    deadline = start + config.time_budget
    index = {w: i for i, w in enumerate(words)}
    function = [w for w in FUNCTION_WORDS if w in index]
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    scored: dict[tuple[str, ...], float] = {}
    embedded: dict[tuple[str, ...], torch.Tensor] = {}

    last_chunk = 0.0  # seconds the last chunk took: a chunk that would end past the deadline is not begun

    def score(phrases) -> None:
        nonlocal last_chunk
        new = [p for p in dict.fromkeys(phrases) if p and p not in scored]
        for begin in range(0, len(new), 256):
            if time.perf_counter() + last_chunk > deadline and scored:
                return
            t0 = time.perf_counter()
            chunk = new[begin:begin + 256]
            vecs = encoder.encode([phrase_text(p) for p in chunk])
            embedded.update(zip(chunk, vecs))
            scored.update(zip(chunk, (vecs @ target).tolist()))
            last_chunk = time.perf_counter() - t0

    follows = _pieces_follow(sets)  # WordPiece endings go after their word, CLIP's word starts before it

    def attach(phrase: tuple[str, ...], pos: int, piece: str) -> tuple[str, ...]:
        """``piece`` joined to the word at ``pos`` (after it for "##x", before it for CLIP's "x##")."""
        at = pos + 1 if follows else pos
        return phrase[:at] + (piece,) + phrase[at:]

    # seeds: the nearest words, and pieces joined to the nearest few (single words the vocabulary lacks)
    nearest = [words[i] for i in torch.topk(vectors @ target, min(4 * config.beam, len(words))).indices.tolist()]
    score([(w,) for w in nearest])
    score([attach((w,), 0, e) for w in nearest[:config.flip_beams]
           for e in hotflip(encoder, sets, (w,), target, 1 if follows else 0, True, True, 4 * config.flips)])
    beams = sorted(scored, key=scored.get, reverse=True)[:config.beam]
    best, stale, steps = scored[beams[0]], 0, 0
    max_steps = config.max_steps if config.max_steps is not None else float("inf")
    while stale < config.patience and steps < max_steps and time.perf_counter() < deadline and best < 1 - 1e-6:
        steps += 1
        exact, proposals, proxies = [], [], []
        for rank, beam in enumerate(beams):
            if time.perf_counter() > deadline:
                break
            n, grow = len(beam), _n_words(beam) < config.max_words
            olds = [vectors[index[t]] if t in index else torch.zeros_like(target) for t in beam]
            bases = n * embedded[beam] - torch.stack([torch.zeros_like(target), *olds])  # (n + 1, d)
            top = torch.topk(proxy_scores(target, vectors, bases), min(config.pool, len(words)), dim=1)
            values, ids = top.values.tolist(), top.indices.tolist()
            for pos in range(n + 1):
                if grow and rank < config.flip_beams:
                    exact += [beam[:pos] + (w,) + beam[pos:] for w in function]
                    proposals += [beam[:pos] + (words[i],) + beam[pos:] for i in ids[0]]
                    proxies += values[0]
                if pos == n:
                    break
                # a whole word in place of a piece adds a word: not past max_words
                word_fits = grow or not is_piece(beam[pos])
                if word_fits:
                    proposals += [beam[:pos] + (words[i],) + beam[pos + 1:] for i in ids[pos + 1]]
                    proxies += values[pos + 1]
                deleted = beam[:pos] + beam[pos + 1:]
                if not _orphaned(deleted):  # deletion, unless it leaves a piece with no word to join
                    exact.append(deleted)
                if rank < config.flip_beams:
                    # this token is the word a piece joins (nu in nu ##dity; dity in CLIP's nu## dity)
                    anchor = (pos + 1 < n and beam[pos + 1].startswith("##")) if follows else \
                        (pos > 0 and beam[pos - 1].endswith("##"))
                    flips = config.flips * (8 if anchor else 1)
                    if anchor and rank == 0 and sets is not None and word_fits:  # nu ##dity, e ##iff ##el
                        exact += [beam[:pos] + (w,) + beam[pos + 1:] for w in sets["short"][0]]
                    exact += [beam[:pos] + (w,) + beam[pos + 1:]
                              for w in hotflip(encoder, sets, beam, target, pos, False, is_piece(beam[pos]), flips)]
                    if not anchor and beam[pos] not in function:  # a piece joined to this token
                        exact += [attach(beam, pos, w) for w in hotflip(encoder, sets, beam, target,
                                                                         pos + 1 if follows else pos, True, True,
                                                                         config.flips)]
            if rank < config.flip_beams:
                exact += span_moves(beam)
        # seeded tie-breaking on the CPU generator (the same draw on every device); proxies are host floats
        proxy = torch.tensor(proxies, device="cpu") + 1e-6 * torch.rand(len(proxies), generator=generator, device="cpu")
        chosen, want = [], config.proposals * 2 ** min(stale, 3)  # widen the search while stuck
        for i in torch.argsort(proxy, descending=True).tolist():
            if proposals[i] not in scored:
                chosen.append(proposals[i])
                if len(chosen) == want:
                    break
        score(exact + chosen)
        beams = sorted(scored, key=scored.get, reverse=True)[:config.beam]
        top_score = scored[beams[0]]
        stale = 0 if top_score > best + 1e-5 else stale + 1
        best = max(best, top_score)
    (text, cosine), *runners_up = rank_texts(scored, 1 + config.runners_up)
    return Guess(text, cosine, runners_up, time.perf_counter() - start, steps)


def rank_texts(scored: dict[tuple[str, ...], float], n: int) -> list[tuple[str, float]]:
    """The ``n`` best distinct texts of the scored phrases with their cosines, best first: phrases
    that read the same (nu ##dity and nudity) count once, at their best cosine."""
    ranked: dict[str, float] = {}
    for p in sorted(scored, key=scored.get, reverse=True):
        ranked.setdefault(phrase_text(p), scored[p])
        if len(ranked) == n:
            break
    return list(ranked.items())


def invert(targets: torch.Tensor, encoder: TextEncoder, config: InvertConfig = InvertConfig(),
           progress: bool = True) -> list[Guess]:
    """One ``Guess`` per row of ``targets`` (unit vectors); the vocabulary is encoded once and cached.
    The targets, the vocabulary's embeddings and HotFlip's ids go to the encoder's device (in fp32)."""
    from lmlab.progress import bar

    if config.max_words > encoder.max_length - 2:  # a CLIP tower reads 77 tokens, <|startoftext|> and end included
        raise LmlabError(f"max words {config.max_words}: the encoder reads at most {encoder.max_length - 2} tokens")
    device = encoder.device
    words, vectors = vocabulary(encoder, progress, config.vocab_words)
    sets = flip_sets(encoder.tokenizer, device)
    targets = targets.to(device, torch.float32)
    return [invert_one(t, encoder, words, vectors, config, sets)
            for t in bar(targets, enabled=progress, desc="inverting", unit="target")]
