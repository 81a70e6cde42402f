"""Architecture maps: per family, the modules each adaptation method attaches to and the name and
size of every parameter, written from a transformers config (no model is built).

``lmlab.models`` re-exports ``ModelSpec`` and ``model_spec``; ``lmlab.calc.params`` counts with
these tables and its tests hold them to the real modules of built models. Families: GPT-2; Llama
and its relatives (Mistral, Qwen2, Qwen3); Phi-1.5/Phi-2; Phi-3; T5 and Flan-T5; BART.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmlab.errors import LmlabError


@dataclass(frozen=True, kw_only=True)
class Linear:
    """One linear projection as transformers names it, repeated over ``blocks`` blocks.

    ``path``: the full module name, ``{i}`` standing for the block index (none outside the blocks);
    ``key``: its short name in lmlab's tables (a valid ``--target``); ``parts``: the matrices it holds
    side by side as (short name, d_out) pairs; GPT-2's ``c_attn`` is (q, d), (k, d), (v, d)."""

    path: str
    key: str
    d_in: int
    parts: tuple[tuple[str, int], ...]
    blocks: int = 1
    bias: bool = False

    @property
    def d_out(self) -> int:
        return sum(width for _, width in self.parts)

    def names(self) -> list[str]:
        return [self.path.format(i=i) for i in range(self.blocks)]


@dataclass(frozen=True, kw_only=True)
class Weight:
    """Any other parameter (embedding, norm, position table, bias of a tied head): its full name with
    ``{i}`` for the block index, its number of elements, and the blocks that hold one."""

    path: str
    size: int
    blocks: int = 1

    def names(self) -> list[str]:
        return [self.path.format(i=i) for i in range(self.blocks)]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Where things live in one architecture family (names are module-name suffixes).

    ``linears`` and ``weights`` list every parameter of the model by name and size, written from
    the config (``lmlab.calc.params`` counts with them; the tests hold them to the built model).
    Tied weights appear once. In an encoder-decoder, ``layers`` counts the decoder's blocks and
    ``encoder_layers`` the encoder's (0 in a decoder-only model).
    """

    family: str
    qkv: tuple[str, ...]  # default LoRA targets: the attention query/key/value projections
    attn_out: str  # (self-)attention output projection (adapter goes after it)
    mlp_out: str  # feed-forward output projection (adapter goes after it)
    norms: tuple[str, ...]  # layer norms, trainable with adapters by option
    hidden: int
    ff: int  # feed-forward inner width
    layers: int  # decoder blocks (all blocks of a decoder-only model)
    heads: int
    kv_heads: int
    head_size: int | None = None  # width of one head where it is not hidden / heads (T5's d_kv)
    encoder_layers: int = 0  # encoder blocks of an encoder-decoder
    cross_attn: str | None = None  # the decoder's cross-attention module (T5 EncDecAttention)
    fused_qkv: bool = False  # q, k and v are one module (GPT-2 c_attn, Phi-3 qkv_proj)
    parallel: bool = False  # attention and MLP read the same input side by side (Phi)
    vocab: int = 0
    linears: tuple[Linear, ...] = ()
    weights: tuple[Weight, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        """Width of one layer's keys (= values); smaller than ``hidden`` under grouped-query attention."""
        return self.kv_heads * self.head_dim

    @property
    def encoder_decoder(self) -> bool:
        return self.encoder_layers > 0

    @property
    def has_bias(self) -> bool:
        return any(lin.bias for lin in self.linears) or any(w.path.endswith(".bias") for w in self.weights)


_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES = ("gpt2", "llama", "phi", "phi3", "t5", "bart")  # model_type llama-likes map to "llama"


def _lin(path: str, key: str, d_in: int, parts: dict[str, int], blocks: int = 1, bias: bool = False) -> Linear:
    return Linear(path=path, key=key, d_in=d_in, parts=tuple(parts.items()), blocks=blocks, bias=bias)


def _norm(path: str, d: int, blocks: int = 1, bias: bool = False) -> tuple[Weight, ...]:
    """LayerNorm: weight and bias (2d); RMSNorm and T5's LayerNorm: weight only (d)."""
    extra = (Weight(path=path + ".bias", size=d, blocks=blocks),) if bias else ()
    return (Weight(path=path + ".weight", size=d, blocks=blocks), *extra)


def _head(config, d: int, bias: bool = False) -> tuple[tuple[Linear, ...], tuple[Weight, ...]]:
    """The LM head: a Linear when untied; when tied to the embeddings only a bias of its own remains."""
    if config.tie_word_embeddings:
        return (), ((Weight(path="lm_head.bias", size=config.vocab_size),) if bias else ())
    return (_lin("lm_head", "lm_head", d, {"lm_head": config.vocab_size}, bias=bias),), ()


