"""Key-free watermark classification (``lmlab.watermark.keyfree``): the per-token statistics on known
logits, counts kept exactly, synthetic texts with an obvious signature, and the CLI's ``--key-free``."""

import json
import math

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.watermark.keyfree import (
    FEATURES,
    KeyFreeConfig,
    classify_key_free,
    cluster,
    e_costs,
    name_by_signature,
    position_stats,
    signature,
    standardize,
    start_labels,
    summarize,
)

# --- per-token statistics on known inputs ---------------------------------------------------------


def test_position_stats_on_known_logits():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [1 / 3, 1 / 3, 1 / 3]]))  # (T=3, V=3)
    stats = position_stats(logits, torch.tensor([0, 2, 1]))
    assert torch.allclose(stats["nll"], torch.tensor([math.log(2), -math.log(0.3), math.log(3)]))
    assert stats["rank"].tolist() == [0, 1, 0]  # a tie counts as top-1
    entropy = [-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)), -(0.1 * math.log(0.1) + 0.6 * math.log(0.6)
                                                                + 0.3 * math.log(0.3)), math.log(3)]
    assert torch.allclose(stats["entropy"], torch.tensor(entropy))


def test_summarize_means_and_shares():
    stats = {"nll": torch.tensor([1.0, 2.0, 3.0, 6.0]), "rank": torch.tensor([0, 0, 4, 5]),
             "entropy": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    out = summarize(stats, [7, 7, 8, 9], top_k=5)
    assert set(out) == set(FEATURES)
    assert out == pytest.approx({"nll": 3.0, "top1": 0.5, "topk": 0.75, "entropy": 1.0, "surprise": 2.0,
                                 "distinct": 0.75})


def test_signature_orientation_and_config_checks():
    z = np.array([[1.0, -1.0], [-1.0, 1.0]])  # nll, top1
    assert signature(z, ("nll", "top1")).tolist() == [1.0, -1.0]  # high NLL, low top-1: less model-like
    with pytest.raises(LmlabError, match="signature"):
        signature(z, ("entropy", "distinct"))
    with pytest.raises(LmlabError, match="bogus"):
        KeyFreeConfig(features=("nll", "bogus"))


# --- the assignment keeps the counts --------------------------------------------------------------

@pytest.mark.parametrize("counts", [[5, 5, 5, 5], [8, 0, 7, 5], [1, 2, 3, 14], [0, 0, 20, 0]])
def test_cluster_keeps_counts_exactly(counts):
    rng = np.random.default_rng(0)
    z = standardize(rng.normal(size=(20, 3)))
    letters, e_count = np.full(20, 100), rng.integers(0, 15, 20)
    labels, costs, _ = cluster(z, e_costs(letters, e_count), signature(z, ("nll", "top1", "surprise")), counts)
    assert np.bincount(labels, minlength=4).tolist() == counts and costs.shape == (20, 4)
    start = start_labels(signature(z, ("nll", "top1", "surprise")), e_costs(letters, e_count), counts)
    assert np.bincount(start, minlength=4).tolist() == counts


@pytest.mark.parametrize("counts,expected", [(None, [2, 1, 0, 3]), ([2, 2, 2, 2], [2, 1, 0, 3]),
                                             ([2, 2, 3, 2], [0, 1, 2, 3]), ([1, 2, 2, 2], [0, 1, 2, 3])])
def test_name_by_signature(counts, expected):
    labels = np.array([0, 0, 2, 2, 3, 3, 1, 1])
    score = np.array([5.0, 6.0, -1.0, -2.0, 1.0, 2.0, 0.0, 9.0])  # "none" reads least model-like, "hard" most
    assert name_by_signature(labels, score, counts).tolist() == expected  # unequal counts: names kept


def test_e_costs_favour_no_e_without_e():
    costs = e_costs(np.array([200, 200]), np.array([0, 24]))
    assert costs[0].argmin() == 1 and costs[1, 1] > costs[1, 0] + 50


# --- synthetic texts with an obvious signature ----------------------------------------------------

class Letters:
    """A tokenizer of lower-case letters: a = 0 ... z = 25, BOS 26."""

    bos_token_id = 26

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) - 97 for c in text if c.isalpha()]}


class NextLetter(torch.nn.Module):
    """A bigram model sure of the next letter in the alphabet (probability ~0.9)."""

    def __init__(self):
        super().__init__()
        table = torch.zeros(27, 27)
        table[torch.arange(27), (torch.arange(27) + 1) % 26] = 6.0  # BOS -> a
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()  # (B, T, 27)


