"""The adaptation methods, one module each: ``lora``, ``adapter``, ``prefix``, ``bitfit``, ``full``.

Each module has a config dataclass and ``apply(model, config)`` that leaves only the method's own
parameters trainable, plus ``save``/``load`` of just those parameters. This package dispatches on
the config type so trainers and the CLI need not know which method they hold.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.peft._modules import count_parameters

METHODS = ("lora", "adapter", "prefix", "bitfit", "full")
_CONFIG_CLASS = {"lora": "LoraConfig", "adapter": "AdapterConfig", "prefix": "PrefixConfig",
                 "bitfit": "BitFitConfig", "full": "FullConfig"}
# The file that marks a saved checkpoint of each method.
_MARKER = {"lora": "adapter_config.json", "adapter": "bottleneck_config.json",
           "prefix": "prefix_config.json", "bitfit": "bitfit_config.json", "full": "config.json"}


def method_module(method: str):
    if method not in METHODS:
        raise LmlabError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return importlib.import_module(f"lmlab.peft.{method}")


def method_name(config) -> str:
    for method, cls in _CONFIG_CLASS.items():
        if type(config).__name__ == cls:
            return method
    raise LmlabError(f"not an adaptation config: {type(config).__name__}")


def make_config(method: str, **kwargs):
    """``make_config('lora', r=16, alpha=64)``: the method's config from keyword arguments."""
    cls = getattr(method_module(method), _CONFIG_CLASS[method])
    return cls(**kwargs)


def apply(model, config):
    """Apply any method's config to ``model`` (in place; returns it)."""
    return method_module(method_name(config)).apply(model, config)


def save(model, config, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write the method's files. ``state_dict``: the model's full state when its parameters are
    sharded across processes (FSDP, ZeRO-3) and were gathered by the trainer; else read from ``model``."""
    return method_module(method_name(config)).save(model, out_dir, state_dict=state_dict)


def detect(checkpoint_dir: str | Path) -> str:
    """Which method saved ``checkpoint_dir``, from the files in it."""
    d = Path(checkpoint_dir)
    for method, marker in _MARKER.items():
        if (d / marker).exists():
            return method
    raise LmlabError(f"{checkpoint_dir} holds no lmlab or PEFT checkpoint")


def load(model, checkpoint_dir: str | Path):
    """Apply a saved method (LoRA in PEFT format, or any lmlab method) to a base ``model``."""
    return method_module(detect(checkpoint_dir)).load(model, checkpoint_dir)


__all__ = ["METHODS", "apply", "count_parameters", "detect", "load", "make_config", "method_module", "save"]
