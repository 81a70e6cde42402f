"""A summarization set anyone can rebuild offline: Python standard-library docstrings.

Each public function or class docstring with a one-line summary and a longer body becomes
{"post": <the body>, "summary": <the summary line>}: the body explains, the first line sums it
up (PEP 257), the TL;DR task in miniature. Deterministic for a given Python version (sorted
module and member names); split by module name hash into train / validation / test.

    python bench/make_summaries.py --out runs/docstrings
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import sys
import warnings
import zlib
from pathlib import Path

SKIP = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "venv", "pydoc_data")


def members(module):
    """Public functions and classes of a module, and the public methods of its classes, by name."""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            yield name, obj
            for attr, method in sorted(vars(obj).items()):
                if not attr.startswith("_") and inspect.isfunction(method):
                    yield f"{name}.{attr}", method


def pairs_of(module) -> list[dict]:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/docstrings")
    args = ap.parse_args()
    rows = []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if name.startswith(SKIP) or name.startswith("_"):
                continue
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001, S112 - platform-specific modules that do not import here
                continue
            rows += pairs_of(module)
    splits = {"train": [], "validation": [], "test": []}
    for r in rows:
        bucket = zlib.crc32(r["source"].split(".")[0].encode()) % 10
        splits["train" if bucket < 8 else "validation" if bucket == 8 else "test"].append(r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    print(json.dumps({s: len(v) for s, v in splits.items()}), f"-> {out}")


if __name__ == "__main__":
    main()
