"""Fuzzed input (issue #15 section 5): random bytes, Unicode, numbers and paths through the readers,
the CLI's arguments, the watermark detector and the inversion's target loader. Every case ends in a
result or in one ``LmlabError`` (from the CLI: one line on stderr, exit status 2), never a traceback
and never a partial output file. Derandomised (same examples on every run) and small (< 60 s)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmlab.cli import main
from lmlab.errors import LmlabError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=15)

# --- strategies ------------------------------------------------------------------------------------

# Unicode of every category, surrogates and NUL included (they cannot always be written as UTF-8)
any_text = st.text(st.characters(codec=None), max_size=40)
utf8_text = st.text(st.characters(codec="utf-8"), max_size=40)
odd = st.sampled_from(["", " ", "\x00", "\u2028", "\ufeff", "\U0001F600", "é", "\u202e", "٣", "1" * 5000,
                       "x" * 200_000, "[" * 100_000, "\r\n", "\\", '"', ","])
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), utf8_text, odd)
json_value = st.recursive(json_scalar, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                              st.dictionaries(utf8_text, kids, max_size=3)),
                          max_leaves=6)
# a row with some of the expected fields (any JSON in them), missing ones, and extra ones
FIELDS = ["text", "label", "prompt", "chosen", "rejected", "post", "summary", "question", "answer"]
row = st.dictionaries(st.one_of(st.sampled_from(FIELDS), utf8_text), json_value, max_size=5)


def _json_line(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


# a line of a .jsonl: a row, other JSON, an odd string, or raw bytes (invalid UTF-8 included)
jsonl_line = st.one_of(row.map(_json_line), json_value.map(_json_line), odd.map(lambda s: s.encode()),
                       st.binary(max_size=30), st.just(b"{" * 50_000), st.just(b'{"text": ' + b"9" * 5000 + b"}"))
jsonl_bytes = st.lists(jsonl_line, max_size=6).map(lambda lines: b"\n".join(lines))
csv_bytes = st.lists(st.one_of(st.lists(st.one_of(utf8_text, odd), max_size=4).map(
    lambda cells: ",".join(cells).encode("utf-8", "surrogatepass")), st.binary(max_size=30)), max_size=6).map(
    lambda lines: b"\n".join(lines))
number_text = st.one_of(st.integers().map(str), st.floats().map(repr), st.sampled_from(
    ["nan", "-nan", "inf", "-inf", "1e309", "-0", "0", "0.0", "1e-320", "1" * 5000, "0x10", "1_000", " 3 ", "٣",
     "", "--1", "+1", "1e", "½", "\x00", "1%", "-1%", "1,2", "1e10000%"]), utf8_text)

# --- helpers ---------------------------------------------------------------------------------------


def ok_or_lmlab_error(fn, *args, **kwargs):
    """``fn``'s result, or None when it raised LmlabError (anything else fails the test)."""
    try:
        return fn(*args, **kwargs)
    except LmlabError as exc:
        assert str(exc).strip(), "an LmlabError needs a message"
        return None


