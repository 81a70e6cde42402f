"""PNG plots of training curves (matplotlib, headless), written atomically."""

from __future__ import annotations

from pathlib import Path

from lmlab.io import write_atomic


def plot_losses(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Train and validation loss against step for one run."""
    plot_runs({"train": [(r["step"], r["train_loss"]) for r in rows],
               "validation": [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]},
              path, title=title or "loss", ylabel="label-token loss")


def plot_runs(curves: dict[str, list[tuple[int, float]]], path: str | Path, title: str, ylabel: str) -> None:
    """One line per named curve of (step, value) points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
