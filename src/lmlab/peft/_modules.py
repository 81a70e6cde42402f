"""Helpers every adaptation method shares: finding modules by name, freezing, counting, and
peft's ``modules_to_save`` (a trainable full copy of a module)."""

from __future__ import annotations

import copy
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


class ModuleCopy(nn.Module):
    """peft's ``modules_to_save``: a trainable full copy of a module (``modules_to_save``; e.g. the
    LM head or the token embeddings) runs in its place, while the frozen ``original_module`` stays
    for ``disabled`` (the base model, as DPO's reference). A tied head's copy is untied, as in peft."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)
        self.disabled = False

    def forward(self, *args, **kwargs):
        return (self.original_module if self.disabled else self.modules_to_save)(*args, **kwargs)

    def __getattr__(self, name: str):
        """Attributes of the copy (``weight``, ``num_embeddings``), so code that reads them still works."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("modules_to_save"), name)


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
