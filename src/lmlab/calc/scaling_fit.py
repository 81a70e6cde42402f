"""Fitting L(N, D) = E + A/N^α + B/D^β to training runs: Chinchilla's third approach
(Hoffmann et al. 2022, Sec. 3.3 and App. D.2), hand-written on numpy.

The paper minimises, over (a, b, e, α, β),

    Σ_i Huber_δ( LSE(a − α log N_i, b − β log D_i, e) − log L_i ),   δ = 1e-3,

with A = exp(a), B = exp(b), E = exp(e) (so the log of the law is a log-sum-exp), by L-BFGS from a
grid of starting points (α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −.5, …, 1}, a, b ∈ {0, 5, …, 25}: 4500 starts),
keeping the best fit. Here every start runs at once: a batched L-BFGS (two-loop recursion, Armijo
backtracking) with analytic gradients. The intercepts are optimised about the mean log N and log D
(a' = a − α·mean log N), which leaves the minimum where it is and makes the problem well conditioned.
Bootstrap intervals resample the runs with replacement (a resample is a weight vector of counts), and
all resamples are fitted in one more batch, warm-started from the full fit and the grid's best points.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import LmlabError

DELTA = 1e-3  # Huber δ of App. D.2
NAMES = ("E", "A", "B", "alpha", "beta")


@dataclass(frozen=True, kw_only=True)
class FitResult:
    """The best fit of L = E + A/N^α + B/D^β, its Huber loss (summed over runs) and, when bootstrapped,
    95% percentile intervals of each constant and of the compute-optimal exponents."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    huber_loss: float
    n_runs: int
    intervals: dict = field(default_factory=dict)

    @property
    def exponents(self) -> tuple[float, float]:
        """(a, b) with N_opt ∝ C^a, D_opt ∝ C^b: a = β/(α+β), b = α/(α+β) (Hoffmann et al. 2022, Eq. 4)."""
        return self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)

    def as_dict(self) -> dict:
        a, b = self.exponents
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
                "exponent_params": a, "exponent_tokens": b, "huber_loss": self.huber_loss,
                "n_runs": self.n_runs, "intervals": self.intervals}


