"""Watermarks: green lists equal the reference implementation's (re-derived here) and transformers';
the processors ban / penalise exactly the red ids (padding columns included); detection agrees with
the reference and transformers' detectors both ways; no-e text has no e; the classifier tells the
four kinds apart on a tiny model's generations, also under known counts per kind; bad input ends in
one line and no file. Other seeding schemes and user green lists: test_watermark_schemes.py."""

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.generate import SamplingConfig, sample
from lmlab.io import read_texts
from lmlab.models import build_model, preset_config
from lmlab.watermark import (
    GreenLists,
    NoELogitsProcessor,
    RedListConfig,
    RedListLogitsProcessor,
    banned_mask,
    classify_counts,
    classify_text,
    classify_texts,
    detect_ids,
    green_ids,
    make_processor,
    p_value,
    text_ids,
    z_score,
)

KEY = 15485863


# --- the reference implementation (jwkirchenbauer/lm-watermarking, simple_1), re-derived -------

def reference_greenlist(prev: int, vocab_size: int, gamma: float, key: int = KEY) -> torch.Tensor:
    """``WatermarkBase._seed_rng`` (seed = hash_key * prev token) + ``_get_greenlist_ids``."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed(key * prev)
    return torch.randperm(vocab_size, device="cpu", generator=rng)[:int(vocab_size * gamma)]


def reference_score(ids: list[int], vocab_size: int, gamma: float, ignore_repeated_bigrams: bool):
    """``WatermarkDetector._score_sequence``: (tokens scored, green count, z)."""
    if ignore_repeated_bigrams:
        table = {b: b[1] in reference_greenlist(b[0], vocab_size, gamma).tolist() for b in Counter(itertools.pairwise(ids))}
        scored, green = len(table), sum(table.values())
    else:
        scored = len(ids) - 1
        green = sum(ids[i] in reference_greenlist(ids[i - 1], vocab_size, gamma).tolist() for i in range(1, len(ids)))
    return scored, green, (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))


@pytest.fixture(scope="module")
def tokenizer():
    from lmlab.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    return build_model(preset_config("tiny-llama"))  # std-0.02 weights: a near-uniform, high-entropy sampler


@pytest.mark.parametrize("prev,vocab,gamma,key", [(0, 100, 0.25, KEY), (17, 50257, 0.25, KEY),
                                                  (49151, 49152, 0.5, KEY), (3, 1000, 0.1, 42)])
def test_green_list_is_the_reference_one(prev, vocab, gamma, key):
    config = RedListConfig(vocab_size=vocab, gamma=gamma, key=key)
    assert torch.equal(green_ids(prev, config), reference_greenlist(prev, vocab, gamma, key))
    mask = GreenLists(config).mask(prev)
    assert mask.sum() == int(vocab * gamma) and mask[reference_greenlist(prev, vocab, gamma, key)].all()


def test_green_list_cache_is_bounded_and_exact():
    config = RedListConfig(vocab_size=500)
    lists = GreenLists(config, capacity=3)
    for prev in [5, 6, 7, 8, 5, 9]:
        assert torch.equal(lists.mask(prev).nonzero().flatten(), green_ids(prev, config).sort().values)
    assert len(lists._caches[torch.device("cpu")]) == 3


def test_processors_match_transformers_and_keep_padding_red():
    """Soft: the same distribution as transformers' WatermarkLogitsProcessor (which adds δ to green
    logits); hard: red ids at -inf, green untouched. Logits 8 columns wider than |V| = 300."""
    from transformers.generation import WatermarkLogitsProcessor

    vocab, width = 300, 308
    config = RedListConfig(vocab_size=vocab)
    input_ids = torch.tensor([[4, 9, 11], [0, 2, 299], [7, 7, 7]])
    scores = torch.randn(3, width)
    theirs = WatermarkLogitsProcessor(vocab_size=vocab, device="cpu")(input_ids, scores[:, :vocab].clone())
    soft = RedListLogitsProcessor(config, hard=False)(input_ids, scores.clone())
    torch.testing.assert_close(soft[:, :vocab].softmax(-1), theirs.softmax(-1))
    assert torch.equal(soft[:, vocab:], scores[:, vocab:] - 2.0)
    hard = RedListLogitsProcessor(config, hard=True)(input_ids, scores.clone())
    for row, prev in enumerate(input_ids[:, -1].tolist()):
        green = torch.zeros(width, dtype=torch.bool)
        green[reference_greenlist(prev, vocab, 0.25)] = True
        assert torch.equal(hard[row, green], scores[row, green]) and torch.isneginf(hard[row, ~green]).all()


def test_meta_tensors_catch_a_device_mismatch():
    """The device tests below rely on torch refusing to mix a CPU mask with meta scores."""
    with pytest.raises(RuntimeError, match="device"):
        torch.empty(2, 5, device="meta").masked_fill(torch.zeros(5, dtype=torch.bool), 0.0)


@pytest.mark.parametrize("scheme", ["no-e", "hard", "soft"])
@pytest.mark.parametrize("extra", [4, -2])  # logits wider (padding rows) and narrower than |V|
def test_processors_follow_the_scores_device(tokenizer, scheme, extra):
    """Scores on another device (meta stands in for a GPU here): the result stays there, no
    device mismatch, and a second step reuses the masks already there (no per-step copy)."""
    processor = make_processor(scheme, tokenizer)
    width = len(tokenizer) + extra
    meta = torch.device("meta")
    # red lists read the previous ids (a GPU's would be read too); meta tensors hold no values
    input_ids = torch.tensor([[5, 17], [9, 17]], device="meta" if scheme == "no-e" else "cpu")
    for _ in range(2):
        out = processor(input_ids, torch.empty(2, width, device=meta))
        assert out.device == meta and out.shape == (2, width)
    if scheme == "no-e":
        assert set(processor._masks) == {(width, meta)}
        assert processor.mask(width, meta) is processor.mask(width, meta)
    else:
        cache = processor.lists._caches
        assert set(cache) == {meta} and set(cache[meta]) == {17}  # one copy per previous token, on meta only
        assert processor.lists.mask(17, meta) is cache[meta][17]


def test_green_lists_ignore_the_default_device():
    """Lists are drawn on the CPU generator whatever torch's default device, so generating on a GPU
    (or with a default device set) marks text with the reference's lists."""
    config = RedListConfig(vocab_size=1000)
    lists = GreenLists(config)
    with torch.device("meta"):
        ids = green_ids(17, config)
        mask = lists.mask(17)
        soft = RedListLogitsProcessor(config, hard=False, lists=lists)(torch.tensor([[17]], device="cpu"),
                                                                      torch.empty(1, 1000, device="meta"))
    assert ids.device.type == "cpu" and torch.equal(ids, reference_greenlist(17, 1000, 0.25))
    assert mask.device.type == "cpu" and torch.equal(mask.nonzero().flatten(), ids.sort().values)
    assert soft.device.type == "meta" and lists.mask(17, "meta").device.type == "meta"


