"""The learning-rate schedule of every trainer: linear warm-up, then cosine decay to 10 % of the
peak (as nanoGPT and most LoRA recipes), and how ``--resume`` lengthens it without redrawing a
rate already applied.
"""

from __future__ import annotations

import math

from lmlab.errors import LmlabError


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to ``peak``, then cosine decay to 10 % of it at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def scheduled_lr(step: int, segments: list[dict], warmup: float, peak: float) -> float:
    """The learning rate of ``step`` under a schedule that a resumed run may have lengthened.

    The first segment is ``lr_at`` over the run's first total. When ``--resume`` grows the total at
    step s, a segment {"from": s, "total": T, "lr": the rate s would have had} continues from that
    rate down to the same floor (10 % of peak) at T on a cosine, so no rate already applied is
    redrawn and the next one does not jump."""
    segment = next(seg for seg in reversed(segments) if seg["from"] <= step)
    if segment["from"] == 0:
        return lr_at(step, segment["total"], int(warmup * segment["total"]), peak)
    floor, start = 0.1 * peak, segment["from"]
    progress = min(1.0, (step - start) / max(1, segment["total"] - start))
    return floor + (segment["lr"] - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lengthened(segments: list[dict], step: int, total: int, warmup: float, peak: float) -> list[dict]:
    """``segments`` for a run resumed at ``step`` with ``total`` steps (unchanged if the total is)."""
    if total == segments[-1]["total"]:
        return segments
    if total < step:
        raise LmlabError(f"--resume: the run has done {step} steps; --max-iters / --epochs ask for {total} in all")
    return [*segments, {"from": step, "total": total, "lr": scheduled_lr(step, segments, warmup, peak)}]
