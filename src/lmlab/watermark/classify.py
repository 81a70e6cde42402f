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

When the number of texts of each kind is known (``classify_counts``), thresholds give way to an
optimal assignment over per-text, per-class costs (negative log-likelihoods of the same scores).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lmlab.errors import LmlabError
from lmlab.watermark.assign import assign_counts
from lmlab.watermark.noe import BANNED_LETTERS
from lmlab.watermark.redlist import (
    GreenLists,
    RedListConfig,
    detect_ids,
    p_value,
    scored_tokens,
    text_ids,
    z_score,
)
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
    if len(ids) <= lists.context:
        return Decision(0, f"{len(ids)} token(s): need at least {lists.context + 1} to score", letters, e_count)
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
    if ids is None or len(ids) <= lists.context:
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


# --- known class counts: an optimal assignment over per-text costs ---------------------------------

E_RATE = 0.1  # share of e/E among the letters of English text (~12 %; a little lower is safer)
E_RATE_NO_E = 1e-3  # a no-e text: a stray e (a tokenizer quirk, another no-e scheme) costs ~4.6 nats


@dataclass(frozen=True)
class Features:
    """What a text shows a classifier: letters and e's, green tokens among the scored ones
    (canonical ids; and the greenest segmentation's, when available), and γ."""

    letters: int = 0
    e_count: int = 0
    scored: int = 0
    green: int = 0
    gamma: float = 0.25  # the mean green share of the lists its tokens were scored against
    reseg_scored: int = 0
    reseg_green: int = 0


