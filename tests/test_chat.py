"""Chat data (``lmlab.chat``): the three row formats read to the same messages; the loss mask covers
exactly the assistant turns, and the prefix-by-prefix tokens equal the tokens of the whole render
(chat template and the plain format); the masked loss equals a hand-computed cross-entropy;
classification in the chat template trains and scores the very ids ``generate --chat`` writes;
``--chat-template`` is recorded and reused by evaluate, generate and prompt; bad rows are one line."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny

from lmlab import LmlabError, chat
from lmlab.cli import main
from lmlab.data import Encoded, Example, TaskFormat, left_pad_batch

EXPECTED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
            {"role": "assistant", "content": "Rome."}]
SHAREGPT = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                               "value": m["content"]} for m in EXPECTED]}
OPENAI = {"messages": EXPECTED}


@pytest.fixture(scope="module")
def tokenizer():
    from lmlab.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template (as GPT-2's): the plain format."""
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


@pytest.mark.parametrize("row,expected", [
    (SHAREGPT, EXPECTED),
    (OPENAI, EXPECTED),
    ({"instruction": "Add.", "input": "2 + 2", "output": "4"},
     [{"role": "user", "content": "Add.\n\n2 + 2"}, {"role": "assistant", "content": "4"}]),
    ({"instruction": "Say hi.", "input": "", "output": "Hi!"},
     [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]),
])
def test_row_formats(row, expected):
    assert chat.messages_of(row, "row") == expected


@pytest.mark.parametrize("row,message", [
    ({"text": "x"}, "not a chat row"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "turn 1"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no assistant turn"),
    ({"instruction": "x", "output": 3}, "alpaca rows"),
])
def test_bad_rows(row, message):
    with pytest.raises(LmlabError, match=message):
        chat.messages_of(row, "row")


@pytest.mark.parametrize("template", [True, False])
@pytest.mark.parametrize("row", [SHAREGPT, {"instruction": "Add.", "input": "2 + 2", "output": "4"}])
def test_prefix_tokens_equal_the_whole_render_and_the_mask_is_the_replies(tokenizer, plain_tokenizer, template, row):
    tok = tokenizer if template else plain_tokenizer
    messages = chat.messages_of(row, "row")
    ids, mask = chat.conversation_ids(tok, messages, template)
    whole = tok(chat.render(tok, messages, False, template), add_special_tokens=not template)["input_ids"]
    assert ids == whole and len(mask) == len(ids)
    end = "<|im_end|>\n"  # SmolLM2's end of turn; the plain format ends a reply with the EOS token and a newline
    replies = [(m["content"] if template else " " + m["content"]) + end for m in messages if m["role"] == "assistant"]
    assert tok.decode([i for i, k in zip(ids, mask) if k]) == "".join(replies)
    # each masked stretch starts right after a generation prompt: the ids the model continues at inference
    reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = tok(chat.render(tok, messages[:reply], True, template), add_special_tokens=not template)["input_ids"]
    assert ids[:mask.index(1)] == prompt


def test_items_and_truncation(tokenizer):
    messages = chat.messages_of(SHAREGPT, "row")
    (item,) = chat.chat_items(tokenizer, [messages], True, 256)
    ids, mask = chat.conversation_ids(tokenizer, messages, True)
    assert item.prompt_ids + item.completion_ids == ids and sum(item.loss_mask) == sum(mask)
    assert item.loss_mask[0] == 1 and item.loss_mask[-1] == 1 and 0 in item.loss_mask
    cut = len(item.prompt_ids) + 2  # the second reply no longer fits: the first's first two tokens stay
    (short,) = chat.chat_items(tokenizer, [messages], True, cut)
    assert short.prompt_ids == item.prompt_ids and short.completion_ids == item.completion_ids[:2]
    assert short.loss_mask is None  # all of it is loss
    with pytest.raises(LmlabError, match="no conversation"), pytest.warns(UserWarning, match="1 of 1"):
        chat.chat_items(tokenizer, [messages], True, len(item.prompt_ids))


def test_masked_loss_is_the_cross_entropy_of_the_kept_tokens():
    from lmlab.train import label_loss

    model = tiny("tiny-llama").eval()
    items = [Encoded([5, 6, 7], [8, 9, 10, 11], 0, (1, 0, 0, 1)), Encoded([3], [4, 5], 0)]
    ids, mask, pos, labels = left_pad_batch(items, 0, device="cpu")
    assert labels.tolist() == [[8, -100, -100, 11], [-100, -100, 4, 5]]
    with torch.no_grad():
        loss, n = label_loss(model, ids, mask, pos, labels)
    expected = []
    for it in items:
        seq = torch.tensor([it.prompt_ids + it.completion_ids])
        with torch.no_grad():
            logp = F.log_softmax(model(seq).logits[0], -1)
        keep = it.loss_mask or (1,) * len(it.completion_ids)
        for j, (t, k) in enumerate(zip(it.completion_ids, keep)):
            if k:
                expected.append(-logp[len(it.prompt_ids) + j - 1, t])
    assert n == 4 and float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)


