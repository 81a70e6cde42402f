"""Argument types and defaults shared by the command groups (no torch import here)."""

from __future__ import annotations

import argparse
import json
import math

DEFAULT_MODEL = "smollm2-135m-instruct"  # lmlab.models.DEFAULT_MODEL, without importing torch


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
    g.add_argument("--chat", action="store_true", help="send each prompt as a user turn of the chat template")


def sampling_config(args: argparse.Namespace):
    from lmlab.generate import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                          samples=args.samples, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, batch_size=args.batch_size, chat=args.chat)


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
