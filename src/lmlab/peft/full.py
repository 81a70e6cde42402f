"""Full fine-tuning: every parameter trains; checkpoints are whole models in safetensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lmlab.errors import LmlabError
from lmlab.io import atomic_dir, load_tensors

WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True, kw_only=True)
class FullConfig:
    """Full fine-tuning has no hyperparameters of its own."""


def apply(model: nn.Module, config: FullConfig | None = None) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save(model: nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """``save_pretrained`` into a temporary folder, then swap it in, so a kill leaves no half model."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    return Path(out_dir)


def load(model: nn.Module, checkpoint_dir: str | Path) -> nn.Module:
    """Load a full checkpoint's weights into ``model`` (same architecture required)."""
    weights = load_tensors(Path(checkpoint_dir) / WEIGHTS_FILE)
    own = model.state_dict()
    bad = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise LmlabError(f"checkpoint {checkpoint_dir} was made for another model (e.g. {bad[0]})")
    model.load_state_dict(weights, strict=False)  # tied weights are stored once
    return model
