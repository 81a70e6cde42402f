"""Training speed of ``lmlab finetune`` against peft + transformers Trainer, side by side, one run.

Same model (SmolLM2-135M-Instruct), data (rotten_tomatoes train, prompt + label word, loss on the
label tokens only in both), LoRA set-up (r=16, alpha=32, dropout 0.05 on q,k,v), batch size,
steps, seed and learning rate. peft gets the usual Trainer recipe: a dynamically padding collator
(DataCollatorForSeq2Seq), random batches. Speed is real (non-padding) tokens per second over the
steps after the warm-up, plus the share of the machine's fp32 matmul rate that the FLOPs a LoRA
step must do reach (forward 2N + backward-to-activations 2N per token, N = non-embedding params).

The machine's speed drifts from minute to minute (one run each gave 1.21x, 2.20x and 1.63x in a
row), so the two sides take turns for ``--rounds`` rounds (peft, lmlab, peft, lmlab, ...) and the
median of the rounds' ratios is the figure; every round is kept in the JSON.

    python bench/bench_finetune.py --steps 14 --warmup 2 --rounds 9 --json bench/results/finetune.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmlab.io import write_json

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "rotten_tomatoes"


def matmul_gflops(n: int = 1024, reps: int = 30) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def examples(n: int):
    from lmlab.data import TaskFormat, load_splits

    fmt = TaskFormat()
    return fmt, load_splits(str(DATA), fmt, ("train",))["train"][:n]


def run_lmlab(args) -> dict:
    from lmlab import peft
    from lmlab.data import encode
    from lmlab.models import load_model
    from lmlab.train import TrainConfig, read_metrics, train

    fmt, rows = examples(args.steps * args.batch_size * 4)
    model, tokenizer = load_model()
    torch.manual_seed(args.seed)
    config = peft.make_config("lora", r=16, alpha=32, dropout=0.05)
    peft.apply(model, config)
    items = encode(tokenizer, fmt, rows)
    out = tempfile.mkdtemp(prefix="bench-lmlab-")
    cfg = TrainConfig(out_dir=out, lr=args.lr, batch_size=args.batch_size, max_iters=args.steps,
                      eval_interval=10**6, log_interval=1, seed=args.seed, progress=False)
    train(model, tokenizer, config, items, items[:8], cfg)
    rows = [r for r in read_metrics(out) if r["step"] > args.warmup]
    tokens = sum(r["tokens"] for r in rows)  # per-step rows: a step's tokens and its rate
    tokens_per_s = tokens / sum(r["tokens"] / r["tokens_per_s"] for r in rows)  # all tokens / all seconds
    return {"tokens_per_s": tokens_per_s, "steps_timed": len(rows)}


def run_peft(args) -> dict:
    import peft as peft_lib
    from transformers import (
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from lmlab.models import load_model

    fmt, rows = examples(args.steps * args.batch_size * 4)
    model, tokenizer = load_model()
    torch.manual_seed(args.seed)
    lora = peft_lib.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                               target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft_lib.get_peft_model(model, lora)
    features = []
    for e in rows:  # prompt and completion tokenised separately, loss on the completion only
        p = tokenizer(fmt.prompt(e.text))["input_ids"]
        c = tokenizer(fmt.completion(e.label), add_special_tokens=False)["input_ids"]
        features.append({"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)),
                         "labels": [-100] * len(p) + c})
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    stamps: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        tokens = 0

        def on_step_end(self, *_, **__):
            stamps.append((time.perf_counter(), Clock.tokens))

    def counting_collator(batch):
        out = collator(batch)
        Clock.tokens += int(out["attention_mask"].sum())
        return out

    targs = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-peft-"), per_device_train_batch_size=args.batch_size,
                              max_steps=args.steps, learning_rate=args.lr, logging_steps=10**6, save_strategy="no",
                              report_to=[], seed=args.seed, use_cpu=True, dataloader_num_workers=0,
                              disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=targs, train_dataset=features, data_collator=counting_collator,
                      callbacks=[Clock()])
    trainer.train()
    (t0, n0), (t1, n1) = stamps[args.warmup - 1], stamps[-1]
    # the collator runs one batch ahead of the step that consumes it; counts over whole steps agree
    return {"tokens_per_s": (n1 - n0) / (t1 - t0), "steps_timed": len(stamps) - args.warmup}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2.5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="turns each side takes, alternating (default 3)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from lmlab.models import load_model, model_spec

    model, _ = load_model()
    spec = model_spec(model.config)
    n_body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    del model
    results = {"model": "smollm2-135m-instruct", "batch_size": args.batch_size, "steps": args.steps,
               "warmup": args.warmup, "lora": "r=16 alpha=32 q,k,v", "threads": torch.get_num_threads(), "rounds": []}
    for turn in range(args.rounds):
        row = {}
        for name, fn in (("peft_trainer", run_peft), ("lmlab", run_lmlab)):
            gflops = matmul_gflops()  # the machine's speed just before this side's turn
            r = fn(args)
            r["matmul_gflops"] = gflops
            r["flop_share"] = 4 * n_body * r["tokens_per_s"] / (gflops * 1e9)
            row[name] = r
            print(f"round {turn + 1}: {name:13s} {r['tokens_per_s']:8.1f} tokens/s  ({100 * r['flop_share']:.0f} % "
                  f"of the matmul peak, {gflops:.0f} GFLOP/s)", file=sys.stderr, flush=True)
        row["ratio"] = row["lmlab"]["tokens_per_s"] / row["peft_trainer"]["tokens_per_s"]
        results["rounds"].append(row)
    for name in ("peft_trainer", "lmlab"):
        results[name] = {k: statistics.median(r[name][k] for r in results["rounds"])
                         for k in ("tokens_per_s", "flop_share", "matmul_gflops")}
    ratios = [r["ratio"] for r in results["rounds"]]
    results["speedup"] = statistics.median(ratios)
    results["speedup_range"] = [min(ratios), max(ratios)]
    print(json.dumps(results, indent=2))
    print(f"lmlab / peft+Trainer = {results['speedup']:.2f}x, median of {len(ratios)} rounds "
          f"({', '.join(f'{x:.2f}' for x in ratios)}; layers {spec.layers}, d {spec.hidden})", file=sys.stderr)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
