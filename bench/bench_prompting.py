"""Few-shot prompting with and without the shared-prefix KV cache: the exemplars every GSM8K
prompt starts with run once (``lmlab.kvcache``) instead of once per problem, side by side on
the same problems and settings as ``lmlab prompt``, one run.

    python bench/bench_prompting.py --n 32 --json bench/results/prompting.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lmlab.io import write_json

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "gsm8k"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32, help="test problems (the first n)")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--strategies", default="few-shot,cot")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from lmlab.generate import SamplingConfig, sample
    from lmlab.kvcache import shared_prefix_length
    from lmlab.models import load_model
    from lmlab.prompting import STOP, PromptConfig, exemplars, load_problems, prompt_ids

    model, tokenizer = load_model()
    problems = load_problems(str(DATA), "test")[:args.n]
    train = load_problems(str(DATA), "train")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0, batch_size=args.batch_size,
                              stop_strings=STOP)
    results = {"n": len(problems), "shots": args.shots, "max_new_tokens": args.max_new_tokens,
               "batch_size": args.batch_size, "threads": torch.get_num_threads(), "chat": True, "strategies": {}}
    for strategy in args.strategies.split(","):
        config = PromptConfig(strategy=strategy, shots=args.shots, chat=True)
        ids = [prompt_ids(tokenizer, q, config, exemplars(train, args.shots, 0, q.question)) for q in problems]
        runs = {}
        for shared in (False, True):
            t0 = time.perf_counter()
            texts = sample(model, tokenizer, ids, sampling, progress=False, shared_prefix=shared)
            runs[shared] = (time.perf_counter() - t0, texts)
        row = {"prompt_tokens": sum(map(len, ids)) / len(ids), "shared_prefix_tokens": shared_prefix_length(ids),
               "s_per_problem_without": runs[False][0] / len(ids), "s_per_problem_with": runs[True][0] / len(ids),
               "speedup": runs[False][0] / runs[True][0], "same_texts": runs[False][1] == runs[True][1]}
        results["strategies"][strategy] = row
        print(strategy, json.dumps(row), file=sys.stderr)
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
