"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Each targeted projection W0 gets a trainable low-rank update (Eq. 3 of the paper):

    h = W0 x + (alpha / r) * B A dropout(x),   A: (r, d_in) kaiming-uniform, B: (d_out, r) zeros,

so the model is unchanged at initialisation. Options, as in peft: rsLoRA's scale alpha / sqrt(r)
(Kalajdzievski 2023), DoRA's magnitude and direction (``lmlab.peft.dora``), ``"all-linear"``
targets and ``modules_to_save`` (trainable full copies, e.g. of the LM head).

``model.eval()`` merges B A into W0 (inference costs nothing extra) and ``model.train()`` restores
W0 bit for bit. Adapters are saved and loaded in the Hugging Face PEFT format, so
``peft.PeftModel.from_pretrained`` reads them and lmlab reads peft's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmlab.errors import LmlabError
from lmlab.io import load_tensors, read_json, save_tensors, write_json
from lmlab.models import model_spec
from lmlab.peft import dora
from lmlab.peft.dropout import SparseDropout
from lmlab.peft._modules import ModuleCopy, find_modules, freeze, name_matches

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"  # peft's shorthand: every Linear / Conv1D but the output head
# The names of every parameter LoRA trains (a modules_to_save copy holds whole modules).
_OWN = (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".modules_to_save.")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA hyperparameters.

    r: rank of the update B A. alpha: scale numerator, the update is multiplied by alpha / r; None
    is ``default_alpha(r)`` = 4r. dropout: dropout on the LoRA branch's input. target_modules:
    module-name suffixes (a list) or a full-name regex (a string), as in peft; ``"all-linear"`` is
    every Linear / Conv1D but the LM head; None targets the attention query/key/value projections.
    use_rslora: scale by alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023) instead of alpha / r.
    use_dora: DoRA (Liu et al. 2024), a trainable magnitude per output (``lmlab.peft.dora``).
    modules_to_save: module-name suffixes of modules trained in full as copies (peft's
    ``modules_to_save``; e.g. ``lm_head``, ``embed_tokens``/``wte``), saved in the adapter.
    These defaults are lmlab's, for params, finetune, dpo and sweep alike.
    """

    r: int = 128
    alpha: float | None = None
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise LmlabError(f"LoRA rank must be a positive integer, got {self.r!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", default_alpha(self.r))
        if self.alpha <= 0:
            raise LmlabError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmlabError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.modules_to_save, str):  # "lm_head,wte", as the command line gives it
            object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save.split(",")))
        if self.modules_to_save is not None:
            names = tuple(n.strip() for n in self.modules_to_save if n.strip())
            object.__setattr__(self, "modules_to_save", names or None)


def default_alpha(r: int) -> float:
    """alpha when none is given: 4r, so the update's scale alpha / r is 4 at every rank (r = 128:
    alpha 512; r = 16: alpha 64)."""
    return 4.0 * r


class LoraLayer(nn.Module):
    """Wraps a ``nn.Linear`` or GPT-2 ``Conv1D`` (``base_layer``) and adds ``scale * B(A(dropout(x)))``
    (with ``use_dora``, DoRA's update instead; see ``lmlab.peft.dora``)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool = False,
                 use_dora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # Conv1D stores W as (d_in, d_out)
        w = base_layer.weight
        if self.fan_in_fan_out:
            d_out, d_in = w.shape[1], w.shape[0]
        else:  # in/out_features: a 4/8-bit bitsandbytes weight is stored packed, not (d_out, d_in)
            d_out, d_in = base_layer.out_features, base_layer.in_features
        # A quantised base keeps LoRA in fp32 (QLoRA); otherwise LoRA takes the base weight's dtype.
        self.quantized = not w.is_floating_point() or type(base_layer).__module__.startswith("bitsandbytes")
        dtype = torch.float32 if self.quantized else w.dtype
        self.lora_A = nn.Linear(d_in, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, d_out, bias=False, device=w.device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = SparseDropout(dropout) if dropout > 0 else nn.Identity()
        # rsLoRA (Kalajdzievski 2023): alpha / sqrt(r) keeps the update's scale stable as r grows
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self._w0: torch.Tensor | None = None  # the unmerged W0 while merged, to restore it exactly
        self.disabled = False  # True: behave as the base layer (DPO's reference model, see ``disabled``)
        magnitude = None
        if use_dora:  # m = ||W0 + s B A||_c = ||W0||_c at init (B = 0): the model is unchanged
            if self.quantized:
                raise LmlabError("DoRA on a 4/8-bit quantised base is not supported; load the base in bf16 or fp32")
            magnitude = nn.Parameter(dora.weight_norm(self._out_in(w.data), self._out_in(self.delta_weight())))
        self.register_parameter("lora_magnitude_vector", magnitude)  # peft's name: (d_out,)

    @property
    def merged(self) -> bool:
        return self._w0 is not None

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for model code that reads it (T5's feed-forward checks ``wo.weight``'s
        dtype), as peft's wrapped layers expose it."""
        return self.base_layer.weight

    def _out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight laid out like ``base_layer.weight`` as (d_out, d_in), and back (a transpose, or none)."""
        return weight.T if self.fan_in_fan_out else weight

    def base_weight(self) -> torch.Tensor:
        """W0, merged or not."""
        return self._w0 if self.merged else self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, laid out like ``base_layer.weight``."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (d_out, d_in)
        return self._out_in(delta)

    def merged_weight(self) -> torch.Tensor:
        """W0 + scale * B A, or DoRA's m (W0 + scale * B A) / ||W0 + scale * B A||_c, in W0's layout and dtype."""
        w0 = self.base_weight().data
        delta = self.delta_weight().to(w0.dtype)
        if self.lora_magnitude_vector is None:
            return w0 + delta
        magnitude = self.lora_magnitude_vector.to(w0.dtype)
        return self._out_in(dora.merged_weight(self._out_in(w0), self._out_in(delta), magnitude))

    def merge(self) -> None:
        """W <- ``merged_weight()``, W0 kept so that unmerge is exact. Never into a quantised W0, nor
        one FSDP / ZeRO-3 holds sharded or freed outside the forward: their forward adds the branch."""
        w = self.base_layer.weight
        if (self.merged or self.quantized or type(w).__name__ == "DTensor"  # FSDP2; ZeRO-3, FSDP1:
                or w.numel() != self.lora_A.in_features * self.lora_B.out_features  # an empty placeholder
                or w.untyped_storage().nbytes() < w.numel() * w.element_size()):  # or freed storage
            return
        with torch.no_grad():
            merged = self.merged_weight()
        self._w0 = self.base_layer.weight.data
        self.base_layer.weight.data = merged

    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.data = self._w0
            self._w0 = None

    def train(self, mode: bool = True):
        """``eval()`` is ``train(False)``: merge for inference, unmerge for training."""
        super().train(mode)
        if mode:
            self.unmerge()
        else:
            self.merge()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self._project(x, self._w0) if self.merged else self.base_layer(x)
        needs_grad = torch.is_grad_enabled() and self.lora_A.weight.requires_grad
        if self.merged and not needs_grad:
            return self.base_layer(x)
        # Unmerged path; while merged (training in eval mode) it uses the saved W0.
        base = self.base_layer(x) if not self.merged else self._project(x, self._w0)
        # LoRA may hold fp32 weights beside a bf16 / quantised base (mixed precision, QLoRA)
        x = x.to(self.lora_A.weight.dtype)
        if self.lora_magnitude_vector is not None:
            return base + self._dora_update(x, base).to(base.dtype)
        # scaled on the (.., r) side: one small multiply instead of one over the (.., d_out) output
        update = self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)
        return base + update.to(base.dtype)

    def _dora_update(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """DoRA's (m/n - 1) W0 x' + (m/n) s B A x' with x' = dropout(x), as peft computes it: without
        dropout W0 x is the base output less its bias, with it W0 x' is computed again."""
        w0 = self._out_in(self.base_weight()).to(x.dtype)  # (d_out, d_in)
        bias = self.base_layer.bias
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            w0_x = base - bias if bias is not None else base
        else:
            x = self.lora_dropout(x)
            w0_x = F.linear(x, w0)
        norm = dora.weight_norm(w0, (self.lora_B.weight @ self.lora_A.weight) * self.scaling)
        return dora.update(w0_x, self.lora_B(self.lora_A(x)), self.lora_magnitude_vector, norm, self.scaling)

    def _project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        if self.fan_in_fan_out:
            out = x @ weight
            return out + bias if bias is not None else out
        return F.linear(x, weight, bias)


def apply(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap every targeted projection of ``model`` in a ``LoraLayer`` and each of ``modules_to_save``
    in a ``ModuleCopy``; only their LoRA weights and copies stay trainable."""
    targets = config.target_modules or model_spec(model.config).qkv
    is_all = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    names = all_linear(model) if is_all else find_modules(model, targets, (nn.Linear, Conv1D))
    freeze(model)
    for name in names:
        layer = LoraLayer(model.get_submodule(name), config.r, config.alpha, config.dropout,
                          use_rslora=config.use_rslora, use_dora=config.use_dora)
        model.set_submodule(name, layer)
        layer.train(model.training)
    for name in _saved_modules(model, config.modules_to_save or ()):
        model.set_submodule(name, ModuleCopy(model.get_submodule(name)))
    mark_only_lora_as_trainable(model)
    return model


def all_linear(model: nn.Module) -> list[str]:
    """peft's ``target_modules="all-linear"``: every Linear / Conv1D but the output head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, Conv1D)) and m is not head]


def _saved_modules(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The modules ``modules_to_save`` names (outermost matches; not one LoRA already adapts)."""
    if not patterns:
        return []
    names = [n for n, _ in model.named_modules() if n and name_matches(n, patterns)]
    if not names:
        raise LmlabError(f"modules_to_save {list(patterns)} matches no module in {type(model).__name__}")
    adapted = lora_layers(model)
    for name in names:
        if any(name == n or name.startswith(n + ".") or n.startswith(name + ".") for n in adapted):
            raise LmlabError(f"modules_to_save {name!r} is also a LoRA target (or holds one); choose one of the two")
    return [n for n in names if not any(n.startswith(m + ".") for m in names)]


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def module_copies(model: nn.Module) -> dict[str, ModuleCopy]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ModuleCopy)}


@contextmanager
def disabled(model: nn.Module):
    """Run ``model`` as its base model (W0 only) inside the block: DPO's reference policy without a
    second copy of the weights (peft's ``disable_adapter``)."""
    layers = [*lora_layers(model).values(), *module_copies(model).values()]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(any(k in name for k in _OWN))


def lora_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Only the trained weights, under their module names (``...c_attn.lora_A.weight``,
    ``...c_attn.lora_magnitude_vector``, ``lm_head.modules_to_save.weight``)."""
    state = model.state_dict() if state_dict is None else state_dict
    return {k: v for k, v in state.items() if any(s in k for s in _OWN)}


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every ``LoraLayer`` by its base layer with B A merged in, and every ``ModuleCopy`` by
    its trained copy: a plain transformers model."""
    if any(layer.quantized for layer in lora_layers(model).values()):
        raise LmlabError("cannot merge LoRA into a 4/8-bit quantised base (the sum is not representable in "
                         "its quantised weights); load the base in bf16 or fp32 to merge")
    for name, layer in lora_layers(model).items():
        layer.merge()
        layer._w0 = None
        model.set_submodule(name, layer.base_layer)
    for name, saved in module_copies(model).items():
        model.set_submodule(name, saved.modules_to_save)
    return model


# --- Hugging Face PEFT format ---------------------------------------------------------------


def _target_modules(model: nn.Module, names: Sequence[str]) -> list[str] | str:
    """Leaf names if they pick out exactly ``names``, else a regex of the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    same_leaf = {n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in leaves and n}
    if same_leaf == set(names):
        return leaves
    return "^(?:" + "|".join(n.replace(".", r"\.") for n in sorted(names)) + ")$"


def _task_type(model: nn.Module) -> str:
    """peft's task type: SEQ_2_SEQ_LM for an encoder-decoder (T5, BART), else CAUSAL_LM."""
    return "SEQ_2_SEQ_LM" if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else "CAUSAL_LM"


def save(model: nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout and key names)."""
    layers = lora_layers(model)
    if not layers:
        raise LmlabError("model has no LoRA layers to save")
    first = next(iter(layers.values()))
    out_dir = Path(out_dir)
    config = {
        "peft_type": "LORA", "task_type": _task_type(model), "r": first.r, "lora_alpha": first.alpha,
        "lora_dropout": getattr(first.lora_dropout, "p", 0.0), "target_modules": _target_modules(model, list(layers)),
        "fan_in_fan_out": first.fan_in_fan_out, "bias": "none", "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": sorted(module_copies(model)) or None,
        "use_dora": first.lora_magnitude_vector is not None, "use_rslora": first.use_rslora,
        "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": getattr(model, "name_or_path", None),
    }
    # peft saves a copy's weights under the module's own name (``lm_head.weight``)
    weights = {_PEFT_PREFIX + k.replace(".modules_to_save.", "."): v
               for k, v in lora_state_dict(model, state_dict).items()}
    save_tensors(out_dir / ADAPTER_WEIGHTS, weights, metadata={"format": "pt"})
    write_json(out_dir / ADAPTER_CONFIG, config)
    return out_dir


def read_config(adapter_dir: str | Path) -> LoraConfig:
    """The ``LoraConfig`` of a PEFT-format adapter folder; unsupported PEFT options are an error."""
    raw = read_json(Path(adapter_dir) / ADAPTER_CONFIG)
    if raw.get("peft_type") != "LORA":
        raise LmlabError(f"{adapter_dir} holds a {raw.get('peft_type')} adapter, not LoRA")
    for key in ("rank_pattern", "alpha_pattern", "ensure_weight_tying"):
        if raw.get(key):
            raise LmlabError(f"{adapter_dir}: peft option {key}={raw[key]!r} is not supported by lmlab")
    if raw.get("bias", "none") != "none":
        raise LmlabError(f"{adapter_dir}: peft option bias={raw['bias']!r} is not supported by lmlab")
    targets = raw.get("target_modules")
    return LoraConfig(
        r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
        target_modules=targets if isinstance(targets, str) else tuple(targets or ()) or None,
        use_rslora=bool(raw.get("use_rslora")), use_dora=bool(raw.get("use_dora")),
        modules_to_save=tuple(raw.get("modules_to_save") or ()) or None,
    )


def load(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply the LoRA adapter saved in ``adapter_dir`` (by lmlab or peft) to a base ``model``."""
    try:
        apply(model, read_config(adapter_dir))
    except LmlabError as exc:
        raise LmlabError(f"adapter {adapter_dir} does not fit this model (made for another model?): {exc}") from None
    copies = list(module_copies(model))

    def own_name(key: str) -> str:  # peft's key -> ours: the adapter name out, a copy's name back in
        key = key.removeprefix(_PEFT_PREFIX).replace(".default.weight", ".weight")
        key = key.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")
        copy = next((c for c in copies if key.startswith(c + ".") and ".modules_to_save." not in key), None)
        return f"{copy}.modules_to_save.{key[len(copy) + 1:]}" if copy else key

    weights = {own_name(k): v for k, v in load_tensors(Path(adapter_dir) / ADAPTER_WEIGHTS).items()}
    load_state(model, weights, str(adapter_dir))
    return model


def load_state(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``weights`` into the model's trained parameters, checking names and shapes first."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    if missing or unexpected:
        raise LmlabError(
            f"adapter {source} does not fit this model: "
            f"{len(missing)} weights missing (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )
    for k, v in weights.items():
        if v.shape != own[k].shape:
            raise LmlabError(
                f"adapter {source} was made for another model: {k} has shape {tuple(v.shape)}, "
                f"this model needs {tuple(own[k].shape)}"
            )
    training = model.training
    model.train()  # unmerge, copy, then re-merge with the loaded weights
    model.load_state_dict(weights, strict=False)
    model.train(training)
