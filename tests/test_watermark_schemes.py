"""Seeding schemes other than simple_1, a user's own green lists, classification with known
counts (an optimal assignment), and generating several schemes at once.

Green lists equal transformers' (lefthash, selfhash at several context widths) and a
re-derivation of the reference's selfhash (jwkirchenbauer/lm-watermarking, alternative_prf_schemes.py);
processors and detection agree with transformers' processor and detector; the Hungarian algorithm
equals brute force (and scipy's where installed) and beats greedy where greedy fails."""

import itertools
import json
import re

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.models import build_model, preset_config
from lmlab.watermark import (
    Features,
    GreenLists,
    RedListConfig,
    RedListLogitsProcessor,
    assign_counts,
    class_costs,
    detect_ids,
    hungarian,
    z_score,
)

KEY = 15485863

# --- the reference's selfhash (algorithm-3: anchored_minhash_prf, width 4, self-salted), re-derived ---

_ref_rng = torch.Generator(device="cpu")
_ref_rng.manual_seed(2971215073)
REF_TABLE = torch.randperm(1_000_003, device="cpu", generator=_ref_rng)


def reference_selfhash_greenlist(window: list[int], vocab: int, gamma: float = 0.25) -> torch.Tensor:
    """``_seed_rng(input_ids[-4:])`` with ``anchored_minhash_prf`` + ``_get_greenlist_ids``."""
    input_ids = torch.tensor(window)[-4:]
    hashint = REF_TABLE[input_ids % 1_000_003] + 1
    prf_key = (KEY * hashint * hashint[-1]).min().item()
    rng = torch.Generator(device="cpu")
    rng.manual_seed(prf_key % (2**64 - 1))
    return torch.randperm(vocab, device="cpu", generator=rng)[:int(vocab * gamma)]


def reference_selfhash_score(ids: list[int], vocab: int, gamma: float = 0.25) -> tuple[int, int]:
    """``WatermarkDetector._score_ngrams_in_passage`` (4-grams; each token in its own list)."""
    grams = [ids[i:i + 4] for i in range(len(ids) - 3)]
    return len(grams), sum(g[-1] in reference_selfhash_greenlist(g, vocab, gamma).tolist() for g in grams)


@pytest.fixture(scope="module")
def model():
    return build_model(preset_config("tiny-llama"))


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("vocab", [1000, 49152])
def test_hf_selfhash_lists_are_transformers(width, vocab):
    from transformers.generation import WatermarkLogitsProcessor

    theirs = WatermarkLogitsProcessor(vocab_size=vocab, device="cpu", seeding_scheme="selfhash", context_width=width)
    lists = GreenLists(RedListConfig(vocab_size=vocab, seeding_scheme="hf-selfhash", context_width=width))
    assert lists.context == width - 1 and lists.self_salt
    for window in [(5, 9, 11, 13), (0, 0, 0, vocab - 1), (123456, 7, 8, 999), (1, 2, 3, 4)]:
        assert torch.equal(lists.ids(window[4 - width:]), theirs._get_greenlist_ids(torch.tensor(window)))
        token = window[-1]
        assert lists.is_green(window[:-1], token) == (token in theirs._get_greenlist_ids(torch.tensor(window)))


@pytest.mark.parametrize("name", ["simple_1", "lefthash"])
def test_lefthash_is_transformers_lefthash(name):
    from transformers.generation import WatermarkLogitsProcessor

    theirs = WatermarkLogitsProcessor(vocab_size=500, device="cpu", seeding_scheme="lefthash")
    lists = GreenLists(RedListConfig(vocab_size=500, seeding_scheme=name))
    for prev in (0, 7, 499):
        assert torch.equal(lists.ids((prev,)), theirs._get_greenlist_ids(torch.tensor([3, prev])))


def test_reference_selfhash_lists():
    lists = GreenLists(RedListConfig(vocab_size=1000, seeding_scheme="selfhash"))
    assert lists.context == 3 and lists.scheme.candidates == 41
    for window in [(5, 9, 11, 13), (0, 0, 0, 999), (123456, 7, 8, 999)]:
        assert torch.equal(lists.ids(window), reference_selfhash_greenlist(list(window), 1000))
    assert not torch.equal(lists.ids((5, 9, 11, 13)), GreenLists(RedListConfig(
        vocab_size=1000, seeding_scheme="hf-selfhash", context_width=4)).ids((5, 9, 11, 13)))  # another table


