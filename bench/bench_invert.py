"""Safety-filter inversion benchmark: encode bench/invert_secrets.txt with an encoder, invert, score.

    python bench/bench_invert.py [--secrets bench/invert_secrets.txt] [--encoder minilm] [--time-budget 60]

Reports exact recoveries (after lower-casing and dropping punctuation), recoveries up to the articles
a/an/the, mean and minimum cosine, and seconds per target; writes bench/results/invert.json and
prints a Markdown table. The secrets are encoded here and only their embeddings reach the search.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from pathlib import Path

import torch

from lmlab.invert import InvertConfig, invert, load_encoder
from lmlab.io import write_json

HERE = Path(__file__).parent
ARTICLES = {"a", "an", "the"}


def normalise(text: str, drop_articles: bool = False) -> str:
    """Lower case, punctuation dropped, single spaces (and no a/an/the when ``drop_articles``)."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(w for w in words if not (drop_articles and w in ARTICLES))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--secrets", default=str(HERE / "invert_secrets.txt"))
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--time-budget", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="first N secrets only")
    ap.add_argument("--out", default=str(HERE / "results" / "invert.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    secrets = [s.strip() for s in Path(args.secrets).read_text().splitlines() if s.strip()][:args.limit]
    encoder = load_encoder(args.encoder)
    targets = encoder.encode(secrets)
    config = InvertConfig(time_budget=args.time_budget, seed=args.seed)
    t0 = time.perf_counter()
    guesses = invert(targets, encoder, config)
    total = time.perf_counter() - t0
    rows = [{"secret": s, "guess": g.text, "cosine": round(g.cosine, 5), "seconds": round(g.seconds, 1),
             "exact": normalise(g.text) == normalise(s),
             "up_to_articles": normalise(g.text, True) == normalise(s, True)} for s, g in zip(secrets, guesses)]
    summary = {
        "targets": len(rows),
        "exact": sum(r["exact"] for r in rows),
        "up_to_articles": sum(r["up_to_articles"] for r in rows),
        "mean_cosine": round(sum(r["cosine"] for r in rows) / len(rows), 5),
        "min_cosine": min(r["cosine"] for r in rows),
        "at_least_0.95": sum(r["cosine"] >= 0.95 for r in rows),
        "seconds_per_target": round(sum(g.seconds for g in guesses) / len(rows), 1),
        "max_seconds": round(max(g.seconds for g in guesses), 1),
        "wall_seconds_incl_vocabulary": round(total, 1),
    }
    machine = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version()}
    write_json(args.out, {"encoder": args.encoder, "config": config.__dict__, "machine": machine,
                          "summary": summary, "rows": rows})

    print("| secret | guess | cosine | s | exact | up to articles |\n|---|---|---:|---:|:-:|:-:|")
    for r in rows:
        print(f"| {r['secret']} | {r['guess']} | {r['cosine']:.4f} | {r['seconds']:.0f} | "
              f"{'yes' if r['exact'] else 'no'} | {'yes' if r['up_to_articles'] else 'no'} |")
    s = summary
    print(f"\n**{s['exact']}/{s['targets']} exact, {s['up_to_articles']}/{s['targets']} up to articles; cosine mean "
          f"{s['mean_cosine']:.4f}, min {s['min_cosine']:.4f} ({s['at_least_0.95']} >= 0.95); "
          f"{s['seconds_per_target']} s per target (max {s['max_seconds']}) on {torch.get_num_threads()} thread(s)** -> {args.out}")


if __name__ == "__main__":
    main()
