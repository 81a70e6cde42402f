"""Sweeps: a grid of fine-tuning runs, one after another, then one table and one plot.

A grid is a list of blocks; each block maps ``finetune`` options (``rank``, ``alpha``, ``lr``,
``method``, ...) to a value or a list of values, and expands to the cartesian product of its
lists. ``alpha = "4r"`` ties alpha to the rank. From TOML::

    [common]
    dataset = "../shared/data/rotten_tomatoes"
    max_iters = 150

    [[run]]
    method = "lora"
    rank = [16, 128, 196]
    alpha = "4r"

    [[run]]
    method = "full"
    lr = 5e-5

Each run writes its own folder under the sweep folder; a run whose ``result.json`` exists is
skipped when the sweep is started again, so a killed sweep resumes where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import re
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.io import read_json, write_json, write_text

RESULT_FILE = "result.json"


def expand(blocks: list[dict], common: dict | None = None) -> list[dict]:
    """Every distinct run of the grid, in order: ``common`` overlaid by each block's product."""
    runs = []
    for block in blocks:
        keys = list(block)
        values = [v if isinstance(v, list) else [v] for v in block.values()]
        for combo in itertools.product(*values):
            run = {**(common or {}), **dict(zip(keys, combo))}
            run.setdefault("method", "lora")
            alpha = run.get("alpha")
            if isinstance(alpha, str):
                m = re.fullmatch(r"\s*(\d*\.?\d*)\s*r\s*", alpha)
                if not m or "rank" not in run:
                    raise LmlabError(f"alpha {alpha!r}: write a number or a multiple of r such as '4r'")
                run["alpha"] = float(m.group(1) or 1) * run["rank"]
            runs.append(run)
    unique = {}
    for r in runs:  # overlapping blocks (r=16 with alpha=4r, and alpha in {64, 256} at r=16) run once
        unique.setdefault(run_name(r), r)
    return list(unique.values())