def _gpt2(c) -> ModelSpec:
    d, n, ff, h = c.n_embd, c.n_layer, c.n_inner or 4 * c.n_embd, "transformer.h.{i}."
    head, head_w = _head(c, d)
    return ModelSpec(
        family="gpt2", qkv=("c_attn",), attn_out="attn.c_proj", mlp_out="mlp.c_proj",
        norms=("ln_1", "ln_2", "ln_f"), hidden=d, ff=ff, layers=n, heads=c.n_head, kv_heads=c.n_head,
        fused_qkv=True, vocab=c.vocab_size,
        linears=(_lin(h + "attn.c_attn", "c_attn", d, {"q": d, "k": d, "v": d}, n, True),
                 _lin(h + "attn.c_proj", "attn.c_proj", d, {"o": d}, n, True),
                 _lin(h + "mlp.c_fc", "c_fc", d, {"fc1": ff}, n, True),
                 _lin(h + "mlp.c_proj", "mlp.c_proj", ff, {"fc2": d}, n, True), *head),
        weights=(Weight(path="transformer.wte.weight", size=c.vocab_size * d),
                 Weight(path="transformer.wpe.weight", size=c.n_positions * d),
                 *_norm(h + "ln_1", d, n, True), *_norm(h + "ln_2", d, n, True),
                 *_norm("transformer.ln_f", d, 1, True), *head_w),
    )


def _llama(c, kind: str) -> ModelSpec:
    """Llama, Mistral, Qwen2 (biased q, k, v), Qwen3 (RMSNorm on each head's q and k)."""
    d, n, ff, heads = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads
    L = "model.layers.{i}."
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or d // heads
    attn_bias = bool(getattr(c, "attention_bias", False))
    qkv_bias, mlp_bias = attn_bias or kind == "qwen2", bool(getattr(c, "mlp_bias", False))
    head, head_w = _head(c, d)
    qk_norms = (*_norm(L + "self_attn.q_norm", hd, n), *_norm(L + "self_attn.k_norm", hd, n)) if kind == "qwen3" else ()
    return ModelSpec(
        family="llama", qkv=("q_proj", "k_proj", "v_proj"), attn_out="self_attn.o_proj",
        mlp_out="mlp.down_proj", norms=("input_layernorm", "post_attention_layernorm", "model.norm"),
        hidden=d, ff=ff, layers=n, heads=heads, kv_heads=kv, head_size=hd if hd * heads != d else None,
        vocab=c.vocab_size,
        linears=(_lin(L + "self_attn.q_proj", "q_proj", d, {"q": heads * hd}, n, qkv_bias),
                 _lin(L + "self_attn.k_proj", "k_proj", d, {"k": kv * hd}, n, qkv_bias),
                 _lin(L + "self_attn.v_proj", "v_proj", d, {"v": kv * hd}, n, qkv_bias),
                 _lin(L + "self_attn.o_proj", "o_proj", heads * hd, {"o": d}, n, attn_bias),
                 _lin(L + "mlp.gate_proj", "gate_proj", d, {"gate": ff}, n, mlp_bias),
                 _lin(L + "mlp.up_proj", "up_proj", d, {"up": ff}, n, mlp_bias),
                 _lin(L + "mlp.down_proj", "down_proj", ff, {"down": d}, n, mlp_bias), *head),
        weights=(Weight(path="model.embed_tokens.weight", size=c.vocab_size * d),
                 *_norm(L + "input_layernorm", d, n), *_norm(L + "post_attention_layernorm", d, n), *qk_norms,
                 *_norm("model.norm", d), *head_w),
    )


def _phi(c) -> ModelSpec:
    """Phi-1.5 / Phi-2 (Li et al. 2023, "Textbooks Are All You Need II"): one LayerNorm per block
    feeding attention and MLP in parallel, biases everywhere (the LM head's too), partial rotary
    embeddings (no parameters), q/k/v as three modules and the output projection named ``dense``."""
    d, n, ff, heads = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads
    L = "model.layers.{i}."
    kv, hd = c.num_key_value_heads or heads, d // heads
    head, head_w = _head(c, d, bias=True)
    qk_norms = (*_norm(L + "self_attn.q_layernorm", hd, n, True),
                *_norm(L + "self_attn.k_layernorm", hd, n, True)) if c.qk_layernorm else ()
    return ModelSpec(
        family="phi", qkv=("q_proj", "k_proj", "v_proj"), attn_out="self_attn.dense", mlp_out="mlp.fc2",
        norms=("input_layernorm", "final_layernorm"), hidden=d, ff=ff, layers=n, heads=heads, kv_heads=kv,
        parallel=True, vocab=c.vocab_size,
        linears=(_lin(L + "self_attn.q_proj", "q_proj", d, {"q": heads * hd}, n, True),
                 _lin(L + "self_attn.k_proj", "k_proj", d, {"k": kv * hd}, n, True),
                 _lin(L + "self_attn.v_proj", "v_proj", d, {"v": kv * hd}, n, True),
                 _lin(L + "self_attn.dense", "dense", heads * hd, {"o": d}, n, True),
                 _lin(L + "mlp.fc1", "fc1", d, {"fc1": ff}, n, True),
                 _lin(L + "mlp.fc2", "fc2", ff, {"fc2": d}, n, True), *head),
        weights=(Weight(path="model.embed_tokens.weight", size=c.vocab_size * d),
                 *_norm(L + "input_layernorm", d, n, True), *qk_norms, *_norm("model.final_layernorm", d, 1, True),
                 *head_w),
    )


