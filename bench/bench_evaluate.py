"""Evaluation throughput: ``lmlab evaluate`` (batched, left-padded, KV cache) and ``--scoring``
against a per-example ``model.generate`` loop, side by side on the same examples, one run.

    python bench/bench_evaluate.py --n 96 --json bench/results/evaluate.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "rotten_tomatoes"


def per_example_loop(model, tokenizer, fmt, examples, max_new_tokens: int) -> tuple[float, list[str]]:
    """What people write first: one ``generate`` call per example."""
    from lmlab.data import encode

    texts = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for item in encode(tokenizer, fmt, examples):
            ids = torch.tensor([item.prompt_ids])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return time.perf_counter() - t0, texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=96, help="test examples (fixed-seed sample)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from lmlab.data import TaskFormat, load_splits, subsample
    from lmlab.evaluate import evaluate_generation, evaluate_scoring, label_logprobs
    from lmlab.models import load_model

    model, tokenizer = load_model()
    fmt = TaskFormat()
    examples = subsample(load_splits(str(DATA), fmt, ("test",))["test"], args.n)
    evaluate_scoring(model, tokenizer, fmt, examples[:4], progress=False)  # warm-up
    loop_s, loop_texts = per_example_loop(model, tokenizer, fmt, examples, args.max_new_tokens)
    gen = evaluate_generation(model, tokenizer, fmt, examples, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, progress=False)
    score = evaluate_scoring(model, tokenizer, fmt, examples, batch_size=2 * args.batch_size, progress=False)
    t0 = time.perf_counter()  # the same scores without the shared-prefix KV cache
    plain = label_logprobs(model, tokenizer, fmt, examples, batch_size=2 * args.batch_size, shared_prefix=False)
    plain_s = time.perf_counter() - t0
    cached = label_logprobs(model, tokenizer, fmt, examples, batch_size=2 * args.batch_size)
    results = {
        "n": len(examples), "model": "smollm2-135m-instruct", "threads": torch.get_num_threads(),
        "per_example_loop": {"examples_per_s": len(examples) / loop_s},
        "evaluate": {"examples_per_s": gen.examples_per_s, "accuracy": gen.accuracy, "unparseable": gen.unparseable},
        "evaluate_scoring": {"examples_per_s": score.examples_per_s, "accuracy": score.accuracy},
        "scoring_without_prefix_cache": {"examples_per_s": len(examples) / plain_s,
                                         "max_abs_logprob_difference": (plain - cached).abs().max().item(),
                                         "same_predictions": bool((plain.argmax(-1) == cached.argmax(-1)).all())},
        "same_generations_as_loop": sum(a == b for a, b in zip(loop_texts, gen.generations)) / len(examples),
    }
    results["speedup_evaluate"] = results["evaluate"]["examples_per_s"] / results["per_example_loop"]["examples_per_s"]
    results["speedup_scoring"] = results["evaluate_scoring"]["examples_per_s"] / results["per_example_loop"]["examples_per_s"]
    print(json.dumps(results, indent=2))
    print(f"evaluate {results['speedup_evaluate']:.1f}x, --scoring {results['speedup_scoring']:.1f}x the per-example loop",
          file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