def test_classification_in_the_chat_template(tokenizer):
    from lmlab.generate import prompt_ids

    fmt = TaskFormat()
    examples = [Example("a lovely film", 1), Example("dull", 0)]
    items = chat.classification_items(tokenizer, fmt, examples)
    for it, e in zip(items, examples):
        assert it.prompt_ids == prompt_ids(tokenizer, fmt.prompt(e.text), chat=True)  # what generate --chat sends
        reply = [{"role": "user", "content": fmt.prompt(e.text)},
                 {"role": "assistant", "content": fmt.label_words[e.label]}]
        whole = tokenizer.apply_chat_template(reply, tokenize=True, return_dict=True)["input_ids"]
        assert whole[:len(it)] == it.prompt_ids + it.completion_ids  # the label tokens as the template writes them
    long = chat.classification_items(tokenizer, fmt, [Example("word " * 400 + "the end", 1)], max_length=96)[0]
    assert len(long) <= 96 and tokenizer.decode(long.prompt_ids).endswith(
        "the end\nSentiment:<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("setting,run,auto,templated,expected", [
    ("on", None, False, True, True), ("off", None, True, True, False), ("auto", None, True, True, True),
    ("auto", None, False, True, False), ("auto", None, True, False, False), (None, {"chat_template": "on"}, False,
                                                                            True, True),
    ("auto", {"chat_template": "off"}, True, True, False), ("on", {"chat_template": "off"}, False, True, True),
])
def test_use_template(tokenizer, plain_tokenizer, setting, run, auto, templated, expected):
    tok = tokenizer if templated else plain_tokenizer
    assert chat.use_template(setting, tok, run_info=run, auto=auto) is expected


def test_on_without_a_template_is_one_error(plain_tokenizer):
    with pytest.raises(LmlabError, match="no chat template"):
        chat.use_template("on", plain_tokenizer)


def test_read_conversations(tmp_path):
    rows = [OPENAI, SHAREGPT] * 5
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, val = chat.read_conversations(str(path), 0.2)
    assert len(train) == 8 and len(val) == 2 and all(m == EXPECTED for m in train + val)
    (tmp_path / "d").mkdir()
    shutil.copy(path, tmp_path / "d" / "train.jsonl")
    with pytest.raises(LmlabError, match="validation.jsonl"):
        chat.read_conversations(str(tmp_path / "d"))
    (tmp_path / "d" / "validation.jsonl").write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(LmlabError, match=r"validation row 1"):
        chat.read_conversations(str(tmp_path / "d"))


def test_chat_round_trip(tiny_model_dir, tmp_path, capsys):
    """finetune --task chat records the template it used; evaluate RUN scores the same validation
    loss; generate --run wraps prompts in the same template (and --chat-template off does not)."""
    rows = [{"instruction": f"Repeat the number {i}.", "output": f"{i}"} for i in range(12)] + [SHAREGPT] * 4
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert main(["finetune", "--task", "chat", "--model", tiny_model_dir, "--dataset", str(data), "--rank", "4",
                 "--batch-size", "4", "--max-iters", "2", "--eval-interval", "2", "--val-fraction", "0.25",
                 "--out-dir", str(run), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads((run / "run.json").read_text())
    assert record["task"] == "chat" and record["chat_template"] == "on" and record["options"]["chat_template"] == "auto"
    assert main(["evaluate", str(run / "last"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["chat_template"] == "on" and scored["n"] == 4
    assert scored["loss"] == pytest.approx(summary["last_val_loss"], rel=1e-4)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Repeat the number 3.\n")
    for extra, templated in (([], True), (["--chat-template", "off"], False)):
        out = tmp_path / f"out{len(extra)}.jsonl"
        assert main(["generate", "--run", str(run), "--prompts", str(prompts), "--temperature", "0",
                     "--max-new-tokens", "3", "--output", str(out), "--no-progress", *extra]) == 0
        assert out.exists()
    capsys.readouterr()


def test_classification_run_reuses_its_template(tiny_model_dir, small_dataset, tmp_path, capsys):
    """classification with --chat-template on: recorded, and evaluate RUN (and a sweep's
    evaluate_checkpoint) score in the chat template; the default stays the raw template."""
    from lmlab.evaluate import evaluate_checkpoint

    run = tmp_path / "run"
    common = ["finetune", "--model", tiny_model_dir, "--dataset", small_dataset, "--rank", "4", "--batch-size", "4",
              "--max-iters", "1", "--eval-interval", "1", "--no-progress", "--json"]
    assert main([*common, "--chat-template", "on", "--out-dir", str(run)]) == 0
    assert main([*common, "--out-dir", str(tmp_path / "raw")]) == 0
    capsys.readouterr()
    assert json.loads((run / "run.json").read_text())["chat_template"] == "on"
    assert json.loads((tmp_path / "raw" / "run.json").read_text())["chat_template"] == "off"
    results = {}
    for extra in ([], ["--chat-template", "on"], ["--chat-template", "off"]):
        assert main(["evaluate", str(run), "--scoring", "--limit", "8", "--json", "--no-progress", *extra]) == 0
        results[tuple(extra)] = json.loads(capsys.readouterr().out)["predictions"]
    assert results[()] == results[("--chat-template", "on")]
    assert evaluate_checkpoint(run, limit=8, scoring=True).predictions == results[()]


def test_chat_data_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text((json.dumps({"text": "no chat here"}) + "\n") * 10)
    for argv, message in ((["--dataset", str(bad)], "not a chat row"), ([], "--task chat needs --dataset"),
                          (["--dataset", str(tmp_path / "none.jsonl")], "no such file")):
        assert main(["finetune", "--task", "chat", "--model", tiny_model_dir, "--out-dir", str(tmp_path / "r"),
                     "--no-progress", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert main(["finetune", "--task", "completion", "--chat-template", "on", "--dataset", str(bad), "--model",
                 tiny_model_dir, "--out-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "--chat-template on is for" in capsys.readouterr().err
