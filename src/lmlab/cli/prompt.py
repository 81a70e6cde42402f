"""``lmlab prompt``: prompting strategies on GSM8K-style math word problems."""

from __future__ import annotations

import argparse

from lmlab.cli._args import DEFAULT_MODEL, nonnegative_int, positive_int, print_json
from lmlab.errors import LmlabError

DEFAULT_DATASET = "gsm8k"


def cmd_prompt(args: argparse.Namespace) -> int:
    from lmlab.data import subsample
    from lmlab.io import write_jsonl
    from lmlab.models import load_model
    from lmlab.prompting import (
        STRATEGIES,
        PromptConfig,
        format_table,
        load_problems,
        run_strategy,
    )

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise LmlabError(f"unknown strategy {', '.join(unknown) or '(none)'}; choose from {', '.join(STRATEGIES)}")
    test = subsample(load_problems(args.dataset, args.split), args.limit)
    needs_train = any(s in ("few-shot", "cot") for s in strategies)
    train = load_problems(args.dataset, "train") if needs_train else []
    model, tokenizer = load_model(args.model)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.chat_template == "on" and not has_template:
        raise LmlabError(f"{args.model} has no chat template; use --chat-template auto or off")
    chat = args.chat_template == "on" or (args.chat_template == "auto" and has_template
                                          and not getattr(model.config, "is_encoder_decoder", False))
    results = []
    for strategy in strategies:
        config = PromptConfig(strategy=strategy, shots=args.shots, seed=args.seed, chat=chat)
        results.append(run_strategy(model, tokenizer, test, train, config, max_new_tokens=args.max_new_tokens,
                                    batch_size=args.batch_size, progress=not args.no_progress))
    if args.output:
        write_jsonl(args.output, [r for result in results for r in result.records])
    summary = {"model": args.model, "dataset": args.dataset, "split": args.split, "n": len(test), "chat": chat,
               "shots": args.shots, "results": [r.summary() for r in results]}
    if args.json:
        print_json(summary)
    else:
        print(f"{args.model} on {args.dataset}/{args.split}, {len(test)} problems, chat template {'on' if chat else 'off'}")
        print(format_table(results))
    return 0


def register(sub) -> None:
    p = sub.add_parser("prompt", help="zero-shot, instruction, few-shot, chain-of-thought and zero-shot CoT "
                                      "prompting on math word problems")
    p.add_argument("--model", default=DEFAULT_MODEL, help="causal LM or seq2seq (T5) model")
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="hub name (gsm8k) or a folder with train/test .jsonl "
                                                              "of {question, answer ending '#### n'}")
    p.add_argument("--split", default="test")
    p.add_argument("--strategies", default="zero-shot,instruction,few-shot,cot,zero-shot-cot")
    p.add_argument("--shots", type=nonnegative_int, default=8, help="exemplars for few-shot and cot (8)")
    p.add_argument("--limit", type=positive_int, default=None, help="N problems drawn with a fixed seed")
    p.add_argument("--seed", type=int, default=0, help="which exemplars")
    p.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"],
                   help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--output", default=None, help="every prompt and generation as .jsonl")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prompt)
