"""``lmlab prompt``: prompting strategies on GSM8K-style math word problems."""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from lmlab.cli._args import (
    DEFAULT_MODEL,
    add_device_args,
    add_model_args,
    load_model_or_run,
    nonnegative_int,
    placement,
    positive_int,
    print_json,
    refuse_existing,
)
from lmlab.errors import LmlabError

DEFAULT_DATASET = "gsm8k"


def _strategies(text: str) -> list[str]:
    from lmlab.prompting import STRATEGIES

    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise LmlabError(f"unknown strategy {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


class _Parts:
    """Finished strategies of an interrupted run, beside ``--output`` (``OUTPUT.parts/``): a rerun of
    the same command keeps them instead of generating again; removed once the output is written.
    The precision is part of the key (bf16 and fp32 greedy texts differ); the device is not."""

    def __init__(self, args: argparse.Namespace, chat: bool, n: int, dtype: str):
        self.dir = Path(str(args.output) + ".parts")
        self.key = {"model": args.model or DEFAULT_MODEL, "run": args.run, "dataset": args.dataset,
                    "split": args.split, "limit": args.limit, "n": n,
                    "shots": args.shots, "seed": args.seed, "chat": chat, "max_new_tokens": args.max_new_tokens,
                    "dtype": dtype}

    def load(self, strategy: str):
        from lmlab.io import read_json
        from lmlab.prompting import StrategyResult

        path = self.dir / f"{strategy}.json"
        if not path.exists():
            return None
        part = read_json(path)
        if part.get("key") != self.key:
            return None
        return StrategyResult(**part["result"])

    def save(self, result) -> None:
        import json

        from lmlab.io import json_safe, write_text

        self.dir.mkdir(parents=True, exist_ok=True)
        # not write_json, which sorts keys: a kept part's records must keep their order, so that the
        # output file of a resumed run is byte for byte an uninterrupted run's
        write_text(self.dir / f"{result.strategy}.json",
                   json.dumps(json_safe({"key": self.key, "result": asdict(result)}), allow_nan=False) + "\n")

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def cmd_prompt(args: argparse.Namespace) -> int:
    from lmlab.data import subsample
    from lmlab.devices import dtype_name
    from lmlab.io import write_jsonl
    from lmlab.prompting import (
        PromptConfig,
        exemplars,
        format_table,
        load_problems,
        run_strategy,
    )

    strategies = _strategies(args.strategies)
    refuse_existing([args.output], args.overwrite)  # an interrupted run resumes from OUTPUT.parts instead
    device, dtype = placement(args)
    test = subsample(load_problems(args.dataset, args.split), args.limit)
    needs_train = any(PromptConfig(strategy=s).uses_exemplars for s in strategies)
    train = load_problems(args.dataset, "train") if needs_train else []
    if needs_train:
        exemplars(train, args.shots, args.seed)  # too few training problems: fail before loading the model
    from lmlab.chat import has_template, use_template

    model, tokenizer, run_info = load_model_or_run(args, device, dtype)
    name = args.run or args.model or DEFAULT_MODEL
    if args.chat_template == "on" and not has_template(tokenizer):
        raise LmlabError(f"{name} has no chat template; use --chat-template auto or off")
    # auto: as the --run trained (its run.json), else on where the tokenizer has a template (not seq2seq)
    chat = use_template(args.chat_template, tokenizer, model, run_info=run_info, auto=True)
    parts = _Parts(args, chat, len(test), dtype_name(dtype)) if args.output else None
    results = []
    for n, strategy in enumerate(strategies, 1):
        done = parts.load(strategy) if parts else None
        if not args.no_progress:
            print(f"lmlab: [{n}/{len(strategies)}] {strategy}{' (done before, kept)' if done else ''}",
                  file=sys.stderr, flush=True)
        if done is None:
            config = PromptConfig(strategy=strategy, shots=args.shots, seed=args.seed, chat=chat)
            done = run_strategy(model, tokenizer, test, train, config, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, progress=not args.no_progress)
            if parts:
                parts.save(done)
        results.append(done)
    if args.output:
        write_jsonl(args.output, [r for result in results for r in result.records])
        parts.clear()
    summary = {"model": name, "dataset": args.dataset, "split": args.split, "n": len(test), "chat": chat,
               "device": str(device), "dtype": dtype_name(dtype), "shots": args.shots, "seed": args.seed,
               "max_new_tokens": args.max_new_tokens,
               "results": [r.summary() for r in results], "output": args.output}
    if args.json:
        print_json(summary)
    else:
        print(f"{name} on {args.dataset} ({args.split}, {len(test)} problems), greedy, {device} "
              f"{dtype_name(dtype)}, chat template {'on' if chat else 'off'}, {args.shots} exemplars for few-shot/cot")
        print(format_table(results))
        if args.output:
            print(f"generations: {args.output}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("prompt", help="zero-shot, instruction, few-shot, chain-of-thought and zero-shot CoT "
                                      "prompting on math word problems (GSM8K)",
                       description="Accuracy of prompting strategies on GSM8K-style problems, greedy decoding; "
                                   "the answer is read after '####', '\\boxed{', 'The answer is', else as the "
                                   "last number (unparseable counts as wrong).")
    add_model_args(p)
    p.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="hub name (gsm8k) or a folder with train/test .jsonl of {question, answer ending '#### n'}")
    p.add_argument("--split", default="test", help="split to score (test)")
    p.add_argument("--strategies", default="zero-shot,instruction,few-shot,cot,zero-shot-cot",
                   help="comma-separated, from zero-shot, instruction, few-shot, cot (chain of thought) and "
                        "zero-shot-cot (default: all five)")
    p.add_argument("--shots", type=nonnegative_int, default=8, help="exemplars for few-shot and cot (8)")
    p.add_argument("--seed", type=int, default=0, help="which exemplars are drawn from train (0)")
    p.add_argument("--limit", type=positive_int, default=None, help="N problems drawn with a fixed seed")
    p.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"],
                   help="use the tokenizer's chat template (auto: as the --run recorded, else when it has one and "
                        "the model is not seq2seq)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--output", default=None, help="every prompt, generation and extracted answer as .jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_args(p)
    p.set_defaults(func=cmd_prompt)
