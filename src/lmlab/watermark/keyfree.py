"""Which watermark does a text carry, when the key is unknown? none / no-e / hard / soft from the
texts and an unwatermarked language model alone: no key, seeding scheme, γ or green lists.

A red list (Kirchenbauer et al. 2023, "A Watermark for Large Language Models", Alg. 1 and 2)
moves probability away from a key-dependent 1 − γ of the vocabulary at every step. Without the
key those lists cannot be recomputed, but their cost shows in how the text reads to the model:
a hard list bans the model's favourite token with probability 1 − γ, so fewer tokens are its
top-1 choice and they surprise it more (perplexity ×4.9–6.2 on SmolLM2, README); a soft list
(δ = 2) only lowers red logits, a smaller shift (×1.3–1.9). A no-e text has no e among many letters.

Per text, one forward pass gives per-token statistics (``position_stats``): negative
log-likelihood (NLL), rank of the token, entropy of the model's distribution. Their means make
the features (``FEATURES``; ``surprise`` = NLL − entropy, the surprise beyond what the model
expected). Classes are Gaussians with one shared covariance on the standardised features (a
linear discriminant), plus the binomial e cost of ``classify``, fitted by hard EM; with known
counts every round is an optimal assignment (``assign_counts``). Names come from the start:
texts ranked by a 1-D signature (``signature``: most model-like first) fill none, soft, hard in
that order, and no-e takes the texts poorest in e; the means are re-ordered the same way at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.watermark.assign import assign_counts
from lmlab.watermark.classify import E_RATE, E_RATE_NO_E, NAMES
from lmlab.watermark.noe import BANNED_LETTERS

FEATURES = ("nll", "top1", "topk", "entropy", "surprise", "distinct")
ORIENTATION = {"nll": 1.0, "top1": -1.0, "topk": -1.0, "surprise": 1.0}  # + = less model-like (signature)


@dataclass(frozen=True, kw_only=True)
class KeyFreeConfig:
    features: tuple[str, ...] = ("nll", "top1", "topk", "surprise")  # which of ``FEATURES`` cluster
    top_k: int = 5  # "topk" is the share of tokens among the model's k likeliest
    max_tokens: int = 256  # tokens scored per text (the first ones)
    batch_size: int = 8  # texts per forward pass
    rounds: int = 30  # EM rounds at most
    ridge: float = 0.05  # added to the shared covariance's diagonal (standardised units)

    def __post_init__(self):
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or not self.features:
            raise LmlabError(f"unknown key-free feature(s) {', '.join(unknown) or '(none)'}; choose from "
                             f"{', '.join(FEATURES)}")
        if min(self.top_k, self.max_tokens, self.batch_size, self.rounds) < 1 or self.ridge < 0:
            raise LmlabError("top_k, max_tokens, batch_size and rounds must be positive, ridge >= 0")


@dataclass(frozen=True)
class KeyFreeDecision:
    """The guess (a code of ``NAMES``), why, and the features behind it (NaN: too short to score)."""

    code: int
    reason: str
    letters: int = 0
    e_count: int = 0
    tokens: int = 0
    features: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return NAMES[self.code]

    def to_dict(self) -> dict:
        return {"guess": self.code, "name": self.name, "reason": self.reason, "letters": self.letters,
                "e_count": self.e_count, "tokens": self.tokens,
                **{k: (None if np.isnan(v) else float(v)) for k, v in self.features.items()}}


# --- features -------------------------------------------------------------------------------------

def position_stats(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """(T,) NLL of each target, its rank (0 = the model's top-1; ties count in its favour) and the
    entropy of the model's distribution, from (T, V) logits that predict the (T,) targets."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    chosen = logp.gather(-1, targets[:, None])[:, 0]  # (T,)
    return {"nll": -chosen, "rank": (logp > chosen[:, None]).sum(-1),
            "entropy": -(logp.exp() * logp.clamp_min(-1e4)).sum(-1)}


def summarize(stats: dict[str, torch.Tensor], ids: list[int], top_k: int) -> dict[str, float]:
    """The per-text ``FEATURES`` from ``position_stats`` and the text's ids."""
    nll, rank, entropy = stats["nll"].double(), stats["rank"], stats["entropy"].double()
    return {"nll": nll.mean().item(), "top1": (rank == 0).double().mean().item(),
            "topk": (rank < top_k).double().mean().item(), "entropy": entropy.mean().item(),
            "surprise": (nll - entropy).mean().item(), "distinct": len(set(ids)) / len(ids)}


def text_ids(tokenizer, text: str, max_tokens: int) -> list[int]:
    """The ids a text is scored on: the tokenizer's BOS (when it has one) and the text's first tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def model_features(texts: list[str], model, tokenizer, config: KeyFreeConfig = KeyFreeConfig(),
                   progress: bool = False) -> tuple[np.ndarray, list[int]]:
    """(n, len(FEATURES)) features per text (NaN rows: fewer than 2 tokens to score) and the
    number of tokens scored per text; one batched forward pass per ``config.batch_size`` texts."""
    from lmlab.devices import model_device
    from lmlab.progress import bar

    encoded = [text_ids(tokenizer, t, config.max_tokens) if t.strip() else [] for t in texts]
    out = np.full((len(texts), len(FEATURES)), np.nan)
    device = model_device(model)
    order = [i for i in sorted(range(len(texts)), key=lambda i: len(encoded[i])) if len(encoded[i]) >= 2]
    with torch.inference_mode(), bar(total=len(texts), enabled=progress, desc="scoring", unit="text") as pbar:
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.tensor([encoded[i] + [0] * (width - len(encoded[i])) for i in idx], device=device)  # (B, T)
            lengths = torch.tensor([len(encoded[i]) for i in idx], device=device)  # (B,)
            mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()  # (B, T)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                stats = position_stats(logits[row, :n - 1].cpu(), ids[row, 1:n].cpu())
                out[i] = [summarize(stats, encoded[i], config.top_k)[f] for f in FEATURES]
            pbar.update(len(idx))
        pbar.update(len(texts) - len(order))
    return out, [max(len(e) - 1, 0) for e in encoded]


def letter_counts(text: str) -> tuple[int, int]:
    """(letters, e's) of a text."""
    return sum(ch.isalpha() for ch in text), sum(text.count(letter) for letter in BANNED_LETTERS)


# --- clustering -----------------------------------------------------------------------------------

def e_costs(letters: np.ndarray, e_count: np.ndarray) -> np.ndarray:
    """(n, 4) negative log-likelihood of the e count, binomial in the letters: rate ``E_RATE``
    for none, hard and soft, ``E_RATE_NO_E`` for no-e (as ``classify.class_costs``)."""
    rate = np.array([E_RATE, E_RATE_NO_E, E_RATE, E_RATE])
    k, n = np.asarray(e_count, float)[:, None], np.asarray(letters, float)[:, None]
    return -(k * np.log(rate) + (n - k) * np.log1p(-rate))


def standardize(x: np.ndarray) -> np.ndarray:
    """Columns to mean 0 and standard deviation 1 over the rows that have values; NaN (unscorable) -> 0."""
    mean, std = np.nanmean(x, axis=0), np.nanstd(x, axis=0)
    z = (x - mean) / np.where(std > 0, std, 1.0)
    return np.nan_to_num(z, nan=0.0)


def signature(z: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """(n,) how unlike the model's own text each text reads: the mean of the standardised
    features that have an orientation (NLL and surprise up, top-1 and top-k share down)."""
    cols = [j for j, f in enumerate(names) if f in ORIENTATION]
    if not cols:
        raise LmlabError(f"the key-free signature needs one of {', '.join(ORIENTATION)} among the features")
    return np.mean([ORIENTATION[names[j]] * z[:, j] for j in cols], axis=0)


def start_labels(score: np.ndarray, e_cost: np.ndarray, counts: list[int] | None) -> np.ndarray:
    """(n,) starting classes 0..3 (none, no-e, hard, soft): no-e for the texts whose e count favours
    it most (``counts[1]`` of them, or every text where it is cheaper), the rest by ``score``,
    lowest first, into none, soft, hard (``counts``, or thirds)."""
    n = len(score)
    favour = e_cost[:, 0] - e_cost[:, 1]  # > 0: the e count favours no-e
    by_favour = np.argsort(-favour, kind="stable")
    no_e = by_favour[:counts[1]] if counts is not None else np.flatnonzero(favour > 0)
    labels = np.full(n, 1)
    rest = np.setdiff1d(np.arange(n), no_e)
    rest = rest[np.argsort(score[rest], kind="stable")]
    sizes = [counts[0], counts[3], counts[2]] if counts is not None else \
        [len(rest) - 2 * (len(rest) // 3), len(rest) // 3, len(rest) // 3]
    for cls, chunk in zip((0, 3, 2), np.split(rest, np.cumsum(sizes)[:2])):
        labels[chunk] = cls
    return labels


def gaussian_costs(z: np.ndarray, labels: np.ndarray, ridge: float,
                   previous: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """((n, 4) half squared Mahalanobis distances to each class mean under the pooled within-class
    covariance (+ ``ridge`` on its diagonal), (4, F) the means). A class with no texts keeps its
    ``previous`` mean (or sits at infinity)."""
    means = np.full((4, z.shape[1]), np.nan)
    for c in range(4):
        if (labels == c).any():
            means[c] = z[labels == c].mean(0)
        elif previous is not None:
            means[c] = previous[c]
    resid = z - np.nan_to_num(means)[labels]
    cov = resid.T @ resid / max(len(z) - len(np.unique(labels)), 1) + ridge * np.eye(z.shape[1])
    precision = np.linalg.inv(cov)
    diff = z[:, None, :] - means[None, :, :]  # (n, 4, F)
    costs = 0.5 * np.einsum("ncf,fg,ncg->nc", diff, precision, diff)
    return np.where(np.isnan(costs), 1e9, costs), means


def cluster(z: np.ndarray, e_cost: np.ndarray, score: np.ndarray, counts: list[int] | None,
            config: KeyFreeConfig = KeyFreeConfig()) -> tuple[np.ndarray, np.ndarray, int]:
    """(n,) classes 0..3, (n, 4) final costs and the EM rounds taken: hard EM from ``start_labels``;
    each round an optimal assignment under ``counts`` (or each text its cheapest class)."""
    labels, means = start_labels(score, e_cost, counts), None
    for rounds in range(1, config.rounds + 1):
        gauss, means = gaussian_costs(z, labels, config.ridge, means)
        costs = gauss + e_cost
        new = assign_counts(costs, list(counts)) if counts is not None else costs.argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
    remap = name_by_signature(labels, score, counts)
    return remap[labels], costs[:, np.argsort(remap)], rounds


def name_by_signature(labels: np.ndarray, score: np.ndarray, counts: list[int] | None) -> np.ndarray:
    """(4,) new class of each class: of none, soft and hard, the cluster with the lowest mean
    ``score`` (the most model-like) is none and the highest hard. Only when those three classes
    have equal counts (or none are given), so that the counts still hold."""
    remap, trio = np.arange(4), [0, 3, 2]
    if counts is None or len({counts[c] for c in trio}) == 1:
        present = [c for c in trio if (labels == c).any()]
        remap[sorted(present, key=lambda c: score[labels == c].mean())] = present
    return remap


def classify_key_free(texts: list[str], model, tokenizer, counts: list[int] | None = None,
                      config: KeyFreeConfig = KeyFreeConfig(), progress: bool = False) -> list[KeyFreeDecision]:
    """Each text none, no-e, hard or soft without the key (module docstring); exactly ``counts``
    (none, no-e, hard, soft) of each when given. Without counts, a text with fewer than two
    tokens is undetermined (code 0); with them, it is assigned like any other (features at the mean)."""
    if not texts:
        raise LmlabError("no texts to classify")
    if counts is not None and (len(counts) != 4 or min(counts) < 0 or sum(counts) != len(texts)):
        raise LmlabError(f"class counts {','.join(map(str, counts))} must be 4 numbers >= 0 adding up to the "
                         f"{len(texts)} texts")
    raw, tokens = model_features(texts, model, tokenizer, config, progress)
    letters, e_count = map(np.array, zip(*[letter_counts(t) for t in texts]))
    cols = [FEATURES.index(f) for f in config.features]
    scorable = ~np.isnan(raw).any(1)
    keep = np.arange(len(texts)) if counts is not None else np.flatnonzero(scorable)
    decisions = [KeyFreeDecision(0, f"{tokens[i]} token(s) to score: need at least 1 after the first", int(letters[i]),
                                 int(e_count[i]), tokens[i], dict(zip(FEATURES, raw[i])))
                 for i in range(len(texts))]
    if len(keep) == 0:
        return decisions
    z = standardize(raw[keep][:, cols])
    score = signature(z, config.features)
    ecost = e_costs(letters[keep], e_count[keep])
    labels, costs, rounds = cluster(z, ecost, score, counts, config)
    for j, i in enumerate(keep):
        c, row = int(labels[j]), costs[j]
        other = int(np.argmin(np.where(np.arange(4) == c, np.inf, row)))
        why = (f"key-free{' under counts ' + ','.join(map(str, counts)) if counts is not None else ''}: "
               f"signature {score[j]:+.2f}, cost {row[c]:.1f}, the cheapest other class {NAMES[other + 1]} "
               f"{row[other] - row[c]:+.1f} ({rounds} EM rounds)")
        decisions[i] = KeyFreeDecision(c + 1, why, int(letters[i]), int(e_count[i]), tokens[i],
                                       dict(zip(FEATURES, raw[i])))
    return decisions
