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