def run_cli(argv: list[str], capsys) -> int:
    """``main(argv)``: exit status 0, or 2 with exactly one line on stderr."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.endswith("\n") and "\n" not in err[:-1], err  # one line (a path may hold \x1e, \u2028)
    return code


def write(path, data: bytes):
    path.write_bytes(data)
    return path


# --- data readers ----------------------------------------------------------------------------------


@FUZZ
@given(data=jsonl_bytes)
def test_read_jsonl(tmp_path_factory, data):
    from lmlab.data import read_jsonl

    rows = ok_or_lmlab_error(read_jsonl, write(tmp_path_factory.mktemp("j") / "x.jsonl", data))
    assert rows is None or all(isinstance(r, dict) for r in rows)


@FUZZ
@given(data=csv_bytes)
def test_read_csv(tmp_path_factory, data):
    from lmlab.data import _read_csv

    rows = ok_or_lmlab_error(_read_csv, write(tmp_path_factory.mktemp("c") / "x.csv", data))
    assert rows is None or all(isinstance(r, dict) for r in rows)


@pytest.mark.parametrize("content", [b"text,label\n" + b"x" * 200_000 + b",1\n", b'text,label\n"open,1\n',
                                     b"text,label\n\x00,\xff\n", b"", b"\n\n\n", b"text\n" + b"y,z," * 10_000])
def test_read_csv_cases(tmp_path, content):
    from lmlab.data import _read_csv

    rows = ok_or_lmlab_error(_read_csv, write(tmp_path / "x.csv", content))
    assert rows is None or all(isinstance(r, dict) for r in rows)


@FUZZ
@given(rows=st.lists(row, max_size=4), csv=st.booleans(), splits=st.sampled_from([("train",), ("test", "train")]))
def test_load_splits_on_a_folder(tmp_path_factory, rows, csv, splits):
    from lmlab.data import TaskFormat, load_splits

    folder = tmp_path_factory.mktemp("d")
    for split in ("train", "validation"):  # no test file: one of the errors
        if csv:
            import csv as csv_module

            with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8", errors="surrogatepass") as f:
                columns = sorted({k for r in rows for k in r}) or ["text"]
                writer = csv_module.writer(f)
                writer.writerow(columns)
                writer.writerows([[json.dumps(r.get(c)) if not isinstance(r.get(c), str) else r[c]
                                   for c in columns] for r in rows])
        else:
            (folder / f"{split}.jsonl").write_bytes(b"\n".join(_json_line(r) for r in rows))
    out = ok_or_lmlab_error(load_splits, str(folder), TaskFormat(), splits)
    assert out is None or all(isinstance(e.text, str) and e.label in (0, 1) for s in out.values() for e in s)


label_value = st.one_of(json_scalar, st.sampled_from(["0", "1", "-0", " 1 ", "²", "٣", "1" * 5000, "1e0", "positive",
                                                      "negative", "1.0", "-1", "01"]))
classification_row = st.fixed_dictionaries({}, optional={"text": st.one_of(utf8_text, json_value), "label": label_value,
                                                         "extra": json_value})


@FUZZ
@given(rows=st.lists(st.one_of(classification_row, row), max_size=5), words=st.lists(st.one_of(utf8_text, odd), min_size=2, max_size=3, unique=True))
def test_to_examples(rows, words):
    from lmlab.data import TaskFormat, _to_examples

    fmt = ok_or_lmlab_error(TaskFormat, label_words=tuple(words))
    assume(fmt is not None)
    out = ok_or_lmlab_error(_to_examples, rows, fmt, "fuzz")
    assert out is None or all(0 <= e.label < len(words) for e in out)


@FUZZ
@given(data=st.one_of(jsonl_bytes, csv_bytes, st.binary(max_size=60)),
       suffix=st.sampled_from([".json", ".jsonl", ".txt", ".npy", ""]))
def test_read_texts_and_read_json(tmp_path_factory, data, suffix):
    from lmlab.io import read_json, read_texts

    path = write(tmp_path_factory.mktemp("t") / f"x{suffix}", data)
    texts = ok_or_lmlab_error(read_texts, path)
    assert texts is None or all(isinstance(t, str) for t in texts)
    ok_or_lmlab_error(read_json, path)


arrays = st.one_of(
    st.lists(st.one_of(utf8_text, odd), max_size=4).map(np.array),
    st.lists(st.binary(max_size=8), max_size=4).map(lambda b: np.array(b, dtype="S8")),  # invalid UTF-8 bytes
    st.lists(st.floats(), max_size=4).map(np.array),
    st.lists(st.integers(-9, 9), max_size=4).map(np.array),
    st.just(np.zeros((2, 2), dtype="U3")), st.just(np.array("one string")), st.just(np.zeros(0, dtype="U1")),
    st.just(np.array([1 + 2j])), st.just(np.array([True])),
)


@FUZZ
@given(array=arrays)
def test_read_texts_npy_of_anything(tmp_path_factory, array):
    from lmlab.io import read_texts

    path = tmp_path_factory.mktemp("n") / "x.npy"
    np.save(path, array)
    texts = ok_or_lmlab_error(read_texts, path)
    assert texts is None or all(isinstance(t, str) for t in texts)


def test_readers_given_a_folder_or_nothing(tmp_path):
    from lmlab.data import read_jsonl
    from lmlab.dpo import read_pairs
    from lmlab.io import read_json, read_texts
    from lmlab.prompting import load_problems
    from lmlab.sft import SftData, read_corpus
    from lmlab.sft import read_pairs as read_sft_pairs

    (tmp_path / "dir.jsonl").mkdir()
    for missing in (tmp_path / "dir.jsonl", tmp_path / "nope.jsonl", tmp_path / "a\u202eb\x01.json"):
        for reader in (read_texts, read_json, read_pairs, read_corpus):
            with pytest.raises(LmlabError):
                reader(missing)
        with pytest.raises(LmlabError):
            read_sft_pairs(SftData(source=str(missing)))
    (tmp_path / "train.jsonl").mkdir()  # a folder where the split file should be
    for call in (lambda: load_problems(str(tmp_path), "train"), lambda: read_jsonl(tmp_path / "train.jsonl")):
        with pytest.raises(LmlabError):
            call()


@FUZZ
@given(data=jsonl_bytes)
def test_dpo_read_pairs(tmp_path_factory, data):
    from lmlab.dpo import read_pairs

    rows = ok_or_lmlab_error(read_pairs, write(tmp_path_factory.mktemp("p") / "pairs.jsonl", data))
    assert rows is None or all(isinstance(r[k], str) for r in rows for k in ("prompt", "chosen", "rejected"))


@FUZZ
@given(data=st.one_of(st.binary(max_size=60), utf8_text.map(lambda s: s.encode("utf-8", "surrogatepass")),
                      odd.map(str.encode)))
def test_sft_read_corpus(tmp_path_factory, data):
    from lmlab.sft import read_corpus

    text = ok_or_lmlab_error(read_corpus, write(tmp_path_factory.mktemp("s") / "corpus.txt", data))
    assert text is None or text.strip()


@FUZZ
@given(train=jsonl_bytes, val=jsonl_bytes, folder=st.booleans())
def test_sft_read_pairs(tmp_path_factory, train, val, folder):
    from lmlab.sft import SftData, read_pairs

    where = tmp_path_factory.mktemp("s")
    if folder:
        write(where / "train.jsonl", train), write(where / "validation.jsonl", val)
        source = where
    else:
        source = write(where / "all.jsonl", train + b"\n" + val)
    out = ok_or_lmlab_error(read_pairs, SftData(source=str(source)))
    assert out is None or all(r["post"].strip() and r["summary"].strip() for rows in out for r in rows)


answers = st.one_of(json_value, st.builds(lambda a, b: f"{a}####{b}", st.one_of(utf8_text, odd),
                                          st.one_of(utf8_text, odd, number_text)))
problem = st.dictionaries(st.sampled_from(["question", "answer", "x"]), st.one_of(answers, json_value), max_size=3)


@FUZZ
@given(rows=st.lists(problem, max_size=4), raw=st.one_of(st.none(), jsonl_bytes))
def test_prompting_load_problems(tmp_path_factory, rows, raw):
    from lmlab.prompting import load_problems, parse_problem

    folder = tmp_path_factory.mktemp("g")
    write(folder / "train.jsonl", raw if raw is not None else b"\n".join(_json_line(r) for r in rows))
    problems = ok_or_lmlab_error(load_problems, str(folder), "train")
    assert problems is None or all(p.answer for p in problems)
    for r in rows:
        ok_or_lmlab_error(parse_problem, r, "row")


# --- CLI arguments ---------------------------------------------------------------------------------


@FUZZ
@given(text=number_text)
def test_argument_types(text):
    import argparse

    from lmlab.cli import _args

    for kind in (_args.positive_int, _args.nonnegative_int, _args.positive_float, _args.nonnegative_float,
                 _args._max_grad_norm):
        try:
            value = kind(text)
        except argparse.ArgumentTypeError:
            continue
        assert value is None or np.isfinite(value) and value >= 0


FINETUNE = ["--batch-size", "--lr", "--rank", "--alpha", "--lora-dropout", "--epochs", "--max-iters",
            "--grad-accum", "--dropout", "--max-length", "--block-size", "--val-fraction", "--bottleneck",
            "--prefix-length", "--max-grad-norm", "--eval-interval"]


@FUZZ
@given(options=st.dictionaries(st.sampled_from(FINETUNE), number_text, min_size=1, max_size=3))
def test_finetune_numbers_are_refused_before_any_work(options, capsys):
    """Parsed and checked as finetune does first (no model, no data): a usage error or one LmlabError."""
    from lmlab.cli import build_parser, finetune_config

    argv = ["finetune", "--model", "tiny-llama", *[x for kv in options.items() for x in kv]]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        return
    ok_or_lmlab_error(lambda: finetune_config(args).check())


SAMPLING = ["--max-new-tokens", "--min-new-tokens", "--temperature", "--top-p", "--top-k", "--samples",
            "--batch-size", "--seed"]


@FUZZ
@given(options=st.dictionaries(st.sampled_from(SAMPLING), number_text, min_size=1, max_size=3),
       gamma=st.one_of(st.none(), number_text), delta=st.one_of(st.none(), number_text))
def test_sampling_and_red_list_numbers(options, gamma, delta, capsys):
    from lmlab.cli import build_parser
    from lmlab.cli._args import sampling_config
    from lmlab.cli.watermark import _redlist

    extra = [*(["--gamma", gamma] if gamma is not None else []), *(["--delta", delta] if delta is not None else [])]
    argv = ["watermark", "generate", "--scheme", "soft", "--prompts", "p.txt", "--output", "o.jsonl",
            *[x for kv in options.items() for x in kv], *extra]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        return
    ok_or_lmlab_error(sampling_config, args)
    ok_or_lmlab_error(_redlist, args, range(100))  # only len(tokenizer) is read


@FUZZ
@given(budget=st.one_of(number_text, st.builds(lambda n, u: f"{n}{u}", number_text,
                                                st.sampled_from(["GB", "TiB", "kb", "b", "PB", "xB", " gb"]))),
       rank=number_text, tasks=number_text, bpp=st.one_of(st.none(), number_text),
       model=st.sampled_from(["gpt3-175b", "llama-7b", "tiny-gpt2", "no-such-model", "/nope/x", "a\u202eb"]))
def test_memory_budget_and_numbers(budget, rank, tasks, bpp, model, capsys):
    argv = ["memory", "--model", model, "--budget", budget, "--rank", rank, "--tasks", tasks, "--json",
            *(["--bytes-per-param", bpp] if bpp is not None else [])]
    run_cli(argv, capsys)


SCALING = ["--params", "--tokens", "--compute", "--unique-tokens", "--target-loss", "--loss-change",
           "--params-scale", "--split-exponents", "--E", "--A", "--B", "--alpha", "--beta"]


@FUZZ
@given(options=st.dictionaries(st.sampled_from(SCALING), number_text, min_size=1, max_size=4),
       text=st.booleans())
def test_scaling_numbers(options, text, capsys):
    argv = ["scaling", *[x for kv in options.items() for x in (kv[0] + "=" + kv[1],)],
            *([] if text else ["--json"])]
    run_cli(argv, capsys)


@settings(FUZZ, max_examples=8)
@given(rank=number_text, method=st.sampled_from(["lora", "adapter", "prefix", "bitfit", "full"]),
       other=st.sampled_from(["--bottleneck", "--prefix-length", "--alpha", "--prefix-hidden"]), value=number_text)
def test_params_numbers(rank, method, other, value, capsys):
    run_cli(["params", "--model", "tiny-gpt2", "--method", method, f"--rank={rank}", f"{other}={value}", "--json"],
            capsys)


odd_name = st.text(st.characters(codec="utf-8", exclude_characters="/\x00\n\r"), min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))


@FEW
@given(name=odd_name, kind=st.sampled_from(["missing", "folder", "file"]),
       command=st.sampled_from(["detect", "classify", "rouge", "scaling-fit", "plot"]))
def test_paths(tmp_path_factory, name, kind, command, capsys):
    """Odd, missing and folder paths where files are expected: one line, exit 2, no output left."""
    assume(command != "plot" or kind != "missing")  # a new file: a plot is drawn (seconds), nothing to refuse
    where = tmp_path_factory.mktemp("paths")
    path = where / name
    if kind == "folder":
        path.mkdir()
    elif kind == "file":
        path.write_bytes(b"\xff\xfe not text \x00")
    out = where / "out" / "guesses.npy"
    argv = {"detect": ["watermark", "detect", "--input", str(path)],
            "classify": ["watermark", "classify", "--input", str(path), "--output", str(out)],
            "rouge": ["evaluate", "--task", "summarization", "--predictions", str(path), "--references", str(path),
                      "--output", str(out.with_suffix(".json"))],
            "scaling-fit": ["scaling", "fit", "--runs", str(path), "--bootstrap", "0"],
            "plot": ["scaling", "--compute", "1e20", "--plot", str(path / "p.png") if kind == "file" else str(path)],
            }[command]
    code = run_cli(argv, capsys)
    if code == 2:
        assert not out.exists() and not out.with_suffix(".json").exists()


# Found by fuzzing: sizes and laws beyond floating point, refused in one line.
KNOWN = [
    pytest.param(["memory", "--budget", "1e999GB"], id="memory-infinite-budget"),  # calc/memory.py: int(nan)
    pytest.param(["memory", "--budget", "1e300PB"], id="memory-overflowing-budget"),  # 1e315 bytes is inf
    pytest.param(["scaling", "--params", "1e300", "--tokens", "1e300", "--alpha", "1e10"],
                 id="scaling-overflow"),  # calc/scaling.py: N ** alpha raises OverflowError
    pytest.param(["scaling", "--compute", "1e308", "--alpha", "1e-300"], id="scaling-zero-division"),
]


@pytest.mark.parametrize("argv", KNOWN)
def test_calculator_numbers_beyond_floating_point(argv, capsys):
    assert run_cli(argv, capsys) == 2


# --- watermark inputs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from lmlab.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")  # embedded, offline


watermark_text = st.one_of(any_text, odd.filter(lambda t: len(t) < 1000),
                           st.text(st.characters(codec="utf-8"), min_size=40, max_size=120))
_LISTS: dict = {}  # green lists per (gamma, scheme), shared by the examples (each list costs a permutation)


@settings(FUZZ, max_examples=30)
@given(text=watermark_text, gamma=st.sampled_from([0.25, 0.5]),  # selfhash: ~10 s a random text (minhash per token)
       scheme=st.sampled_from(["simple_1", "hf-selfhash"]))
def test_detect_and_classify_any_text(tokenizer, text, gamma, scheme):
    from lmlab.watermark import ClassifyConfig, GreenLists, RedListConfig, classify_text, detect_text

    key = (gamma, scheme)
    if key not in _LISTS:
        _LISTS[key] = GreenLists(RedListConfig(vocab_size=len(tokenizer), gamma=gamma, seeding_scheme=scheme))
    lists = _LISTS[key]
    d = ok_or_lmlab_error(classify_text, text, tokenizer, lists, ClassifyConfig())
    assert d is None or d.code in (0, 1, 2, 3, 4)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return
    stats = ok_or_lmlab_error(detect_text, text, tokenizer, lists)
    assert stats is None or 0 <= stats.green <= stats.scored


@pytest.mark.parametrize("text", ["e" * 100_000, "a b " * 20_000, "x" * 200_000], ids=["e", "ab", "x"])
def test_classify_huge_texts(tokenizer, text):
    from lmlab.watermark import GreenLists, RedListConfig, classify_text

    d = classify_text(text, tokenizer, GreenLists(RedListConfig(vocab_size=len(tokenizer))))
    assert d.code in (0, 1, 2, 3, 4) and "\n" not in d.reason


@settings(FUZZ, max_examples=8)
@given(texts=st.lists(st.one_of(any_text, odd.filter(lambda t: len(t) < 1000)), min_size=1, max_size=3))
def test_classify_counts_any_texts(tokenizer, texts):
    """The known-counts classifier (a resegmentation per text, ~0.4 s each: few examples)."""
    from lmlab.watermark import classify_counts

    decisions = ok_or_lmlab_error(classify_counts, texts, tokenizer, [len(texts), 0, 0, 0])
    assert decisions is None or [d.code for d in decisions] == [1] * len(texts)


@FEW
@given(array=arrays, command=st.sampled_from(["detect", "classify"]),
       z=st.sampled_from(["4", "nan", "-inf", "1e309", "x"]))
def test_watermark_cli_on_npy_of_anything(tmp_path_factory, array, command, z, capsys):
    where = tmp_path_factory.mktemp("w")
    np.save(where / "texts.npy", array)
    out = where / "guesses.npy"
    argv = ["watermark", command, "--input", str(where / "texts.npy"), f"--z-threshold={z}", "--json",
            *(["--output", str(out), "--no-progress"] if command == "classify" else [])]
    if run_cli(argv, capsys) == 2:
        assert not out.exists() and not out.with_suffix(".json").exists()


# --- inversion targets -----------------------------------------------------------------------------

DIM = 8
shapes = st.sampled_from([(DIM,), (3, DIM), (0, DIM), (2, 0), (0,), (), (2, 3, DIM), (1, DIM + 1), (1, 1)])
special = st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e30, -1e30, 1e-40, 3e38, 1.0])
embedding_arrays = st.one_of(
    st.builds(lambda shape, fill, dtype: np.full(shape, fill).astype(dtype), shapes, special,
              st.sampled_from(["float16", "float32", "float64"])),
    st.builds(lambda shape, seed, dtype: np.random.default_rng(seed).normal(size=shape).astype(dtype), shapes,
              st.integers(0, 9), st.sampled_from(["float32", "float64", "int64", "bool", "complex64", ">f4"])),
    st.builds(lambda seed, i, v: _poke(np.random.default_rng(seed).normal(size=(3, DIM)), i, v), st.integers(0, 9),
              st.integers(0, 3 * DIM - 1), special),
)


def _poke(a, i, v):
    a.flat[i] = v
    return a.astype("float32")


def _save(array, path):
    if path.suffix == ".npy":
        np.save(path, array)
    elif path.suffix == ".pt":
        torch.save(torch.from_numpy(array.astype(array.dtype.newbyteorder("="))), path)
    else:
        from safetensors.numpy import save_file

        save_file({"e": np.ascontiguousarray(array.astype(array.dtype.newbyteorder("=")))}, str(path))


@FUZZ
@given(array=embedding_arrays, suffix=st.sampled_from([".npy", ".pt", ".safetensors"]))
def test_load_targets(tmp_path_factory, array, suffix):
    from lmlab.invert import load_targets

    path = tmp_path_factory.mktemp("e") / f"targets{suffix}"
    try:
        _save(array, path)
    except (TypeError, ValueError, RuntimeError):  # a dtype this format cannot hold
        return
    targets = ok_or_lmlab_error(load_targets, path, DIM)
    if targets is not None:
        assert targets.ndim == 2 and targets.shape[1] == DIM and torch.isfinite(targets).all()
        assert torch.allclose(targets.norm(dim=1), torch.ones(len(targets)), atol=1e-3)


class _FakeEncoder:
    dim = DIM


@FEW
@given(array=embedding_arrays, suffix=st.sampled_from([".npy", ".pt", ".txt"]))
def test_invert_cli_input_checks(tmp_path_factory, monkeypatch, array, suffix, capsys):
    """``lmlab invert``'s checks, the encoder and the search stubbed: exit 0 with both outputs, or
    one line and exit 2 with neither."""
    import lmlab.invert
    from lmlab.invert.search import Guess

    monkeypatch.setattr(lmlab.invert, "load_encoder", lambda *a, **k: _FakeEncoder())
    monkeypatch.setattr(lmlab.invert, "invert",
                        lambda targets, *a, **k: [Guess("guess", 1.0, [], 0.0) for _ in targets])
    where = tmp_path_factory.mktemp("i")
    path = where / f"targets{suffix}"
    try:
        _save(array, path) if suffix != ".txt" else path.write_text("0.1 0.2")
    except (TypeError, ValueError, RuntimeError):
        return
    out = where / "out" / "guesses.txt"
    code = run_cli(["invert", "--embeddings", str(path), "--output", str(out), "--device", "cpu", "--json"], capsys)
    assert out.exists() == (code == 0) and out.with_suffix(".json").exists() == (code == 0)
