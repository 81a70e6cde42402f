"""Scaling-law calculators (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models").

The parametric fit of Eq. 2, L(N, D) = E + A / N^α + B / D^β, with the paper's constants as
defaults; compute C ≈ 6 N D FLOPs; the compute-optimal split of a budget (Eq. 4); the
single-factor laws; and data reuse in the spirit of Muennighoff et al. 2023: the r-th pass over a
token is worth (1/2)^(r-1) of a fresh one, so x extra epochs over D unique tokens are worth
D' = D · Σ_{r=1}^{1+x} 2^-(r-1) = 2(1 − 2^-(x+1)) D, which never exceeds 2D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmlab.errors import LmlabError


@dataclass(frozen=True, kw_only=True)
class ChinchillaFit:
    """The fitted constants of L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, Eq. 10 / App. D.2)."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28

    def __post_init__(self):
        if self.alpha <= 0 or self.beta <= 0:
            raise LmlabError(f"the exponents must be positive, got alpha={self.alpha}, beta={self.beta}")
        if self.A <= 0 or self.B <= 0 or self.E < 0:
            raise LmlabError("need A > 0, B > 0 and E >= 0")


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise LmlabError(f"{name} must be a positive number, got {value!r}")


def loss(n: float, d: float, fit: ChinchillaFit = ChinchillaFit()) -> float:
    """L(N, D) = E + A / N^α + B / D^β."""
    _positive(params=n, tokens=d)
    return fit.E + fit.A / n**fit.alpha + fit.B / d**fit.beta


def loss_of_params(n: float, fit: ChinchillaFit = ChinchillaFit()) -> float:
    """The model-size term alone, L(N) = A / N^α (infinite data, no irreducible loss)."""
    _positive(params=n)
    return fit.A / n**fit.alpha


def loss_of_tokens(d: float, fit: ChinchillaFit = ChinchillaFit()) -> float:
    """The data term alone, L(D) = B / D^β."""
    _positive(tokens=d)
    return fit.B / d**fit.beta


def compute(n: float, d: float) -> float:
    """Training FLOPs, C ≈ 6 N D (2 for the forward pass, 4 for the backward, per parameter and token)."""
    _positive(params=n, tokens=d)
    return 6.0 * n * d


def exponents(fit: ChinchillaFit = ChinchillaFit()) -> tuple[float, float]:
    """(x, y) with N_opt ∝ C^x and D_opt ∝ C^y: x = β/(α+β), y = α/(α+β), so x + y = 1."""
    return fit.beta / (fit.alpha + fit.beta), fit.alpha / (fit.alpha + fit.beta)


def compute_optimal(c: float, fit: ChinchillaFit = ChinchillaFit()) -> tuple[float, float]:
    """(N_opt, D_opt) minimising L subject to 6 N D = C (Hoffmann et al. 2022, Eq. 4):
    N_opt = G (C/6)^x, D_opt = (C/6)^y / G, with G = (αA / (βB))^(1/(α+β))."""
    _positive(compute=c)
    x, y = exponents(fit)
    g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1 / (fit.alpha + fit.beta))
    return g * (c / 6) ** x, (c / 6) ** y / g


def balanced_tokens(n: float, fit: ChinchillaFit = ChinchillaFit()) -> float:
    """The D that is compute-optimal for a model of N parameters: where the marginal gains balance,
    αA / N^α = βB / D^β, so D = (βB N^α / (αA))^(1/β)."""
    _positive(params=n)
    return (fit.beta * fit.B * n**fit.alpha / (fit.alpha * fit.A)) ** (1 / fit.beta)


def effective_tokens(d: float, extra_epochs: float) -> float:
    """D' = 2 (1 − 2^-(x+1)) D after x extra epochs over D unique tokens (x = 0: D' = D)."""
    _positive(tokens=d)
    if extra_epochs < 0 or not math.isfinite(extra_epochs):
        raise LmlabError(f"extra epochs must be a number >= 0, got {extra_epochs!r}")
    return 2 * (1 - 2 ** -(extra_epochs + 1)) * d


def extra_epochs_for_loss(n: float, d: float, target: float, fit: ChinchillaFit = ChinchillaFit()) -> dict:
    """Extra epochs over D unique tokens that bring a model of N parameters to ``target`` loss,
    and the compute they add (6 N D per epoch). Solves B / D'^β = target − E − A/N^α for D', then
    2(1 − 2^-(x+1)) = D'/D for x; unreachable when D'/D ≥ 2 (repetition saturates at 2D)."""
    _positive(params=n, tokens=d, target=target)
    room = target - fit.E - fit.A / n**fit.alpha
    if room <= 0:
        raise LmlabError(f"target loss {target} is unreachable with {n:.3g} parameters: even infinite data "
                         f"gives {fit.E + fit.A / n ** fit.alpha:.4f}")
    needed = (fit.B / room) ** (1 / fit.beta)
    ratio = needed / d
    if ratio >= 2:
        limit = fit.E + fit.A / n**fit.alpha + fit.B / (2 * d) ** fit.beta
        raise LmlabError(f"target loss {target} is unreachable by repeating {d:.3g} tokens: infinite epochs "
                         f"give at best {limit:.4f} (effective data saturates at 2D)")
    extra = 0.0 if ratio <= 1 else -math.log2(1 - ratio / 2) - 1
    return {"extra_epochs": extra, "effective_tokens": max(needed, d), "extra_compute": 6 * n * d * extra,
            "loss": loss(n, effective_tokens(d, extra), fit)}


