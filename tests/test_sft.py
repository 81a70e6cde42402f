"""Generation tasks: completion blocks and TL;DR items (loss on the right tokens), perplexity equals
a naive computation, ROUGE equals hand-worked values (directly and through ``evaluate
--predictions``), finetune -> generate writes what peft's loader of the adapter generates, and the
completion round trip on a tiny model; bad input ends in one line."""

import json
import math

import pytest
import torch
from conftest import SHARED

from lmlab import LmlabError
from lmlab.cli import main
from lmlab.data import Encoded
from lmlab.evaluate import perplexity
from lmlab.models import build_model, preset_config
from lmlab.rouge import rouge
from lmlab.sft import (
    TLDR,
    SftData,
    blocks,
    completion_items,
    split_by_position,
    summarization_items,
    summary_prompt,
)

CORPUS = "\n".join(f"First Citizen:\nBefore we proceed any further, hear me speak, line {i}." for i in range(60))
PAIRS = [{"post": f"The function number {i} opens a file, reads every line and counts the words in it, "
                  "then returns the total as an integer.", "summary": f"Count the words of file {i}."}
         for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer():
    from lmlab.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


@pytest.mark.parametrize("n,size,expected", [(10, 4, [(0, [1, 2, 3]), (4, [5, 6, 7])]), (3, 4, [(0, [1, 2])]),
                                             (8, 4, [(0, [1, 2, 3]), (4, [5, 6, 7])]), (1, 4, [])])
def test_blocks(n, size, expected):
    """Each block: its first token as the prompt, the rest as the completion (the loss targets)."""
    assert [(b.prompt_ids[0], b.completion_ids) for b in blocks(list(range(n)), size)] == expected


def test_split_by_position():
    assert split_by_position(list(range(10)), 0.2) == (list(range(8)), [8, 9])


def test_completion_items_cover_the_corpus_in_order(tokenizer, corpus):
    train, val = completion_items(tokenizer, SftData(source=str(corpus), block_size=16))
    ids = tokenizer(CORPUS, add_special_tokens=False)["input_ids"]
    cut = int(len(ids) * 0.9)
    assert train[0].prompt_ids + train[0].completion_ids == ids[:16]
    assert val[0].prompt_ids + val[0].completion_ids == ids[cut:cut + 16]
    assert len(train) == cut // 16 and all(len(b) == 16 for b in train + val)


def test_summarization_items(tokenizer):
    data = SftData(source="-", max_length=40)
    long = {"post": "word " * 200, "summary": "A short summary."}
    items = summarization_items(tokenizer, [PAIRS[0], long], data)
    tail = tokenizer(TLDR, add_special_tokens=False)["input_ids"]
    summary = tokenizer(" Count the words of file 0.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert items[0].prompt_ids[-len(tail):] == tail and items[0].completion_ids == summary
    assert len(items[1]) == 40 and items[1].prompt_ids[-len(tail):] == tail  # the post was cut, not the summary
    with pytest.raises(LmlabError, match="no room"):
        summarization_items(tokenizer, [{"post": "x", "summary": "word " * 50}], data)


def test_perplexity_is_the_completion_tokens_cross_entropy(tokenizer):
    model = build_model(preset_config("tiny-llama")).eval()
    items = [Encoded([5, 6, 7], [8, 9], 0), Encoded([11], [12, 13, 14, 15], 0)]
    total, count = 0.0, 0
    for it in items:
        ids = torch.tensor([it.prompt_ids + it.completion_ids])
        with torch.no_grad():
            logp = model(ids).logits[0].log_softmax(-1)
        for j, t in enumerate(it.completion_ids):
            total -= logp[len(it.prompt_ids) - 1 + j, t].item()
            count += 1
    result = perplexity(model, tokenizer, items, batch_size=2)
    assert result["loss"] == pytest.approx(total / count, rel=1e-5) and result["tokens"] == 6
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_rouge_against_hand_worked_values():
    """"the cat sat on the mat" vs reference "the cat lay on the mat": 5 of 6 unigrams match
    (P = R = F = 5/6); bigrams: the-cat, on-the, the-mat match of 5 (3/5); LCS the cat on the mat = 5/6."""
    r = rouge(["the cat sat on the mat"], ["the cat lay on the mat"])
    assert r["mean"]["rouge1"]["f"] == pytest.approx(5 / 6)
    assert r["mean"]["rouge2"]["precision"] == pytest.approx(3 / 5)
    assert r["mean"]["rougeL"]["recall"] == pytest.approx(5 / 6)
    assert r["examples"][0]["rouge1"]["recall"] == pytest.approx(5 / 6)
    with pytest.raises(LmlabError, match="3 predictions for 2 references"):
        rouge(["a", "b", "c"], ["a", "b"])


def test_completion_round_trip_on_a_tiny_model(tiny_model_dir, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", "--task", "completion", "--model", tiny_model_dir, "--dataset", str(corpus),
                 "--method", "lora", "--rank", "4", "--block-size", "32", "--batch-size", "4", "--max-iters", "3",
                 "--eval-interval", "3", "--lr", "1e-2", "--out-dir", str(run), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and math.isfinite(summary["best_val_loss"])
    assert json.loads((run / "run.json").read_text())["task"] == "completion"
    assert main(["evaluate", str(run), "--task", "completion", "--dataset", str(corpus), "--block-size", "32",
                 "--json"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["loss"] == pytest.approx(summary["best_val_loss"], rel=1e-4)
    assert main(["evaluate", "--model", tiny_model_dir, "--task", "completion", "--dataset", str(corpus),
                 "--block-size", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > tuned["loss"]  # lr 1e-2 on a repetitive corpus
    (tmp_path / "prompts.txt").write_text("First Citizen:\nBefore we\n")
    assert main(["generate", "--adapter", str(run), "--prompts", str(tmp_path / "prompts.txt"), "--samples", "3",
                 "--max-new-tokens", "5", "--output", str(tmp_path / "out.jsonl"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("First Citizen:", 0), ("First Citizen:", 1),
                                                        ("First Citizen:", 2), ("Before we", 0), ("Before we", 1),
                                                        ("Before we", 2)]


@pytest.fixture(scope="module")
def lively_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with weights of std 0.3 (not 0.02), so that what it writes depends on the post."""
    from transformers import AutoTokenizer

    config = preset_config("tiny-llama")
    config.initializer_range = 0.3
    path = tmp_path_factory.mktemp("lively-llama")
    build_model(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


def test_summarization_round_trip(lively_model_dir, pairs, tmp_path, capsys):
    """finetune -> generate --tldr: the summaries are the greedy first lines that peft's own loader
    of the saved adapter gives for each '<post>\nTL;DR:' prompt, in prompt order."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    assert main(["finetune", "--task", "summarization", "--model", lively_model_dir, "--dataset", str(pairs),
                 "--method", "lora", "--rank", "2", "--batch-size", "4", "--max-iters", "2", "--eval-interval", "2",
                 "--lr", "1e-2", "--out-dir", str(run), "--no-progress", "--json"]) == 0
    capsys.readouterr()
    predictions = tmp_path / "pred.txt"
    assert main(["generate", "--adapter", str(run / "last"), "--prompts", str(pairs), "--tldr", "--first-line",
                 "--temperature", "0", "--max-new-tokens", "8", "--output", str(predictions), "--no-progress"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(lively_model_dir)
    base = AutoModelForCausalLM.from_pretrained(lively_model_dir).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lively_model_dir), str(run / "last")).eval()

    def greedy(model, post):
        ids = tokenizer(post.strip() + TLDR, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip()

    expected = [greedy(tuned, p["post"]) for p in PAIRS]
    assert predictions.read_text().splitlines() == expected and len(set(expected)) > 3, expected
    assert expected != [greedy(base, p["post"]) for p in PAIRS]  # the adapter was applied


def test_summarization_rouge_of_predictions_against_hand_worked_values(pairs, tmp_path, capsys):
    """evaluate --predictions/--references pairs each line with its row's summary. Even rows
    repeat their summary (1 everywhere); odd rows say "Count words in file i" against "Count the
    words of file i": unigrams count, word(s), file, i match, 4 of 5 predicted (P) and 4 of 6
    reference words (R); bigrams: only "file i", 1 of 4 and 1 of 5; the longest common
    subsequence is those 4 words. A row paired with its neighbour's summary, or prediction and
    reference swapped (P and R trade places), gives other means."""
    lines = [p["summary"] if i % 2 == 0 else f"Count words in file {i}" for i, p in enumerate(PAIRS)]
    (tmp_path / "pred.txt").write_text("".join(line + "\n" for line in lines))
    assert main(["evaluate", "--task", "summarization", "--predictions", str(tmp_path / "pred.txt"),
                 "--references", str(pairs), "--output", str(tmp_path / "rouge.json"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((tmp_path / "rouge.json").read_text())
    assert printed["n"] == result["n"] == 12 and printed["mean"] == result["mean"]
    odd = {"rouge1": (4 / 5, 4 / 6), "rouge2": (1 / 4, 1 / 5), "rougeL": (4 / 5, 4 / 6)}
    for kind, (p, r) in odd.items():
        f = 2 * p * r / (p + r)
        assert result["examples"][1][kind] == pytest.approx({"precision": p, "recall": r, "f": f})
        assert result["examples"][0][kind] == pytest.approx({"precision": 1, "recall": 1, "f": 1})
        assert result["mean"][kind] == pytest.approx({"precision": (1 + p) / 2, "recall": (1 + r) / 2,
                                                      "f": (1 + f) / 2})


@pytest.mark.parametrize("rows,message", [
    ([{"post": "a long post"}], "missing or empty 'summary'"),
    ([{"post": "a long post", "summary": "  "}], "missing or empty 'summary'"),
    ([{"text": "a", "summary": "b"}], "missing or empty 'post'"),
])
def test_summarization_bad_rows(tiny_model_dir, tmp_path, capsys, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 20))
    out = tmp_path / "run"
    assert main(["finetune", "--task", "summarization", "--model", tiny_model_dir, "--dataset", str(path),
                 "--out-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (out / "last").exists()


@pytest.mark.parametrize("content,message", [("", "is empty"), ("short", "too few"), (b"\xff\xfe", "not UTF-8")])
def test_completion_bad_corpus(tiny_model_dir, tmp_path, capsys, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["finetune", "--task", "completion", "--model", tiny_model_dir, "--dataset", str(path),
                 "--out-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_prompt_longer_than_the_context_is_one_line(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("word " * 9000 + "\n")
    assert main(["generate", "--model", tiny_model_dir, "--prompts", str(tmp_path / "p.txt"),
                 "--output", str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exceeds the model's context" in err[0] and not (tmp_path / "o.jsonl").exists()


@pytest.mark.skipif(not (SHARED / "tinyshakespeare" / "input.txt").exists(), reason="needs ../shared")
def test_tinyshakespeare_blocks(tokenizer):
    train, val = completion_items(tokenizer, SftData(source=str(SHARED / "tinyshakespeare" / "input.txt")))
    assert len(train) > 2000 and len(val) > 200


# --- the summarization template (--template with a {post} slot) ----------------------------------


def old_summarization_items(tokenizer, rows, max_length):
    """The prompt and completion ids before --template existed (hard-coded ``<post>\\nTL;DR:``)."""
    eos = [tokenizer.eos_token_id]
    tail = tokenizer("\nTL;DR:", add_special_tokens=False)["input_ids"]
    out = []
    for row in rows:
        summary = tokenizer(" " + row["summary"].strip(), add_special_tokens=False)["input_ids"] + eos
        post = tokenizer(row["post"].strip())["input_ids"]
        out.append((post[:max_length - len(summary) - len(tail)] + tail, summary))
    return out


@pytest.mark.parametrize("max_length", [24, 40, 256])
def test_the_default_template_gives_the_same_tokens_as_before(tokenizer, max_length):
    rows = [*PAIRS[:3], {"post": "  word " * 200 + "\n", "summary": " A short summary. "}]
    items = summarization_items(tokenizer, rows, SftData(source="-", max_length=max_length))
    assert [(i.prompt_ids, i.completion_ids) for i in items] == old_summarization_items(tokenizer, rows, max_length)
    assert SftData(source="-").template == "{post}\nTL;DR:" == "{post}" + TLDR
    assert summary_prompt("  a post \n") == "a post\nTL;DR:"


def test_a_template_puts_the_post_in_its_slot_and_keeps_its_tail_whole(tokenizer):
    data = SftData(source="-", max_length=64, template="Post: {post}\nSummary:")
    long = {"post": "word " * 200, "summary": "A short summary."}
    items = summarization_items(tokenizer, [PAIRS[0], long], data)
    tail = tokenizer("\nSummary:", add_special_tokens=False)["input_ids"]
    assert items[0].prompt_ids == tokenizer("Post: " + PAIRS[0]["post"])["input_ids"] + tail
    assert len(items[1]) == 64 and items[1].prompt_ids[-len(tail):] == tail
    assert tokenizer.decode(items[1].prompt_ids).startswith("Post: word word")
    assert summary_prompt(" a ", "Post: {post}\nSummary:") == "Post: a\nSummary:"


@pytest.mark.parametrize("task,template,message", [
    ("summarization", "Review: {text}\\nSummary:", "needs a {post} slot ({text} is classification's slot)"),
    ("summarization", "{post} and {post}", "needs one {post} slot"),
    ("classification", "{post}\\nSentiment:", "needs a {text} slot ({post} is summarization's slot)"),
    ("completion", "{post}", "--template is for classification ({text}) and summarization ({post})"),
])
def test_a_template_without_its_tasks_slot_is_one_line(tiny_model_dir, pairs, tmp_path, capsys, task, template,
                                                        message):
    out = tmp_path / "run"
    assert main(["finetune", "--task", task, "--model", tiny_model_dir, "--dataset", str(pairs), "--template",
                 template, "--out-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists(), err


def test_evaluate_reuses_the_runs_template_unless_a_flag_says_otherwise(tiny_model_dir, pairs, tmp_path, capsys,
                                                                        monkeypatch):
    """run.json records the template; evaluate RUN prompts with it (a forgotten flag), and a flag
    given wins. The prompts reach generation as the very ids finetune trained on."""
    from lmlab import rouge
    from lmlab.models import load_tokenizer

    run = tmp_path / "run"
    assert main(["finetune", "--task", "summarization", "--model", tiny_model_dir, "--dataset", str(pairs),
                 "--template", "Post: {post}\\nSummary:", "--rank", "2", "--batch-size", "4", "--max-iters", "1",
                 "--eval-interval", "1", "--out-dir", str(run), "--no-progress", "--json"]) == 0
    assert json.loads((run / "run.json").read_text())["template"] == "Post: {post}\nSummary:"
    capsys.readouterr()
    seen = []

    def generate(model, tokenizer, items, **kw):
        seen.append([tokenizer.decode(i.prompt_ids) for i in items])
        return ["Count the words of file 10."] * len(items)

    monkeypatch.setattr(rouge, "generate_summaries", generate)
    for flags, template in (([], "Post: {post}\nSummary:"), (["--template", "{post}\\nTL;DR:"], "{post}\nTL;DR:")):
        assert main(["evaluate", str(run), "--split", "validation", "--json", "--no-progress", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["n"] == 2
        assert seen[-1] == [summary_prompt(p["post"], template) for p in PAIRS[10:]], seen
    tokenizer = load_tokenizer(tiny_model_dir)
    trained = summarization_items(tokenizer, PAIRS[10:], SftData(source="-", template="Post: {post}\nSummary:"))
    assert seen[0] == [tokenizer.decode(i.prompt_ids) for i in trained]


def test_generate_tldr_prompts_with_the_runs_template_unless_a_flag_says_otherwise(tiny_model_dir, pairs, tmp_path,
                                                                                   capsys, monkeypatch):
    """generate --tldr --run RUN: the run's recorded summarization template, a --template flag
    over it; --template without --tldr is one line."""
    import lmlab.generate

    run = tmp_path / "run"
    assert main(["finetune", "--task", "summarization", "--model", tiny_model_dir, "--dataset", str(pairs),
                 "--template", "Post: {post}\\nSummary:", "--rank", "2", "--batch-size", "4", "--max-iters", "1",
                 "--eval-interval", "1", "--out-dir", str(run), "--no-progress", "--json"]) == 0
    capsys.readouterr()
    seen = []

    def sample(model, tokenizer, prompts, config, progress=True):
        seen.append(list(prompts))
        return [["x"] for _ in prompts]

    monkeypatch.setattr(lmlab.generate, "sample", sample)
    for n, (flags, template) in enumerate((([], "Post: {post}\nSummary:"),
                                           (["--template", "summarize: {post}"], "summarize: {post}"))):
        out = tmp_path / f"o{n}.txt"
        assert main(["generate", "--run", str(run / "last"), "--prompts", str(pairs), "--tldr", "--output", str(out),
                     "--no-progress", *flags]) == 0
        assert seen[-1] == [summary_prompt(p["post"], template) for p in PAIRS], seen[-1][:2]
    capsys.readouterr()
    assert main(["generate", "--prompts", str(pairs), "--template", "a {post}", "--output", str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "with --tldr" in err[0] and not (tmp_path / "x.txt").exists()
