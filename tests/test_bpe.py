"""Byte-level BPE: the same merges as the Hugging Face trainer (tie-breaking included), encode and
decode round trips, the saved tokenizer.json loads in `tokenizers` and encodes alike, bad input."""

import json

import pytest
from conftest import SHARED

from lmlab import LmlabError
from lmlab.bpe import Tokenizer, to_text, train
from lmlab.cli import main

SAMPLE = ("The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!\n"
          "Ünïcödé wörds, 数字 123 4567, emoji 🎉🎉 and tabs\tand  double  spaces.\n") * 30
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
CORPORA = {"sample": SAMPLE}
if SHAKESPEARE.exists():
    CORPORA["shakespeare-100k"] = SHAKESPEARE.read_text()[:100_000]


def hf_merges(text: str, vocab_size: int) -> list[tuple[str, str]]:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return [tuple(m) for m in json.loads(hf.to_str())["model"]["merges"]]


@pytest.mark.parametrize("corpus", list(CORPORA))
@pytest.mark.parametrize("vocab_size", [300, 600])
def test_merges_equal_the_hugging_face_trainer(corpus, vocab_size):
    text = CORPORA[corpus]
    tok = train(text, vocab_size)
    assert [(to_text(a), to_text(b)) for a, b in tok.merges] == hf_merges(text, vocab_size)


def test_counts_are_the_pair_frequencies():
    """'aaab' x 3 and 'ab' x 2 as pre-tokens: (a, a) occurs 2 x 3 = 6 times, (a, b) 3 + 2 = 5."""
    tok = train("aaab aaab aaab ab ab", 258)
    assert tok.merges[0] == (b"a", b"a") and tok.counts[0] == 6


@pytest.mark.parametrize("text", ["", "a", "hello world", "  leading and trailing  ", "emoji 🎉 ünïcödé 数字\n\t",
                                  "\x00\x01 control", "a" * 500])
def test_round_trip(text):
    tok = train(SAMPLE, 400)
    assert tok.decode(tok.encode(text)) == text


def test_encoding_applies_merges_in_rank_order():
    tok = train(SAMPLE, 400)
    ids = tok.encode(" the fox")
    assert [tok.tokens[i] for i in ids] == [b" the", b" fox"]  # both frequent words became single tokens


def test_save_load_and_hugging_face_interop(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    tok = train(SAMPLE, 400)
    tok.save(tmp_path / "bpe")
    again = Tokenizer.load(tmp_path / "bpe")
    assert again.merges == tok.merges and again.vocab_size == tok.vocab_size == 256 + len(tok.merges)
    vocab = json.loads((tmp_path / "bpe" / "vocab.json").read_text())
    assert len(vocab) == tok.vocab_size and vocab["Ġ"] == 32 and max(vocab.values()) == tok.vocab_size - 1
    hf = HFTokenizer.from_file(str(tmp_path / "bpe" / "tokenizer.json"))
    text = "The lazy dog, 数字 🎉 and the fox."
    assert hf.encode(text).ids == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text


def test_cli_train_encode_decode(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE)
    assert main(["bpe", "train", str(corpus), "--vocab-size", "300", "--output", str(tmp_path / "t"), "--json",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["merges"] == 44
    assert main(["bpe", "encode", "--tokenizer", str(tmp_path / "t"), "--text", "the fox", "--json"]) == 0
    ids = json.loads(capsys.readouterr().out)["ids"]
    assert main(["bpe", "decode", "--tokenizer", str(tmp_path / "t"), ",".join(map(str, ids))]) == 0
    assert capsys.readouterr().out == "the fox\n"


@pytest.mark.parametrize("content,vocab,message", [
    (b"", "300", "is empty"), (b"\xff\xfe\x00bad", "300", "not UTF-8"), (b"fine text", "100", "at least 256"),
    (b"fine text", "abc", "expected a positive integer"), (b"fine text", "-3", "expected a positive integer"),
])
def test_bad_input(tmp_path, capsys, content, vocab, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    try:
        code = main(["bpe", "train", str(corpus), "--vocab-size", vocab, "--output", str(tmp_path / "t")])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and not (tmp_path / "t").exists()


def test_decode_rejects_unknown_ids(tmp_path):
    tok = train(SAMPLE, 300)
    with pytest.raises(LmlabError, match="0..299"):
        tok.decode([5, 300])