@pytest.mark.parametrize("width", [1, 2])
def test_hf_selfhash_processors_match_transformers(width):
    """Soft: the same distribution as transformers' (δ on the self-consistent candidates among the
    40 likeliest); hard: exactly those candidates stay, the rest are -inf (padding columns too)."""
    from transformers.generation import WatermarkLogitsProcessor

    vocab, width_logits = 300, 304
    config = RedListConfig(vocab_size=vocab, seeding_scheme="hf-selfhash", context_width=width)
    theirs = WatermarkLogitsProcessor(vocab_size=vocab, device="cpu", seeding_scheme="selfhash", context_width=width)
    input_ids = torch.tensor([[4, 9, 11], [0, 2, 299]])
    scores = torch.randn(2, width_logits, generator=torch.Generator().manual_seed(0))
    scores[:, vocab:] = -5.0  # padding columns: never among the 40 likeliest
    expected = theirs(input_ids, scores[:, :vocab].clone())
    soft = RedListLogitsProcessor(config, hard=False)(input_ids, scores.clone())
    torch.testing.assert_close(soft[:, :vocab].softmax(-1), expected.softmax(-1))
    hard = RedListLogitsProcessor(config, hard=True)(input_ids, scores.clone())
    for row in range(2):
        green = theirs._score_rejection_sampling(input_ids[row], scores[row, :vocab]).tolist()
        assert green and set(torch.isfinite(hard[row]).nonzero().flatten().tolist()) == set(green)


def test_reference_selfhash_processor_tries_41_candidates():
    config = RedListConfig(vocab_size=300, seeding_scheme="selfhash")
    input_ids = torch.tensor([[4, 9, 11, 7]])
    scores = torch.randn(1, 300, generator=torch.Generator().manual_seed(1))
    order = scores[0].sort(descending=True).indices.tolist()[:41]
    green = {t for t in order if t in reference_selfhash_greenlist([9, 11, 7, t], 300).tolist()}
    hard = RedListLogitsProcessor(config, hard=True)(input_ids, scores.clone())
    assert set(torch.isfinite(hard[0]).nonzero().flatten().tolist()) == green


@pytest.mark.parametrize("width,ignore_repeated", [(1, False), (3, True)])
def test_hf_selfhash_detection_both_ways(model, width, ignore_repeated):
    """Text from transformers' selfhash processor scores identically in lmlab and transformers'
    detector; so does lmlab's hard selfhash text, which transformers' flags."""
    from transformers import WatermarkDetector, WatermarkingConfig

    vocab = model.config.vocab_size
    wm = WatermarkingConfig(seeding_scheme="selfhash", context_width=width)
    config = RedListConfig(vocab_size=vocab, seeding_scheme="hf-selfhash", context_width=width)
    prompt = torch.tensor([[5, 900, 31, 7]])
    torch.manual_seed(0)
    common = {"attention_mask": torch.ones_like(prompt), "do_sample": True, "top_k": 0, "max_new_tokens": 20,
              "pad_token_id": 0}
    theirs = model.generate(prompt, watermarking_config=wm, **common)
    ours = model.generate(prompt, logits_processor=[RedListLogitsProcessor(config, hard=True)], **common)
    detector = WatermarkDetector(model.config, "cpu", wm, ignore_repeated_ngrams=ignore_repeated)
    for sequence in (theirs[0], ours[0]):
        ids = sequence[4:].tolist()
        mine = detect_ids(ids, GreenLists(config), ignore_repeated)
        out = detector(torch.tensor([ids]), return_dict=True)
        assert (mine.scored, mine.green) == (out.num_tokens_scored[0], out.num_green_tokens[0])
        assert mine.z == pytest.approx(out.z_score[0])
    # a random model spreads its mass over 49k tokens, so δ on the 40 likeliest barely shows (theirs);
    # the hard scheme keeps only those, all green
    assert mine.z > 4


