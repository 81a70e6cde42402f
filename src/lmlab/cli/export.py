"""``lmlab export``: a run as a folder transformers / peft load without lmlab, optionally pushed to the hub."""

from __future__ import annotations

import argparse
import sys

from lmlab.cli._args import print_json, refuse_existing


def cmd_export(args: argparse.Namespace) -> int:
    from lmlab.export import ExportConfig, export

    refuse_existing([args.output], args.overwrite)
    result = export(ExportConfig(run=args.run, output=args.output, merge=args.merge, dtype=args.dtype,
                                 push_to_hub=args.push_to_hub))
    if args.json:
        print_json(result)
        return 0
    print(f"lmlab: {result['method']} from {result['checkpoint']} as a {result['format']} folder "
          f"({result['dtype']}): {', '.join(result['files'])}", file=sys.stderr)
    if result["pushed"]:
        print(f"lmlab: pushed to {result['pushed']}", file=sys.stderr)
    print(result["output"])
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="a run as a folder transformers (or peft) loads without lmlab, with a model "
                                      "card; optionally pushed to the Hugging Face hub",
                       description="LoRA: a PEFT adapter folder, or with --merge a plain transformers model with "
                                   "B A merged into the weights. BitFit and full: a plain transformers model. "
                                   "Bottleneck adapters and prefix tuning have no transformers form: --merge is "
                                   "refused, and without it their lmlab files are exported.")
    p.add_argument("run", metavar="RUN", help="a folder finetune or dpo wrote: RUN means RUN/best (RUN/last for "
                                              "the last step)")
    p.add_argument("--output", required=True, help="the folder to write (required)")
    p.add_argument("--merge", action="store_true",
                   help="merge LoRA into the weights: a plain transformers model instead of a PEFT adapter")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights' precision; auto: the base model's own dtype when merged, the adapter's as "
                        "trained otherwise (auto)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="also upload the folder to this hub repo (created if needed; needs the network and a token)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_export)
