"""``lmlab evaluate``: classification accuracy (from generations or label log-likelihoods),
completion and chat perplexity, summarization ROUGE, of a base model or a run (its recorded task,
data, template and lengths filling the options not given), or lm-evaluation-harness tasks."""

from __future__ import annotations

import argparse
import json

from lmlab.cli import add_generation_task_args, add_task_args, sft_data, task_format
from lmlab.cli._args import (
    DEFAULT_MODEL,
    _positive_int,
    add_device_args,
    load_model_or_run,
    nonnegative_int,
    placement,
    positive_float,
    refuse_existing,
)
from lmlab.cli._config import add_config_arg
from lmlab.errors import LmlabError


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
    if task == "summarization":  # the prompt a summarization run trained on (run.json's resolved template)
        trained = (recorded.get("task") or record.get("task")) == "summarization"
        resolved["template"] = given["template"] or (record.get("template") if trained else None)
    if given["max_new_tokens"] is None:  # a label is a word or two (the homework samples 5); a summary a sentence
        resolved["max_new_tokens"] = 40 if task == "summarization" else 5 if given.get("decoding") == "sample" else 3
    return argparse.Namespace(**{**given, **resolved, "task": task})


def cmd_evaluate_generation_task(args: argparse.Namespace) -> int:
    """Summarization: ROUGE of the summaries a model or run writes for held-out posts (or of
    ``--predictions`` against ``--references``). Completion: the validation loss and perplexity
    of a base model or run on a corpus (a run's own held-out tail by default)."""
    from lmlab import evaluate, rouge
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
        return _report_rouge(args, rouge.rouge(predictions, references))
    data = sft_data(args)
    refuse_existing([args.output], args.overwrite)
    device, dtype = placement(args)
    model, tokenizer, _ = load_model_or_run(args, device, dtype, run=args.checkpoint)
    from lmlab import seq2seq

    if seq2seq.is_seq2seq(model):
        seq2seq.check_task(args.task, args.checkpoint or args.model)
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
    items = summarization_items(tokenizer, rows, data, seq2seq=seq2seq.is_seq2seq(model))
    predictions = rouge.generate_summaries(model, tokenizer, items, max_new_tokens=args.max_new_tokens,
                                           batch_size=args.batch_size, progress=progress)
    result = rouge.rouge(predictions, [r[data.summary_column] for r in rows])
    for row, prediction in zip(result["examples"], predictions, strict=True):
        row["prediction"] = prediction
    return _report_rouge(args, result, f"{data.source} / {split}, {args.checkpoint or args.model or DEFAULT_MODEL}, "
                                       f"greedy, {args.max_new_tokens} new tokens at most")


def _report_rouge(args: argparse.Namespace, result: dict, title: str | None = None) -> int:
    from lmlab import rouge
    from lmlab.io import write_json

    if args.output:
        write_json(args.output, result)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}))
    else:
        print((title + "\n" if title else "") + rouge.format_rouge(result))
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


def register(sub) -> None:
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
