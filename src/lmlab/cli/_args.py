"""Argument types and defaults shared by the command groups (no torch import here)."""

from __future__ import annotations

import argparse
import json
import math

DEFAULT_MODEL = "smollm2-135m-instruct"  # lmlab.models.DEFAULT_MODEL, without importing torch


class HelpFormatter(argparse.HelpFormatter):
    """Help that states every option's default: argparse's ``ArgumentDefaultsHelpFormatter``, except
    where the help already says it, or the default is None / False (no value to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or "%(default)" in text or "default" in text
                or not action.option_strings or isinstance(default, bool) and default is True):
            return text
        if text.endswith(f"({default})") or text.endswith(f"({default!r})"):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


# One text per common option, so one name means one thing in every command (used where a command
# gives no help of its own; the formatter adds the command's default).
COMMON_HELP = {
    "json": "print the result as one JSON object on stdout",
    "no_progress": "no progress bar (bars are drawn only when stderr is a terminal)",
    "seed": "random seed",
    "model": "embedded name, preset, local folder or hub id",
    "method": "adaptation method",
    "out_dir": "folder for the run's checkpoints, metrics and plots",
    "resume": "continue the run in --out-dir from its last checkpoint, with its recorded settings",
    "report_to": "also log metrics to this tracker",
    "epochs": "passes over the training data (--max-iters overrides)",
    "max_iters": "optimizer steps (overrides --epochs)",
    "grad_accum": "micro-batches per optimizer step",
    "eval_interval": "optimizer steps between validation passes",
    "max_length": "longest example in tokens",
    "batch_size": "examples per batch",
    "max_new_tokens": "most tokens generated per text",
    "split": "data split to evaluate",
    "overwrite": "replace existing outputs instead of refusing",
}


def fill_help(parser: argparse.ArgumentParser) -> None:
    """Give every option of ``parser`` and its subcommands without help text the common one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                fill_help(sub)
        elif action.option_strings and action.help is None and action.dest in COMMON_HELP:
            action.help = COMMON_HELP[action.dest]


class Parser(argparse.ArgumentParser):
    """``lmlab``'s parsers: a usage error is one line naming what was wrong, plus where help is
    (argparse would print the whole usage block first), and every option's help shows its default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            # A leaf command reports its own leftovers, so the hint names it rather than `lmlab`.
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._suggestion(extras)}")
        return namespace, extras

    def _suggestion(self, extras: list[str]) -> str:
        import difflib

        unknown = next((a.split("=")[0] for a in extras if a.startswith("--")), None)
        close = difflib.get_close_matches(unknown, list(self._option_string_actions), n=1) if unknown else []
        return f" (did you mean {close[0]}?)" if close else ""

    def error(self, message: str):
        import difflib
        import re

        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = re.findall(r"'([^']*)'", choice.group(2))
            close = difflib.get_close_matches(choice.group(1), options, n=1)
            message = f"invalid choice: {choice.group(1)!r}" + (f" (did you mean {close[0]}?)" if close else
                                                               f" (choose from {', '.join(options)})")
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _number(kind, text: str, minimum: float | None, strict: bool, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if math.isnan(value) or (minimum is not None and (value <= minimum if strict else value < minimum)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(int, text, 0, True, "a positive integer")


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    return _positive_int(text)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(int, text, 0, False, "a non-negative integer")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(float, text, 0.0, True, "a positive number")
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (no nan, no inf)."""
    value = _number(float, text, None, False, "a finite number")
    if abs(value) == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _number(float, text, 0.0, False, "a non-negative number")
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def print_json(obj) -> None:
    """One JSON object on one line of stdout (what ``--json`` promises)."""
    print(json.dumps(obj))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Options of ``lmlab.generate.SamplingConfig`` (generate, watermark generate)."""
    g = p.add_argument_group("sampling (defaults: plain sampling from the model's distribution)")
    g.add_argument("--samples", type=positive_int, default=1, help="continuations per prompt")
    g.add_argument("--max-new-tokens", type=positive_int, default=100)
    g.add_argument("--min-new-tokens", type=nonnegative_int, default=0,
                   help="ban the end-of-text token until this many new tokens (0)")
    g.add_argument("--temperature", type=nonnegative_float, default=1.0, help="0 = greedy (1.0)")
    g.add_argument("--top-k", type=nonnegative_int, default=0, help="0 = off (0)")
    g.add_argument("--top-p", type=positive_float, default=1.0, help="1 = off (1.0)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=positive_int, default=8, help="prompts per batch")
    g.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"],
                   help="send each prompt as a user turn of the tokenizer's chat template (auto: as the --run "
                        "recorded, else off)")
    g.add_argument("--chat", dest="chat_template", action="store_const", const="on",
                   help="the same as --chat-template on")


def sampling_config(args: argparse.Namespace):
    from lmlab.generate import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                          samples=args.samples, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, batch_size=args.batch_size, chat=args.chat_template == "on")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model and --run: the one way every generating command names a base model or a checkpoint."""
    p.add_argument("--model", default=None,
                   help=f"base model: embedded name, preset, local folder or hub id (default: the run's, "
                        f"else {DEFAULT_MODEL})")
    p.add_argument("--run", "--adapter", dest="run", metavar="RUN", default=None,
                   help="a folder finetune or dpo wrote: RUN means RUN/best (RUN/last for the last step)")


