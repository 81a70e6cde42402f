"""A summarization set anyone can rebuild offline: Python standard-library docstrings.

Kept for old instructions; the set is built by ``lmlab data docstrings`` (``lmlab.databuild``).
Unlike the command, this script replaces existing split files, as it always did.

    python bench/make_summaries.py --out runs/docstrings
"""

from __future__ import annotations

import argparse
import sys

from lmlab.cli import main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/docstrings")
    args = ap.parse_args()
    sys.exit(main(["data", "docstrings", "--output", args.out, "--overwrite"]))
