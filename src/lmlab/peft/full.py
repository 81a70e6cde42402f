"""Full fine-tuning: every parameter trains; checkpoints are whole models in safetensors."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lmlab.errors import LmlabError

WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True, kw_only=True)
class FullConfig:
    """Full fine-tuning has no hyperparameters of its own."""


def apply(model: nn.Module, config: FullConfig | None = None) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save(model: nn.Module, out_dir: str | Path) -> Path:
    """``save_pretrained`` into a temporary folder, then swap it in, so a kill leaves no half model."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    old = out_dir.with_name(f".{out_dir.name}.old")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load(model: nn.Module, checkpoint_dir: str | Path) -> nn.Module:
    """Load a full checkpoint's weights into ``model`` (same architecture required)."""
    from lmlab.io import load_tensors

    weights = load_tensors(Path(checkpoint_dir) / WEIGHTS_FILE)
    own = model.state_dict()
    bad = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise LmlabError(f"checkpoint {checkpoint_dir} was made for another model (e.g. {bad[0]})")
    model.load_state_dict(weights, strict=False)  # tied weights are stored once
    return model
