"""Closed-form parameter counts of a transformer and of each adaptation method.

Pure arithmetic on a ``ModelSpec``; ``lmlab params`` prints these beside the count taken from
real modules built on the meta device, and the tests require the two to agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmlab.errors import LmlabError
from lmlab.models import ModelSpec


def projection_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every linear projection in one block, by module name."""
    d, ff, kv = spec.hidden, spec.ff, spec.kv_dim
    if spec.family == "gpt2":
        return {"c_attn": (d, 3 * d), "attn.c_proj": (d, d), "c_fc": (d, ff), "mlp.c_proj": (ff, d)}
    return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
            "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}


def lora_count(spec: ModelSpec, r: int, targets: Sequence[str] | None = None) -> int:
    """r * (d_in + d_out) per targeted projection per layer (A is r x d_in, B is d_out x r)."""
    shapes = projection_shapes(spec)
    total = 0
    for t in targets or spec.qkv:
        matches = [s for name, s in shapes.items() if name == t or name.endswith("." + t) or t.endswith(name)]
        if len(matches) != 1:
            raise LmlabError(f"closed form: target {t!r} is not one projection of a {spec.family} block")
        d_in, d_out = matches[0]
        total += r * (d_in + d_out)
    return spec.layers * total


def adapter_count(spec: ModelSpec, m: int, train_layer_norms: bool = False) -> int:
    """2 * (2md + m + d) per layer: two adapters of W_down (d x m), b_down, W_up (m x d), b_up."""
    d = spec.hidden
    count = spec.layers * 2 * (2 * m * d + m + d)
    if train_layer_norms:
        count += norm_count(spec)
    return count


def norm_count(spec: ModelSpec) -> int:
    """LayerNorm has weight and bias (2d), RMSNorm only weight (d); two per block plus the final one."""
    per_norm = 2 * spec.hidden if spec.family == "gpt2" else spec.hidden
    return (2 * spec.layers + 1) * per_norm


def prefix_count(spec: ModelSpec, length: int, hidden: int | None = None) -> int:
    """Plain: layers * l * 2 * d_kv (a key and a value per position per layer; d_kv < d under GQA).

    With the reparametrisation of Li & Liang (2021, Sec. 4.2), P = MLP(P') with P' of shape
    (l, d_kv): l*d_kv + (d_kv*h + h) + (h * layers*2*d_kv + layers*2*d_kv)  (peft's shapes).
    """
    out = spec.layers * 2 * spec.kv_dim
    if hidden is None:
        return length * out
    d = spec.kv_dim
    return length * d + (d * hidden + hidden) + (hidden * out + out)


def projection_bias_count(spec: ModelSpec) -> int:
    """Biases of one block's projections: GPT-2 has 3d + d + ff + d; Llama has none."""
    d = spec.hidden
    return 3 * d + d + spec.ff + d if spec.family == "gpt2" else 0


def bitfit_count(spec: ModelSpec) -> int:
    """Every bias: the projections' and, for LayerNorm (not RMSNorm), half of each norm's 2d."""
    if spec.family != "gpt2":
        return 0
    return spec.layers * projection_bias_count(spec) + norm_count(spec) // 2


def base_count(spec: ModelSpec, vocab: int, positions: int = 0, tied: bool = True) -> int:
    """Total parameters of the base model: embeddings, blocks, norms, and the head if untied."""
    d = spec.hidden
    block = sum(i * o for i, o in projection_shapes(spec).values()) + projection_bias_count(spec)
    head = 0 if tied else vocab * d
    return vocab * d + positions * d + spec.layers * block + norm_count(spec) + head


def closed_form(spec: ModelSpec, method: str, config, total_base: int) -> int:
    """Trainable parameters of ``method`` with ``config`` by the formulas above."""
    if method == "lora":
        targets = config.target_modules
        if isinstance(targets, str):
            raise LmlabError("closed form needs target names, not a regex")
        return lora_count(spec, config.r, targets)
    if method == "adapter":
        return adapter_count(spec, config.bottleneck, config.train_layer_norms)
    if method == "prefix":
        return prefix_count(spec, config.length, config.hidden)
    if method == "bitfit":
        return bitfit_count(spec)
    return total_base


def report(model_name: str, method: str, config) -> dict:
    """Trainable/total counts from real modules built on the meta device (no weights), with the
    closed form beside them. ``model_name`` is a preset, the embedded model, a folder or a hub id."""
    from lmlab import peft
    from lmlab.models import build_model, model_config, model_spec

    hf_config = model_config(model_name)
    model = build_model(hf_config, device="meta")
    _, total_base = peft.count_parameters(model)
    peft.apply(model, config)
    trainable, total = peft.count_parameters(model)
    expected = closed_form(model_spec(hf_config), method, config, total_base)
    return {
        "model": model_name, "method": method, "trainable": trainable, "total": total,
        "percent": 100.0 * trainable / total, "closed_form_trainable": expected,
        "closed_form_agrees": expected == trainable,
    }
