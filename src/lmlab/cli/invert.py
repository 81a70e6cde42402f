"""``lmlab invert``: recover short texts from their embeddings (``lmlab.invert``)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from lmlab.cli._args import add_device_args, positive_float, positive_int, print_json, refuse_existing
from lmlab.errors import LmlabError


def cmd_invert(args: argparse.Namespace) -> int:
    from lmlab.invert import (
        InvertConfig,
        check_dimension,
        invert,
        load_encoder,
        load_targets,
    )
    from lmlab.io import write_json, write_text

    report = args.report or str(Path(args.output).with_suffix(".json"))
    if Path(report).resolve() == Path(args.output).resolve():
        raise LmlabError(f"--output {args.output} would be overwritten by the JSON report: give --report FILE")
    refuse_existing([args.output, report], args.overwrite)
    config = InvertConfig(max_words=args.max_words, beam=args.beam, time_budget=args.time_budget, seed=args.seed,
                          runners_up=max(4, args.guesses - 1), vocab_words=args.vocab_words)
    from lmlab.devices import select_device, select_dtype

    device = select_device(args.device)  # every check before any work or output: the device first,
    # --dtype auto is fp32 here, on a GPU too: the search compares cosines to 1e-5 (the encoders are small)
    dtype = select_dtype("fp32" if args.dtype == "auto" else args.dtype, device)
    targets = load_targets(args.embeddings)  # then the file,
    encoder = load_encoder(args.encoder, device=device, dtype=dtype)  # then the encoder (seconds),
    check_dimension(targets, encoder.dim, args.embeddings)  # then the two against each other
    guesses = invert(targets, encoder, config, progress=not args.no_progress)
    rows = [{"row": i, "guess": g.text, "cosine": g.cosine, "seconds": g.seconds,
             "runners_up": [{"text": t, "cosine": c} for t, c in g.runners_up]} for i, g in enumerate(guesses)]
    write_json(report, {"encoder": args.encoder, "config": asdict(config), "guesses_per_target": args.guesses,
                        "guesses": rows})
    write_text(args.output, "".join(line + "\n" for g in guesses for line in submission(g, args.guesses)))
    summary = {"targets": len(guesses), "mean_cosine": sum(g.cosine for g in guesses) / len(guesses),
               "min_cosine": min(g.cosine for g in guesses), "guesses_per_target": args.guesses,
               "output": args.output, "report": report}
    if args.json:
        print_json(summary)
    else:
        for row in rows:
            print(f"{row['row']:>4}  {row['cosine']:.4f}  {row['guess']}")
        print(f"mean cosine {summary['mean_cosine']:.4f}, min {summary['min_cosine']:.4f} -> {args.output} ({report})")
    return 0


def submission(guess, n: int) -> list[str]:
    """A target's ``n`` lines of the submission: its best guess, then its runners-up by falling
    cosine (distinct texts); the last repeated if the search scored fewer than ``n`` texts."""
    texts = [guess.text, *(t for t, _ in guess.runners_up)][:n]
    return texts + [texts[-1]] * (n - len(texts))


def register(sub) -> None:
    p = sub.add_parser("invert", help="recover short texts from their embeddings (safety-filter inversion)",
                       description="Recover short texts from their embeddings by a search over words. --dtype auto "
                                   "is fp32 here, on a GPU too: the search compares cosines to 1e-5.")
    p.add_argument("--embeddings", required=True, help=".npy, .pt or .safetensors, one embedding per row")
    p.add_argument("--encoder", default="minilm",
                   help="minilm (all-MiniLM-L6-v2, embedded); clip:PATH, a CLIP text tower: a Hugging Face CLIP "
                        "folder or an open_clip checkpoint (.safetensors file, or a folder with "
                        "open_clip_model.safetensors); a sentence-transformers folder")
    p.add_argument("--output", required=True, help="guesses, one line each: --guesses lines per row, rows in order")
    p.add_argument("--guesses", type=positive_int, default=1,
                   help="guesses per row, best cosine first (1: one line per row)")
    p.add_argument("--vocab-words", type=positive_int, default=None,
                   help="search the N most frequent whole words only (default all; for large encoders on a CPU)")
    p.add_argument("--report", default=None, help="JSON with cosines and runner-up guesses (default: output .json)")
    p.add_argument("--time-budget", type=positive_float, default=60.0, help="seconds per target (60)")
    p.add_argument("--max-words", type=positive_int, default=8, help="longest guess in words")
    p.add_argument("--beam", type=positive_int, default=8, help="beam width of the search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output and --report")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    add_device_args(p)  # --dtype auto means fp32 here: cosines are compared to 1e-5
    p.set_defaults(func=cmd_invert)
