"""Evaluation throughput: ``lmlab evaluate`` (batched, left-padded, KV cache, shared-prefix cache,
early stop) with each of those switched off, and ``--scoring``, against a per-example
``model.generate`` loop, side by side on the same examples, one run.

    python bench/bench_evaluate.py --n 192 --json bench/results/evaluate.json
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


def per_label_forward_scores(model, tokenizer, fmt, examples, batch_size: int) -> torch.Tensor:
    """Multi-token labels the plain way: one forward over prompt + label per label, left-padded,
    the head on the label's positions only; (N, L)."""
    from lmlab.data import Encoded, encode, label_token_ids, left_pad_batch

    items = encode(tokenizer, fmt, examples)
    scores = torch.empty(len(items), len(fmt.label_words))
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            for j, completion in enumerate(label_token_ids(tokenizer, fmt)):
                k = len(completion)
                ids, mask, pos, labels = left_pad_batch([Encoded(b.prompt_ids, completion, 0) for b in batch],
                                                        tokenizer.pad_token_id, device=model.device)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=k + 1).logits
                logp = logits[:, :-1].float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
                scores[start:start + len(batch), j] = logp.sum(-1)
    return scores


def compute_bound(model, tokenizer, fmt, examples, max_new_tokens: int, gflops: float) -> dict:
    """Examples/s at 100 % of the fp32 matmul rate for the FLOPs exact evaluation cannot skip:
    2 x non-embedding parameters for each prompt token after the shared prefix, plus the LM head on
    the last position (scoring) and a whole token per further generated token (generation)."""
    from lmlab.data import encode
    from lmlab.kvcache import shared_prefix_length

    prompts = [it.prompt_ids for it in encode(tokenizer, fmt, examples)]
    own = sum(len(p) for p in prompts) / len(prompts) - shared_prefix_length(prompts)
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    body -= 0 if model.config.tie_word_embeddings else head
    scoring = 2 * (own * body + head)
    generation = scoring + 2 * (max_new_tokens - 1) * (body + head)
    return {"own_tokens_per_example": own, "gflop_scoring": scoring / 1e9, "gflop_generation": generation / 1e9,
            "scoring_examples_per_s": gflops * 1e9 / scoring, "generation_examples_per_s": gflops * 1e9 / generation}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=96, help="test examples (fixed-seed sample)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=3)
    p.add_argument("--multi-token-labels", default="very negative,very positive",
                   help="comma-separated label words of several tokens, for the multi-token scoring row")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from bench_finetune import matmul_gflops

    from lmlab.data import TaskFormat, label_token_ids, load_splits, subsample
    from lmlab.evaluate import (
        evaluate_generation,
        evaluate_scoring,
        label_logprobs,
        parse_label,
    )
    from lmlab.models import load_model

    model, tokenizer = load_model()
    fmt = TaskFormat()
    gflops = matmul_gflops()
    examples = subsample(load_splits(str(DATA), fmt, ("test",))["test"], args.n)
    evaluate_scoring(model, tokenizer, fmt, examples[:4], progress=False)  # warm-up
    loop_s, loop_texts = per_example_loop(model, tokenizer, fmt, examples, args.max_new_tokens)
    gen = evaluate_generation(model, tokenizer, fmt, examples, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, progress=False)
    gen_full = evaluate_generation(model, tokenizer, fmt, examples, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, progress=False, stop_when_decided=False)
    gen_plain = evaluate_generation(model, tokenizer, fmt, examples, batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens, progress=False, shared_prefix=False,
                                    stop_when_decided=False)
    score = evaluate_scoring(model, tokenizer, fmt, examples, batch_size=args.batch_size, progress=False)
    t0 = time.perf_counter()  # the same scores without the shared-prefix KV cache
    plain = label_logprobs(model, tokenizer, fmt, examples, batch_size=args.batch_size, shared_prefix=False)
    plain_s = time.perf_counter() - t0
    cached = label_logprobs(model, tokenizer, fmt, examples, batch_size=args.batch_size)
    loop_again_s, _ = per_example_loop(model, tokenizer, fmt, examples, args.max_new_tokens)
    loop_s = min(loop_s, loop_again_s)  # the loop runs first and last; its faster run counts (conservative)
    multi = TaskFormat(label_words=tuple(args.multi_token_labels.split(",")))
    t0 = time.perf_counter()
    multi_plain = per_label_forward_scores(model, tokenizer, multi, examples, args.batch_size)
    multi_plain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    multi_ours = label_logprobs(model, tokenizer, multi, examples, batch_size=args.batch_size)
    multi_ours_s = time.perf_counter() - t0
    loop_predictions = [parse_label(t, fmt.label_words) for t in loop_texts]
    results = {
        "n": len(examples), "model": "smollm2-135m-instruct", "threads": torch.get_num_threads(),
        "matmul_gflops": gflops,
        "bound_at_matmul_peak": compute_bound(model, tokenizer, fmt, examples, args.max_new_tokens, gflops),
        "per_example_loop": {"examples_per_s": len(examples) / loop_s},
        "evaluate": {"examples_per_s": gen.examples_per_s, "accuracy": gen.accuracy, "unparseable": gen.unparseable,
                     "same_predictions_as_loop": gen.predictions == loop_predictions,
                     "prefixes_of_loop_texts": all(a.startswith(b) for a, b in zip(loop_texts, gen.generations))},
        "generation_without_early_stop": {"examples_per_s": gen_full.examples_per_s,
                                          "same_generations_as_loop": gen_full.generations == loop_texts},
        "generation_without_early_stop_and_prefix_cache": {
            "examples_per_s": gen_plain.examples_per_s, "same_generations_as_loop": gen_plain.generations == loop_texts},
        "evaluate_scoring": {"examples_per_s": score.examples_per_s, "accuracy": score.accuracy},
        "scoring_without_prefix_cache": {"examples_per_s": len(examples) / plain_s,
                                         "max_abs_logprob_difference": (plain - cached).abs().max().item(),
                                         "same_predictions": bool((plain.argmax(-1) == cached.argmax(-1)).all())},
    }
    results["multi_token_labels"] = {
        "label_words": multi.label_words, "tokens": [len(c) for c in label_token_ids(tokenizer, multi)],
        "one_forward_per_label_examples_per_s": len(examples) / multi_plain_s,
        "evaluate_scoring_examples_per_s": len(examples) / multi_ours_s, "speedup": multi_plain_s / multi_ours_s,
        "max_abs_logprob_difference": (multi_plain - multi_ours).abs().max().item(),
        "same_predictions": bool((multi_plain.argmax(-1) == multi_ours.argmax(-1)).all())}
    results["speedup_evaluate"] = results["evaluate"]["examples_per_s"] / results["per_example_loop"]["examples_per_s"]
    results["speedup_scoring"] = results["evaluate_scoring"]["examples_per_s"] / results["per_example_loop"]["examples_per_s"]
    loop = results["per_example_loop"]["examples_per_s"]
    bound = results["bound_at_matmul_peak"]
    results["speedup_bound_scoring"] = bound["scoring_examples_per_s"] / loop
    results["speedup_bound_generation"] = bound["generation_examples_per_s"] / loop
    print(json.dumps(results, indent=2))
    print(f"evaluate {results['speedup_evaluate']:.1f}x, --scoring {results['speedup_scoring']:.1f}x the per-example loop "
          f"(at {gflops:.0f} GFLOP/s the FLOPs allow at most {results['speedup_bound_generation']:.1f}x and "
          f"{results['speedup_bound_scoring']:.1f}x)", file=sys.stderr)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