def load_model_or_run(args: argparse.Namespace, device, dtype, run: str | None = None):
    """(model, tokenizer, run_info) of ``--run`` (or ``run``) on ``--model``, else of the base model."""
    run = run if run is not None else getattr(args, "run", None)
    if run:
        from lmlab.evaluate import run_record
        from lmlab.train import load_checkpoint

        from pathlib import Path

        bits = run_record(run).get("bits") if Path(run).exists() else None  # a QLoRA run: its 4/8-bit base
        return load_checkpoint(run, args.model, device=device, dtype=dtype, bits=bits)
    from lmlab.models import load_model

    model, tokenizer = load_model(args.model or DEFAULT_MODEL, device=device, dtype=dtype)
    return model, tokenizer, {}


def add_device_args(p: argparse.ArgumentParser, training: bool = False) -> None:
    """--device and --dtype (every command that runs a model); with ``training``, also gradient
    checkpointing, gradient clipping and 4/8-bit loading (QLoRA)."""
    g = p.add_argument_group("device and precision")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on a CUDA GPU with native bf16, else fp16 there; fp32 on the CPU and "
                        "on MPS (auto)")
    if training:
        g.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass: less memory, ~1/3 more compute")
        g.add_argument("--max-grad-norm", type=_max_grad_norm, default=1.0,
                       help="clip the gradients' global norm to this; 0 = no clipping (1.0)")
        g.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 quantised frozen base (CUDA, bitsandbytes)")
        g.add_argument("--load-in-8bit", action="store_true", help="LLM.int8() quantised frozen base (CUDA, bitsandbytes)")


def _max_grad_norm(text: str):
    value = nonnegative_float(text)
    return None if value == 0 else value


def placement(args: argparse.Namespace):
    """(torch.device, torch.dtype) from --device and --dtype (one clear line for a missing device)."""
    from lmlab.devices import select_device, select_dtype

    device = select_device(args.device)
    return device, select_dtype(args.dtype, device)


def refuse_existing(paths, overwrite: bool, flag: str = "--output") -> None:
    """Every command's one policy for outputs: an existing file is replaced only with --overwrite
    (runs resume instead); one line, before any work, otherwise."""
    from pathlib import Path

    from lmlab.errors import LmlabError

    existing = [str(p) for p in paths if p is not None and Path(p).exists()]
    if existing and not overwrite:
        raise LmlabError(f"{flag}: {', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                         "give --overwrite to replace")
