"""Storage for K task-adapted copies of one model (Hu et al. 2021, LoRA, §4.2 and §7).

Full fine-tuning stores a whole model per task; fine-tuning only some weight matrices stores
those; LoRA of rank r stores r·(d_in + d_out) numbers per adapted matrix. The shared base can be
counted once or left out. GPT-3 175B with r = 4 on W_q and W_v: 2 · 96 · 4 · (12288 + 12288) =
18,874,368 parameters, 37.7 MB in fp16 against 350 GB per fully fine-tuned copy.

The matrices' shapes are ``lmlab.calc.params``'s, the ones ``lmlab params`` checks against real
modules: under grouped-query attention W_k and W_v are d x d_kv (SmolLM2-135M: 576 x 192).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmlab.calc.params import SHAPE_PRESETS, adapted_matrices, lora_count, model_config, target_shape
from lmlab.errors import LmlabError
from lmlab.models import PRESETS, ModelSpec, build_model, model_spec

# The papers' round totals where they differ from the modules' count (GPT-3: 174.6e9 counted;
# Hu et al.'s 350 GB per copy is 175e9 * 2 bytes).
_STATED_PARAMS = {"gpt3-175b": 175e9}


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the calculator needs of a transformer: one block's shapes (the ``ModelSpec`` that
    ``lmlab params`` counts with), its total parameters and bytes per parameter."""

    spec: ModelSpec
    params: float  # total parameters (all of them, embeddings included)
    bytes_per_param: float = 2.0  # fp16 / bf16 checkpoints

    @property
    def layers(self) -> int:
        return self.spec.layers

    def matrix_shape(self, name: str) -> tuple[int, int]:
        """(d_in, d_out) of one weight matrix per layer: a short name (q, k, v, o, fc1, fc2, gate, up,
        down, wi, wo) or a module name (c_attn, q_proj, qkv_proj, ...), as ``lmlab.calc.params``
        resolves it."""
        return target_shape(self.spec, name)


def model_shape(name: str) -> ModelShape:
    """The shape of what ``lmlab params --model`` takes: a preset, the embedded model, a folder or a
    hub id, built on the meta device (no weights) and counted. The shape presets (``gpt3-175b``,
    ``llama-7b``) are fp16 checkpoints; the rest are counted in fp32, as lmlab trains them."""
    from pathlib import Path

    from lmlab import peft  # torch

    if name not in SHAPE_PRESETS and name not in PRESETS and "/" not in name and not Path(name).is_dir():
        raise LmlabError(f"unknown preset {name!r}; choose one of {', '.join((*SHAPE_PRESETS, *PRESETS))}, "
                         "a folder or a hub id (owner/name)")
    config = model_config(name)
    total = _STATED_PARAMS.get(name) or peft.count_parameters(build_model(config, device="meta"))[1]
    return ModelShape(spec=model_spec(config), params=total, bytes_per_param=2.0 if name in SHAPE_PRESETS else 4.0)


def parse_matrices(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    if not names:
        raise LmlabError("--target needs at least one matrix, e.g. q,v")
    return names


def matrix_params(shape: ModelShape, matrices: tuple[str, ...]) -> int:
    """Weights of the chosen matrices over the whole model (fine-tuning only those): every module a
    name picks, as ``lmlab params`` counts them (T5's ``q``: each encoder, decoder and cross-attention
    query)."""
    return sum(n * a * b for a, b, n in adapted_matrices(shape.spec, matrices))


def lora_params(shape: ModelShape, matrices: tuple[str, ...], rank: int) -> int:
    """LoRA's A and B for the chosen matrices over all layers: r (d_in + d_out) each (``lmlab params``'s
    closed form)."""
    return lora_count(shape.spec, rank, matrices)


def storage(shape: ModelShape, tasks: int, matrices: tuple[str, ...], rank: int) -> dict:
    """Bytes for ``tasks`` adapted copies under each strategy, with the shared base and without it."""
    if tasks <= 0:
        raise LmlabError(f"tasks must be positive, got {tasks}")
    bpp, base = shape.bytes_per_param, shape.params * shape.bytes_per_param
    per_task = {"full": shape.params * bpp, "matrices": matrix_params(shape, matrices) * bpp,
                "lora": lora_params(shape, matrices, rank) * bpp}
    return {
        "tasks": tasks, "bytes_per_param": bpp, "base_bytes": base, "matrices": list(matrices), "rank": rank,
        "per_task_params": {"full": shape.params, "matrices": matrix_params(shape, matrices),
                            "lora": lora_params(shape, matrices, rank)},
        "per_task_bytes": per_task,
        # full fine-tuning keeps no shared base: every task is a whole model
        "total_bytes": {"full": tasks * per_task["full"], "matrices": base + tasks * per_task["matrices"],
                        "lora": base + tasks * per_task["lora"]},
        "total_bytes_without_base": {k: tasks * v for k, v in per_task.items()},
    }


def rank_for_budget(shape: ModelShape, tasks: int, matrices: tuple[str, ...], budget: float,
                    include_base: bool = True) -> int:
    """The largest LoRA rank whose ``tasks`` adapters (plus the base, if included) fit ``budget`` bytes."""
    room = budget - (shape.params * shape.bytes_per_param if include_base else 0)
    per_rank = tasks * lora_params(shape, matrices, 1) * shape.bytes_per_param
    rank = int(room // per_rank) if room > 0 else 0
    if rank < 1:
        need = (shape.params * shape.bytes_per_param if include_base else 0) + per_rank
        raise LmlabError(f"a budget of {human_bytes(budget)} does not fit even rank 1 ({human_bytes(need)} needed)")
    return rank


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "pb": 1e15,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> float:
    """'350GB', '1.5 TiB', '4e9' -> bytes (decimal kB/MB/GB/TB, binary KiB/MiB/GiB/TiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _UNITS:
        raise LmlabError(f"not a size in bytes: {text!r} (e.g. 350GB, 1.5TiB, 4e9)")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < value < float("inf"):
        raise LmlabError(f"a size must be positive and finite, got {text!r}")
    return value


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"
