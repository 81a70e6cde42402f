"""``lmlab embed``: texts to embeddings, in the form ``lmlab invert --embeddings`` reads."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmlab.cli._args import add_device_args, placement, positive_int, print_json, refuse_existing
from lmlab.errors import LmlabError

FORMATS = (".npy", ".pt", ".safetensors")


def save_embeddings(path: str | Path, embeddings) -> None:
    """(N, dim) fp32 rows, atomically: .npy array, .pt tensor, or .safetensors with one tensor
    ``embeddings`` (each is what ``lmlab.invert.load_targets`` reads back)."""
    import torch

    from lmlab.io import save_npy, save_tensors, write_atomic

    embeddings = embeddings.detach().float().cpu().contiguous()
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        save_npy(path, embeddings.numpy())
    elif suffix == ".pt":
        write_atomic(path, lambda tmp: torch.save(embeddings, tmp))
    else:
        save_tensors(path, {"embeddings": embeddings})


def cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from lmlab.invert import load_encoder
    from lmlab.io import read_texts
    from lmlab.progress import bar

    if Path(args.output).suffix.lower() not in FORMATS:
        raise LmlabError(f"--output must end in {', '.join(FORMATS)}, got {args.output!r}")
    refuse_existing([args.output], args.overwrite)
    # as in invert, --dtype auto is fp32, on a GPU too: invert compares cosines to 1e-5
    device, dtype = placement(argparse.Namespace(device=args.device,
                                                 dtype="fp32" if args.dtype == "auto" else args.dtype))
    texts = read_texts(args.texts, field=args.field)
    if not texts:
        raise LmlabError(f"{args.texts}: no texts")
    encoder = load_encoder(args.encoder, device=device, dtype=dtype)
    t0 = time.perf_counter()
    starts = range(0, len(texts), args.batch_size)  # a bar only on a terminal (lmlab.progress)
    chunks = [encoder.encode(texts[i:i + args.batch_size], args.batch_size)
              for i in bar(starts, enabled=not args.no_progress, desc="embedding", unit="batch")]
    embeddings = torch.cat(chunks)  # (N, dim) unit vectors, fp32
    seconds = time.perf_counter() - t0
    save_embeddings(args.output, embeddings)
    if args.json:
        print_json({"texts": len(texts), "dim": encoder.dim, "encoder": args.encoder, "seconds": seconds,
                    "output": args.output})
    else:
        print(f"{len(texts)} embeddings of dimension {encoder.dim} ({args.encoder}) in {seconds:.1f} s -> {args.output}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("embed", help="embed texts with an invert encoder (the --embeddings file lmlab invert reads)",
                       description="Embed texts as lmlab invert's encoders do: unit vectors, one row per text, fp32. "
                                   "--dtype auto is fp32 here, on a GPU too, as in lmlab invert.")
    p.add_argument("--texts", required=True, help=".txt (one per line), .jsonl (--field), .json list or .npy of strings")
    p.add_argument("--field", default="text", help="the text field of .jsonl rows (default text)")
    p.add_argument("--encoder", default="minilm", help="minilm (all-MiniLM-L6-v2, embedded; the default), a "
                                                       "sentence-transformers folder, or a CLIP text-encoder folder")
    p.add_argument("--output", required=True, help=f"embeddings file: {', '.join(FORMATS)}")
    p.add_argument("--batch-size", type=positive_int, default=256, help="texts per forward pass (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal)")
    p.add_argument("--json", action="store_true", help="print a summary as one JSON object")
    add_device_args(p)  # --dtype auto means fp32 here, as in invert
    p.set_defaults(func=cmd_embed)