def test_reference_selfhash_generation_and_detection(model):
    config = RedListConfig(vocab_size=model.config.vocab_size, seeding_scheme="selfhash")
    prompt = torch.tensor([[5, 900, 31, 7]])
    torch.manual_seed(0)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, max_new_tokens=20,
                         logits_processor=[RedListLogitsProcessor(config, hard=True)], pad_token_id=0)
    ids = out[0].tolist()
    mine = detect_ids(ids, GreenLists(config))
    assert (mine.scored, mine.green) == reference_selfhash_score(ids, model.config.vocab_size)
    assert mine.z > 4


# --- a user's own green lists -------------------------------------------------------------------

USER_FILE = '''
import random

def green(prev, vocab_size):
    return random.Random(prev * 7919 + 1).sample(range(vocab_size), vocab_size // 5)

def uneven(prev, vocab_size):
    return list(range(prev % 3 + 1, vocab_size // (prev % 3 + 2)))

def out_of_range(prev, vocab_size):
    return [0, vocab_size]

def floats(prev, vocab_size):
    return [0.5, 1.0]

def empty(prev, vocab_size):
    return []
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_lists.py"
    path.write_text(USER_FILE)
    return str(path)


def test_user_green_list_function(user_file):
    import random

    config = RedListConfig(vocab_size=500, green_list=f"{user_file}:green")
    lists = GreenLists(config)
    for prev in (0, 3, 499):
        assert sorted(lists.ids((prev,)).tolist()) == sorted(random.Random(prev * 7919 + 1).sample(range(500), 100))
    assert lists.gamma(3) == pytest.approx(0.2)
    hard = RedListLogitsProcessor(config, hard=True, lists=lists)(torch.tensor([[1, 3]]), torch.zeros(1, 504))
    assert torch.equal(torch.isfinite(hard[0]).nonzero().flatten(), lists.ids((3,)).sort().values)
    ids = [3, 17, 250, 17, 4, 99, 0, 7]
    d = detect_ids(ids, lists)
    expected = sum(b in random.Random(a * 7919 + 1).sample(range(500), 100) for a, b in itertools.pairwise(ids))
    assert (d.scored, d.green) == (7, expected) and d.z == pytest.approx(z_score(expected, 7, 0.2))


def test_user_lists_of_different_sizes_use_each_gamma(user_file):
    lists = GreenLists(RedListConfig(vocab_size=600, green_list=f"{user_file}:uneven"))
    ids = [0, 5, 1, 2, 400, 3]
    gammas = [lists.gamma(p) for p in ids[:-1]]
    assert len(set(gammas)) == 3
    green = sum(lists.is_green(a, b) for a, b in itertools.pairwise(ids))
    z = (green - sum(gammas)) / np.sqrt(sum(g * (1 - g) for g in gammas))
    assert detect_ids(ids, lists).z == pytest.approx(z)


@pytest.mark.parametrize("spec,message", [
    ("{dir}/missing.py:green", "no file"), ("{file}:nope", "has no function 'nope'"),
    ("{file}:out_of_range", "outside [0, 500)"), ("{file}:floats", "integer token ids"),
    ("{file}:empty", "0 distinct ids"), ("no_such_module_xyz:f", "cannot import"), ("justaname", "expected FILE.py"),
])
def test_bad_green_list_is_one_error(user_file, tmp_path, spec, message):
    from lmlab.watermark.seeding import load_green_list

    load_green_list.cache_clear()
    with pytest.raises(LmlabError, match=re.escape(message)) as err:
        GreenLists(RedListConfig(vocab_size=500, green_list=spec.format(dir=tmp_path, file=user_file)))
    assert "\n" not in str(err.value)


def test_cli_green_list_generate_detect_and_bad_function(tiny_model_dir, user_file, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("The weather today\n")
    out = tmp_path / "hard.jsonl"
    assert main(["watermark", "generate", "--scheme", "hard", "--prompts", str(tmp_path / "prompts.txt"),
                 "--model", tiny_model_dir, "--max-new-tokens", "40", "--min-new-tokens", "40", "--output", str(out),
                 "--green-list", f"{user_file}:green", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["watermark", "detect", "--input", str(out), "--model", tiny_model_dir, "--json",
                 "--green-list", f"{user_file}:green"]) == 0
    assert json.loads(capsys.readouterr().out)["texts"][0]["z"] > 4
    for extra, message in ((["--green-list", f"{user_file}:floats"], "integer token ids"),
                           (["--green-list", f"{user_file}:green", "--gamma", "0.5"], "drop --gamma")):
        assert main(["watermark", "detect", "--input", str(out), "--model", tiny_model_dir, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_cli_hf_selfhash_generate_and_detect(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("The weather today\n")
    out = tmp_path / "soft.npy"
    flags = ["--seeding-scheme", "hf-selfhash", "--context-width", "2"]
    assert main(["watermark", "generate", "--scheme", "hard", "--prompts", str(tmp_path / "prompts.txt"),
                 "--model", tiny_model_dir, "--max-new-tokens", "40", "--min-new-tokens", "40", "--output", str(out),
                 "--no-progress", *flags]) == 0
    capsys.readouterr()
    assert main(["watermark", "detect", "--input", str(out), "--model", tiny_model_dir, "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["texts"][0]["z"] > 4
    assert main(["watermark", "detect", "--input", str(out), "--model", tiny_model_dir, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["texts"][0]["z"] < 4  # simple_1 lists see no watermark


# --- known counts: the Hungarian algorithm ------------------------------------------------------

def brute_force(costs: np.ndarray) -> float:
    n = len(costs)
    return min(costs[np.arange(n), list(p)].sum() for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_hungarian_is_optimal(n):
    rng = np.random.default_rng(n)
    for trial in range(10):
        costs = rng.normal(size=(n, n))
        if trial % 3 == 0:
            costs = np.round(costs)  # ties
        match = hungarian(costs)
        assert sorted(match) == list(range(n))
        assert costs[np.arange(n), match].sum() == pytest.approx(brute_force(costs))


def test_hungarian_equals_scipy_on_80():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    costs = np.random.default_rng(0).normal(size=(80, 80))
    rows, cols = scipy_optimize.linear_sum_assignment(costs)
    assert costs[np.arange(80), hungarian(costs)].sum() == pytest.approx(costs[rows, cols].sum())


def test_assignment_beats_greedy_and_keeps_counts():
    """Text 0 slightly prefers class 0, text 1 needs it badly: filling in text order (greedy) gives
    0 + 10, the optimum 1 + 0. Each text's own cheapest class would break the counts."""
    costs = np.array([[0.0, 1.0], [0.0, 10.0]])
    assert assign_counts(costs, [1, 1]).tolist() == [1, 0]
    rng = np.random.default_rng(1)
    costs = rng.normal(size=(12, 4))
    costs[:, 0] -= 5  # every text prefers class 0
    codes = assign_counts(costs, [3, 3, 3, 3])
    assert np.bincount(codes, minlength=4).tolist() == [3, 3, 3, 3]
    best = min(costs[np.arange(12), np.repeat(np.arange(4), 3)[list(p)]].sum()
               for p in itertools.islice(itertools.permutations(range(12)), 20000))
    assert costs[np.arange(12), codes].sum() <= best + 1e-9
    with pytest.raises(LmlabError, match="add up to"):
        assign_counts(costs, [3, 3, 3, 2])


def test_costs_order_the_kinds():
    """A text's cheapest class follows its scores: no e -> no-e; ~γ green -> none; all green ->
    hard; in between -> soft."""
    rates = {"canonical": np.array([0.25, 0.25, 0.95, 0.6]), "resegmented": np.array([0.35, 0.35, 0.99, 0.75])}
    texts = [Features(300, 0, 100, 24, 0.25, 100, 30), Features(300, 35, 100, 26, 0.25, 100, 36),
             Features(300, 33, 100, 97, 0.25, 100, 100), Features(300, 30, 100, 62, 0.25, 100, 74),
             Features()]  # an empty text costs every class alike
    costs = class_costs(texts, rates)
    assert costs[:4].argmin(axis=1).tolist() == [1, 0, 2, 3] and np.ptp(costs[4]) == 0


# --- several schemes at once; texts the model ended -----------------------------------------------

class ForceEos:
    """End rows ``rows`` at their ``at``-th new token."""

    def __init__(self, eos: int, rows: list[int], at: int):
        self.eos, self.rows, self.at, self.start = eos, rows, at, None

    def __call__(self, input_ids, scores):
        self.start = self.start or input_ids.shape[1]
        if input_ids.shape[1] - self.start == self.at - 1:
            scores[self.rows] = float("-inf")
            scores[self.rows, self.eos] = 0.0
        return scores


@pytest.mark.parametrize("rows", [[], [1], [0, 2], [0, 1, 2]])
def test_sample_tokens_reports_the_texts_the_model_ended(model, rows):
    from lmlab.generate import SamplingConfig, sample, sample_tokens

    class Tok:  # ids in, ids out: enough of a tokenizer for sample_tokens
        eos_token_id = pad_token_id = 2

        def batch_decode(self, ids, skip_special_tokens=True):
            return [" ".join(str(i) for i in row if not (skip_special_tokens and i == 2)) for row in ids.tolist()]

    prompts = [[5, 900, 31], [6, 7, 8], [9, 10, 11]]
    config = SamplingConfig(max_new_tokens=8, batch_size=3, seed=3)
    out = sample_tokens(model, Tok(), prompts, config, logits_processors=[ForceEos(2, rows, 4)], progress=False)
    # sample_tokens sorts prompts by length (all 3 here: batch order = prompt order)
    assert [len(c.ids) for (c,) in out] == [3 if i in rows else 8 for i in range(3)]
    assert [c.ended_by_eos for (c,) in out] == [i in rows for i in range(3)]
    assert all(2 not in c.ids and c.text == " ".join(map(str, c.ids)) for (c,) in out)
    texts = sample(model, Tok(), prompts, config, logits_processors=[ForceEos(2, rows, 4)], progress=False)
    assert texts == [[c.text] for (c,) in out]  # sample: the same texts as before


def test_cli_generate_reports_texts_ended_by_eos(tiny_model_dir, tmp_path, capsys):
    import shutil

    # a model that ends texts often: one id in 25 is an end-of-text id of its generation config
    folder = tmp_path / "eager"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": list(range(2, 49152, 25))}))
    (tmp_path / "prompts.txt").write_text("The weather today\nOnce upon a time\nA list of fruit\n")
    out = tmp_path / "texts.npy"
    assert main(["watermark", "generate", "--schemes", "none,hard,soft", "--prompts", str(tmp_path / "prompts.txt"),
                 "--model", str(folder), "--max-new-tokens", "12", "--min-new-tokens", "2", "--output", str(out),
                 "--json", "--no-progress", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    tokens, early = summary["tokens"], summary["ended_early"]
    assert len(tokens) == len(np.load(out)) == 9
    assert 0 < len(early) < 9 and summary["ended_early_by_eos"] == len(early)
    assert {e["index"] for e in early} == {i for i, n in enumerate(tokens) if n < 12}
    assert all(2 <= e["tokens"] == tokens[e["index"]] < 12 for e in early)
    assert [e["scheme"] for e in early] == [["none", "hard", "soft"][e["index"] // 3] for e in early]
    assert summary["ended_early_by_scheme"] == {s: sum(e["scheme"] == s for e in early) for s in ("none", "hard", "soft")}
    lines = [line for line in captured.err.splitlines() if "ended by the model" in line]
    assert len(lines) == len(early) and f"after {early[0]['tokens']} of 12 tokens" in lines[0]


def test_cli_generate_several_schemes(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("The weather today\nOnce upon a time\n")
    out = tmp_path / "texts.npy"
    assert main(["watermark", "generate", "--schemes", "no-e,hard,soft", "--prompts", str(tmp_path / "prompts.txt"),
                 "--model", tiny_model_dir, "--max-new-tokens", "20", "--output", str(out), "--json",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    texts = np.load(out).tolist()
    assert summary["texts"] == len(texts) == 6 and summary["schemes"] == ["no-e", "hard", "soft"]
    assert set(summary["ended_early_by_scheme"]) == {"no-e", "hard", "soft"}
    assert summary["ended_early_by_eos"] == sum(summary["ended_early_by_scheme"].values())
    assert summary["tokens"] == [20] * 6 and summary["ended_early"] == []  # a random model: no end-of-text
    assert all("e" not in t.lower() for t in texts[:2])
    with pytest.raises(SystemExit) as stop:  # argparse: usage error, exit 2, before any model loads
        main(["watermark", "generate", "--schemes", "hard,bogus", "--prompts", str(tmp_path / "prompts.txt"),
              "--output", str(tmp_path / "x.npy")])
    assert stop.value.code == 2 and "got 'hard,bogus'" in capsys.readouterr().err