def load_grid(path: str | Path) -> list[dict]:
    """Runs from a TOML file with an optional ``[common]`` table and ``[[run]]`` blocks."""
    import tomllib

    try:
        spec = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmlabError(f"no such file: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LmlabError(f"{path}: not valid TOML ({exc})") from None
    blocks = spec.get("run")
    if not isinstance(blocks, list) or not blocks:
        raise LmlabError(f"{path}: needs at least one [[run]] block")
    return expand(blocks, spec.get("common", {}))


_SHORT = {"rank": "r", "alpha": "a", "lr": "lr", "bottleneck": "m", "prefix_length": "l"}


def run_name(run: dict) -> str:
    """A readable, stable folder name: ``lora-r16-a64``, ``full-lr5e-05``."""
    parts = [run["method"]]
    for key, short in _SHORT.items():
        if key in run and (run["method"] == "lora" or key not in ("rank", "alpha")):
            value = run[key]
            parts.append(f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}")
    return "-".join(parts)


def run(runs: list[dict], out_dir: str | Path, *, split: str = "test", eval_limit: int | None = 500,
        device: str = "auto", dtype: str = "auto") -> list[dict]:
    """Run the grid ``runs`` (from ``expand`` or ``load_grid``) one after another into
    ``out_dir/<run name>/``, evaluate each run's best and last checkpoints on ``split``, and write
    ``results.md``, ``results.csv`` and ``val_loss.png``; returns the finished runs' rows.

    Every run's options are checked before the first one trains. A run with a ``result.json`` is
    skipped; one with a checkpoint but no result (a killed sweep) is resumed."""
    import sys

    from lmlab import devices
    from lmlab.evaluate import evaluate_checkpoint
    from lmlab.finetune import FinetuneConfig
    from lmlab.finetune import run as finetune_run
    from lmlab.io import committed_dir

    out_dir = Path(out_dir)
    configs = [FinetuneConfig.from_options({"device": device, "dtype": dtype, **r,
                                            "out_dir": str(out_dir / run_name(r))}).check() for r in runs]
    placement = devices.select_device(device)
    compute = devices.select_dtype(dtype, placement, warn_slow=False)
    try:  # the table and the plot show what finished, also when a run fails or is stopped
        for i, (settings, config) in enumerate(zip(runs, configs), 1):
            run_dir = Path(config.out_dir)
            if (run_dir / RESULT_FILE).exists():
                print(f"[{i}/{len(runs)}] {run_dir.name}: done before, skipped", file=sys.stderr)
                continue
            print(f"[{i}/{len(runs)}] {run_dir.name}", file=sys.stderr, flush=True)
            if committed_dir(run_dir / "last") is not None:
                config = dataclasses.replace(config, resume=True)  # a run the last sweep left unfinished
            summary = finetune_run(config)
            accuracy = {which: evaluate_checkpoint(run_dir / which, split=split, limit=eval_limit, device=placement,
                                                   dtype=compute).to_dict() for which in ("best", "last")}
            save_result(run_dir, result_row(settings, summary, accuracy["best"], accuracy["last"]))
            devices.release_memory()
    finally:
        if any((out_dir / run_name(r) / RESULT_FILE).exists() for r in runs):
            write_tables(out_dir, collect(out_dir, runs))
            plot(out_dir, runs)
    return collect(out_dir, runs)


def collect(sweep_dir: str | Path, runs: list[dict]) -> list[dict]:
    """The result rows of the finished runs, in grid order."""
    rows = []
    for run in runs:
        path = Path(sweep_dir) / run_name(run) / RESULT_FILE
        if path.exists():
            rows.append(read_json(path))
    return rows


COLUMNS = ["run", "method", "rank", "alpha", "trainable", "percent", "best_step", "best_val_loss",
           "acc_best", "acc_last", "unparseable_best", "seconds"]


def write_tables(sweep_dir: str | Path, rows: list[dict]) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` with one row per finished run."""
    sweep_dir = Path(sweep_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(sweep_dir / "results.csv", buf.getvalue())
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    write_text(sweep_dir / "results.md", "\n".join(md) + "\n")
    return sweep_dir / "results.csv", sweep_dir / "results.md"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def plot(sweep_dir: str | Path, runs: list[dict]) -> Path:
    """All validation-loss curves in one PNG."""
    from lmlab.plots import plot_runs
    from lmlab.engine import read_metrics

    curves = {run_name(r): [(m["step"], m["val_loss"]) for m in read_metrics(Path(sweep_dir) / run_name(r))
                            if m.get("val_loss") is not None] for r in runs}
    path = Path(sweep_dir) / "val_loss.png"
    plot_runs(curves, path, title="validation loss", ylabel="label-token loss")
    return path


def save_result(run_dir: str | Path, row: dict) -> None:
    write_json(Path(run_dir) / RESULT_FILE, row)


def result_row(run: dict, train_summary: dict, acc_best: dict, acc_last: dict) -> dict:
    return {"run": run_name(run), "method": run["method"], "rank": run.get("rank") if run["method"] == "lora" else None,
            "alpha": run.get("alpha") if run["method"] == "lora" else None,
            "trainable": train_summary["trainable"], "percent": train_summary["percent"],
            "best_step": train_summary["best_step"], "best_val_loss": train_summary["best_val_loss"],
            "acc_best": acc_best["accuracy"], "acc_last": acc_last["accuracy"],
            "unparseable_best": acc_best["unparseable"], "seconds": train_summary["seconds"],
            "settings": run, "eval_best": acc_best, "eval_last": acc_last}


def parse_grid_args(items: list[str]) -> list[dict]:
    """Blocks from the command line: ``method=lora rank=16,128,196 alpha=4r`` ; ``method=full``.

    Blocks are separated by ``;`` (or given as separate ``--run`` options); comma lists expand.
    """
    blocks = []
    for text in items:
        for chunk in text.split(";"):
            block = {}
            for pair in chunk.split():
                if "=" not in pair:
                    raise LmlabError(f"grid item {pair!r}: write key=value, e.g. rank=16,128")
                key, value = pair.split("=", 1)
                values = [_number(v) for v in value.split(",")]
                block[key.replace("-", "_")] = values if len(values) > 1 else values[0]
            if block:
                blocks.append(block)
    return blocks


def _number(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def summary_json(rows: list[dict]) -> str:
    return json.dumps([{k: r.get(k) for k in COLUMNS} for r in rows])
