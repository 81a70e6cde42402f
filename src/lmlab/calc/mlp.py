"""Parameter counts of a plain MLP under full fine-tuning, BitFit, bottleneck adapters and LoRA.

Layer i maps width w_i to w_{i+1}: w_i · w_{i+1} weights and w_{i+1} biases. BitFit (Ben Zaken
et al. 2022) trains the biases only. A bottleneck adapter of rank m (Houlsby et al. 2019) after
each layer's output of width w adds a down projection w×m + m and an up projection m×w + w, i.e.
2mw + m + w trainable numbers, while the base stays frozen (and counts in the total). LoRA of
rank r (Hu et al. 2021, Eq. 3) beside each layer's weight W (w_i x w_{i+1}) trains A (r x w_i) and
B (w_{i+1} x r): r (w_i + w_{i+1}) numbers per layer.
"""

from __future__ import annotations

from lmlab.errors import LmlabError

MLP_METHODS = ("full", "bitfit", "adapter", "lora")


def parse_widths(text: str) -> list[int]:
    """'1024,512,256,10' -> [1024, 512, 256, 10]: at least two positive integer widths."""
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise LmlabError(f"--mlp needs comma-separated integer widths, got {text!r}") from None
    if len(widths) < 2 or any(w <= 0 for w in widths):
        raise LmlabError(f"--mlp needs at least two positive widths (input, ..., output), got {text!r}")
    return widths


def mlp_counts(widths: list[int], method: str, bottleneck: int | None = None, rank: int | None = None) -> dict:
    """``trainable``, ``total`` and ``percent`` for an MLP of these layer widths under ``method``."""
    if method not in MLP_METHODS:
        raise LmlabError(f"method {method!r} is not defined for an MLP; choose {', '.join(MLP_METHODS)}")
    outs = widths[1:]
    weights = sum(a * b for a, b in zip(widths, outs))
    biases = sum(outs)
    base = weights + biases
    if method == "full":
        trainable, total = base, base
    elif method == "bitfit":
        trainable, total = biases, base
    elif method == "lora":
        if rank is None or rank <= 0:
            raise LmlabError(f"LoRA needs a positive --rank, got {rank}")
        trainable = sum(rank * (a + b) for a, b in zip(widths, outs))
        total = base + trainable
    else:
        if bottleneck is None or bottleneck <= 0:
            raise LmlabError(f"adapters need a positive --bottleneck, got {bottleneck}")
        trainable = sum(2 * bottleneck * w + bottleneck + w for w in outs)
        total = base + trainable
    return {"widths": widths, "method": method, "bottleneck": bottleneck if method == "adapter" else None,
            "rank": rank if method == "lora" else None,
            "trainable": trainable, "total": total, "percent": 100 * trainable / total}