def synthetic_texts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` each of none (the model's own alphabet runs), no-e (the same, e skipped), hard (a random
    letter 3 times in 4) and soft (a random letter 1 time in 4), 240 letters each (~9 e's where e is allowed)."""
    rng = np.random.default_rng(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz"

    def run(jump: float, skip_e: bool = False) -> str:
        out, k = [], int(rng.integers(26))
        while len(out) < 240:
            k = int(rng.integers(26)) if rng.random() < jump else (k + 1) % 26
            if not (skip_e and alphabet[k] == "e"):
                out.append(alphabet[k])
        return "".join(out)

    texts = [run(0.0) for _ in range(n)] + [run(0.0, True) for _ in range(n)] + \
        [run(0.75) for _ in range(n)] + [run(0.25) for _ in range(n)]
    return texts, [1] * n + [2] * n + [3] * n + [4] * n


@pytest.mark.parametrize("counts", [[6, 6, 6, 6], [6, 6, 4, 8], None])
def test_synthetic_texts_are_told_apart(counts):
    texts, truth = synthetic_texts(8)
    wanted = counts or [6, 6, 6, 6]  # the first wanted[c] texts of each class
    pick = [i for i, t in enumerate(truth) if i - truth.index(t) < wanted[t - 1]]
    texts, truth = [texts[i] for i in pick], [truth[i] for i in pick]
    order = np.random.default_rng(1).permutation(len(texts))  # shuffled: the order gives nothing away
    decisions = classify_key_free([texts[i] for i in order], NextLetter(), Letters(), counts)
    assert [d.code for d in decisions] == [truth[i] for i in order]
    hard = next(d for d, i in zip(decisions, order) if truth[i] == 3)
    assert hard.tokens == 240 and hard.features["top1"] < 0.5 and "key-free" in hard.reason


def test_short_texts_are_undetermined_without_counts():
    texts, _ = synthetic_texts(3)
    decisions = classify_key_free(texts + ["", "12 ?"], NextLetter(), Letters())
    assert [d.code for d in decisions[-2:]] == [0, 0] and all(d.code for d in decisions[:-2])
    assert json.dumps(decisions[-1].to_dict())  # NaN features become null
    counted = classify_key_free(texts + ["", "12 ?"], NextLetter(), Letters(), [4, 3, 3, 4])
    assert all(d.code for d in counted)
    with pytest.raises(LmlabError, match="add"):
        classify_key_free(texts, NextLetter(), Letters(), [3, 3, 3, 2])


# --- the CLI --------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,flag", [(["--key", "5"], "--key"), (["--gamma", "0.5"], "--gamma"),
                                        (["--seeding-scheme", "selfhash"], "--seeding-scheme"),
                                        (["--green-list", "x.py:green"], "--green-list"),
                                        (["--z-threshold", "3"], "--z-threshold"),
                                        (["--hard-fraction", "0.8", "--key", "1"], "--key, --hard-fraction")])
def test_cli_key_free_refuses_key_options_in_one_line(tmp_path, capsys, extra, flag):
    (tmp_path / "texts.json").write_text(json.dumps(["a text", "another"]))
    out = tmp_path / "guesses.npy"
    assert main(["watermark", "classify", "--key-free", "--input", str(tmp_path / "texts.json"), "--output", str(out),
                 *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"drop {flag}" in err[0] and not out.exists()


def test_cli_key_free_json(tiny_model_dir, tmp_path, capsys):
    texts = ["The weather today is mild and clear.", "Once upon a time a fox lived in a wood.",
             "A list of fruit: apples, pears, plums.", "Birds sing at dawn in spring and summer.",
             "A dog on a mat.", "Many words, all with a missing fifth symbol."] * 2 + ["x", "The end of it all.", "Sun.", "Rain, and then more rain."]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    out = tmp_path / "guesses.npy"
    assert main(["watermark", "classify", "--key-free", "--input", str(tmp_path / "texts.json"), "--output", str(out),
                 "--model", tiny_model_dir, "--balanced", "4", "--json", "--no-progress", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["key_free"] is True and summary["guesses"] == np.load(out).tolist()
    assert summary["counts"] == {"undetermined": 0, "none": 4, "no-e": 4, "hard": 4, "soft": 4}
    report = json.loads((tmp_path / "guesses.json").read_text())
    assert report["key_free"]["features"] == list(KeyFreeConfig().features)
    assert set(FEATURES) <= set(report["texts"][0]) and report["texts"][0]["tokens"] > 5
    assert "Warning" not in captured.err and "warn" not in captured.err.lower()
