"""Watermark benchmark: the 4-way classifier, the soft detector's error rates, the perplexity cost,
and generation speed of each scheme against no watermark and against transformers' processor.

    # 1. the evaluation set: 20 prompts x 4 schemes x 100 new tokens, SmolLM2-135M-Instruct, plain sampling
    for s in none no-e hard soft; do
      lmlab watermark generate --scheme $s --prompts bench/watermark_prompts.txt --max-new-tokens 100 \\
        --min-new-tokens 100 --seed 7 --batch-size 10 --output runs/wm/$s.jsonl
    done
    # 2. scores, perplexities and timings
    python bench/bench_watermark.py --texts runs/wm --out bench/results/watermark.json

Timings interleave the schemes round by round (same prompts, batch, seed and token count), so a
slow moment of the machine hits them all alike; the overhead is the ratio of medians. Whole runs
vary by a few per cent, so the time spent inside each processor is also added up and reported as
a share of the unwatermarked time per token: the overhead measured directly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import torch

from lmlab.generate import SamplingConfig, sample
from lmlab.io import write_json
from lmlab.models import load_model
from lmlab.watermark import (
    GreenLists,
    RedListConfig,
    classify_texts,
    green_ids,
    make_processor,
    text_ids,
)

SCHEMES = ("none", "no-e", "hard", "soft")


def load_set(folder: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (folder / f"{s}.jsonl").read_text().splitlines()] for s in SCHEMES}


def accuracy(texts: dict[str, list[dict]], tokenizer) -> dict:
    truth, flat = [], []
    for code, scheme in enumerate(SCHEMES, 1):
        truth += [code] * len(texts[scheme])
        flat += [r["text"] for r in texts[scheme]]
    decisions = classify_texts(flat, tokenizer)
    confusion = [[sum(d.code == p and t == y for d, t in zip(decisions, truth)) for p in range(5)] for y in range(1, 5)]
    by_scheme = {s: [d for d, t in zip(decisions, truth) if t == c] for c, s in enumerate(SCHEMES, 1)}
    soft_z = [d.z for d in by_scheme["soft"]]
    clean_z = [d.z for d in by_scheme["none"] + by_scheme["no-e"]]
    return {
        "n": len(flat), "correct": sum(d.code == t for d, t in zip(decisions, truth)),
        "accuracy": sum(d.code == t for d, t in zip(decisions, truth)) / len(flat),
        "confusion_rows_true_cols_pred_0to4": confusion,
        "soft_tpr_at_z4": sum(z >= 4 for z in soft_z) / len(soft_z),
        "fpr_at_z4_on_unwatermarked": sum(z >= 4 for z in clean_z) / len(clean_z),
        "green_fraction": {s: [round(d.green_fraction, 3) for d in ds] for s, ds in by_scheme.items()},
        "z": {s: [round(d.z, 2) for d in ds] for s, ds in by_scheme.items()},
        "min_z": {s: min(d.z for d in ds) for s, ds in by_scheme.items()},
    }


@torch.inference_mode()
def perplexity(model, tokenizer, rows: list[dict]) -> float:
    """exp of the mean NLL of the generated tokens given their prompt, under the unwatermarked model."""
    nll, count = 0.0, 0
    for r in rows:
        prompt = tokenizer(r["prompt"])["input_ids"]
        new = tokenizer(r["text"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + new])
        logp = model(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        nll -= logp.gather(-1, torch.tensor(new)[:, None]).sum().item()
        count += len(new)
    return math.exp(nll / count)


class Timed:
    """A processor that also adds up the seconds spent inside it: the overhead measured directly,
    free of the run-to-run noise of whole generations."""

    def __init__(self, processor):
        self.processor, self.seconds = processor, 0.0

    def __call__(self, input_ids, scores):
        t0 = time.perf_counter()
        out = self.processor(input_ids, scores)
        self.seconds += time.perf_counter() - t0
        return out


def timings(model, tokenizer, prompts: list[str], rounds: int, tokens: int, batch: int) -> dict:
    from transformers.generation import WatermarkLogitsProcessor

    config = SamplingConfig(max_new_tokens=tokens, min_new_tokens=tokens, seed=0, batch_size=batch)
    processors = {s: make_processor(s, tokenizer) for s in SCHEMES}
    processors |= {f"{s} (warm cache)": make_processor(s, tokenizer) for s in ("hard", "soft")}
    processors["transformers-soft"] = WatermarkLogitsProcessor(vocab_size=len(tokenizer), device="cpu")
    times: dict[str, list[float]] = {s: [] for s in processors}
    inside: dict[str, list[float]] = {s: [] for s in processors}
    sample(model, tokenizer, prompts[:batch], SamplingConfig(max_new_tokens=4), progress=False)  # warm-up
    for s in ("hard", "soft"):  # "warm cache": the masks of a long job, here from other prompts' texts
        warm = processors[f"{s} (warm cache)"]
        sample(model, tokenizer, prompts[batch:], config, logits_processors=[warm], progress=False)
    for _ in range(rounds):
        for name, proc in processors.items():
            if name in ("hard", "soft"):
                proc.lists = GreenLists(proc.config)  # a cold cache each round: no credit for earlier rounds
            timed = [Timed(proc)] if proc else []
            t0 = time.perf_counter()
            sample(model, tokenizer, prompts[:batch], config, logits_processors=timed, progress=False)
            times[name].append((time.perf_counter() - t0) / (tokens * batch))
            inside[name].append(timed[0].seconds / (tokens * batch) if timed else 0.0)
    base = statistics.median(times["none"])
    return {name: {"ms_per_token": 1000 * statistics.median(t), "overhead": statistics.median(t) / base - 1,
                   "processor_ms_per_token": 1000 * statistics.median(inside[name]),
                   "processor_share": statistics.median(inside[name]) / base}
            for name, t in times.items()}


def green_list_speed(tokenizer, ids: list[int]) -> dict:
    """Detection of one text: a randperm per scored token (the reference) vs the cached masks."""
    config = RedListConfig(vocab_size=len(tokenizer))
    t0 = time.perf_counter()
    reference = sum(cur in set(green_ids(prev, config).tolist()) for prev, cur in itertools.pairwise(ids))
    t1 = time.perf_counter()
    lists = GreenLists(config)
    cached = sum(lists.is_green(prev, cur) for prev, cur in itertools.pairwise(ids))
    t2 = time.perf_counter()
    assert reference == cached
    return {"tokens": len(ids) - 1, "reference_s": t1 - t0, "lmlab_s": t2 - t1, "speedup": (t1 - t0) / (t2 - t1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", default="runs/wm", help="folder with none/no-e/hard/soft.jsonl from lmlab watermark generate")
    ap.add_argument("--prompts", default="bench/watermark_prompts.txt")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (0: no timing, e.g. for a held-out set)")
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="bench/results/watermark.json")
    args = ap.parse_args()

    model, tokenizer = load_model()
    texts = load_set(Path(args.texts))
    result = {"setup": {"model": "smollm2-135m-instruct", "texts_per_scheme": {s: len(v) for s, v in texts.items()},
                        "threads": torch.get_num_threads(), "torch": torch.__version__}}
    result["classification"] = accuracy(texts, tokenizer)
    result["perplexity"] = {s: perplexity(model, tokenizer, texts[s]) for s in SCHEMES}
    all_text = " ".join(r["text"] for r in texts["soft"])
    result["detection_speed"] = green_list_speed(tokenizer, text_ids(tokenizer, all_text))
    prompts = Path(args.prompts).read_text().splitlines()
    result["generation"] = timings(model, tokenizer, prompts, args.rounds, args.tokens, args.batch) if args.rounds else {}
    write_json(args.out, result)

    c = result["classification"]
    print(f"4-way accuracy {c['accuracy']:.1%} ({c['correct']}/{c['n']}); soft TPR at z>=4 {c['soft_tpr_at_z4']:.0%}, "
          f"FPR on unwatermarked {c['fpr_at_z4_on_unwatermarked']:.0%}")
    print("| scheme | perplexity | ms / token | overhead vs none | in the processor |\n|---|---|---|---|---|")
    for s in result["generation"] or SCHEMES:
        g = result["generation"].get(s, {"ms_per_token": 0.0, "overhead": 0.0, "processor_share": 0.0})
        ppl = f"{result['perplexity'][s]:.1f}" if s in result["perplexity"] else "-"
        print(f"| {s} | {ppl} | {g['ms_per_token']:.2f} | {g['overhead']:+.1%} | {g['processor_share']:.1%} |")
    d = result["detection_speed"]
    print(f"detection of {d['tokens']} tokens: reference {d['reference_s']:.2f} s, lmlab {d['lmlab_s']:.2f} s "
          f"({d['speedup']:.1f}x)")


if __name__ == "__main__":
    main()
