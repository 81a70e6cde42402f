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

Each run writes its own folder under the sweep folder, named by its readable settings and a short
hash of its whole configuration (``lora-r16-a64-3f9c2a1b``): runs that differ in any setting that
changes the experiment (seed, data, template, model, dropout, ...) get their own folders. A run
whose ``result.json`` exists is skipped when the sweep is started again, so a killed sweep resumes
where it stopped. ``plan`` lists the runs and their folders without running them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import re
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.io import read_json, write_json, write_text

RESULT_FILE = "result.json"
# Settings that say how and where a run goes, not what it is (finetune.RESUMABLE, less its length):
# they do not enter a run's identity, so changing them finds the same folder (resumed or skipped).
NOT_IDENTITY = frozenset({"out_dir", "resume", "report_to", "no_progress", "json", "device", "dtype"})
# Set by the sweep itself: each run's folder is the sweep's to choose, and the sweep resumes.
SWEEP_OWNED = ("out_dir", "resume")


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
            owned = [k for k in SWEEP_OWNED if k in run]
            if owned:
                raise LmlabError(f"a sweep grid cannot set {owned[0]}: each run's folder is chosen (and resumed) by "
                                 "the sweep under its --out-dir")
            runs.append(run)
    unique = {}
    for r in runs:  # overlapping blocks (r=16 with alpha=4r, and alpha in {64, 256} at r=16) run once
        unique.setdefault(run_id(r), r)
    return list(unique.values())


def load_grid(path: str | Path, defaults: dict | None = None) -> list[dict]:
    """Runs from a TOML file with an optional ``[common]`` table and ``[[run]]`` blocks;
    ``defaults`` lie under ``[common]`` (the sweep command's ``--eval-limit``)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser as the tomli package
        try:
            import tomli as tomllib
        except ImportError:
            raise LmlabError("--grid: reading TOML on Python 3.10 needs the tomli package: pip install tomli "
                             "(or give the grid as --run/--common)") from None
    try:
        spec = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmlabError(f"no such file: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LmlabError(f"{path}: not valid TOML ({exc})") from None
    blocks = spec.get("run")
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, dict) for b in blocks):
        raise LmlabError(f"{path}: needs at least one [[run]] block")
    common = spec.get("common", {})
    if not isinstance(common, dict):
        raise LmlabError(f"{path}: [common] must be a table")
    return expand(blocks, {**(defaults or {}), **common})


# The readable part of a folder name: the method's size settings, then the learning rate if not the default.
_SHORT = {"lora": (("rank", "r"), ("alpha", "a")), "adapter": (("bottleneck", "m"),),
          "prefix": (("prefix_length", "l"),)}


def run_name(run: dict) -> str:
    """The readable part of a run's folder name: ``lora-r16-a64``, ``full-lr5e-05``, from the run's
    resolved settings (given or default alike). Not unique (``run_id`` is); made of letters, digits
    and ``.+_-`` only, whatever the grid holds."""
    from lmlab.finetune import FinetuneConfig

    settings = resolved(run)
    parts = [str(settings["method"])]
    for key, short in _SHORT.get(settings["method"], ()):
        if settings[key] is not None:
            parts.append(f"{short}{_short_value(settings[key])}")
    if settings["lr"] != FinetuneConfig.lr:
        parts.append(f"lr{_short_value(settings['lr'])}")
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", "-".join(parts)).lstrip(".")[:80] or "run"


def _short_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def resolved(run: dict) -> dict:
    """Every ``FinetuneConfig`` field as the run resolves it (defaults included), less those in
    ``NOT_IDENTITY``. Whole numbers given for float settings count as floats (``alpha=64`` is
    ``alpha=4r`` at r=16). An unknown option is kept as given (``run`` and ``plan`` refuse it)."""
    from lmlab.finetune import FinetuneConfig

    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    options = {k.replace("-", "_"): v for k, v in run.items() if k not in SWEEP_OWNED}
    config = FinetuneConfig.from_options({k: v for k, v in options.items() if k in known})
    settings = {f"unknown:{k}": v for k, v in options.items() if k not in known}
    for f in dataclasses.fields(config):
        if f.name in NOT_IDENTITY:
            continue
        value = getattr(config, f.name)
        if str(f.type).startswith("float") and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        settings[f.name] = value
    if settings.get("alpha") is None and isinstance(settings.get("rank"), int):  # LoRA's alpha = 4r, given or not
        from lmlab.peft.lora import default_alpha

        settings["alpha"] = default_alpha(settings["rank"])
    return settings


def identity(run: dict) -> dict:
    """The settings that make a run the experiment it is: ``resolved`` less those at their default,
    so ``rank=128`` given or not is the same run, and a setting lmlab adds later leaves the folders
    of existing runs as they were."""
    default = resolved({})
    return {k: v for k, v in resolved(run).items() if k not in default or v != default[k]}


def run_id(run: dict) -> str:
    """A run's folder name under the sweep folder: ``run_name`` and 8 hex digits of the SHA-256 of
    its ``identity``, so two runs share a folder only if they are the same experiment."""
    text = json.dumps(identity(run), sort_keys=True, default=str)
    return f"{run_name(run)}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def run_dir(sweep_dir: str | Path, run: dict) -> Path:
    """``sweep_dir/<run_id>``, checked to lie inside ``sweep_dir``."""
    from lmlab.checkpoint import child_dir

    return child_dir(sweep_dir, run_id(run))


def plan(runs: list[dict], out_dir: str | Path, *, device: str = "auto", dtype: str = "auto") -> list[dict]:
    """What ``run`` would do, without doing it: each run's id, folder, settings and state (``done``:
    skipped, ``resume``: a checkpoint without a result, ``new``). Every run's options are checked."""
    from lmlab.finetune import FinetuneConfig
    from lmlab.io import committed_dir

    rows = []
    for r in runs:
        folder = run_dir(out_dir, r)
        FinetuneConfig.from_options({"device": device, "dtype": dtype, **r, "out_dir": str(folder)}).check()
        state = "done" if (folder / RESULT_FILE).exists() else "resume" if committed_dir(folder / "last") else "new"
        rows.append({"run": folder.name, "folder": str(folder), "state": state, "settings": r})
    return rows


