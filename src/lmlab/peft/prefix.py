"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every attention layer gets l trainable key and value vectors that all tokens can attend to, as if
l virtual tokens preceded the input; the model's own weights stay frozen.

Where the prefix lives: inside attention, not in the KV cache. transformers looks up the attention
function by ``config._attn_implementation`` and passes the attention module along, so one
registered function (``lmlab_prefix``) prepends the module's prefix to the keys and values *after*
the cache update and gives it "attend" mask columns. The cache, the position ids (RoPE) and the
padding masks never see the prefix, which is why ``generate()`` with the cache, and left-padded
batches, behave exactly like the plain model (peft puts the prefix into ``past_key_values``, where
positions shift and masks must be patched).

Reparametrisation (Sec. 4.2): P = MLP(P'), P' an (l, d_kv) table, MLP = Linear(d_kv, h) -> tanh ->
Linear(h, layers * 2 * d_kv), with d_kv the width of one layer's keys (= d without grouped-query
attention; peft's shapes, so parameter counts agree with it). It steadies training; ``fold`` evaluates it once afterwards and keeps
only the plain prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.io import load_tensors, read_json, save_tensors, write_json
from lmlab.models import model_spec
from lmlab.peft._modules import freeze

ATTN_IMPLEMENTATION = "lmlab_prefix"
CONFIG_FILE = "prefix_config.json"
WEIGHTS_FILE = "prefix_model.safetensors"


@dataclass(frozen=True, kw_only=True)
class PrefixConfig:
    """length: l virtual tokens per layer. hidden: width h of the reparametrising MLP (None: plain
    prefixes). init_std: standard deviation of the initial prefixes (or of P')."""

    length: int = 10
    hidden: int | None = None
    init_std: float = 0.02

    def __post_init__(self):
        if not isinstance(self.length, int) or self.length <= 0:
            raise LmlabError(f"prefix length must be a positive integer, got {self.length!r}")
        if self.hidden is not None and (not isinstance(self.hidden, int) or self.hidden <= 0):
            raise LmlabError(f"prefix MLP hidden width must be a positive integer, got {self.hidden!r}")


class PrefixEncoder(nn.Module):
    """P = MLP(P'): all layers' prefixes from one small table, computed once per model forward."""

    def __init__(self, length: int, hidden: int, layers: int, kv_heads: int, head_dim: int,
                 init_std: float, device=None):
        super().__init__()
        d_kv = kv_heads * head_dim
        self.table = nn.Parameter(torch.randn(length, d_kv, device=device) * init_std)  # P': (l, d_kv)
        self.mlp = nn.Sequential(nn.Linear(d_kv, hidden, device=device), nn.Tanh(),
                                 nn.Linear(hidden, layers * 2 * kv_heads * head_dim, device=device))
        self.shape = (length, layers, 2, kv_heads, head_dim)
        self._cache: torch.Tensor | None = None

    def clear(self) -> None:
        self._cache = None

    def __deepcopy__(self, memo):
        """A copy without the cached prefixes: they belong to the last forward's autograd graph,
        which ``copy.deepcopy`` cannot copy (and the copy recomputes them from its own weights)."""
        import copy

        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__dict__.update({key: None if key == "_cache" else copy.deepcopy(value, memo)
                               for key, value in self.__dict__.items()})
        return clone

    def all_layers(self) -> torch.Tensor:
        """(layers, 2, kv_heads, l, head_dim); computed on first use within a forward."""
        if self._cache is None:
            self._cache = self.mlp(self.table).view(self.shape).permute(1, 2, 3, 0, 4)
        return self._cache


class PrefixKV(nn.Module):
    """One layer's prefix: keys and values of shape (kv_heads, l, head_dim)."""

    def __init__(self, kv_heads: int, length: int, head_dim: int, init_std: float, device=None,
                 encoder: PrefixEncoder | None = None, layer: int = 0):
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "_encoder", encoder)  # shared, registered once on the model
        if encoder is None:
            self.key = nn.Parameter(torch.randn(kv_heads, length, head_dim, device=device) * init_std)
            self.value = nn.Parameter(torch.randn(kv_heads, length, head_dim, device=device) * init_std)

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._encoder is None:
            return self.key, self.value
        kv = self._encoder.all_layers()[self.layer]
        return kv[0], kv[1]


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa attention with the module's prefix prepended to keys/values; (B, H, T, hd) layout."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pk, pv = module.prefix.key_value()  # (kv_heads, l, hd)
    batch, q_len, k_len, length = key.shape[0], query.shape[2], key.shape[2], pk.shape[1]
    key = torch.cat([pk.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)  # (B, kv_heads, l + K, hd)
    value = torch.cat([pv.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    if attention_mask is None:  # no padding: causal, with queries at the last q_len of k_len keys
        rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        attention_mask = (torch.arange(k_len, device=query.device)[None, :] <= rows)[None, None]
    attention_mask = attention_mask[..., :k_len]
    b, h = attention_mask.shape[:2]
    if attention_mask.dtype == torch.bool:
        prefix_cols = torch.ones(b, h, q_len, length, dtype=torch.bool, device=query.device)
    else:  # additive float mask: 0 = attend
        prefix_cols = torch.zeros(b, h, q_len, length, dtype=attention_mask.dtype, device=query.device)
    attention_mask = torch.cat([prefix_cols, attention_mask.expand(b, h, q_len, k_len)], dim=-1)
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=False, **kwargs)


def _clear_encoder_cache(model, args) -> None:
    """Looks the encoder up on the module it is called with, so a deep copy clears its own cache."""
    encoder = getattr(model, "prefix_encoder", None)
    if encoder is not None:
        encoder.clear()


def _register() -> None:
    """Make ``lmlab_prefix`` a known attention implementation (idempotent; sdpa's mask builder)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every block, in layer order."""
    spec = model_spec(model.config)
    suffix = "." + spec.attn_out.rsplit(".", 1)[0]  # ".attn" (GPT-2) or ".self_attn" (Llama)
    return [m for n, m in model.named_modules() if n.endswith(suffix)]


def refusal(spec) -> str:
    """Why prefix tuning refuses an encoder-decoder: T5's attention adds its relative position bias in
    its own code, outside transformers' attention interface where the prefix is inserted; and Li &
    Liang's encoder-decoder form, z = [PREFIX; x; PREFIX'; y] (a prefix for the encoder and one for
    the decoder, cross-attention reading the encoder's prefixed output), is not implemented."""
    other = "lora, adapter, bitfit or full" if spec.has_bias else "lora, adapter or full"
    return (f"prefix tuning is implemented for decoder-only models (GPT-2, Llama, Phi, Phi-3), not for the "
            f"encoder-decoder {spec.family} (its encoder and cross-attention would need prefixes of their own); "
            f"choose {other}")


def apply(model: nn.Module, config: PrefixConfig) -> nn.Module:
    """Attach a prefix to every attention layer and route attention through ``prefix_attention``.
    Decoder-only models only (GPT-2, Llama, Phi, Phi-3); an encoder-decoder is refused (see
    ``refusal``)."""
    spec = model_spec(model.config)
    if spec.encoder_decoder:
        raise LmlabError(refusal(spec))
    device = next(model.parameters()).device
    freeze(model)
    encoder = None
    if config.hidden is not None:
        encoder = PrefixEncoder(config.length, config.hidden, spec.layers, spec.kv_heads,
                                spec.head_dim, config.init_std, device)
        model.prefix_encoder = encoder
        model.register_forward_pre_hook(_clear_encoder_cache)  # recompute once per forward
    for i, attention in enumerate(attention_modules(model)):
        attention.prefix = PrefixKV(spec.kv_heads, config.length, spec.head_dim, config.init_std, device, encoder, i)
    _register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    for name, p in model.named_parameters():
        p.requires_grad_(".prefix." in name or name.startswith("prefix_encoder."))
    return model


def prefix_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain per-layer prefixes (the MLP evaluated if there is one): ``layers.{i}.key``/``.value``."""
    out = {}
    with torch.no_grad():
        for i, attention in enumerate(attention_modules(model)):
            if not hasattr(attention, "prefix"):
                raise LmlabError("model has no prefix to save")
            k, v = attention.prefix.key_value()
            out[f"layers.{i}.key"], out[f"layers.{i}.value"] = k.detach().clone(), v.detach().clone()
    encoder = getattr(model, "prefix_encoder", None)
    if encoder is not None:
        encoder.clear()
    return out


def fold(model: nn.Module) -> nn.Module:
    """Replace the reparametrising MLP by the plain prefixes it produces (outputs unchanged)."""
    if getattr(model, "prefix_encoder", None) is None:
        return model
    tensors = prefix_tensors(model)
    for i, attention in enumerate(attention_modules(model)):
        k = tensors[f"layers.{i}.key"]
        attention.prefix = PrefixKV(k.shape[0], k.shape[1], k.shape[2], 0.0, k.device)
        attention.prefix.key.data.copy_(k)
        attention.prefix.value.data.copy_(tensors[f"layers.{i}.value"])
    del model.prefix_encoder  # the pre-hook finds no encoder now and does nothing
    return model


def save(model: nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """``prefix_config.json`` + ``prefix_model.safetensors`` with the plain (folded) prefixes."""
    if state_dict is not None:
        raise LmlabError("prefix tuning cannot be saved from parameters sharded across processes "
                         "(FSDP / ZeRO-3): its prefixes are folded from the model; use DDP")
    out_dir = Path(out_dir)
    tensors = prefix_tensors(model)
    save_tensors(out_dir / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    write_json(out_dir / CONFIG_FILE, {"method": "prefix", "length": tensors["layers.0.key"].shape[1],
                                       "base_model_name_or_path": getattr(model, "name_or_path", None)})
    return out_dir


def load(model: nn.Module, prefix_dir: str | Path) -> nn.Module:
    raw = read_json(Path(prefix_dir) / CONFIG_FILE)
    apply(model, PrefixConfig(length=raw["length"]))
    tensors = load_tensors(Path(prefix_dir) / WEIGHTS_FILE)
    layers = attention_modules(model)
    if len(tensors) != 2 * len(layers):
        raise LmlabError(f"prefix {prefix_dir} has {len(tensors) // 2} layers, this model {len(layers)}")
    with torch.no_grad():
        for i, attention in enumerate(layers):
            for part in ("key", "value"):
                src, dst = tensors[f"layers.{i}.{part}"], getattr(attention.prefix, part)
                if src.shape != dst.shape:
                    raise LmlabError(f"prefix {prefix_dir} was made for another model: layer {i} {part} has "
                                     f"shape {tuple(src.shape)}, this model needs {tuple(dst.shape)}")
                dst.copy_(src)
    return model