def text_features(text: str, tokenizer, lists: GreenLists, ignore_repeated: bool = False) -> Features:
    """``Features`` of a text; an empty or unscorable one has zero counts (it costs every class alike)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return Features(gamma=lists.gamma() if lists.config.green_list is None else 0.25)
    letters = sum(ch.isalpha() for ch in text)
    e_count = sum(text.count(letter) for letter in BANNED_LETTERS)
    ids = text_ids(tokenizer, text) if text.strip() else []
    if len(ids) <= lists.context:
        return Features(letters, e_count)
    stats = detect_ids(ids, lists, ignore_repeated)
    gamma = lists.gamma() if lists.config.green_list is None else float(
        sum(lists.gamma(prev[-1]) for prev, _ in scored_tokens(ids, lists.context)) / (len(ids) - lists.context))
    # the greenest segmentation tells hard from soft; unwatermarked-looking (z < 2) and all-green
    # texts skip it (the slow part): a text without it is costed on its canonical ids alone
    greenest = greenest_ids(text, tokenizer, lists) if stats.z >= 2 and stats.green < stats.scored else None
    reseg = detect_ids(greenest, lists) if greenest is not None and len(greenest) > lists.context else None
    return Features(letters, e_count, stats.scored, stats.green, gamma,
                    reseg.scored if reseg else 0, reseg.green if reseg else 0)


def _log_binomial(k: np.ndarray, n: np.ndarray, p: np.ndarray) -> np.ndarray:
    """log p^k (1 − p)^(n − k), without the binomial coefficient (the same for every class)."""
    return k * np.log(p) + (n - k) * np.log1p(-p)


def class_costs(features: list[Features], rates: dict[str, np.ndarray]) -> np.ndarray:
    """(n, 4) negative log-likelihoods, columns none, no-e, hard, soft: the e count is binomial in the
    letters (rate ``E_RATE``, or ``E_RATE_NO_E`` for no-e); the green counts (canonical and
    resegmented) binomial in the scored tokens, with a green rate per class (``rates``: "canonical"
    and "resegmented", each (4,); none and no-e use each text's own γ on the canonical ids)."""
    f = {name: np.array([getattr(x, name) for x in features], dtype=float) for name in Features.__dataclass_fields__}
    e_rate = np.array([E_RATE, E_RATE_NO_E, E_RATE, E_RATE])
    loglik = _log_binomial(f["e_count"][:, None], f["letters"][:, None], e_rate)  # (n, 4)
    canonical = np.tile(rates["canonical"], (len(features), 1))
    canonical[:, :2] = f["gamma"][:, None]
    loglik += _log_binomial(f["green"][:, None], f["scored"][:, None], canonical)
    loglik += _log_binomial(f["reseg_green"][:, None], f["reseg_scored"][:, None], rates["resegmented"])
    return -loglik


def _fit_rates(features: list[Features], codes: np.ndarray, gamma: float) -> dict[str, np.ndarray]:
    """Green rates per class from the texts assigned to it (pooled, +1/+2 smoothing), kept in the
    order none = no-e < soft < hard, each within (γ, 0.999]."""
    rates = {}
    for kind, green, scored in (("canonical", "green", "scored"), ("resegmented", "reseg_green", "reseg_scored")):
        def pooled(cols):
            chosen = [x for x, c in zip(features, codes) if c in cols]
            return (sum(getattr(x, green) for x in chosen) + 1) / (sum(getattr(x, scored) for x in chosen) + 2)

        unmarked = gamma if kind == "canonical" else max(gamma, pooled({0, 1}))
        soft = min(max(pooled({3}), unmarked + 0.01), 0.989)
        hard = min(max(pooled({2}), soft + 0.01), 0.999)
        rates[kind] = np.array([unmarked, unmarked, hard, soft])
    return rates


def classify_counts(texts: list[str], tokenizer, counts: list[int], redlist: RedListConfig | None = None,
                    config: ClassifyConfig = ClassifyConfig(), progress: bool = False) -> list[Decision]:
    """Each text one of none, no-e, hard, soft, exactly ``counts`` (in that order) of each.

    Minimises the summed ``class_costs`` by an optimal assignment (``assign.assign_counts``),
    never undetermined. The soft and hard green rates depend on the model, δ and γ, so they
    are re-fitted to the texts assigned to each class and the assignment solved again until it
    no longer changes (hard EM under the count constraint; at most 20 rounds).
    """
    from lmlab.progress import bar

    if len(counts) != 4:
        raise LmlabError(f"give 4 class counts (none, no-e, hard, soft), got {len(counts)}")
    if any(c < 0 for c in counts) or sum(counts) != len(texts):
        raise LmlabError(f"class counts {','.join(map(str, counts))} add up to {sum(counts)}, "
                         f"but there are {len(texts)} texts")
    lists = GreenLists(redlist or RedListConfig(vocab_size=len(tokenizer)))
    features = [text_features(t, tokenizer, lists, config.ignore_repeated)
                for t in bar(texts, enabled=progress, desc="scoring", unit="text")]
    gamma = float(np.mean([x.gamma for x in features]))
    rest = 1 - gamma  # starting rates, shares of the way from γ to 1: soft δ = 2 gives ~0.6 canonical
    rates = {"canonical": np.array([gamma, gamma, gamma + 0.93 * rest, gamma + 0.45 * rest]),
             "resegmented": np.array([gamma + 0.1 * rest] * 2 + [gamma + 0.98 * rest, gamma + 0.65 * rest])}
    codes = None
    for _ in range(20):
        costs = class_costs(features, rates)
        new = assign_counts(costs, list(counts))
        if codes is not None and np.array_equal(new, codes):
            break
        codes = new
        rates = _fit_rates(features, codes, gamma)
    decisions = []
    for x, row, c in zip(features, costs, codes):
        others = np.delete(row, c)
        z = z_score(x.green, x.scored, x.gamma) if x.scored else 0.0
        decisions.append(Decision(
            int(c) + 1, f"assigned under counts {','.join(map(str, counts))}: cost {row[c]:.1f} nats, "
            f"the cheapest other class {NAMES[int(np.argmin(np.where(np.arange(4) == c, np.inf, row))) + 1]} "
            f"{others.min() - row[c]:+.1f}", x.letters, x.e_count, x.scored, x.green,
            x.green / x.scored if x.scored else 0.0, z, p_value(z),
            x.reseg_green / x.reseg_scored if x.reseg_scored else None))
    return decisions