def read_runs(path: str | Path) -> tuple[list[float], list[float], list[float]]:
    """(params, tokens, loss) columns of a CSV with a header; other columns are ignored."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows, header = list(reader), [h.strip() for h in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LmlabError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    missing = [c for c in ("params", "tokens", "loss") if c not in header]
    if missing:
        raise LmlabError(f"{path}: missing column(s) {', '.join(missing)} (need a header with params, tokens, loss)")
    rows = [{k.strip(): v for k, v in row.items() if k is not None} for row in rows]
    cols: dict[str, list[float]] = {"params": [], "tokens": [], "loss": []}
    for i, row in enumerate(rows, start=1):
        for name, values in cols.items():
            try:
                value = float(row[name])
            except (TypeError, ValueError):
                raise LmlabError(f"{path}: run {i}: {name} is not a number: {row[name]!r}") from None
            if not (math.isfinite(value) and value > 0):
                raise LmlabError(f"{path}: run {i}: {name} must be a positive number, got {row[name]!r}")
            values.append(value)
    return cols["params"], cols["tokens"], cols["loss"]


def _check(n, d, loss) -> None:
    if not len(n) == len(d) == len(loss):
        raise LmlabError("params, tokens and loss must have the same length")
    if len(n) < 5:
        raise LmlabError(f"need at least 5 runs to fit 5 constants, got {len(n)}")
    if min(min(n), min(d), min(loss)) <= 0 or not all(map(math.isfinite, [*n, *d, *loss])):
        raise LmlabError("params, tokens and loss must be positive numbers")
    if len(set(n)) < 2 or len(set(d)) < 2:
        raise LmlabError("need runs at two or more model sizes and two or more token counts")


def objective(x, u, v, y, w, delta: float = DELTA):
    """Σ_i w_i Huber_δ(LSE(a' − α u_i, b' − β v_i, e) − y_i) and its gradient, for a batch of parameter rows.
    x: (K, 5) rows (a', α, b', β, e); u, v, y: (R,) centred log N, centred log D, log loss; w: (K, R) or (R,)."""
    import numpy as np

    with np.errstate(over="ignore", invalid="ignore"):  # a far trial step may overflow: f = inf, rejected
        return _objective(x, u, v, y, w, delta)


def _objective(x, u, v, y, w, delta):
    import numpy as np

    t = np.stack([x[:, :1] - x[:, 1:2] * u, x[:, 2:3] - x[:, 3:4] * v,
                  np.broadcast_to(x[:, 4:5], (len(x), len(u)))])  # (3, K, R)
    top = t.max(axis=0)
    ex = np.exp(t - top)
    total = ex.sum(axis=0)
    r = top + np.log(total) - y  # residual in log loss, (K, R)
    clipped = np.minimum(np.abs(r), delta)
    f = (w * clipped * (np.abs(r) - 0.5 * clipped)).sum(axis=1)  # r²/2 for |r| <= δ, else δ(|r| − δ/2)
    g_r = w * np.clip(r, -delta, delta)  # dHuber/dr, weighted
    soft = ex / total  # d LSE / d t_j
    g = np.stack([(g_r * soft[0]).sum(1), -(g_r * soft[0] * u).sum(1), (g_r * soft[1]).sum(1),
                  -(g_r * soft[1] * v).sum(1), (g_r * soft[2]).sum(1)], axis=1)
    return f, g


def lbfgs(fun, x0, max_iter: int = 500, memory: int = 10, c1: float = 1e-4, ftol: float = 1e-10,
          max_step: float = 2.0):
    """Minimise each row of x0 independently: L-BFGS (Nocedal & Wright, Alg. 7.4 two-loop recursion) with
    Armijo backtracking (quadratic interpolation, the step cut to between 1/10 and 1/2 each time); a row
    stops when no step along its direction decreases it, when an iteration gains less than ``ftol`` of its
    value, or after ``max_iter`` iterations.
    ``fun(x, rows) -> (f (len(rows),), g (len(rows), P))`` evaluates the rows ``rows`` of the batch at ``x``.
    Returns (x, f)."""
    import numpy as np

    x = np.array(x0, dtype=float)
    k, p = x.shape
    f, g = fun(x, np.arange(k))
    s_hist, y_hist, rho = np.zeros((k, memory, p)), np.zeros((k, memory, p)), np.zeros((k, memory))
    active = np.ones(k, dtype=bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        gi, si, yi, ri = g[idx], s_hist[idx], y_hist[idx], rho[idx]
        q, alphas = -gi, np.zeros((len(idx), memory))
        for j in range(memory - 1, -1, -1):  # newest pair is last; empty slots have rho = 0 and do nothing
            alphas[:, j] = ri[:, j] * (si[:, j] * q).sum(1)
            q = q - alphas[:, j, None] * yi[:, j]
        yy = (yi[:, -1] ** 2).sum(1)
        gamma = np.where(yy > 0, (si[:, -1] * yi[:, -1]).sum(1) / np.where(yy > 0, yy, 1.0),
                         1.0 / np.maximum(np.abs(gi).max(1), 1e-300))  # first step: length ~1 in the largest coordinate
        q = gamma[:, None] * q
        for j in range(memory):
            beta = ri[:, j] * (yi[:, j] * q).sum(1)
            q = q + (alphas[:, j] - beta)[:, None] * si[:, j]
        slope = (q * gi).sum(1)
        uphill = slope >= 0  # not a descent direction: restart that row from steepest descent
        if uphill.any():
            q[uphill] = -gi[uphill] / np.maximum(np.abs(gi[uphill]).max(1, keepdims=True), 1e-300)
            slope[uphill] = (q[uphill] * gi[uphill]).sum(1)
            rho[idx[uphill]] = 0.0
            s_hist[idx[uphill]] = y_hist[idx[uphill]] = 0.0
        # first trial: the full step, but at most max_step in any coordinate (a far start can ask for e^100)
        step = np.minimum(1.0, max_step / np.maximum(np.abs(q).max(1), 1e-300))
        todo = np.ones(len(idx), dtype=bool)
        f_new, g_new = f[idx].copy(), gi.copy()
        for _ in range(40):  # cut the step until Armijo holds (40 cuts of >= 2x: < 1e-12, then give up on the row)
            t_idx = np.flatnonzero(todo)
            if t_idx.size == 0:
                break
            t, f0, sl = step[t_idx], f[idx[t_idx]], slope[t_idx]
            ft, gt = fun(x[idx[t_idx]] + t[:, None] * q[t_idx], idx[t_idx])
            ok = np.isfinite(ft) & (ft <= f0 + c1 * t * sl)
            f_new[t_idx[ok]], g_new[t_idx[ok]] = ft[ok], gt[ok]
            todo[t_idx[ok]] = False
            # minimiser of the parabola through f(0), f'(0) and f(t): t* = −f'(0) t² / (2 (f(t) − f(0) − f'(0) t))
            curv = np.where(np.isfinite(ft), ft - f0 - sl * t, np.inf)
            t_star = np.where(curv > 0, -sl * t * t / (2 * np.where(curv > 0, curv, 1.0)), 0.5 * t)
            step[t_idx[~ok]] = np.clip(t_star, 0.1 * t, 0.5 * t)[~ok]
        moved = ~todo & (f_new < f[idx])
        gain = f[idx] - f_new
        active[idx[~moved | (gain <= ftol * np.abs(f[idx]))]] = False
        m = idx[moved]
        s = step[moved, None] * q[moved]
        yv = g_new[moved] - g[m]
        x[m] += s
        f[m], g[m] = f_new[moved], g_new[moved]
        sy = (s * yv).sum(1)
        keep = sy > 1e-12 * np.sqrt((s * s).sum(1) * (yv * yv).sum(1))  # curvature condition, else skip the pair
        mk = m[keep]
        s_hist[mk, :-1], y_hist[mk, :-1], rho[mk, :-1] = s_hist[mk, 1:], y_hist[mk, 1:], rho[mk, 1:]
        s_hist[mk, -1], y_hist[mk, -1], rho[mk, -1] = s[keep], yv[keep], 1.0 / sy[keep]
    return x, f


def _grid():
    """Hoffmann et al. 2022, App. D.2: α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −.5, …, 1}, a, b ∈ {0, 5, …, 25}."""
    import numpy as np

    exps, es, ab = np.arange(0, 2.01, 0.5), np.arange(-1, 1.01, 0.5), np.arange(0, 25.1, 5)
    a, alpha, b, beta, e = np.meshgrid(ab, exps, ab, exps, es, indexing="ij")
    return np.stack([a.ravel(), alpha.ravel(), b.ravel(), beta.ravel(), e.ravel()], axis=1)  # (4500, 5)


def fit(n, d, loss, bootstrap: int = 0, seed: int = 0, starts: int | None = None, delta: float = DELTA) -> FitResult:
    """The best fit of L(N, D) = E + A/N^α + B/D^β to runs (N_i, D_i, L_i), and with ``bootstrap`` > 0
    the 2.5 and 97.5 percentiles of each constant over that many resamples of the runs. ``starts``: run
    L-BFGS only from that many grid points, those with the lowest objective (None: all 4500, as the paper)."""
    import numpy as np

    _check(n, d, loss)
    log_n, log_d, y = np.log(np.asarray(n, float)), np.log(np.asarray(d, float)), np.log(np.asarray(loss, float))
    mn, md = log_n.mean(), log_d.mean()
    u, v = log_n - mn, log_d - md

    def to_centred(p):  # (a, α, b, β, e) -> (a' = a − α mean log N, α, b', β, e)
        p = p.copy()
        p[:, 0] -= p[:, 1] * mn
        p[:, 2] -= p[:, 3] * md
        return p

    def to_constants(p) -> dict:
        a, alpha, b, beta, e = p[0] + p[1] * mn, p[1], p[2] + p[3] * md, p[3], p[4]
        return {"E": math.exp(e), "A": math.exp(min(a, 700.0)), "B": math.exp(min(b, 700.0)),
                "alpha": float(alpha), "beta": float(beta)}

    ones = np.ones((1, len(u)))
    grid = to_centred(_grid())
    if starts is not None:
        if starts < 1:
            raise LmlabError(f"starts must be >= 1, got {starts}")
        f0 = objective(grid, u, v, y, ones, delta)[0]
        grid = grid[np.argsort(np.where(np.isfinite(f0), f0, np.inf))[:starts]]
    x, f = lbfgs(lambda p, rows: objective(p, u, v, y, ones, delta), grid)
    order = np.argsort(np.where(np.isfinite(f), f, np.inf))
    best = x[order[0]]
    intervals: dict = {}
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        k = len(u)
        counts = np.stack([np.bincount(rng.integers(0, k, k), minlength=k) for _ in range(bootstrap)]).astype(float)
        # warm starts: the best fit and the next best distinct optima of the grid, 8 in all
        first = np.unique(np.round(x[order[:500]], 3), axis=0, return_index=True)[1]
        seeds = x[order[np.sort(first)[:8]]]
        xb = np.repeat(seeds[None], bootstrap, axis=0).reshape(-1, 5)
        wb = np.repeat(counts, len(seeds), axis=0)
        xb, fb = lbfgs(lambda p, rows: objective(p, u, v, y, wb[rows], delta), xb)
        fb = np.where(np.isfinite(fb), fb, np.inf).reshape(bootstrap, len(seeds))
        picks = xb.reshape(bootstrap, len(seeds), 5)[np.arange(bootstrap), fb.argmin(1)]
        draws = [to_constants(p) for p in picks]
        for dr in draws:
            dr["exponent_params"] = dr["beta"] / (dr["alpha"] + dr["beta"])
            dr["exponent_tokens"] = dr["alpha"] / (dr["alpha"] + dr["beta"])
        for name in (*NAMES, "exponent_params", "exponent_tokens"):
            values = [dr[name] for dr in draws]
            intervals[name] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    return FitResult(**to_constants(best), huber_loss=float(f[order[0]]), n_runs=len(u), intervals=intervals)


def plot(path, result: FitResult, n, d, loss) -> None:
    """Two panels: observed against fitted loss (on the diagonal when the law fits), and the fitted law's
    iso-loss curves in the (N, D) plane with the runs coloured by their observed loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lmlab.io import write_atomic

    n, d, loss = (np.asarray(c, float) for c in (n, d, loss))
    fitted = result.E + result.A / n**result.alpha + result.B / d**result.beta
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    lo, hi = min(loss.min(), fitted.min()), max(loss.max(), fitted.max())
    left.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="observed = fitted")
    left.scatter(fitted, loss, s=18, c="C0", label=f"{result.n_runs} runs")
    left.set(xlabel="fitted loss L(N, D)", ylabel="observed loss", title="observed against fitted")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    grid_n = np.logspace(np.log10(n.min()) - 0.5, np.log10(n.max()) + 0.5, 200)
    grid_d = np.logspace(np.log10(d.min()) - 0.5, np.log10(d.max()) + 0.5, 200)
    gn, gd = np.meshgrid(grid_n, grid_d)
    surface = result.E + result.A / gn**result.alpha + result.B / gd**result.beta
    levels = np.quantile(loss, np.linspace(0.05, 0.95, 7))
    contours = right.contour(gn, gd, surface, levels=np.unique(levels), cmap="viridis")
    right.clabel(contours, fontsize=7, fmt="%.3g")
    points = right.scatter(n, d, c=loss, cmap="viridis", edgecolors="k", s=28, vmin=levels.min(), vmax=levels.max())
    fig.colorbar(points, ax=right, label="observed loss")
    right.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="training tokens D",
              title="fitted iso-loss curves and the runs")
    fig.suptitle(f"L = {result.E:.3g} + {result.A:.4g}/N^{result.alpha:.3f} + {result.B:.4g}/D^{result.beta:.3f}")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
