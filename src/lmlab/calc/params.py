"""Closed-form parameter counts of a transformer and of each adaptation method.

Pure arithmetic on a ``ModelSpec`` (``lmlab.calc.architectures``: every linear's name and shape,
every other parameter's size, per family); ``lmlab params`` prints these beside the count taken
from real modules built on the meta device, and the tests require the two to agree.
"""

from __future__ import annotations

import re
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


def _matches(name: str, patterns: str | Sequence[str]) -> bool:
    """peft's rule (as ``lmlab.peft`` applies it): a string is a regex for the whole name, a list
    holds name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _module(param: str) -> str:
    return param.rsplit(".", 1)[0]


def matrix_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every weight matrix by short name: attention q, k, v, o, then the MLP's fc1,
    fc2 (GPT-2, Phi, BART), gate, up, down (Llama, Phi-3) or wi / wi_0, wi_1, wo (T5). Under
    grouped-query attention k and v are d x d_kv (SmolLM2-135M: 576 x 192); fused modules (GPT-2's
    c_attn, Phi-3's qkv_proj and gate_up_proj) hold several."""
    return {part: (lin.d_in, width) for lin in spec.linears if lin.key != "lm_head" for part, width in lin.parts}


def projection_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every linear projection in the blocks, by module name (``ModelSpec.linears``'
    keys: c_attn, q_proj, SelfAttention.q, encoder_attn.q_proj, ...)."""
    return {lin.key: (lin.d_in, lin.d_out) for lin in spec.linears if lin.key != "lm_head"}


def target_shape(spec: ModelSpec, target: str) -> tuple[int, int]:
    """(d_in, d_out) of one target: a module name as peft matches it (``c_attn``, ``q_proj``,
    ``mlp.c_proj``) or a matrix's short name (``q``, ``v``, ``fc1``; a slice of ``c_attn`` in GPT-2)."""
    shapes = projection_shapes(spec)
    found = {s for lin in spec.linears if lin.key != "lm_head" and any(_matches(n, [target]) for n in lin.names())
             for s in [(lin.d_in, lin.d_out)]}
    if len(found) == 1:
        return found.pop()
    short = matrix_shapes(spec)
    if not found and target in short:
        return short[target]
    raise LmlabError(f"unknown matrix {target!r} of a {spec.family} block; choose from {', '.join(short)} "
                     f"or the modules {', '.join(shapes)}")


def adapted_matrices(spec: ModelSpec, targets: str | Sequence[str] | None) -> list[tuple[int, int, int]]:
    """(d_in, d_out, how many) of the matrices ``targets`` picks, over the whole model: module names
    matched as peft matches them (suffixes, or a regex string; T5's ``q`` is every self- and cross-
    attention query), ``"all-linear"`` (every projection but the LM head), or a matrix's short name
    (a slice of a fused module: GPT-2's ``q`` in c_attn). None: the default targets ``spec.qkv``."""
    blocks = [lin for lin in spec.linears if lin.key != "lm_head"]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return [(lin.d_in, lin.d_out, lin.blocks) for lin in blocks]
    targets = targets or spec.qkv
    picked = [(lin.d_in, lin.d_out, sum(_matches(n, targets) for n in lin.names())) for lin in blocks]
    if isinstance(targets, str):
        return [p for p in picked if p[2]]
    out = [p for p in picked if p[2]]
    short = matrix_shapes(spec)
    for target in targets:
        if any(_matches(n, [target]) for lin in blocks for n in lin.names()):
            continue
        if target not in short:
            raise LmlabError(f"unknown matrix {target!r} of a {spec.family} model; choose from "
                             f"{', '.join(short)} or the modules {', '.join(projection_shapes(spec))}")
        out += [(lin.d_in, width, lin.blocks) for lin in blocks for part, width in lin.parts if part == target]
    return out


def lora_count(spec: ModelSpec, r: int, targets: str | Sequence[str] | None = None, dora: bool = False) -> int:
    """r * (d_in + d_out) per targeted projection (A is r x d_in, B is d_out x r; Hu et al. 2021,
    eq. 3), plus d_out with DoRA (its magnitude vector m). ``targets`` "all-linear": every projection."""
    if r <= 0:
        raise LmlabError(f"rank must be positive, got {r}")
    return sum(n * (r * (d_in + d_out) + (d_out if dora else 0)) for d_in, d_out, n in adapted_matrices(spec, targets))


def parameter_sizes(spec: ModelSpec) -> list[tuple[str, int]]:
    """(parameter name, size) of every parameter, tied ones once: the spec's tables expanded (the
    tests hold this list to the built model's ``named_parameters()``)."""
    out = []
    for lin in spec.linears:
        for name in lin.names():
            out.append((name + ".weight", lin.d_in * lin.d_out))
            if lin.bias:
                out.append((name + ".bias", lin.d_out))
    return out + [(name, w.size) for w in spec.weights for name in w.names()]


