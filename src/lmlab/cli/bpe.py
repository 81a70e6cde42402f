"""``lmlab bpe train|encode|decode``: the byte-level BPE of ``lmlab.bpe``."""

from __future__ import annotations

import argparse
import json
import time

from lmlab.cli._args import positive_int, print_json, refuse_existing
from lmlab.errors import LmlabError


def cmd_train(args: argparse.Namespace) -> int:
    from lmlab import bpe

    refuse_existing([args.output], args.overwrite)
    text = bpe.read_corpus(args.corpus)
    t0 = time.perf_counter()
    tok = bpe.train(text, args.vocab_size, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    tok.save(args.output)
    out = {"vocab_size": tok.vocab_size, "merges": len(tok.merges), "seconds": seconds, "output": args.output}
    if len(tok.merges) < args.vocab_size - 256:
        out["note"] = f"the corpus ran out of pairs after {len(tok.merges)} merges"
    print_json(out) if args.json else print(f"{len(tok.merges)} merges (vocabulary {tok.vocab_size}) in "
                                            f"{seconds:.2f} s -> {args.output}" + (f"; {out['note']}" if "note" in out else ""))
    return 0


def _text(args: argparse.Namespace) -> str:
    if (args.text is None) == (args.input is None):
        raise LmlabError("give exactly one of --text or --input FILE")
    if args.text is not None:
        return args.text
    from lmlab.bpe import read_corpus

    return read_corpus(args.input)


def cmd_encode(args: argparse.Namespace) -> int:
    from lmlab.bpe import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(_text(args))
    print(json.dumps({"ids": ids, "tokens": len(ids)}) if args.json else " ".join(map(str, ids)))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from lmlab.bpe import Tokenizer

    try:
        ids = [int(i) for i in args.ids.replace(",", " ").split()]
    except ValueError:
        raise LmlabError(f"ids must be integers separated by spaces or commas, got {args.ids!r}") from None
    text = Tokenizer.load(args.tokenizer).decode(ids)
    print(json.dumps({"text": text}) if args.json else text)
    return 0


def register(sub) -> None:
    p = sub.add_parser("bpe", help="byte-level BPE: train merges on a corpus, encode and decode")
    bsub = p.add_subparsers(dest="bpe_command", required=True, metavar="ACTION")
    t = bsub.add_parser("train", help="learn vocab-size - 256 merges from a UTF-8 corpus")
    t.add_argument("corpus", help="a UTF-8 text file")
    t.add_argument("--vocab-size", type=positive_int, required=True, help="256 bytes + the number of merges")
    t.add_argument("--output", required=True, help="folder for merges.json, vocab.json and tokenizer.json")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_train)
    for name, func in (("encode", cmd_encode), ("decode", cmd_decode)):
        e = bsub.add_parser(name, help=f"{name} with a trained tokenizer folder")
        e.add_argument("--tokenizer", required=True, help="the folder bpe train wrote")
        if name == "encode":
            e.add_argument("--text", default=None, help="the text to encode (or --input FILE)")
            e.add_argument("--input", default=None, help="a UTF-8 text file")
        else:
            e.add_argument("ids", help="token ids, separated by spaces or commas")
        e.add_argument("--json", action="store_true")
        e.set_defaults(func=func)
