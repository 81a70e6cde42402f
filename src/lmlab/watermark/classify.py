"""Which watermark does a text carry? 1 = none, 2 = no-e, 3 = hard red list, 4 = soft red list.

From the text and the tokenizer alone (no model forward):
1. a text with enough letters and not one e/E is no-e (English has ~12 % e's: 200 letters
   without one happen by chance with probability ~0.88^200 ≈ 1e-11);
2. otherwise the red-list z score decides watermarked (z ≥ ``z_threshold``, 4 as in the paper) or not;
3. a watermarked text is hard if nearly all its tokens are green (``hard_fraction``): the hard
   scheme emits green tokens only. The red ones a detector sees come from re-tokenisation (decode
   → encode may split text differently from how it was generated), so when the canonical ids
   fall short, the greenest segmentation of the text decides (``resegment``): hard text is
   ~100 % green there. Soft text with δ = 2 and γ = 0.25 is at most γe^δ / (γe^δ + 1 − γ) ≈ 71 %
   green when the model is unsure (measured: 48–74 % canonical, 71–81 % resegmented).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lmlab.errors import LmlabError
from lmlab.watermark.noe import BANNED_LETTERS
from lmlab.watermark.redlist import GreenLists, RedListConfig, detect_ids, text_ids
from lmlab.watermark.resegment import greenest_ids

NAMES = {0: "undetermined", 1: "none", 2: "no-e", 3: "hard", 4: "soft"}
CODES = {name: code for code, name in NAMES.items()}


@dataclass(frozen=True, kw_only=True)
class ClassifyConfig:
    z_threshold: float = 4.0
    hard_fraction: float = 0.9  # canonical green share above which watermarked text is hard
    resegmented_hard_fraction: float = 0.95  # the same for the greenest segmentation (which favours
    # green: soft text reaches 71-81 % there on SmolLM2, up to 88 % on a random model's junk)
    min_letters: int = 20  # fewer letters than this prove nothing about a missing e
    ignore_repeated: bool = False  # score each (previous, current) pair once


@dataclass(frozen=True)
class Decision:
    """The guess (a code of ``NAMES``; 0 when undetermined), the reason, and the scores behind it."""

    code: int
    reason: str
    letters: int = 0
    e_count: int = 0
    scored: int = 0
    green: int = 0
    green_fraction: float = 0.0
    z: float = 0.0
    p_value: float = 1.0
    resegmented_fraction: float | None = None  # green share of the greenest segmentation, when computed

    @property
    def name(self) -> str:
        return NAMES[self.code]

    def to_dict(self) -> dict:
        return {"guess": self.code, "name": self.name, **asdict(self)}


def classify_text(text: str, tokenizer, lists: GreenLists, config: ClassifyConfig = ClassifyConfig()) -> Decision:
    """One text's watermark, following the module docstring's three steps."""
    if not text.strip():
        return Decision(0, "empty text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return Decision(0, f"not valid Unicode text ({exc.reason} at character {exc.start})")
    letters = sum(ch.isalpha() for ch in text)
    e_count = sum(text.count(letter) for letter in BANNED_LETTERS)
    ids = text_ids(tokenizer, text)
    if len(ids) < 2:
        return Decision(0, f"{len(ids)} token(s): need at least 2 to score", letters, e_count)
    stats = detect_ids(ids, lists, config.ignore_repeated)
    scores = {"letters": letters, "e_count": e_count, "scored": stats.scored, "green": stats.green,
                  "green_fraction": stats.green_fraction, "z": stats.z, "p_value": stats.p_value}
    if e_count == 0 and letters >= config.min_letters:
        return Decision(2, f"{letters} letters and no e", **scores)
    if stats.z < config.z_threshold:
        if e_count == 0:
            return Decision(0, f"no e but only {letters} letters, and z {stats.z:.2f} < {config.z_threshold}",
                            **scores)
        return Decision(1, f"z {stats.z:.2f} < {config.z_threshold}", **scores)
    head = f"z {stats.z:.2f}, {stats.green_fraction:.0%} green"
    if stats.green_fraction >= config.hard_fraction:
        return Decision(3, f"{head} >= {config.hard_fraction:.0%}", **scores)
    ids = greenest_ids(text, tokenizer, lists)
    if ids is None or len(ids) < 2:
        return Decision(4, f"{head} < {config.hard_fraction:.0%}", **scores)
    scores["resegmented_fraction"] = resegmented = detect_ids(ids, lists).green_fraction
    verdict = ">=" if resegmented >= config.resegmented_hard_fraction else "<"
    return Decision(3 if verdict == ">=" else 4, f"{head}, {resegmented:.0%} after resegmenting "
                    f"{verdict} {config.resegmented_hard_fraction:.0%}", **scores)


def classify_texts(texts: list[str], tokenizer, redlist: RedListConfig | None = None,
                   config: ClassifyConfig = ClassifyConfig(), progress: bool = False) -> list[Decision]:
    """``classify_text`` over many texts, sharing one green-list cache."""
    from lmlab.progress import bar

    if not texts:
        raise LmlabError("no texts to classify")
    lists = GreenLists(redlist or RedListConfig(vocab_size=len(tokenizer)))
    return [classify_text(t, tokenizer, lists, config)
            for t in bar(texts, enabled=progress, desc="classifying", unit="text")]