@pytest.mark.parametrize("ignore_repeated", [False, True])
def test_detection_equals_reference_and_transformers(model, ignore_repeated):
    """Text watermarked by transformers' processor is scored by lmlab exactly as the reference and
    transformers' detector score it; and text watermarked by lmlab is flagged by transformers."""
    from transformers import WatermarkDetector, WatermarkingConfig

    vocab = model.config.vocab_size
    config = RedListConfig(vocab_size=vocab)
    prompt = torch.tensor([[5, 900, 31, 7]])
    torch.manual_seed(0)
    theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                            max_new_tokens=40, watermarking_config=WatermarkingConfig(), pad_token_id=0)
    ours = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, max_new_tokens=40,
                          logits_processor=[RedListLogitsProcessor(config, hard=False)], pad_token_id=0)
    detector = WatermarkDetector(model.config, "cpu", WatermarkingConfig(), ignore_repeated_ngrams=ignore_repeated)
    for sequence in (theirs[0], ours[0]):
        ids = sequence[4:].tolist()
        mine = detect_ids(ids, GreenLists(config), ignore_repeated)
        assert (mine.scored, mine.green, pytest.approx(mine.z)) == reference_score(ids, vocab, 0.25, ignore_repeated)
        out = detector(torch.tensor([ids]), return_dict=True)
        assert (mine.scored, mine.green) == (out.num_tokens_scored[0], out.num_green_tokens[0])
        assert mine.z == pytest.approx(out.z_score[0]) and mine.z > 4


@pytest.mark.parametrize("green,scored,gamma,z", [(25, 100, 0.25, 0.0), (100, 100, 0.25, 75 / math.sqrt(18.75)),
                                                  (0, 12, 0.5, -6 / math.sqrt(3))])
def test_z_score(green, scored, gamma, z):
    assert z_score(green, scored, gamma) == pytest.approx(z)
    assert p_value(0.0) == pytest.approx(0.5) and p_value(4.0) == pytest.approx(3.167e-5, rel=1e-3)