def saved_modules_count(spec: ModelSpec, names: Sequence[str], vocab: int = 0, positions: int = 0) -> int:
    """The full copies of LoRA's ``modules_to_save`` outside the blocks: every parameter of the
    modules ``names`` picks (the LM head and the token embeddings are vocab x d each, a tied head's
    copy too; GPT-2's positions, the final norms). ``vocab`` and ``positions`` are read from the spec
    (kept for callers)."""
    outside = [(name + ".weight", lin.d_in * lin.d_out) for lin in spec.linears if "{i}" not in lin.path
               for name in lin.names()] + [(lin.path + ".bias", lin.d_out) for lin in spec.linears
                                           if lin.bias and "{i}" not in lin.path]
    outside += [(w.path, w.size) for w in spec.weights if "{i}" not in w.path and w.blocks == 1]
    known = sorted({_module(n).rsplit(".", 1)[-1] for n, _ in outside} | {"lm_head"})
    total = 0
    for pattern in names:
        found = [size for name, size in outside if _matches(_module(name), [pattern])]
        if not found and pattern.rsplit(".", 1)[-1] == "lm_head":  # tied: a copy of the embeddings' matrix
            found = [spec.vocab * spec.hidden]
        if not found:
            raise LmlabError(f"closed form knows modules_to_save {', '.join(known)} of a {spec.family} model, "
                             f"not {pattern!r}")
        total += sum(found)
    return total


def adapter_count(spec: ModelSpec, m: int, train_layer_norms: bool = False) -> int:
    """2md + m + d per adapter (W_down d x m, b_down, W_up m x d, b_up), one after every
    self-attention and every feed-forward sublayer (encoder and decoder; none after T5's or BART's
    cross-attention)."""
    d = spec.hidden
    n = sum(_matches(name, [spec.attn_out, spec.mlp_out]) for lin in spec.linears for name in lin.names())
    return n * (2 * m * d + m + d) + (norm_count(spec) if train_layer_norms else 0)


def norm_count(spec: ModelSpec) -> int:
    """Every layer norm parameter: LayerNorm has weight and bias (2d), RMSNorm and T5's only weight (d)."""
    return sum(size for name, size in parameter_sizes(spec) if _matches(_module(name), spec.norms))


def prefix_count(spec: ModelSpec, length: int, hidden: int | None = None) -> int:
    """Plain: layers * l * 2 * d_kv (a key and a value per position per layer; d_kv < d under GQA).

    With the reparametrisation of Li & Liang (2021, Sec. 4.2), P = MLP(P') with P' of shape
    (l, d_kv): l*d_kv + (d_kv*h + h) + (h * layers*2*d_kv + layers*2*d_kv)  (peft's shapes).
    """
    if spec.encoder_decoder:
        raise LmlabError(f"prefix tuning is not implemented for encoder-decoder models ({spec.family})")
    out = spec.layers * 2 * spec.kv_dim
    if hidden is None:
        return length * out
    d = spec.kv_dim
    return length * d + (d * hidden + hidden) + (hidden * out + out)


def projection_bias_count(spec: ModelSpec) -> int:
    """Biases of one decoder block's projections: GPT-2 has 3d + d + ff + d; Llama has none."""
    return sum(lin.d_out for lin in spec.linears if lin.bias and lin.blocks == spec.layers and "{i}" in lin.path
               and not lin.path.startswith(("encoder.", "model.encoder.")))


def bitfit_count(spec: ModelSpec) -> int:
    """Every bias: the projections', the LayerNorms' (not RMSNorm's) and Phi's LM head's."""
    return sum(size for name, size in parameter_sizes(spec) if name.endswith(".bias"))


def base_count(spec: ModelSpec, vocab: int = 0, positions: int = 0, tied: bool = True) -> int:
    """Total parameters of the base model: embeddings, blocks, norms, and the head if untied (all read
    from the spec's tables; ``vocab``, ``positions`` and ``tied`` are kept for callers)."""
    return sum(size for _, size in parameter_sizes(spec))


def closed_form(spec: ModelSpec, method: str, config, total_base: int, vocab: int = 0, positions: int = 0) -> int:
    """Trainable parameters of ``method`` with ``config`` by the formulas above (``vocab`` and
    ``positions`` size LoRA's ``modules_to_save``)."""
    if method == "lora":
        targets = config.target_modules
        saved = saved_modules_count(spec, config.modules_to_save or (), vocab, positions)
        return lora_count(spec, config.r, targets, dora=config.use_dora) + saved
    if method == "adapter":
        return adapter_count(spec, config.bottleneck, config.train_layer_norms)
    if method == "prefix":
        return prefix_count(spec, config.length, config.hidden)
    if method == "bitfit":
        return bitfit_count(spec)
    return base_count(spec)  # full: every parameter (``total_base``, the built model's count, is not used)


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
