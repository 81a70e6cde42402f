"""Helpers every adaptation method shares: finding modules by name, freezing, counting."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from lmlab.errors import LmlabError


def name_matches(name: str, patterns: str | Sequence[str]) -> bool:
    """peft's rule: a string is a regex that must match the whole name; a list holds name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_modules(model: nn.Module, patterns: str | Sequence[str], kinds: tuple[type, ...]) -> list[str]:
    """Names of the modules of ``kinds`` matching ``patterns``; an error if none match."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, kinds) and name_matches(n, patterns)]
    if not names:
        raise LmlabError(
            f"target {patterns!r} matches no {'/'.join(k.__name__ for k in kinds)} module in "
            f"{type(model).__name__}"
        )
    return names


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():  # parameters() already skips shared tensors
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def load_matching(model: nn.Module, weights: dict, own: dict, source: str) -> None:
    """Load ``weights`` into ``model`` if their names and shapes are exactly ``own``'s, else one error."""
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        raise LmlabError(f"checkpoint {source} was made for another model or configuration")
    model.load_state_dict(weights, strict=False)