def test_no_e_bans_exactly_the_tokens_with_e(tokenizer):
    mask = banned_mask(tokenizer)
    pieces = {i: tokenizer.decode([i]) for i in range(0, len(tokenizer), 97)}
    for i, text in pieces.items():
        if i not in tokenizer.all_special_ids:
            assert bool(mask[i]) == ("e" in text or "E" in text), (i, text)
    assert not mask[tokenizer.eos_token_id]
    wide = NoELogitsProcessor(tokenizer)(torch.tensor([[1]]), torch.zeros(1, len(tokenizer) + 4))
    assert torch.isneginf(wide[0, len(tokenizer):]).all() and torch.isneginf(wide[0, :len(tokenizer)]).sum() == mask.sum()


@pytest.fixture(scope="module")
def generations(model, tokenizer):
    """Six 100-token texts per scheme from the tiny model, decoded to strings."""
    prompts = ["The weather today", "Once upon a time", "In 1850, the city", "My favourite food",
               "Scientists have found", "The best way to learn"]
    config = SamplingConfig(max_new_tokens=100, min_new_tokens=100, seed=3)
    texts = {}
    for scheme in ("none", "no-e", "hard", "soft"):
        processor = make_processor(scheme, tokenizer)
        out = sample(model, tokenizer, prompts, config, logits_processors=[processor] if processor else [],
                     progress=False)
        texts[scheme] = [t[0] for t in out]
    return texts


def test_no_e_generations_have_no_e(generations):
    assert all("e" not in t.lower() for t in generations["no-e"])
    assert all("e" in t.lower() for t in generations["none"])


def test_classifier_tells_the_four_kinds_apart(generations, tokenizer):
    """From the decoded strings. A random model's text re-tokenises differently from the sampled
    ids every few tokens (word pieces glued into other words, broken UTF-8), which leaves hard
    text only 79-93 % green on its canonical ids: the resegmentation must recover it."""
    for code, scheme in enumerate(("none", "no-e", "hard", "soft"), 1):
        decisions = classify_texts(generations[scheme], tokenizer)
        assert [d.code for d in decisions] == [code] * 6, (scheme, [d.reason for d in decisions])


def test_known_counts_are_met_exactly_and_correctly(generations, tokenizer):
    """Six texts per kind and the counts 6,6,6,6: every text gets its kind (an optimal assignment,
    never undetermined); lopsided counts are met exactly too, with an empty text among them."""
    texts = [t for scheme in ("none", "no-e", "hard", "soft") for t in generations[scheme]]
    decisions = classify_counts(texts, tokenizer, [6, 6, 6, 6])
    assert [d.code for d in decisions] == [1] * 6 + [2] * 6 + [3] * 6 + [4] * 6, [d.reason for d in decisions]
    lopsided = classify_counts(texts[:12] + [""], tokenizer, [7, 6, 0, 0])  # the empty text fills the gap
    assert [d.code for d in lopsided] == [1] * 6 + [2] * 6 + [1]
    with pytest.raises(LmlabError, match="add up to 23"):
        classify_counts(texts, tokenizer, [6, 6, 6, 5])


@pytest.mark.parametrize("text,reason", [("", "empty"), ("   \n", "empty"), ("a", "need at least 2"),
                                         ("\x00", "need at least 2"), ("ok \udcff ok", "not valid Unicode")])
def test_undetermined_texts(tokenizer, text, reason):
    d = classify_text(text, tokenizer, GreenLists(RedListConfig(vocab_size=len(tokenizer))))
    assert d.code == 0 and reason in d.reason


def test_text_ids_match_what_the_reference_detector_scores(tokenizer):
    ids = text_ids(tokenizer, "Hello there, wörld 🎉")
    assert ids == tokenizer("Hello there, wörld 🎉", add_special_tokens=False)["input_ids"] and len(ids) > 3


