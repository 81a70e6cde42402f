"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", Fig. 2).

After the attention sublayer and after the feed-forward sublayer of every block, before the
residual sum, the sublayer output h passes through a small bottleneck with its own skip:

    h <- h + f(h W_down + b_down) W_up + b_up,   W_down: (d, m), W_up: (m, d).

W_up and both biases start at zero, so every adapter starts as the exact identity (Houlsby's
"near-identity" initialisation; W_down is small and random so gradients reach it at once).
Per block that is 2 * (2md + m + d) parameters; the layer norms can be trained too, as Houlsby did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.io import load_tensors, read_json, save_tensors, write_json
from lmlab.models import model_spec
from lmlab.peft._modules import find_modules, freeze, load_matching, name_matches

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_model.safetensors"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """bottleneck: inner width m. activation: f. train_layer_norms: also train every layer norm.
    init_std: standard deviation of W_down at initialisation (W_up starts at zero)."""

    bottleneck: int = 64
    activation: str = "relu"
    train_layer_norms: bool = False
    init_std: float = 1e-2

    def __post_init__(self):
        if not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise LmlabError(f"adapter bottleneck must be a positive integer, got {self.bottleneck!r}")
        if self.activation not in ACTIVATIONS:
            raise LmlabError(f"adapter activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")


class Bottleneck(nn.Module):
    """x -> f(x W_down + b_down) W_up + b_up (the adapter's residual branch)."""

    def __init__(self, d: int, m: int, activation: str, init_std: float, device=None):
        super().__init__()
        self.down = nn.Linear(d, m, device=device)
        self.up = nn.Linear(m, d, device=device)
        self.act = ACTIVATIONS[activation]()
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class AdapterLayer(nn.Module):
    """A sublayer's output projection (``base_layer``) followed by a bottleneck adapter with a skip."""

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (T5's feed-forward reads ``wo.weight``'s dtype)."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)  # (B, T, d)
        return h + self.adapter(h)


def apply(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Insert an adapter after each block's self-attention and feed-forward output projection
    (``ModelSpec.attn_out``, ``mlp_out``), in the encoder and the decoder of an encoder-decoder; the
    decoder's cross-attention gets none (as in the adapters library's Houlsby configuration)."""
    spec = model_spec(model.config)
    names = find_modules(model, [spec.attn_out, spec.mlp_out], (nn.Module,))
    freeze(model)
    for name in names:
        base = model.get_submodule(name)
        device = next(base.parameters()).device
        bottleneck = Bottleneck(spec.hidden, config.bottleneck, config.activation, config.init_std, device)
        model.set_submodule(name, AdapterLayer(base, bottleneck))
    for name, p in model.named_parameters():
        is_norm = config.train_layer_norms and _is_norm(name, spec.norms)
        p.requires_grad_(".adapter." in name or is_norm)
    return model


def _is_norm(param_name: str, norms: tuple[str, ...]) -> bool:
    return name_matches(param_name.rsplit(".", 1)[0], norms)


def adapter_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The trainable state: adapter weights (and layer norms when they were trained)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict() if state_dict is None else state_dict
    return {k: v for k, v in state.items() if k in trainable or ".adapter." in k}


def save(model: nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write ``bottleneck_config.json`` and ``bottleneck_model.safetensors``."""
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    if not layers:
        raise LmlabError("model has no bottleneck adapters to save")
    b = layers[0].adapter
    out_dir = Path(out_dir)
    state = adapter_state_dict(model, state_dict)
    config = {
        "method": "adapter", "bottleneck": b.down.out_features,
        "activation": next(k for k, v in ACTIVATIONS.items() if isinstance(b.act, v)),
        "train_layer_norms": any(".adapter." not in k for k in state),
        "base_model_name_or_path": getattr(model, "name_or_path", None),
    }
    save_tensors(out_dir / WEIGHTS_FILE, state, metadata={"format": "pt"})
    write_json(out_dir / CONFIG_FILE, config)
    return out_dir


def load(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    raw = read_json(Path(adapter_dir) / CONFIG_FILE)
    config = AdapterConfig(bottleneck=raw["bottleneck"], activation=raw["activation"],
                           train_layer_norms=raw.get("train_layer_norms", False))
    apply(model, config)
    weights = load_tensors(Path(adapter_dir) / WEIGHTS_FILE)
    load_matching(model, weights, adapter_state_dict(model), str(adapter_dir))
    return model
