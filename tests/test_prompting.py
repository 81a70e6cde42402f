"""Prompting: answer extraction (a table), prompt construction per strategy, batched generation equals
one-by-one, the CLI end to end on tiny causal and seq2seq models, bad input, and the real GSM8K files."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHARED

from lmlab import LmlabError
from lmlab.cli import main
from lmlab.models import build_model, preset_config
from lmlab.prompting import (
    COT_TRIGGER,
    EXTRACTION,
    INSTRUCTION,
    STRATEGIES,
    Problem,
    PromptConfig,
    build_messages,
    build_prompt,
    cut_at_stop,
    exemplars,
    extract_answer,
    load_problems,
    normalize_number,
    parse_problem,
    prompt_ids,
    run_strategy,
)

ROWS = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
         "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}
        for i in range(1, 13)]
PROBLEMS = [parse_problem(r, "") for r in ROWS]
GSM8K = SHARED / "gsm8k"


@pytest.mark.parametrize("text,expected", [
    # GSM8K's own format; "####" outranks everything
    ("#### 42", "42"), ("so 3 + 4 = 7\n#### 7", "7"), ("#### 1,000,000", "1000000"),
    ("3 cats. #### 5 The answer is 6", "5"), ("#### 4\nmore text 9", "4"), ("#### $12.00", "12"),
    # "The answer is" (any case, "final answer is"), the last one wins, on its own line
    ("The answer is 1,234.", "1234"), ("the answer is $18.", "18"), ("The answer is: 0.25", "0.25"),
    ("THE ANSWER IS 7 apples", "7"), ("The final answer is 30.", "30"), ("The answer is 8. Question: 9", "8"),
    ("The answer is 3. No wait, the answer is 4.", "4"), ("The answer is -5 degrees.", "-5"),
    ("The answer is unclear\nbut 6 and 8", "8"), ("The answer is twelve", None),
    ("so 5 + 5 = 10. The answer is 10.\n\nIt was fun, 3 times.", "10"),
    # \boxed{} (instruct models)
    (r"So the total is \boxed{72}.", "72"), (r"\boxed{1,080} dollars, the answer is 3", "1080"),
    # otherwise the last number
    ("It costs $5 and then 12.0 dollars", "12"), ("about 3.50 kg", "3.5"), ("5 then 6 then 7 cookies.", "7"),
    ("-4 degrees", "-4"), ("It is 10 - 5", "5"), ("10-5", "5"), ("(-3)", "-3"), ("\u22122", "-2"),
    ("numbers 3,4", "4"), ("a total of 2,500 people", "2500"), ("$ 7", "7"), ("50%", "50"), (".5 liters", "0.5"),
    ("He earns $1,234.50 a week.", "1234.5"), ("12.0.", "12"), ("100.", "100"), ("0.10", "0.1"),
    ("-0", "0"), ("007", "7"),
    # unparseable
    ("no number here", None), ("", None), ("twelve apples", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("12.0", "12"), ("$1,234.50", "1234.5"), ("007", "7"), ("x", None), (" 18.", "18"), (" $2,000 a year", "2000"),
    ("3.14159", "3.14159"), ("1e5", "1"), ("1,2345", "1"),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("text,expected", [
    (" 12\nQuestion: what", " 12"), (" 3\nQ: x\nQuestion: y", " 3"), ("no stop", "no stop"),
    ("Question: at the start is kept", "Question: at the start is kept"),
])
def test_cut_at_stop(text, expected):
    assert cut_at_stop(text) == expected


def test_parse_problem_strips_calculator_annotations():
    assert PROBLEMS[0] == Problem(ROWS[0]["question"], "He has 1 + 3 = 4 apples.", "4")
    assert parse_problem({"question": "q", "answer": "so\n#### 1,000"}, "").answer == "1000"


@pytest.mark.parametrize("row,message", [
    ({"question": "q"}, "row 7: no 'answer' field"), ({"answer": "#### 4"}, "no 'question' field"),
    ({"question": "q", "answer": "4"}, "no '####'"), ({"question": "q", "answer": "#### four"}, "no number after"),
])
def test_parse_problem_bad_rows(row, message):
    with pytest.raises(LmlabError, match=message):
        parse_problem(row, "test.jsonl, row 7")


def test_prompts_per_strategy():
    target, train = PROBLEMS[0], PROBLEMS[1:]
    shots = exemplars(train, 3, seed=0, avoid=target.question)
    ask = f"Question: {target.question}\nAnswer:"
    prompts = {s: build_prompt(target, PromptConfig(strategy=s, shots=3), shots) for s in STRATEGIES}
    assert prompts["zero-shot"] == ask
    assert prompts["instruction"] == f"{INSTRUCTION}\n\n{ask}"
    assert prompts["zero-shot-cot"] == f"{ask} {COT_TRIGGER}"
    assert prompts["few-shot"] == "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots) + ask
    assert prompts["cot"] == "".join(f"Question: {s.question}\nAnswer: {s.solution} The answer is {s.answer}.\n\n"
                                     for s in shots) + ask
    assert "<<" not in prompts["cot"] and "####" not in prompts["cot"]


def test_exemplars_deterministic_and_never_the_question():
    train = PROBLEMS
    draws = [exemplars(train, 4, seed=s) for s in range(3)]
    assert draws[0] == exemplars(train, 4, seed=0) and draws[0] != draws[1]
    for p in PROBLEMS:  # the asked question is left out; otherwise the draw is the same for everyone
        shots = exemplars(train, 4, seed=0, avoid=p.question)
        assert p not in shots and len(shots) == 4
        if p not in draws[0]:
            assert shots == draws[0]
    assert exemplars(train, 0, seed=0) == []
    with pytest.raises(LmlabError, match="training split has 11 problems"):
        exemplars(train, 12, seed=0, avoid=PROBLEMS[0].question)


def test_unknown_strategy():
    with pytest.raises(LmlabError, match="unknown strategy 'tree-of-thought'"):
        PromptConfig(strategy="tree-of-thought")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lmlab.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())  # SmolLM2's, with a chat template


def test_chat_prompts_are_multi_turn(tokenizer):
    target, shots = PROBLEMS[0], PROBLEMS[1:3]
    messages, opening = build_messages(target, PromptConfig(strategy="cot", shots=2, chat=True), shots)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"] and opening == ""
    assert messages[1]["content"] == f"{shots[0].solution} The answer is {shots[0].answer}."
    messages, opening = build_messages(target, PromptConfig(strategy="instruction", chat=True), [])
    assert messages == [{"role": "user", "content": f"{INSTRUCTION}\n\n{target.question}"}] and opening == ""
    text = tokenizer.decode(prompt_ids(tokenizer, target, PromptConfig(strategy="zero-shot-cot", chat=True), []))
    assert text.endswith(f"{target.question}<|im_end|>\n<|im_start|>assistant\n{COT_TRIGGER}")
    plain = prompt_ids(tokenizer, target, PromptConfig(strategy="zero-shot"), [])
    assert tokenizer.decode(plain) == build_prompt(target, PromptConfig(strategy="zero-shot"), [])


def _tiny(family: str):
    config = preset_config(family)
    config.initializer_range = 0.3  # outputs that depend on the input
    return build_model(config).eval()


@pytest.mark.parametrize("family,strategy", [("tiny-gpt2", "few-shot"), ("tiny-llama", "zero-shot-cot")])
def test_batched_equals_one_by_one(tokenizer, family, strategy):
    """Left-padded batches of different lengths give what each prompt gives alone (GPT-2's absolute
    positions catch wrong position ids); both stages of zero-shot-cot."""
    model = _tiny(family)
    config = PromptConfig(strategy=strategy, shots=2)
    problems = [PROBLEMS[0], Problem("Hi?", "", "1"), PROBLEMS[9], PROBLEMS[11]]
    kw = {"max_new_tokens": 6, "progress": False}
    batched = run_strategy(model, tokenizer, problems, PROBLEMS, config, batch_size=3, **kw)
    alone = run_strategy(model, tokenizer, problems, PROBLEMS, config, batch_size=1, **kw)
    assert batched.records == alone.records
    assert len({r["generation"] for r in alone.records}) > 1
    if strategy == "zero-shot-cot":
        assert all(r["prompt"].endswith(COT_TRIGGER) for r in alone.records)


def _tiny_t5(tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, initializer_factor=3.0)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("strategy", ["cot", "zero-shot-cot"])
def test_seq2seq_path(tokenizer, strategy):
    """A tiny random T5: generations are the decoder's text (not the echoed input); batching changes nothing."""
    model = _tiny_t5(tokenizer)
    problems, config = PROBLEMS[:3], PromptConfig(strategy=strategy, shots=2)
    batched = run_strategy(model, tokenizer, problems, PROBLEMS[4:], config, max_new_tokens=5, batch_size=3,
                           progress=False)
    alone = run_strategy(model, tokenizer, problems, PROBLEMS[4:], config, max_new_tokens=5, batch_size=1,
                         progress=False)
    assert batched.records == alone.records and batched.n == 3
    assert all("Question:" not in r["generation"] and len(tokenizer(r["generation"])["input_ids"]) <= 5
               for r in batched.records)
    assert ("extraction" in batched.records[0]) == (strategy == "zero-shot-cot")


