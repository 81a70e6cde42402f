"""Prompting: answer extraction (a table), prompt construction per strategy, batched generation equals
one-by-one, the CLI end to end on tiny causal and seq2seq models, and bad input."""

import json

import pytest
import torch

from lmlab import LmlabError
from lmlab.cli import main
from lmlab.generate import SamplingConfig, sample
from lmlab.models import build_model, preset_config
from lmlab.prompting import (
    COT_TRIGGER,
    STRATEGIES,
    Problem,
    PromptConfig,
    build_prompt,
    exemplars,
    extract_answer,
    normalize_number,
    parse_problem,
    run_strategy,
)

ROWS = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
         "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}
        for i in range(1, 13)]


@pytest.mark.parametrize("text,expected", [
    ("#### 42", "42"), ("so 3 + 4 = 7\n#### 7", "7"), ("The answer is 1,234.", "1234"),
    ("the answer is $18.", "18"), ("It costs $5 and then 12.0 dollars", "12"), ("about 3.50 kg", "3.5"),
    ("-4 degrees", "-4"), ("5 then 6 then 7 cookies.", "7"), ("no number here", None), ("", None),
    ("The answer is 8. Question: 9", "8"), ("#### 1,000,000", "1000000"), ("The answer is: 0.25", "0.25"),
    ("3 cats. #### 5 The answer is 6", "5"),  # "####" outranks "The answer is"
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text,expected", [("12.0", "12"), ("$1,234.50", "1234.5"), ("007", "7"), ("x", None)])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_parse_problem_strips_calculator_annotations():
    p = parse_problem(ROWS[0], "row 1")
    assert p == Problem(ROWS[0]["question"], "He has 1 + 3 = 4 apples.", "4")
    with pytest.raises(LmlabError, match="#### <number>"):
        parse_problem({"question": "q", "answer": "no marker"}, "row 2")


def test_prompts_per_strategy():
    problems = [parse_problem(r, "") for r in ROWS]
    target, train = problems[0], problems[1:]
    shots = exemplars(train, 2, seed=0, avoid=target.question)
    assert shots == exemplars(train, 2, seed=0, avoid=target.question) and target not in shots
    ask = f"Question: {target.question}\nAnswer:"
    prompts = {s: build_prompt(target, PromptConfig(strategy=s, shots=2), shots) for s in STRATEGIES}
    assert prompts["zero-shot"] == ask
    assert prompts["instruction"].endswith(ask) and "number" in prompts["instruction"]
    assert prompts["zero-shot-cot"] == f"{ask} {COT_TRIGGER}"
    assert prompts["few-shot"] == "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots) + ask
    assert prompts["cot"].count("The answer is") == 2 and shots[0].solution in prompts["cot"]
    with pytest.raises(LmlabError, match="training split has 11"):
        exemplars(train, 20, seed=0)
    with pytest.raises(LmlabError, match="unknown strategy"):
        PromptConfig(strategy="tree-of-thought")


@pytest.fixture(scope="module")
def tokenizer():
    from lmlab.models import load_tokenizer

    return load_tokenizer()


def test_batched_greedy_equals_one_by_one(tokenizer):
    config = preset_config("tiny-llama")
    config.initializer_range = 0.3  # outputs that depend on the input
    model = build_model(config).eval()
    prompts = [f"Question: {r['question']}\nAnswer:" for r in ROWS[:5]] + ["Hi"]
    greedy = SamplingConfig(max_new_tokens=6, temperature=0, batch_size=4)
    batched = [o[0] for o in sample(model, tokenizer, prompts, greedy, progress=False)]
    alone = [sample(model, tokenizer, [p], greedy, progress=False)[0][0] for p in prompts]
    assert batched == alone and len(set(alone)) > 1


def test_t5_seq2seq_path(tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    problems = [parse_problem(r, "") for r in ROWS]
    result = run_strategy(model, tokenizer, problems[:3], problems[3:], PromptConfig(strategy="few-shot", shots=2),
                          max_new_tokens=5, progress=False)
    assert result.n == 3 and len(result.records) == 3 and all(isinstance(r["generation"], str) for r in result.records)


@pytest.fixture
def gsm_dir(tmp_path):
    for split, rows in (("train", ROWS[3:]), ("test", ROWS[:3])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_cli_end_to_end(tiny_model_dir, gsm_dir, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    assert main(["prompt", "--model", tiny_model_dir, "--dataset", str(gsm_dir), "--shots", "2", "--max-new-tokens",
                 "4", "--output", str(out), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in summary["results"]] == list(STRATEGIES) and summary["n"] == 3
    assert all(r["n"] == 3 and 0 <= r["correct"] <= 3 for r in summary["results"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 15 and {"prompt", "generation", "predicted", "correct"} <= set(records[0])
    assert "extraction" in records[-1]  # zero-shot-cot's second stage is kept


@pytest.mark.parametrize("argv,message", [
    (["--strategies", "zero-shot,magic"], "unknown strategy"),
    (["--strategies", "few-shot", "--shots", "50"], "training split has 9"),
    (["--chat-template", "on"], "no chat template"),
])
def test_bad_options(tiny_model_dir, gsm_dir, capsys, argv, message):
    from pathlib import Path

    model = tiny_model_dir
    if "--chat-template" in argv:  # a copy of the tiny model whose tokenizer has no template
        import shutil

        model = str(Path(gsm_dir) / "no-template")
        shutil.copytree(tiny_model_dir, model)
        config = Path(model) / "tokenizer_config.json"
        data = json.loads(config.read_text())
        data.pop("chat_template", None)
        config.write_text(json.dumps(data))
        for extra in Path(model).glob("chat_template.*"):
            extra.unlink()
    assert main(["prompt", "--model", model, "--dataset", str(gsm_dir), "--max-new-tokens", "2", "--no-progress",
                 *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_missing_answer_field(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "What is 2 + 2?"}) + "\n")
    assert main(["prompt", "--model", tiny_model_dir, "--dataset", str(tmp_path), "--strategies", "zero-shot"]) == 2
    assert "'answer' ending in '#### <number>'" in capsys.readouterr().err