def run(runs: list[dict], out_dir: str | Path, *, split: str = "test", accuracy_limit: int | None = None,
        device: str = "auto", dtype: str = "auto") -> list[dict]:
    """Run the grid ``runs`` (from ``expand`` or ``load_grid``) one after another into
    ``out_dir/<run id>/``, evaluate each run's best and last checkpoints on ``split`` (all of it, or
    ``accuracy_limit`` examples drawn with a fixed seed), and write ``results.md``, ``results.csv``
    and ``val_loss.png``; returns the finished runs' rows.

    Every run's options are checked before the first one trains. A run with a ``result.json`` is
    skipped; one with a checkpoint but no result (a killed sweep) is resumed. The sweep folder is
    locked while the sweep runs (``checkpoint.lock_out_dir``): a second sweep on it is refused."""
    import sys

    from lmlab import devices
    from lmlab.checkpoint import out_dir_lock
    from lmlab.evaluate import evaluate_checkpoint
    from lmlab.finetune import FinetuneConfig
    from lmlab.finetune import run as finetune_run
    from lmlab.io import committed_dir

    out_dir = Path(out_dir)
    configs = [FinetuneConfig.from_options({"device": device, "dtype": dtype, **r,
                                            "out_dir": str(run_dir(out_dir, r))}).check() for r in runs]
    placement = devices.select_device(device)
    compute = devices.select_dtype(dtype, placement, warn_slow=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    with out_dir_lock(out_dir):
        try:  # the table and the plot show what finished, also when a run fails or is stopped
            for i, (settings, config) in enumerate(zip(runs, configs), 1):
                folder = Path(config.out_dir)
                if (folder / RESULT_FILE).exists():
                    print(f"[{i}/{len(runs)}] {folder.name}: done before, skipped", file=sys.stderr)
                    continue
                print(f"[{i}/{len(runs)}] {folder.name}", file=sys.stderr, flush=True)
                if committed_dir(folder / "last") is not None:
                    config = dataclasses.replace(config, resume=True)  # a run the last sweep left unfinished
                with out_dir_lock(folder):  # released when the run is done (finetune.run locks for the process)
                    summary = finetune_run(config)
                    accuracy = {which: evaluate_checkpoint(folder / which, split=split, limit=accuracy_limit,
                                                           device=placement, dtype=compute).to_dict()
                                for which in ("best", "last")}
                    save_result(folder, result_row(settings, summary, accuracy["best"], accuracy["last"]))
                devices.release_memory()
        finally:
            if any((run_dir(out_dir, r) / RESULT_FILE).exists() for r in runs):
                write_tables(out_dir, collect(out_dir, runs))
                plot(out_dir, runs)
    return collect(out_dir, runs)


def collect(sweep_dir: str | Path, runs: list[dict]) -> list[dict]:
    """The result rows of the finished runs, in grid order."""
    rows = []
    for run in runs:
        path = run_dir(sweep_dir, run) / RESULT_FILE
        if path.exists():
            row = read_json(path)
            if not isinstance(row, dict):
                raise LmlabError(f"{path}: not a sweep result")
            rows.append(row)
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
    md += ["| " + " | ".join(_accuracy(r, c) or _cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    write_text(sweep_dir / "results.md", "\n".join(md) + "\n")
    return sweep_dir / "results.csv", sweep_dir / "results.md"


def _accuracy(row: dict, column: str) -> str | None:
    """An accuracy column as every command prints accuracy (``84.5 % (169/200)``); the CSV keeps
    the fraction."""
    from lmlab.evaluate import format_accuracy

    result = row.get({"acc_best": "eval_best", "acc_last": "eval_last"}.get(column, ""))
    if not isinstance(result, dict) or "correct" not in result or "n" not in result:
        return None
    return format_accuracy(result["correct"], result["n"])


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

    curves = {run_id(r): [(m["step"], m["val_loss"]) for m in read_metrics(run_dir(sweep_dir, r))
                          if m.get("val_loss") is not None] for r in runs}
    path = Path(sweep_dir) / "val_loss.png"
    plot_runs(curves, path, title="validation loss", ylabel="label-token loss")
    return path


def save_result(run_dir: str | Path, row: dict) -> None:
    write_json(Path(run_dir) / RESULT_FILE, row)


def result_row(run: dict, train_summary: dict, acc_best: dict, acc_last: dict) -> dict:
    from lmlab.peft.lora import LoraConfig, default_alpha

    lora = run["method"] == "lora"
    rank = run.get("rank") or LoraConfig.r
    return {"run": run_id(run), "method": run["method"], "rank": rank if lora else None,
            "alpha": (run.get("alpha") or default_alpha(rank)) if lora else None,
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
