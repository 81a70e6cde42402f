"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning"): train only the
bias terms (of the projections and of the layer norms), freeze every weight matrix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.io import load_tensors, save_tensors, write_json
from lmlab.peft._modules import load_matching

CONFIG_FILE = "bitfit_config.json"
WEIGHTS_FILE = "bitfit_model.safetensors"


@dataclass(frozen=True, kw_only=True)
class BitFitConfig:
    """BitFit has no hyperparameters: every parameter named ``*.bias`` trains."""


def _is_bias(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")


def apply(model: nn.Module, config: BitFitConfig | None = None) -> nn.Module:
    """Leave only bias terms trainable; a model without any (Llama) is an error, not a silent no-op."""
    names = [n for n, _ in model.named_parameters() if _is_bias(n)]
    if not names:
        config = getattr(model, "config", None)
        family = getattr(config, "model_type", None) or "this architecture"
        # prefix tuning is for decoder-only models (``lmlab.peft.prefix.refusal``)
        seq2seq = getattr(config, "is_encoder_decoder", False)
        other = "lora, adapter or full" if seq2seq else "lora, adapter, prefix or full"
        raise LmlabError(
            f"BitFit trains bias terms only, and {type(model).__name__} has none (no {family} "
            f"projection or norm has one); choose {other}"
        )
    for name, p in model.named_parameters():
        p.requires_grad_(_is_bias(name))
    return model


def bias_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters()) if state_dict is None else state_dict
    return {n: p for n, p in state.items() if _is_bias(n)}


def save(model: nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    save_tensors(out_dir / WEIGHTS_FILE, bias_state_dict(model, state_dict), metadata={"format": "pt"})
    write_json(out_dir / CONFIG_FILE, {"method": "bitfit", "base_model_name_or_path": getattr(model, "name_or_path", None)})
    return out_dir


def load(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    apply(model)
    weights = load_tensors(Path(adapter_dir) / WEIGHTS_FILE)
    load_matching(model, weights, bias_state_dict(model), str(adapter_dir))
    return model