@pytest.fixture
def gsm_dir(tmp_path):
    folder = tmp_path / "gsm"
    folder.mkdir()
    for split, rows in (("train", ROWS[3:]), ("test", ROWS[:3])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_cli_end_to_end(tiny_model_dir, gsm_dir, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    assert main(["prompt", "--model", tiny_model_dir, "--dataset", str(gsm_dir), "--shots", "2", "--max-new-tokens",
                 "4", "--output", str(out), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in summary["results"]] == list(STRATEGIES) and summary["n"] == 3
    assert summary["chat"] is True  # auto: SmolLM2's tokenizer has a template
    if not torch.cuda.is_available():  # --device auto / --dtype auto on a CPU machine
        assert (summary["device"], summary["dtype"]) == ("cpu", "fp32")
    assert all(r["n"] == 3 and 0 <= r["correct"] <= 3 and 0 <= r["unparseable"] <= 3 for r in summary["results"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 15 and {"prompt", "generation", "predicted", "correct", "answer"} <= set(records[0])
    assert [r["strategy"] for r in records] == [s for s in STRATEGIES for _ in range(3)]
    assert all("extraction" in r for r in records[-3:])  # zero-shot-cot's second stage is kept
    for r in records:
        assert r["prompt"].count(r["question"]) == 1  # never an exemplar of itself
        assert r["correct"] == (r["predicted"] == r["answer"])

    assert main(["prompt", "--model", tiny_model_dir, "--dataset", str(gsm_dir), "--strategies", "few-shot,zero-shot",
                 "--shots", "1", "--limit", "2", "--chat-template", "off", "--max-new-tokens", "3", "--output",
                 str(out), "--no-progress", "--overwrite"]) == 0
    table = capsys.readouterr().out
    assert "chat template off" in table and "| strategy | accuracy | unparseable |" in table
    assert "| few-shot |" in table and "| zero-shot |" in table and f"generations: {out}" in table
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and records[0]["prompt"].startswith("Question: ")


def test_cli_resumes_finished_strategies(tiny_model_dir, gsm_dir, tmp_path, capsys, monkeypatch):
    from lmlab import prompting

    out = tmp_path / "gen.jsonl"
    argv = ["prompt", "--model", tiny_model_dir, "--dataset", str(gsm_dir), "--strategies", "zero-shot,few-shot",
            "--shots", "1", "--max-new-tokens", "3", "--output", str(out), "--json", "--no-progress"]
    real, calls = prompting.run_strategy, []

    def killed_at_second(*args, **kwargs):
        calls.append(args[4].strategy)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prompting, "run_strategy", killed_at_second)
    assert main(argv) == 130
    assert not out.exists() and (tmp_path / "gen.jsonl.parts" / "zero-shot.json").exists()
    capsys.readouterr()
    calls.clear()
    monkeypatch.setattr(prompting, "run_strategy", lambda *a, **k: calls.append(a[4].strategy) or real(*a, **k))
    assert main(argv) == 0
    assert calls == ["few-shot"]  # zero-shot was kept from the killed run
    summary = json.loads(capsys.readouterr().out)
    assert [r["n"] for r in summary["results"]] == [3, 3]
    assert len(out.read_text().splitlines()) == 6 and not (tmp_path / "gen.jsonl.parts").exists()
    calls.clear()
    assert main([*argv[:-4], "--max-new-tokens", "2", *argv[-4:]]) == 2  # the finished output is kept ...
    assert "give --overwrite" in capsys.readouterr().err and calls == []
    assert main([*argv[:-4], "--max-new-tokens", "2", "--overwrite", *argv[-4:]]) == 0  # other settings: nothing
    assert calls == ["zero-shot", "few-shot"]  # is reused


def _without_template(model_dir: str, where: Path) -> str:
    """A copy of the tiny model whose tokenizer has no chat template."""
    copy = where / "no-template"
    shutil.copytree(model_dir, copy)
    config = copy / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    for extra in copy.glob("chat_template.*"):
        extra.unlink()
    return str(copy)


@pytest.mark.parametrize("argv,message", [
    (["--strategies", "zero-shot,magic"], "unknown strategy 'magic'"),
    (["--strategies", ","], "unknown strategy (none given)"),
    (["--strategies", "few-shot", "--shots", "50"], "training split has 9 problems"),
    (["--chat-template", "on"], "no chat template"),
    (["--dataset", "./nowhere"], "no such folder"),
    (["--device", "tpu"], "device must be one of"),
    pytest.param(["--device", "cuda"], "--device cuda: this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_options(tiny_model_dir, gsm_dir, tmp_path, capsys, argv, message):
    model = _without_template(tiny_model_dir, tmp_path) if "--chat-template" in argv else tiny_model_dir
    assert main(["prompt", "--model", model, "--dataset", str(gsm_dir), "--max-new-tokens", "2", "--no-progress",
                 *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmlab: error: ") and message in err[0]


def test_chat_on_without_template_in_the_api(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(_without_template(tiny_model_dir, tmp_path))
    with pytest.raises(LmlabError, match="no chat template"):
        prompt_ids(plain, PROBLEMS[0], PromptConfig(strategy="zero-shot", chat=True), [])


def test_missing_answer_field(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "What is 2 + 2?"}) + "\n")
    assert main(["prompt", "--model", tiny_model_dir, "--dataset", str(tmp_path), "--strategies", "zero-shot"]) == 2
    err = capsys.readouterr().err
    assert "test.jsonl, row 1: no 'answer' field" in err and "'#### <number>'" in err


def test_real_gsm8k_files():
    """Every reference row parses; the extractor reads every gold rationale (raw, and rendered the cot way)."""
    if not (GSM8K / "test.jsonl").exists():
        pytest.skip(f"needs the shared data folder {GSM8K}")
    train, test = load_problems(str(GSM8K), "train"), load_problems(str(GSM8K), "test")
    assert (len(train), len(test)) == (7473, 1319)
    raw = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()]
    assert all(extract_answer(r["answer"]) == p.answer for r, p in zip(raw, test))
    assert all(extract_answer(f"{p.solution} The answer is {p.answer}.") == p.answer for p in train + test)
    assert not {p.question for p in exemplars(train, 8, seed=0)} & {p.question for p in test}
    assert EXTRACTION.endswith("is")
