"""Closed-form parameter counts of a transformer and of each adaptation method.

Pure arithmetic on a ``ModelSpec``; ``lmlab params`` prints these beside the count taken from
real modules built on the meta device, and the tests require the two to agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmlab.errors import LmlabError
from lmlab.models import ModelSpec

# Architectures with no config lmlab can load, as transformers config fields (so ``params`` builds
# them on the meta device and ``memory`` reads the same shapes as for any other model).
SHAPE_PRESETS = {
    # Brown et al. 2020, Table 2.1: 96 layers, d = 12288, 96 heads, context 2048, GPT-2's tokenizer
    "gpt3-175b": ("gpt2", {"n_embd": 12288, "n_layer": 96, "n_head": 96, "n_positions": 2048}),
    # Touvron et al. 2023, Table 2: d = 4096, 32 layers, 32 heads (no GQA), SwiGLU width 11008, untied head
    "llama-7b": ("llama", {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                           "tie_word_embeddings": False}),
}


def model_config(name_or_path: str):
    """The transformers config of a shape preset above, else ``lmlab.models.model_config``'s (a
    built-in preset, the embedded model, a folder or a hub id)."""
    if name_or_path in SHAPE_PRESETS:
        from transformers import GPT2Config, LlamaConfig

        family, fields = SHAPE_PRESETS[name_or_path]
        return (GPT2Config if family == "gpt2" else LlamaConfig)(**fields)
    from lmlab.models import model_config as from_models

    return from_models(name_or_path)


def matrix_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every weight matrix in one block by short name: attention q, k, v, o, then
    the MLP's fc1, fc2 (GPT-2) or gate, up, down (Llama). Under grouped-query attention k and v are
    d x d_kv (SmolLM2-135M: 576 x 192)."""
    d, ff, kv = spec.hidden, spec.ff, spec.kv_dim
    attn = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d)}
    if spec.family == "gpt2":
        return {**attn, "fc1": (d, ff), "fc2": (ff, d)}
    return {**attn, "gate": (d, ff), "up": (d, ff), "down": (ff, d)}


# The block's linear modules and the matrices each holds (GPT-2's c_attn is q, k, v side by side).
_MODULES = {
    "gpt2": {"c_attn": ("q", "k", "v"), "attn.c_proj": ("o",), "c_fc": ("fc1",), "mlp.c_proj": ("fc2",)},
    "llama": {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",), "gate_proj": ("gate",),
              "up_proj": ("up",), "down_proj": ("down",)},
}


def projection_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every linear projection in one block, by module name."""
    m = matrix_shapes(spec)
    return {name: (m[parts[0]][0], sum(m[p][1] for p in parts)) for name, parts in _MODULES[spec.family].items()}


def target_shape(spec: ModelSpec, target: str) -> tuple[int, int]:
    """(d_in, d_out) of one target: a module name as peft matches it (``c_attn``, ``q_proj``,
    ``mlp.c_proj``) or a matrix's short name (``q``, ``v``, ``fc1``; a slice of ``c_attn`` in GPT-2)."""
    shapes = projection_shapes(spec)
    matches = [s for name, s in shapes.items() if name == target or name.endswith("." + target)
               or target.endswith(name)]
    if len(matches) == 1:
        return matches[0]
    short = matrix_shapes(spec)
    if target in short:
        return short[target]
    raise LmlabError(f"unknown matrix {target!r} of a {spec.family} block; choose from {', '.join(short)} "
                     f"or the modules {', '.join(shapes)}")


def lora_count(spec: ModelSpec, r: int, targets: Sequence[str] | None = None, dora: bool = False) -> int:
    """r * (d_in + d_out) per targeted projection per layer (A is r x d_in, B is d_out x r), plus
    d_out with DoRA (its magnitude vector m). ``targets`` "all-linear": every projection."""
    if r <= 0:
        raise LmlabError(f"rank must be positive, got {r}")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = list(projection_shapes(spec))
    shapes = [target_shape(spec, t) for t in targets or spec.qkv]
    return spec.layers * sum(r * (d_in + d_out) + (d_out if dora else 0) for d_in, d_out in shapes)


def saved_modules_count(spec: ModelSpec, names: Sequence[str], vocab: int, positions: int = 0) -> int:
    """The full copies of LoRA's ``modules_to_save``: the LM head and the token embeddings are
    vocab x d each (a tied head's copy too), GPT-2's position embeddings positions x d, the final
    norm d (RMSNorm) or 2d (LayerNorm)."""
    d = spec.hidden
    norm = 2 * d if spec.family == "gpt2" else d
    sizes = {"lm_head": vocab * d, "wte": vocab * d, "embed_tokens": vocab * d, "wpe": positions * d,
             "ln_f": norm, "norm": norm}
    leaves = [n.rsplit(".", 1)[-1] for n in names]
    unknown = [n for n in leaves if n not in sizes]
    if unknown:
        raise LmlabError(f"closed form knows modules_to_save {', '.join(sizes)}, not {unknown[0]!r}")
    return sum(sizes[n] for n in leaves)


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


def closed_form(spec: ModelSpec, method: str, config, total_base: int, vocab: int = 0, positions: int = 0) -> int:
    """Trainable parameters of ``method`` with ``config`` by the formulas above (``vocab`` and
    ``positions`` size LoRA's ``modules_to_save``)."""
    if method == "lora":
        targets = config.target_modules
        if isinstance(targets, str) and targets.lower() != "all-linear":
            raise LmlabError("closed form needs target names, not a regex")
        saved = saved_modules_count(spec, config.modules_to_save or (), vocab, positions)
        return lora_count(spec, config.r, targets, dora=config.use_dora) + saved
    if method == "adapter":
        return adapter_count(spec, config.bottleneck, config.train_layer_norms)
    if method == "prefix":
        return prefix_count(spec, config.length, config.hidden)
    if method == "bitfit":
        return bitfit_count(spec)
    return total_base


def report(model_name: str, method: str, config) -> dict:
    """Trainable/total counts from real modules built on the meta device (no weights), with the
    closed form beside them. ``model_name`` is a preset (``SHAPE_PRESETS`` included), the embedded
    model, a folder or a hub id."""
    from lmlab import peft
    from lmlab.models import build_model, model_spec

    hf_config = model_config(model_name)
    model = build_model(hf_config, device="meta")
    _, total_base = peft.count_parameters(model)
    peft.apply(model, config)
    trainable, total = peft.count_parameters(model)
    expected = closed_form(model_spec(hf_config), method, config, total_base, vocab=hf_config.vocab_size,
                           positions=getattr(hf_config, "n_positions", 0))
    return {
        "model": model_name, "method": method, "trainable": trainable, "total": total,
        "percent": 100.0 * trainable / total, "closed_form_trainable": expected,
        "closed_form_agrees": expected == trainable,
    }