@pytest.mark.parametrize("name,content", [
    ("t.json", json.dumps(["one text", "two"])), ("t.json", json.dumps({"texts": ["one text", "two"]})),
    ("t.jsonl", '{"text": "one text"}\n{"text": "two"}\n'), ("t.txt", "one text\ntwo\n"),
])
def test_read_texts_shapes(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    assert read_texts(tmp_path / name) == ["one text", "two"]
    np.save(tmp_path / "t.npy", np.array(["one text", "two"]))
    assert read_texts(tmp_path / "t.npy") == ["one text", "two"]


@pytest.mark.parametrize("name,content,message", [
    ("bad.json", '{"nope": 1}', "list of strings"), ("bad.json", "[1, 2]", "list of strings"),
    ("bad.jsonl", '{"txt": "x"}\n', "'text' field"), ("bad.json", "{", "not valid JSON"),
])
def test_classify_bad_file_is_one_line_and_no_output(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_text(content)
    out = tmp_path / "guesses.npy"
    assert main(["watermark", "classify", "--input", str(tmp_path / name), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists() and not out.with_suffix(".json").exists()


def test_cli_generate_classify_detect(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("The weather today\nOnce upon a time\n")
    texts = []
    for scheme in ("none", "no-e", "hard", "soft"):
        out = tmp_path / f"{scheme}.jsonl"
        assert main(["watermark", "generate", "--scheme", scheme, "--prompts", str(tmp_path / "prompts.txt"),
                     "--model", tiny_model_dir, "--max-new-tokens", "100", "--min-new-tokens", "100", "--samples", "2",
                     "--seed", "1", "--output", str(out), "--no-progress"]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 4 and {r["scheme"] for r in rows} == {scheme}
        texts += [r["text"] for r in rows]
    np.save(tmp_path / "texts.npy", np.array(texts))
    guesses = tmp_path / "guesses.npy"
    capsys.readouterr()
    assert main(["watermark", "classify", "--input", str(tmp_path / "texts.npy"), "--model", tiny_model_dir,
                 "--output", str(guesses), "--json", "--no-progress"]) == 0
    assert np.load(guesses).tolist() == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    report = json.loads((tmp_path / "guesses.json").read_text())
    assert report["counts"]["hard"] == 4 and "z" in report["texts"][8]
    assert main(["watermark", "classify", "--input", str(tmp_path / "texts.npy"), "--model", tiny_model_dir,
                 "--output", str(guesses), "--overwrite", "--no-progress", "--balanced", "4"]) == 0
    assert np.load(guesses).tolist() == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    capsys.readouterr()
    assert main(["watermark", "classify", "--input", str(tmp_path / "texts.npy"), "--model", tiny_model_dir,
                 "--output", str(tmp_path / "other.npy"), "--counts", "4,4,4,3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "add up to 15" in err[0] and not (tmp_path / "other.npy").exists()
    capsys.readouterr()
    assert main(["watermark", "detect", "--input", str(tmp_path / "texts.npy"), "--model", tiny_model_dir,
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["texts"]
    assert [r["watermarked"] for r in rows] == [False] * 8 + [True] * 8


@pytest.mark.parametrize("device,message", [
    ("tpu", "device must be one of"),
    pytest.param("cuda", "--device cuda: this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_cli_generate_missing_device_is_one_line(tmp_path, capsys, device, message):
    (tmp_path / "prompts.txt").write_text("The weather today\n")
    out = tmp_path / "soft.jsonl"
    assert main(["watermark", "generate", "--scheme", "soft", "--prompts", str(tmp_path / "prompts.txt"),
                 "--output", str(out), "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmlab: error: ") and message in err[0], err
    assert not out.exists()


def test_greenest_segmentation_recovers_the_sampled_ids(model, tokenizer):
    """Hard-watermarked ids whose decoded text re-tokenises differently: the greenest segmentation
    decodes to the same text and is all green, while the canonical ids are not."""
    from lmlab.watermark.resegment import greenest_ids

    config = RedListConfig(vocab_size=len(tokenizer))
    lists = GreenLists(config)
    prompt = torch.tensor([tokenizer("The weather today")["input_ids"]])
    torch.manual_seed(3)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, max_new_tokens=60,
                         min_new_tokens=60, logits_processor=[RedListLogitsProcessor(config, hard=True, lists=lists)],
                         pad_token_id=tokenizer.pad_token_id)
    sampled = out[0, prompt.shape[1]:].tolist()
    text = tokenizer.decode(sampled)
    canonical = text_ids(tokenizer, text)
    assert canonical != sampled and detect_ids(canonical, lists).green_fraction < 1
    ids = greenest_ids(text, tokenizer, lists)
    assert tokenizer.decode(ids) == text
    assert detect_ids(ids, lists).green_fraction >= detect_ids(sampled, lists).green_fraction - 0.02


def test_classify_never_overwrites_its_input(tiny_model_dir, tmp_path):
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(["a first text to classify", "and a second one"]))
    assert main(["watermark", "classify", "--input", str(texts), "--model", tiny_model_dir,
                 "--output", str(tmp_path / "texts.npy"), "--no-progress"]) == 0
    assert read_texts(texts) == ["a first text to classify", "and a second one"]
    assert json.loads((tmp_path / "texts.scores.json").read_text())["counts"]["none"] == 2
