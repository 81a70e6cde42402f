"""The command line behaves alike everywhere: usage errors are one line with where help is, every
option's help states its default, templates read typed escapes, a run's recorded settings fill
what evaluate is not given, one flag names a checkpoint, and progress bars stay off pipes."""

import argparse
import json

import pytest

from lmlab.cli import build_parser, main, template_text

CORPUS = "\n".join(f"First Citizen:\nBefore we proceed any further, hear me speak, line {i}." for i in range(60))
PAIRS = [{"post": f"The function number {i} opens a file, reads every line and counts the words in it, "
                  "then returns the total as an integer.", "summary": f"Count the words of file {i}."}
         for i in range(12)]


def _parsers(parser=None, name="lmlab"):
    parser = parser or build_parser()
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _options():
    for name, parser in _parsers():
        for action in parser._actions:
            if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) \
                    and action.help != argparse.SUPPRESS:
                yield name, parser, action


@pytest.mark.parametrize("argv,expected", [
    (["finetune", "--rnak", "4"], ("lmlab finetune: error: unrecognized arguments: --rnak 4 (did you mean --rank?)",
                                   "see lmlab finetune --help")),
    (["fintune"], ("lmlab: error: invalid choice: 'fintune' (did you mean finetune?)", "see lmlab --help")),
    (["evaluate", "--split", "tset"], ("lmlab evaluate: error: invalid choice: 'tset' (did you mean test?)",
                                       "see lmlab evaluate --help")),
    (["watermark", "generate", "--scheme", "soft"], ("lmlab watermark generate: error: the following arguments are "
                                                     "required: --prompts, --output",
                                                     "see lmlab watermark generate --help")),
    (["finetune", "--batch-size", "0"], ("argument --batch-size: expected a positive integer, got '0'",
                                         "see lmlab finetune --help")),
    (["sweep", "--eval-limit", "x"], ("lmlab sweep: error:", "see lmlab sweep --help")),
])
def test_usage_errors_are_one_line_naming_the_command(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1, err
    assert all(part in err for part in expected), err


def test_every_option_has_help_that_states_its_default():
    missing, no_default = [], []
    for name, parser, action in _options():
        if not action.help:
            missing.append(f"{name} {action.option_strings[0]}")
            continue
        shown = parser._get_formatter()._get_help_string(action)  # what --help prints, before % expansion
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in shown.lower() \
                and f"({action.default})" not in shown:
            no_default.append(f"{name} {action.option_strings[0]}")
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help hides the default: {no_default}"


def test_help_shows_defaults_once(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert "(default: 8)" in " ".join(out.split())  # --batch-size, from the formatter
    assert out.count("(default: 1337)") == 1  # --seed


def test_version(capsys):
    from lmlab import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"lmlab {__version__}"


@pytest.mark.parametrize("typed,read", [
    (r"Review: {text}\nSentiment:", "Review: {text}\nSentiment:"),
    (r"a\tb", "a\tb"),
    (r"keep \\n literal", "keep \\n literal"),
    (r"unknown \x escape, é", "unknown \\x escape, é"),
    ("a real\nnewline", "a real\nnewline"),
])
def test_templates_read_typed_escapes(typed, read):
    assert template_text(typed) == read


def test_template_flag_reaches_the_run(tiny_model_dir, toy_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", "--model", tiny_model_dir, "--dataset", str(toy_dataset), "--max-iters", "1",
                 "--eval-interval", "1", "--eval-limit", "4", "--rank", "2", "--template", r"Review: {text}\nMood:",
                 "--out-dir", str(run), "--no-progress", "--json"]) == 0
    capsys.readouterr()
    assert json.loads((run / "run.json").read_text())["template"] == "Review: {text}\nMood:"


def test_options_that_do_nothing_are_not_offered():
    offered = {(name, action.option_strings[0]) for name, _, action in _options()}
    assert ("lmlab watermark generate", "--delta") in offered
    for name in ("lmlab watermark detect", "lmlab watermark classify"):
        assert (name, "--delta") not in offered


def test_one_flag_names_a_checkpoint():
    """Every command that runs a model takes a finetune run the same way (``evaluate`` also as its
    positional RUN)."""
    commands = {name: {a.dest: a for a in parser._actions} for name, parser in _parsers()}
    for name in ("lmlab generate", "lmlab watermark generate", "lmlab prompt"):
        assert "--run" in commands[name]["run"].option_strings, name
        assert commands[name]["model"].default is None, name  # the run's base unless given
    assert commands["lmlab evaluate"]["checkpoint"].metavar == "RUN"


@pytest.fixture
def completion_run(tiny_model_dir, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("completion")
    corpus = tmp / "corpus.txt"
    corpus.write_text(CORPUS)
    run = tmp / "run"
    assert main(["finetune", "--task", "completion", "--model", tiny_model_dir, "--dataset", str(corpus),
                 "--rank", "4", "--block-size", "32", "--batch-size", "4", "--max-iters", "2", "--eval-interval", "2",
                 "--lr", "1e-2", "--val-fraction", "0.2", "--out-dir", str(run), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    return run, corpus, summary


def test_evaluate_run_reads_a_completion_runs_settings(completion_run, tiny_model_dir, capsys):
    run, corpus, summary = completion_run
    assert main(["evaluate", str(run), "--json", "--no-progress"]) == 0  # task, data, block size from run.json
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(summary["best_val_loss"], rel=1e-4)
    assert result["dataset"] == str(corpus) and result["split"] == "validation"
    assert main(["evaluate", str(run), "--limit", "2", "--json", "--no-progress"]) == 0
    limited = json.loads(capsys.readouterr().out)
    assert limited["n"] == 2 < result["n"] and limited["tokens"] == 2 * 31
    assert main(["evaluate", str(run), "--block-size", "16", "--json", "--no-progress"]) == 0  # a flag wins
    assert json.loads(capsys.readouterr().out)["n"] > result["n"]


def test_evaluate_run_generates_and_scores_summaries(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "tldr"
    data.mkdir()
    for split, rows in (("train", PAIRS[:8]), ("validation", PAIRS[8:10]), ("test", PAIRS[10:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert main(["finetune", "--task", "summarization", "--model", tiny_model_dir, "--dataset", str(data),
                 "--rank", "2", "--batch-size", "4", "--max-iters", "1", "--eval-interval", "1",
                 "--out-dir", str(run), "--no-progress", "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "rouge.json"
    assert main(["evaluate", str(run), "--max-new-tokens", "6", "--output", str(out), "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2  # the folder's test.jsonl
    written = json.loads(out.read_text())
    # the scores are ROUGE of what the run generated: scoring the written predictions again agrees
    from lmlab.rouge import rouge

    again = rouge([e["prediction"] for e in written["examples"]], [r["summary"] for r in PAIRS[10:]])
    assert again["mean"] == written["mean"] == result["mean"]
    assert main(["evaluate", str(run), "--split", "validation", "--limit", "1", "--max-new-tokens", "2", "--json",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 1
    assert main(["evaluate", str(run), "--scoring"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_watermark_generate_takes_a_run(completion_run, tmp_path, capsys):
    run, corpus, _ = completion_run
    prompts = tmp_path / "p.txt"
    prompts.write_text("First Citizen:\n")
    out = tmp_path / "wm.jsonl"
    assert main(["watermark", "generate", "--scheme", "soft", "--run", str(run), "--prompts", str(prompts),
                 "--max-new-tokens", "4", "--output", str(out), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == 1 and out.exists()


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from lmlab.progress import bar

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    with bar(total=3, desc="x") as shown:
        shown.update(3)
    assert sys.stderr.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    with bar(total=3, desc="x") as shown:
        shown.update(3)
    assert "3/3" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", Terminal())
    with bar(total=3, desc="x", enabled=False) as shown:
        shown.update(3)
    assert sys.stderr.getvalue() == ""


@pytest.mark.parametrize("argv", [
    ["bpe", "train", "{corpus}", "--vocab-size", "260", "--output", "{out}"],
    ["generate", "--model", "{model}", "--prompts", "{corpus}", "--output", "{out}.txt"],
    ["watermark", "generate", "--scheme", "soft", "--model", "{model}", "--prompts", "{corpus}",
     "--output", "{out}.jsonl"],
    ["watermark", "classify", "--input", "{corpus}", "--output", "{out}.npy"],
    ["invert", "--embeddings", "{out}.npy", "--output", "{out}.txt"],
    ["prompt", "--model", "{model}", "--dataset", "{corpus}", "--output", "{out}.jsonl"],
    ["evaluate", "--task", "summarization", "--predictions", "{corpus}", "--references", "{corpus}",
     "--output", "{out}.json"],
    ["scaling", "--params", "1e9", "--tokens", "2e10", "--plot", "{out}.png"],
    ["data", "sentiment-pairs", "--output", "{out}.jsonl"],
    ["embed", "--texts", "{corpus}", "--output", "{out}.npy"],
])
def test_existing_outputs_are_refused_without_overwrite(argv, tiny_model_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n")
    out = tmp_path / "out"
    argv = [a.format(corpus=corpus, out=out, model=tiny_model_dir) for a in argv]
    output = next(a for a, flag in zip(argv[1:], argv) if flag in ("--output", "--plot"))
    if argv[0] == "invert":  # the embeddings it would read are there; the guesses file too
        import numpy as np

        np.save(f"{out}.npy", np.ones((1, 4), dtype=np.float32))
    with open(output, "w") as f:
        f.write("keep me")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give --overwrite" in err, err
    assert open(output).read() == "keep me"


def test_overwrite_replaces(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello hello world world\n" * 20)
    out = tmp_path / "bpe"
    assert main(["bpe", "train", str(corpus), "--vocab-size", "258", "--output", str(out), "--json"]) == 0
    assert main(["bpe", "train", str(corpus), "--vocab-size", "260", "--output", str(out), "--json",
                 "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["vocab_size"] == 260


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--model", "{tmp}/no-such-model", "--out-dir", "{out}"], "no such folder"),
    (["finetune", "--model", "{model}", "--dataset", "{tmp}/nowhere", "--out-dir", "{out}"], "no such folder"),
    (["finetune", "--model", "{model}", "--task", "completion", "--dataset", "{tmp}/empty.txt", "--out-dir", "{out}"],
     "is empty"),
    (["dpo", "--model", "{model}", "--data", "{tmp}/empty.txt", "--out-dir", "{out}"], ""),
])
def test_an_input_error_leaves_no_out_folder(argv, message, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "deep" / "run"
    argv = [a.format(tmp=tmp_path, out=out, model=tiny_model_dir) for a in argv]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()
    from lmlab import checkpoint

    assert out.resolve() not in checkpoint._held  # and no lock is left held in this process


def test_warnings_are_printed_above_a_progress_bar(monkeypatch, capsys):
    """A warning raised while a bar is drawn goes through tqdm.write (its own line), and the
    handler is restored when the command ends."""
    import warnings

    import lmlab.cli as cli

    seen = {}

    def command(args):
        seen["handler"] = warnings.showwarning
        warnings.warn("careful", UserWarning)
        return 0

    parser = build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    dict(_parsers(parser))["lmlab params"].set_defaults(func=command)
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["params"]) == 0
    assert seen["handler"] is cli._show_warning and warnings.showwarning is before
    err = capsys.readouterr().err
    assert "UserWarning: careful" in err and err.endswith("\n")


def test_evaluate_sampled_decoding_is_reported_beside_greedy(tiny_model_dir, toy_dataset, capsys):
    import random

    import torch

    argv = ["evaluate", "--model", tiny_model_dir, "--dataset", str(toy_dataset), "--limit", "6", "--json",
            "--no-progress", "--decoding", "sample", "--temperature", "5", "--top-k", "0"]
    torch.manual_seed(123)
    random.seed(5)
    state = torch.get_rng_state()
    assert main(argv + ["--seed", "1"]) == 0
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    first = json.loads(capsys.readouterr().out)
    assert main(argv + ["--seed", "1"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert first["sampled"] == {**again["sampled"], "seconds": first["sampled"]["seconds"],
                                "examples_per_s": first["sampled"]["examples_per_s"]}  # same seed, same texts
    assert first["sampled"]["temperature"] == 5 and first["n"] == first["sampled"]["n"] == 6
    assert main(argv + ["--seed", "2"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["sampled"]["generations"] != first["sampled"]["generations"]  # temperature 5 on a random model
    assert other["generations"] == first["generations"]  # greedy beside it does not depend on the seed


def test_rouge_of_k_samples_per_reference(tmp_path, capsys):
    """generate --samples k writes each prompt's k samples in a row: each is scored against its own
    reference, and best-of-k takes each reference's best."""
    from lmlab.rouge import rouge

    refs = ["the cat sat on the mat", "a dog ran in the park"]
    preds = ["the cat sat", "nothing here", "a dog ran in the park", "a dog"]
    r = rouge(preds, refs)
    alone = [rouge([p], [refs[i // 2]])["mean"]["rouge1"]["f"] for i, p in enumerate(preds)]
    assert r["k"] == 2 and r["n"] == 4 and r["references"] == 2
    assert r["mean"]["rouge1"]["f"] == pytest.approx(sum(alone) / 4)
    assert r["best_of_k"]["rouge1"] == pytest.approx((max(alone[:2]) + max(alone[2:])) / 2)
    with pytest.raises(Exception, match="k samples for each reference"):
        rouge(preds[:3], refs)
    (tmp_path / "p.txt").write_text("".join(p + "\n" for p in preds))
    (tmp_path / "r.txt").write_text("".join(p + "\n" for p in refs))
    assert main(["evaluate", "--task", "summarization", "--predictions", str(tmp_path / "p.txt"), "--references",
                 str(tmp_path / "r.txt"), "--limit", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["n"], out["k"], out["references"]) == (2, 2, 1)
    assert out["best_of_k"]["rouge1"] == pytest.approx(max(alone[:2]))


def test_generate_takes_a_peft_adapter_folder_or_hub_id(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A PEFT adapter saved by peft itself (no run.json): its base comes from adapter_config.json.
    A hub id that is neither a folder nor cached fails in one line when the hub is unreachable."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tuned.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == tiny_model_dir
    from lmlab.train import load_checkpoint

    model, _, _ = load_checkpoint(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tuned.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    assert main(["generate", "--run", str(tmp_path / "adapter"), "--prompts", str(prompts), "--max-new-tokens", "2",
                 "--output", str(tmp_path / "o.txt"), "--no-progress"]) == 0
    capsys.readouterr()
    import lmlab.hub

    monkeypatch.setattr(lmlab.hub, "hub_reachable", lambda timeout=3.0: False)
    assert main(["generate", "--run", "nobody/no-such-adapter", "--prompts", str(prompts),
                 "--output", str(tmp_path / "o2.txt"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not in the local cache (the hub is unreachable)" in err, err


def test_evaluate_of_a_dpo_run_scores_classification(tmp_path):
    from lmlab.cli import evaluate_options

    (tmp_path / "run.json").write_text(json.dumps({"task": "dpo", "model": "m", "options": {"data": "p.jsonl"}}))
    args = build_parser().parse_args(["evaluate", str(tmp_path)])
    assert evaluate_options(args).task == "classification"


@pytest.mark.parametrize("extra,message", [
    (["--output", "x.json"], "are for --task summarization, not completion"),
    (["--decoding", "sample"], "are for classification"),
])
def test_evaluate_refuses_options_a_task_would_ignore(extra, message, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world " * 50)
    assert main(["evaluate", "--task", "completion", "--dataset", str(corpus), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_leftovers_cleared_are_only_lmlabs(tmp_path):
    from lmlab import checkpoint

    out = tmp_path / "run"
    out.mkdir()
    for name in (".last.abc123.tmp", ".metrics.jsonl.x1.tmp", ".notes.tmp", ".config.old", "config", "last",
                 ".last.old"):
        (out / name).mkdir() if name in ("last", ".last.old", ".last.abc123.tmp") else (out / name).write_text("x")
    assert checkpoint.lock_out_dir(out)
    try:
        checkpoint.clear_leftovers(out)
    finally:
        checkpoint.unlock_out_dir(out)
    assert sorted(p.name for p in out.iterdir()) == [".config.old", ".lmlab.lock", ".notes.tmp", "config", "last"]


def test_a_refused_run_releases_its_folder(tiny_model_dir, tmp_path, capsys):
    """--resume on a folder with no run: refused, no folder left, and no lock kept by this process."""
    from lmlab import checkpoint

    out = tmp_path / "typo"
    assert main(["finetune", "--model", tiny_model_dir, "--resume", "--out-dir", str(out), "--no-progress"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert not out.exists() and out.resolve() not in checkpoint._held
