"""The ``lmlab`` command line: a thin shell over the Python API, one subcommand per concept.

Heavy imports (torch, transformers) happen inside the subcommands so ``lmlab --help`` is instant.
Bad input ends in one line on stderr (``lmlab: error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from lmlab.errors import LmlabError

DEFAULT_MODEL = "smollm2-135m-instruct"  # lmlab.models.DEFAULT_MODEL, without importing torch


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_method_args(p: argparse.ArgumentParser) -> None:
    """Options of the five adaptation methods (shared by params, finetune, ...)."""
    p.add_argument("--method", default="lora", choices=["lora", "adapter", "prefix", "bitfit", "full"])
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", "-r", type=int, default=8, help="LoRA rank r (default 8)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha/r (default 2r)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch input")
    g.add_argument("--target", default=None,
                   help="comma-separated module names to adapt (default: attention q,k,v projections)")
    g = p.add_argument_group("bottleneck adapter")
    g.add_argument("--bottleneck", type=int, default=64, help="adapter inner width m (default 64)")
    g.add_argument("--train-layer-norms", action="store_true", help="also train the layer norms (Houlsby et al.)")
    g = p.add_argument_group("prefix tuning")
    g.add_argument("--prefix-length", type=int, default=10, help="prefix length l (default 10)")
    g.add_argument("--prefix-hidden", type=int, default=None,
                   help="reparametrise the prefix through an MLP of this hidden width (Li & Liang Sec. 4.2)")


def method_config(args: argparse.Namespace):
    """The typed config of ``args.method`` from the parsed options."""
    from lmlab import peft

    if args.method == "lora":
        targets = tuple(t.strip() for t in args.target.split(",") if t.strip()) if args.target else None
        alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
        return peft.make_config("lora", r=args.rank, alpha=alpha, dropout=args.lora_dropout, target_modules=targets)
    if args.method == "adapter":
        return peft.make_config("adapter", bottleneck=args.bottleneck, train_layer_norms=args.train_layer_norms)
    if args.method == "prefix":
        return peft.make_config("prefix", length=args.prefix_length, hidden=args.prefix_hidden)
    return peft.make_config(args.method)


# --- subcommands ----------------------------------------------------------------------------


def cmd_params(args: argparse.Namespace) -> int:
    from lmlab.calc.params import report

    r = report(args.model, args.method, method_config(args))
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"model      {r['model']}")
    print(f"method     {r['method']}")
    print(f"trainable  {r['trainable']:,}  (closed form {r['closed_form_trainable']:,}: "
          f"{'agrees' if r['closed_form_agrees'] else 'DIFFERS'})")
    print(f"total      {r['total']:,}")
    print(f"trainable% {r['percent']:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="trainable and total parameters of a method on a model (no weights loaded)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, smollm2-135m, tiny-*), folder or hub id")
    add_method_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LmlabError as exc:
        print(f"lmlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
