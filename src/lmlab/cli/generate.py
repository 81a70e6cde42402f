"""``lmlab generate``: sample continuations from a base model or a fine-tuned checkpoint."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmlab.cli._args import (
    add_device_args,
    add_model_args,
    add_sampling_args,
    load_model_or_run,
    placement,
    print_json,
    refuse_existing,
    sampling_config,
)
from lmlab.errors import LmlabError


def cmd_generate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from lmlab.chat import use_template, user_turn_ids
    from lmlab.generate import sample
    from lmlab.io import read_texts, write_jsonl, write_text
    from lmlab.sft import SUMMARY_TEMPLATE, split_template, summary_prompt

    if args.template is not None and not args.tldr:
        raise LmlabError("--template is the summarization prompt (a {post} slot): give it with --tldr")
    if args.template is not None:
        split_template(args.template)  # a template without its one {post} slot: one line, before any load
    suffix = Path(args.output).suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise LmlabError(f"--output must end in .jsonl or .txt, got {args.output!r}")
    refuse_existing([args.output], args.overwrite)
    device, dtype = placement(args)
    field = "post" if args.tldr else "prompt"
    prompts = read_texts(args.prompts, field=field)
    config = sampling_config(args)
    model, tokenizer, run_info = load_model_or_run(args, device, dtype)
    if args.tldr:  # the flag's template, else the one a summarization --run trained on, else TL;DR
        trained = run_info.get("template") if run_info.get("task") == "summarization" else None
        prompts = [summary_prompt(p, args.template or trained or SUMMARY_TEMPLATE) for p in prompts]
    # the run's own format: its recorded --chat-template; a --task chat run without one used the plain format
    template = use_template(args.chat_template, tokenizer, model, run_info=run_info)
    turns = template or run_info.get("task") == "chat"
    inputs = [user_turn_ids(tokenizer, p, template) for p in prompts] if turns else prompts
    t0 = time.perf_counter()
    outputs = sample(model, tokenizer, inputs, replace(config, chat=False), progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    if args.first_line:
        outputs = [[t.strip().split("\n")[0].strip() for t in texts] for texts in outputs]
    if suffix == ".jsonl":
        write_jsonl(args.output, [{"prompt": p, "sample": k, "text": t}
                                  for p, texts in zip(prompts, outputs) for k, t in enumerate(texts)])
    else:  # one line per sample (newlines escaped), prompt order: ready for evaluate --predictions
        write_text(args.output, "".join(t.replace("\n", " ") + "\n" for texts in outputs for t in texts))
    n = sum(map(len, outputs))
    if args.json:
        print_json({"texts": n, "seconds": seconds, "output": args.output})
    else:
        print(f"{n} texts ({len(prompts)} prompts x {args.samples}) in {seconds:.1f} s -> {args.output}")
    return 0


def register(sub) -> None:
    from lmlab.cli import template_text

    p = sub.add_parser("generate", help="sample continuations of prompts from a model or a finetune checkpoint")
    add_model_args(p)
    p.add_argument("--prompts", required=True,
                   help="prompts: .txt (one per line), .json list, .jsonl with a 'prompt' field ('post' with --tldr)")
    p.add_argument("--tldr", action="store_true",
                   help="summarization: read the 'post' field and prompt with the --template a summarization "
                        "--run trained on, as finetune does (else '{post}\\nTL;DR:')")
    p.add_argument("--template", type=template_text, default=None,
                   help="with --tldr: the prompt, its {post} slot taking the post (e.g. 'summarize: {post}')")
    p.add_argument("--output", required=True, help=".jsonl (prompt, sample, text) or .txt (one sample per line)")
    add_sampling_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--first-line", action="store_true", help="keep each sample's first line only (summaries)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    add_device_args(p)
    p.set_defaults(func=cmd_generate)
