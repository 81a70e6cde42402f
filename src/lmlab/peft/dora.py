"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

The adapted weight is split into a magnitude and a direction (Eq. 5):

    W' = m * (W0 + s B A) / ||W0 + s B A||_c,

m a trainable vector of d_out magnitudes, initialised to ||W0||_c so the model is unchanged at init,
and ||.||_c the norm over the inputs of each output's weights (the paper's column norm: its W is
d_in x d_out). As the paper advises (Sec. 4.3) and peft does, the norm is a constant in the
backward pass: it follows B A forward but passes no gradient. Weights here are (d_out, d_in), as
``nn.Linear`` stores them; ``lora.LoraLayer`` holds m and calls these functions.
"""

from __future__ import annotations

import torch


def weight_norm(w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W0 + delta||_c, (d_out,), detached from the graph (Sec. 4.3). ``delta`` = s B A."""
    with torch.no_grad():
        return torch.linalg.norm(w0 + delta, dim=1).to(w0.dtype)


def update(w0_x: torch.Tensor, lora_x: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
           scaling: float) -> torch.Tensor:
    """What DoRA adds to the base layer's output, as peft computes it:

        W' x - W0 x = (m / n - 1) W0 x + (m / n) s B A x,    n = ||W0 + s B A||_c,

    with ``w0_x`` = W0 x (no bias; (..., d_out)) and ``lora_x`` = B A x (..., d_out)."""
    scale = magnitude / norm  # (d_out,), broadcast over the tokens
    return (scale - 1) * w0_x + scale * lora_x * scaling


def merged_weight(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' = m (W0 + delta) / ||W0 + delta||_c, (d_out, d_in): the weight ``eval()`` merges."""
    return (magnitude / weight_norm(w0, delta)).view(-1, 1) * (w0 + delta)
