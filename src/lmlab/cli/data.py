"""``lmlab data docstrings|sentiment-pairs``: build the README's example data sets (``lmlab.databuild``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.cli._args import positive_int, print_json, refuse_existing
from lmlab.errors import LmlabError

SPLIT_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl")


def cmd_docstrings(args: argparse.Namespace) -> int:
    from lmlab.databuild import docstring_splits, write_splits

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise LmlabError(f"--output {out} is a file; give a folder")
    refuse_existing([out / name for name in SPLIT_FILES], args.overwrite)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else None
    splits = docstring_splits(modules)
    if not any(splits.values()):
        raise LmlabError("no docstring passed the filters: nothing to write")
    write_splits(out, splits)
    counts = {s: len(rows) for s, rows in splits.items()}
    if args.json:
        print_json({**counts, "output": str(out)})
    else:
        print(" / ".join(f"{n} {s}" for s, n in counts.items()) + f" pairs -> {out}")
    return 0


def cmd_sentiment_pairs(args: argparse.Namespace) -> int:
    from lmlab.databuild import sentiment_pairs
    from lmlab.io import write_jsonl

    if Path(args.output).is_dir():
        raise LmlabError(f"--output {args.output} is a folder; give a .jsonl file")
    refuse_existing([args.output], args.overwrite)
    rows = sentiment_pairs(args.dataset, args.n, seed=args.seed)
    write_jsonl(args.output, rows)
    if args.json:
        print_json({"pairs": len(rows), "dataset": args.dataset, "output": args.output})
    else:
        print(f"{len(rows)} pairs from {args.dataset} -> {args.output}")
    return 0


def register(sub) -> None:
    from lmlab.data import DEFAULT_DATASET  # no torch behind it

    p = sub.add_parser("data", help="build the example data sets: docstring summaries, sentiment preference pairs")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SET")

    d = dsub.add_parser("docstrings", help="a summarization set from Python standard-library docstrings "
                                           "({post, summary}; train / validation / test .jsonl)",
                        description="Each public function or class docstring of the standard library with a "
                                    "one-line summary (PEP 257) and a longer body becomes {post: body, summary: "
                                    "first line}; split by module into train / validation / test. Offline and "
                                    "deterministic for a given Python version.")
    d.add_argument("--output", required=True, help="folder for train.jsonl, validation.jsonl and test.jsonl")
    d.add_argument("--modules", default=None,
                   help="comma-separated modules to read (default: every standard-library module that imports)")
    d.add_argument("--overwrite", action="store_true", help="replace split files already in the folder")
    d.add_argument("--json", action="store_true", help="print the split sizes as one JSON object")
    d.set_defaults(func=cmd_docstrings)

    s = dsub.add_parser("sentiment-pairs", help="DPO preference pairs from a sentiment set (chosen = the true "
                                                "label word, rejected = the other)",
                        description="prompt = the classification prompt of lmlab finetune for a review, chosen = "
                                    "its true label word, rejected = the other one; shuffled (lmlab dpo holds out "
                                    "the file's tail).")
    s.add_argument("--output", required=True, help=".jsonl of {prompt, chosen, rejected}")
    s.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="training split of: a folder with train.jsonl or train.csv ({text, label}), a hub name "
                        f"(rotten_tomatoes), or {DEFAULT_DATASET} (embedded; the default)")
    s.add_argument("--n", type=positive_int, default=400, help="pairs, drawn with --seed (default 400; all if fewer)")
    s.add_argument("--seed", type=int, default=1, help="seed of the draw and the shuffle (default 1)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    s.add_argument("--json", action="store_true", help="print the count as one JSON object")
    s.set_defaults(func=cmd_sentiment_pairs)