def optimal_epochs(c: float, d: float, fit: ChinchillaFit = ChinchillaFit(), points: int = 4000) -> dict:
    """With a compute budget C and D unique tokens, the number of extra epochs x (and the model
    size N = C / (6 D (1 + x)) it leaves) that minimises L(N, D'(x)). One-dimensional and smooth,
    solved numerically: a log-spaced grid over x, then golden-section search around its best point."""
    _positive(compute=c, tokens=d)
    x_max = c / (6 * d) - 1  # N >= 1 parameter
    if x_max < 0:
        raise LmlabError(f"compute {c:.3g} cannot train even a 1-parameter model on one pass over {d:.3g} tokens")

    def objective(x: float) -> float:
        return loss(c / (6 * d * (1 + x)), effective_tokens(d, x), fit)

    grid = [0.0] + [x_max * 10 ** (-6 + 6 * i / (points - 1)) for i in range(points)]
    best = min(range(len(grid)), key=lambda i: objective(grid[i]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if objective(a) < objective(b) else (a, hi)
    x = (lo + hi) / 2 if objective((lo + hi) / 2) < objective(grid[best]) else grid[best]
    n = c / (6 * d * (1 + x))
    return {"extra_epochs": x, "params": n, "effective_tokens": effective_tokens(d, x), "loss": objective(x)}


def simple_split(n: float, d: float, x: float, y: float, flops_per_param_token: float = 6.0,
                 rel_tol: float = 0.01) -> dict:
    """Is (N, D) compute-optimal under the simple law N* = C^x, C = k N D (k = 6 for 6ND, 1 for ND)?

    The law fixes N* = C^x; the budget fixes D* = C / (k N*), which is C^y when k = 1 and x + y = 1 (and
    ∝ C^y otherwise). The pair is optimal when N is within ``rel_tol`` of N*. Keeping D, the N that makes
    it optimal solves N = (k N D)^x, so N = (k D)^(x/(1−x)); keeping N, the D solves the same equation
    for D: D = N^((1−x)/x) / k. With k = 1 these are D^(x/y) and N^(y/x)."""
    _positive(params=n, tokens=d, flops_per_param_token=flops_per_param_token)
    if not (0 < x < 1 and 0 < y < 1) or abs(x + y - 1) > 1e-6:
        raise LmlabError(f"split exponents must be in (0, 1) and add up to 1 (N·D ∝ C), got {x}, {y}")
    k = flops_per_param_token
    c = k * n * d
    n_opt = c**x
    return {"compute": c, "optimal_params": n_opt, "optimal_tokens": c / (k * n_opt), "params_ratio": n / n_opt,
            "optimal": abs(n / n_opt - 1) <= rel_tol, "params_for_tokens": (k * d) ** (x / (1 - x)),
            "tokens_for_params": n ** ((1 - x) / x) / k}


def loss_change(n: float, d: float, change: float, params_scale: float = 1.0,
                fit: ChinchillaFit = ChinchillaFit()) -> dict:
    """A run of N parameters on D unique tokens (one pass) and a loss target L' = (1 + change) L(N, D).

    With a model of s N parameters (s = ``params_scale``, 1 by default) and the unique data fixed at D:
    the loss that model reaches on one pass and its relative change; the fresh tokens it would need for
    L' (solving B/D'^β = L' − E − A/(sN)^α); the model size that reaches L' on one pass over D (solving
    A/N'^α = L' − E − B/D^β); and the extra epochs over D that reach L' (``extra_epochs_for_loss``).
    An unreachable answer is None, with the reason under ``*_unreachable``."""
    _positive(params=n, tokens=d, params_scale=params_scale)
    if not (math.isfinite(change) and change > -1):
        raise LmlabError(f"the loss change must be a number above -100%, got {change!r}")
    current, scaled = loss(n, d, fit), params_scale * n
    target = (1 + change) * current
    at_scaled = loss(scaled, d, fit)
    out = {"loss": current, "target_loss": target, "params": scaled, "loss_at_params": at_scaled,
           "loss_change_at_params": at_scaled / current - 1}
    room_d = target - fit.E - fit.A / scaled**fit.alpha
    out["tokens_for_target"] = (fit.B / room_d) ** (1 / fit.beta) if room_d > 0 else None
    room_n = target - fit.E - fit.B / d**fit.beta
    out["params_for_target"] = (fit.A / room_n) ** (1 / fit.alpha) if room_n > 0 else None
    try:
        out["repeat"] = extra_epochs_for_loss(scaled, d, target, fit)
    except LmlabError as exc:
        out["repeat"], out["repeat_unreachable"] = None, str(exc)
    return out


def plot(path, fit: ChinchillaFit = ChinchillaFit(), losses=(2.0, 2.1, 2.2, 2.4, 2.7, 3.0)) -> None:
    """Iso-loss curves in the (N, D) plane, log-log, and the compute-optimal frontier (N_opt(C), D_opt(C))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lmlab.io import write_atomic

    n = np.logspace(7, 13, 400)
    fig, ax = plt.subplots(figsize=(7, 5))
    for target in losses:
        room = target - fit.E - fit.A / n**fit.alpha
        ok = room > 0
        ax.loglog(n[ok], (fit.B / room[ok]) ** (1 / fit.beta), label=f"L = {target}")
    frontier = [compute_optimal(c, fit) for c in np.logspace(17, 26, 50)]
    ax.loglog([f[0] for f in frontier], [f[1] for f in frontier], "k--", linewidth=2, label="compute-optimal")
    ax.set(xlabel="parameters N", ylabel="training tokens D", xlim=(1e7, 1e13), ylim=(1e8, 1e15),
           title=f"iso-loss curves, L = {fit.E} + {fit.A}/N^{fit.alpha} + {fit.B}/D^{fit.beta}")
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
