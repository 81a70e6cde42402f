"""``lmlab watermark generate|detect|classify``: a thin shell over ``lmlab.watermark``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmlab.cli._args import (
    DEFAULT_MODEL,
    add_device_args,
    add_model_args,
    finite_float,
    add_sampling_args,
    load_model_or_run,
    nonnegative_float,
    nonnegative_int,
    placement,
    positive_float,
    positive_int,
    print_json,
    refuse_existing,
    sampling_config,
)
from lmlab.errors import LmlabError

SCHEME_CHOICES = ("none", "no-e", "hard", "soft")
SEEDING_CHOICES = ("simple_1", "lefthash", "selfhash", "hf-selfhash")  # lmlab.watermark.seeding.SCHEMES


def _redlist_args(p: argparse.ArgumentParser, delta: bool = False) -> None:
    g = p.add_argument_group("red list (defaults: the reference implementation's simple_1 / LeftHash)")
    g.add_argument("--gamma", type=positive_float, default=None, help="green share of the vocabulary (0.25)")
    if delta:  # only generation adds it; detection counts green tokens whatever the penalty was
        g.add_argument("--delta", type=nonnegative_float, default=2.0, help="soft scheme: penalty of red logits (2.0)")
    g.add_argument("--key", type=nonnegative_int, default=None, help="hash key (15485863)")
    g.add_argument("--seeding-scheme", default=None, choices=SEEDING_CHOICES,
                   help="simple_1 = lefthash (the previous token seeds the list); selfhash: the reference's "
                        "(anchored minhash over 3 previous tokens and the candidate); hf-selfhash: transformers' "
                        "seeding_scheme='selfhash' (with --context-width, default 1) (simple_1)")
    g.add_argument("--context-width", type=positive_int, default=None,
                   help="hf-selfhash: tokens seeding each list, the candidate included (1)")
    g.add_argument("--green-list", default=None, metavar="FILE.py:FUNCTION",
                   help="your own green lists: f(prev_token_id, vocab_size) -> green token ids, from a Python "
                        "file (which is run) or module:function; gamma is the share of green ids")


def _redlist(args, tokenizer):
    from lmlab.watermark import DEFAULT_KEY, RedListConfig

    if args.green_list is not None:
        given = [flag for flag, value in (("--gamma", args.gamma), ("--key", args.key),
                                          ("--context-width", args.context_width)) if value is not None]
        if given or args.seeding_scheme not in (None, "simple_1"):
            raise LmlabError(f"--green-list sets the lists itself: drop {', '.join(given) or '--seeding-scheme'}")
    options = {"vocab_size": len(tokenizer), "gamma": 0.25 if args.gamma is None else args.gamma,
               "key": DEFAULT_KEY if args.key is None else args.key,
               "seeding_scheme": args.seeding_scheme or "simple_1",
               "context_width": args.context_width, "green_list": args.green_list}
    if "delta" in args:
        options["delta"] = args.delta
    return RedListConfig(**options)


def _scheme_list(text: str) -> list[str]:
    schemes = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in schemes if s not in SCHEME_CHOICES]
    if not schemes or bad:
        raise argparse.ArgumentTypeError(f"schemes are {', '.join(SCHEME_CHOICES)} (comma-separated), got {text!r}")
    return schemes


def _counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        counts = []
    if len(counts) != 4 or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"give 4 counts >= 0 (none,no-e,hard,soft), got {text!r}")
    return counts


def cmd_generate(args: argparse.Namespace) -> int:
    from lmlab.io import read_texts, save_npy, write_jsonl
    from lmlab.watermark.sampling import generate_schemes

    suffix = Path(args.output).suffix.lower()
    if suffix not in (".jsonl", ".npy"):
        raise LmlabError(f"--output must end in .jsonl or .npy, got {args.output!r}")
    refuse_existing([args.output], args.overwrite)
    device, dtype = placement(args)
    prompts = read_texts(args.prompts, field="prompt")
    config = sampling_config(args)
    model, tokenizer, _ = load_model_or_run(args, device, dtype)
    out = generate_schemes(model, tokenizer, prompts, args.schemes, config, _redlist(args, tokenizer),
                           progress=not args.no_progress)
    if suffix == ".npy":
        save_npy(args.output, [r["text"] for r in out.records])
    else:
        write_jsonl(args.output, out.records)
    names = ",".join(args.schemes)
    early = out.early()
    ended = len(early)
    summary = {"texts": len(out.records), "scheme": names, "schemes": args.schemes,
               "max_new_tokens": config.max_new_tokens, "ended_early_by_eos": ended,
               "ended_early_by_scheme": out.ended_early, "ended_early": early,
               "tokens": [r["tokens"] for r in out.records], "seconds": out.seconds, "output": args.output}
    for e in early:  # which texts are short, and why: the model drew its end-of-text token
        print(f"text {e['index']} ({e['scheme']}, prompt {e['prompt_index']}, sample {e['sample']}): ended by the "
              f"model after {e['tokens']} of {config.max_new_tokens} tokens", file=sys.stderr)
    if args.json:
        print_json(summary)
    else:
        print(f"{len(out.records)} texts ({names}; {ended} ended by the model before {config.max_new_tokens} tokens) "
              f"in {out.seconds:.1f} s -> {args.output}")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from lmlab.io import read_texts
    from lmlab.models import load_tokenizer
    from lmlab.watermark import GreenLists, classify_text

    texts = read_texts(args.input)
    if not texts:
        raise LmlabError(f"{args.input}: no texts")
    from lmlab.watermark import ClassifyConfig

    z_threshold = ClassifyConfig().z_threshold if args.z_threshold is None else args.z_threshold
    tokenizer = load_tokenizer(args.model)
    lists = GreenLists(_redlist(args, tokenizer))
    rows = []
    for text in texts:
        d = classify_text(text, tokenizer, lists)
        if d.scored == 0:
            rows.append({"scored": 0, "watermarked": None, "undetermined": d.reason})
        else:
            rows.append({"scored": d.scored, "green": d.green, "green_fraction": d.green_fraction, "z": d.z,
                         "p_value": d.p_value, "watermarked": d.z >= z_threshold})
    if args.json:
        print_json({"texts": rows, "z_threshold": z_threshold})
        return 0
    print(f"{'#':>4} {'scored':>6} {'green':>6} {'fraction':>8} {'z':>7} {'p-value':>9}  watermarked")
    for i, r in enumerate(rows):
        if r.get("undetermined"):
            print(f"{i:>4} undetermined: {r['undetermined']}")
        else:
            print(f"{i:>4} {r['scored']:>6} {r['green']:>6} {r['green_fraction']:>8.3f} {r['z']:>7.2f} "
                  f"{r['p_value']:>9.2e}  {'yes' if r['watermarked'] else 'no'}")
    return 0


def _key_free_conflicts(args: argparse.Namespace) -> None:
    """--key-free is given no key: the options that describe one (or tune the keyed rule) end in one line."""
    given = [flag for flag, value in (("--key", args.key), ("--gamma", args.gamma),
                                      ("--seeding-scheme", args.seeding_scheme),
                                      ("--context-width", args.context_width), ("--green-list", args.green_list),
                                      ("--z-threshold", args.z_threshold), ("--hard-fraction", args.hard_fraction))
             if value is not None]
    if given:
        raise LmlabError(f"--key-free works without the scheme's key and lists: drop {', '.join(given)}")


def cmd_classify(args: argparse.Namespace) -> int:
    from lmlab.io import read_texts, save_npy, write_json
    from lmlab.watermark import NAMES

    if Path(args.output).suffix.lower() != ".npy":
        raise LmlabError(f"--output must end in .npy, got {args.output!r}")
    if args.key_free:
        _key_free_conflicts(args)
    texts = read_texts(args.input)
    if not texts:
        raise LmlabError(f"{args.input}: no texts")
    counts = [args.balanced] * 4 if args.balanced is not None else args.counts
    if counts is not None and sum(counts) != len(texts):
        raise LmlabError(f"counts {','.join(map(str, counts))} add up to {sum(counts)}, but {args.input} has "
                         f"{len(texts)} texts")
    report = args.report or str(Path(args.output).with_suffix(".json"))
    if Path(report).resolve() == Path(args.input).resolve():  # texts.json -> texts.npy: keep the input
        report = args.report or str(Path(args.output).with_suffix(".scores.json"))
    if Path(report).resolve() == Path(args.input).resolve():
        raise LmlabError(f"--report {report} would overwrite the input")
    refuse_existing([args.output, report], args.overwrite)
    extra = {}
    if args.key_free:
        from lmlab.models import load_model
        from lmlab.watermark.keyfree import KeyFreeConfig, classify_key_free

        device, dtype = placement(args)
        model, tokenizer = load_model(args.model, device=device, dtype=dtype)
        config = KeyFreeConfig()
        decisions = classify_key_free(texts, model.eval(), tokenizer, counts, config, progress=not args.no_progress)
        extra = {"key_free": {"model": args.model, "features": list(config.features), "top_k": config.top_k}}
    else:
        from lmlab.models import load_tokenizer
        from lmlab.watermark import ClassifyConfig, classify_counts, classify_texts

        tokenizer = load_tokenizer(args.model)
        given = {"z_threshold": args.z_threshold, "hard_fraction": args.hard_fraction}
        options = ClassifyConfig(**{k: v for k, v in given.items() if v is not None})  # its defaults otherwise
        if counts is None:
            decisions = classify_texts(texts, tokenizer, _redlist(args, tokenizer), options,
                                       progress=not args.no_progress)
        else:
            decisions = classify_counts(texts, tokenizer, counts, _redlist(args, tokenizer), options,
                                        progress=not args.no_progress)
    counts = {name: sum(d.code == code for d in decisions) for code, name in NAMES.items()}
    write_json(report, {"codes": NAMES, "counts": counts, **extra, "texts": [d.to_dict() for d in decisions]})
    save_npy(args.output, [d.code for d in decisions])
    if args.json:
        print_json({"guesses": [d.code for d in decisions], "counts": counts, "key_free": args.key_free,
                    "report": report})
    else:
        print(f"{len(decisions)} texts: " + ", ".join(f"{n} {name}" for name, n in counts.items() if n)
              + f" -> {args.output} (scores: {report})", file=sys.stdout)
    return 0


def register(sub) -> None:
    p = sub.add_parser("watermark", help="watermark generations (no-e, hard / soft red list), detect and classify")
    wsub = p.add_subparsers(dest="watermark_command", required=True, metavar="ACTION")

    g = wsub.add_parser("generate", help="sample continuations of prompts under a watermark scheme")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--scheme", "--schemes", dest="schemes", type=_scheme_list, metavar="SCHEME[,SCHEME...]",
                       help="none (plain sampling), no-e (never an 'e'), hard (red tokens banned) or soft (red "
                            "logits lowered by --delta); a comma-separated list writes, for each scheme in turn, "
                            "every prompt's texts")
    g.add_argument("--prompts", required=True,
                   help="prompts: .txt (one per line), .json list, .jsonl with a 'prompt' field, or .npy")
    g.add_argument("--output", required=True, help=".jsonl (prompt, sample, scheme, text) or .npy of strings")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--json", action="store_true")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    _redlist_args(g, delta=True)
    add_device_args(g)
    g.set_defaults(func=cmd_generate)

    for name, func, text in (("detect", cmd_detect, "red-list z test per text: scored and green tokens, z, p-value"),
                             ("classify", cmd_classify, ("which watermark each text carries: 1 none, 2 no-e, "
                                                        "3 hard, 4 soft (0 undetermined)"))):
        d = wsub.add_parser(name, help=text)
        d.add_argument("--input", required=True,
                       help="texts: .json list or {'texts': [...]}, .jsonl with 'text', .npy of strings, or .txt lines")
        d.add_argument("--model", default=DEFAULT_MODEL,
                       help="whose tokenizer (no weights are loaded, except by classify --key-free)")
        d.add_argument("--z-threshold", type=finite_float, default=None,
                       help="z score from which a text counts as red-list watermarked (4.0)")
        d.add_argument("--json", action="store_true")
        _redlist_args(d)
        if name == "classify":
            d.add_argument("--output", required=True, help="guesses as an .npy of ints")
            d.add_argument("--report", default=None, help="JSON with the scores behind each guess (default: "
                                                          "the output with .json, or .scores.json if that is the input)")
            d.add_argument("--hard-fraction", type=positive_float, default=None,
                           help="green share above which watermarked text is hard (0.9)")
            d.add_argument("--no-progress", action="store_true")
            d.add_argument("--overwrite", action="store_true", help="replace an existing --output and --report")
            d.add_argument("--key-free", action="store_true",
                           help="the key is unknown: tell the kinds apart by how the texts read to --model (its "
                                "weights are loaded: perplexity, top-1 / top-5 share, surprise) and their e's, "
                                "clustered (exactly the counts with --balanced / --counts); no --key, --gamma, "
                                "--seeding-scheme, --green-list, --z-threshold or --hard-fraction")
            add_device_args(d)
            known = d.add_mutually_exclusive_group()
            known.add_argument("--balanced", type=nonnegative_int, default=None, metavar="N",
                               help="exactly N texts of each kind: an optimal assignment over per-text costs "
                                    "(never 0, undetermined)")
            known.add_argument("--counts", type=_counts, default=None, metavar="NONE,NO-E,HARD,SOFT",
                               help="exactly these many texts of each kind (e.g. 20,20,20,20)")
        d.set_defaults(func=func)
