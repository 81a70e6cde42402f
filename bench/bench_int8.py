"""Would int8 make evaluation faster without changing its answers? Label scoring with the fp32
model against the same model with its decoder's linear layers dynamically quantised to int8
(torch.ao ``quantize_dynamic``, fbgemm kernels), side by side on the same test reviews.

    python bench/bench_int8.py --n 300 --json bench/results/int8.json
    python bench/bench_int8.py --n 300 --checkpoint runs/rt-r16 --json bench/results/int8_lora.json

A negative result kept on record: int8 is ~4x faster here but changes too many predictions to
stand in for the fp32 model, so ``lmlab evaluate`` does not offer it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from lmlab.io import write_json

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "rotten_tomatoes"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="test examples (fixed-seed sample)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--checkpoint", default=None, help="a LoRA run of lmlab finetune (default: the zero-shot model)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from lmlab.data import TaskFormat, load_splits, subsample
    from lmlab.evaluate import label_logprobs
    from lmlab.models import load_model

    if args.checkpoint:
        from lmlab.peft import lora
        from lmlab.train import load_checkpoint

        model, tokenizer, _ = load_checkpoint(args.checkpoint)
        model = lora.merge_and_unload(model)  # plain Linear layers for quantize_dynamic to replace
    else:
        model, tokenizer = load_model()
    fmt = TaskFormat()
    examples = subsample(load_splits(str(DATA), fmt, ("test",))["test"], args.n)
    labels = torch.tensor([e.label for e in examples])

    def timed(m):
        label_logprobs(m, tokenizer, fmt, examples[:8], batch_size=args.batch_size)  # warm-up
        t0 = time.perf_counter()
        scores = label_logprobs(m, tokenizer, fmt, examples, batch_size=args.batch_size)
        return scores, time.perf_counter() - t0

    fp32, fp32_s = timed(model)
    results = {"n": len(examples), "threads": torch.get_num_threads(), "checkpoint": args.checkpoint,
               "fp32": {"examples_per_s": len(examples) / fp32_s,
                        "accuracy": (fp32.argmax(-1) == labels).float().mean().item()}}
    qconfigs = {"per_tensor": torch.ao.quantization.default_dynamic_qconfig,
                "per_channel": torch.ao.quantization.per_channel_dynamic_qconfig}
    for name, qconfig in qconfigs.items():
        quantised = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice
            quantised.model.layers = torch.ao.quantization.quantize_dynamic(
                quantised.model.layers, {torch.nn.Linear: qconfig}, dtype=torch.qint8)
        int8, int8_s = timed(quantised)
        results[f"int8_{name}"] = {
            "examples_per_s": len(examples) / int8_s, "speedup": fp32_s / int8_s,
            "accuracy": (int8.argmax(-1) == labels).float().mean().item(),
            "same_prediction_as_fp32": (int8.argmax(-1) == fp32.argmax(-1)).float().mean().item(),
            "max_abs_logprob_difference": (int8 - fp32).abs().max().item()}
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