def _phi3(c) -> ModelSpec:
    """Phi-3 (Abdin et al. 2024, "Phi-3 Technical Report"): Llama's block with q, k, v fused into
    ``qkv_proj`` and gate, up fused into ``gate_up_proj``; RMSNorm, no biases."""
    d, n, ff, heads = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads
    L = "model.layers.{i}."
    kv = c.num_key_value_heads or heads
    hd = getattr(c, "head_dim", None) or d // heads
    head, head_w = _head(c, d)
    return ModelSpec(
        family="phi3", qkv=("qkv_proj",), attn_out="self_attn.o_proj", mlp_out="mlp.down_proj",
        norms=("input_layernorm", "post_attention_layernorm", "model.norm"), hidden=d, ff=ff, layers=n,
        heads=heads, kv_heads=kv, head_size=hd if hd * heads != d else None, fused_qkv=True, vocab=c.vocab_size,
        linears=(_lin(L + "self_attn.qkv_proj", "qkv_proj", d, {"q": heads * hd, "k": kv * hd, "v": kv * hd}, n),
                 _lin(L + "self_attn.o_proj", "o_proj", heads * hd, {"o": d}, n),
                 _lin(L + "mlp.gate_up_proj", "gate_up_proj", d, {"gate": ff, "up": ff}, n),
                 _lin(L + "mlp.down_proj", "down_proj", ff, {"down": d}, n), *head),
        weights=(Weight(path="model.embed_tokens.weight", size=c.vocab_size * d),
                 *_norm(L + "input_layernorm", d, n), *_norm(L + "post_attention_layernorm", d, n),
                 *_norm("model.norm", d), *head_w),
    )


def _t5(c) -> ModelSpec:
    """T5 and Flan-T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
    Text-to-Text Transformer"): attention q, k, v, o of width heads * d_kv and no biases; a scale-only
    LayerNorm before each sublayer; one relative-position bias table per stack, in its first block's
    self-attention; the feed-forward ``DenseReluDense`` is wi -> wo, or gated wi_0 * wi_1 -> wo
    (Flan-T5's gated-gelu). transformers >= 5 always ties the head to the shared embeddings."""
    d, ff, inner, ne, nd = c.d_model, c.d_ff, c.num_heads * c.d_kv, c.num_layers, c.num_decoder_layers
    enc, dec = "encoder.block.{i}.layer.", "decoder.block.{i}.layer."

    def attention(path: str, name: str, n: int) -> tuple[Linear, ...]:
        return (*(_lin(f"{path}{name}.{m}", f"{name}.{m}", d, {m: inner}, n) for m in "qkv"),
                _lin(f"{path}{name}.o", f"{name}.o", inner, {"o": d}, n))

    def feed_forward(path: str, n: int) -> tuple[Linear, ...]:
        wi = ("wi_0", "wi_1") if c.is_gated_act else ("wi",)
        return (*(_lin(f"{path}DenseReluDense.{m}", f"DenseReluDense.{m}", d, {m: ff}, n) for m in wi),
                _lin(f"{path}DenseReluDense.wo", "DenseReluDense.wo", ff, {"wo": d}, n))

    head, _ = _head(c, d)
    bias_table = c.relative_attention_num_buckets * c.num_heads
    return ModelSpec(
        family="t5", qkv=("q", "k", "v"), attn_out="SelfAttention.o", mlp_out="DenseReluDense.wo",
        norms=("layer_norm", "final_layer_norm"), hidden=d, ff=ff, layers=nd, heads=c.num_heads,
        kv_heads=c.num_heads, head_size=c.d_kv, encoder_layers=ne, cross_attn="EncDecAttention", vocab=c.vocab_size,
        linears=(*attention(enc + "0.", "SelfAttention", ne), *feed_forward(enc + "1.", ne),
                 *attention(dec + "0.", "SelfAttention", nd), *attention(dec + "1.", "EncDecAttention", nd),
                 *feed_forward(dec + "2.", nd), *head),
        weights=(Weight(path="shared.weight", size=c.vocab_size * d),
                 Weight(path="encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", size=bias_table),
                 Weight(path="decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", size=bias_table),
                 *(w for k in "01" for w in _norm(f"{enc}{k}.layer_norm", d, ne)),
                 *(w for k in "012" for w in _norm(f"{dec}{k}.layer_norm", d, nd)),
                 *_norm("encoder.final_layer_norm", d), *_norm("decoder.final_layer_norm", d)),
    )


def _bart(c) -> ModelSpec:
    """BART (Lewis et al. 2020, "BART: Denoising Sequence-to-Sequence Pre-training"): post-norm
    blocks with biases everywhere, q/k/v/out projections in ``self_attn`` and the decoder's
    ``encoder_attn``, fc1 -> fc2, a LayerNorm on the embeddings, learned positions with 2 extra rows
    (fairseq's offset), head tied to the shared embeddings (``final_logits_bias`` is a buffer)."""
    d, ne, nd, V = c.d_model, c.encoder_layers, c.decoder_layers, c.vocab_size
    enc, dec = "model.encoder.layers.{i}.", "model.decoder.layers.{i}."

    def attention(path: str, name: str, n: int) -> tuple[Linear, ...]:
        return tuple(_lin(f"{path}{name}.{m}_proj", f"{name}.{m}_proj", d, {m[0]: d}, n, True)
                     for m in ("q", "k", "v", "out"))

    def block(path: str, n: int, ff: int, cross: bool) -> tuple[Linear, ...]:
        return (*attention(path, "self_attn", n), *(attention(path, "encoder_attn", n) if cross else ()),
                _lin(path + "fc1", "fc1", d, {"fc1": ff}, n, True), _lin(path + "fc2", "fc2", ff, {"fc2": d}, n, True))

    def stack_weights(name: str, path: str, n: int, norms: tuple[str, ...]) -> tuple[Weight, ...]:
        return (Weight(path=f"model.{name}.embed_positions.weight", size=(c.max_position_embeddings + 2) * d),
                *_norm(f"model.{name}.layernorm_embedding", d, 1, True),
                *(w for norm in norms for w in _norm(path + norm, d, n, True)))

    head, _ = _head(c, d)
    return ModelSpec(
        family="bart", qkv=("q_proj", "k_proj", "v_proj"), attn_out="self_attn.out_proj", mlp_out="fc2",
        norms=("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm", "layernorm_embedding"),
        hidden=d, ff=c.decoder_ffn_dim, layers=nd, heads=c.decoder_attention_heads,
        kv_heads=c.decoder_attention_heads, encoder_layers=ne, cross_attn="encoder_attn", vocab=V,
        linears=(*block(enc, ne, c.encoder_ffn_dim, False), *block(dec, nd, c.decoder_ffn_dim, True), *head),
        weights=(Weight(path="model.shared.weight", size=V * d),
                 *stack_weights("encoder", enc, ne, ("self_attn_layer_norm", "final_layer_norm")),
                 *stack_weights("decoder", dec, nd, ("self_attn_layer_norm", "encoder_attn_layer_norm",
                                                     "final_layer_norm"))),
    )


def model_spec(config) -> ModelSpec:
    """The ``ModelSpec`` of a transformers config, by ``model_type``: gpt2; llama, mistral, qwen2,
    qwen3 (family "llama"); phi; phi3; t5 (Flan-T5 included); bart. An explicit map per family, no
    guessing from module names.

    Default LoRA targets (``qkv``) are the attention's query, key and value projections in every
    family, lmlab's one rule: gpt2 c_attn, llama/phi q_proj,k_proj,v_proj, phi3 qkv_proj, t5 q,k,v,
    bart q_proj,k_proj,v_proj (in an encoder-decoder the suffixes also pick the decoder's
    cross-attention, as in peft). peft's own defaults differ: q,v for t5, q_proj,v_proj for
    bart/llama, q_proj,v_proj,fc1,fc2 for phi, none for phi3; ``--target`` reproduces them. One rule
    keeps ``--target`` unset meaning the same matrices everywhere, and on the fused families (GPT-2,
    Phi-3) q and v cannot be adapted without k.
    """
    kind = getattr(config, "model_type", None)
    if kind == "gpt2":
        return _gpt2(config)
    if kind in _LLAMA_LIKE:
        return _llama(config, kind)
    builders = {"phi": _phi, "phi3": _phi3, "t5": _t5, "bart": _bart}
    if kind in builders:
        return builders[kind](config)
    raise LmlabError(f"unsupported architecture {kind!r}: lmlab knows gpt2, {', '.join(_LLAMA_LIKE)}, "
                     "phi, phi3, t5 (and Flan-T5) and bart")
