"""gpu_check's section "newer": the paths lmlab gained after gpu_check was written, each run once in
bf16 on gpu_check's device, with random weights built on the fly (the device run has no network and
carries at most 64 MiB). Each part is timed, its peak CUDA memory measured, and a failure recorded
as {"error": ...} without stopping the others.

  seq2seq_t5, seq2seq_bart
            encoder-decoder LoRA fine-tuning for summarization (lmlab.finetune.run -> train.train ->
            lmlab.seq2seq) of t5-small's and bart-base's architectures (smoke: tiny-t5, tiny-bart) with
            gpu_check's tokenizer and vocabulary, on docstring summaries of a few standard-library
            modules (lmlab.databuild); then `lmlab evaluate RUN` (ROUGE of greedy summaries of the test
            split). rouge_score and nltk come from --newer-assets' rouge.zip where they are not installed
            (the device image); where they still cannot be imported, the summaries alone are recorded.
  schemes   `lmlab watermark generate --schemes none,no-e,hard,soft` with gpu_check's model: every
            text's count of new tokens (generate.sample_tokens) is --max-new-tokens unless the model
            drew its end-of-text token, and the texts come scheme by scheme, prompt by prompt
  key_free  `lmlab watermark classify --key-free --balanced N` on those texts in bf16 and in fp32:
            accuracy against the schemes, bf16/fp32 agreement, largest feature difference
  clip      `--encoder clip:PATH`: a random CLIP text tower (width 512, 12 layers; smoke 32, 2)
            written as an open_clip checkpoint beside CLIP's BPE file (from --newer-assets, else an
            installed package's, else a stand-in merges file), loaded in bf16, inverting a few of
            bench/invert_secrets.txt; the vocabulary is encoded afresh (a private LMLAB_CACHE)

About 60 s on an H200 (t5 ~10 s, bart ~12 s, schemes and key_free ~15 s, clip ~20 s: estimates).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FULL = dict(seq2seq=("t5-small", "bart-base"), s2s_steps=20, s2s_batch=8, s2s_length=256, s2s_eval=32, s2s_tokens=32,
            wm_prompts=8, wm_tokens=64, clip_width=512, clip_layers=12, clip_targets=3, clip_budget=4.0, clip_vocab=None)
SMOKE = dict(seq2seq=("tiny-t5", "tiny-bart"), s2s_steps=2, s2s_batch=4, s2s_length=64, s2s_eval=2, s2s_tokens=6,
             wm_prompts=2, wm_tokens=8, clip_width=32, clip_layers=2, clip_targets=2, clip_budget=1.0, clip_vocab=4096)
DOCSTRING_MODULES = ["json", "os", "pathlib", "argparse", "collections", "functools", "itertools", "string",
                     "textwrap", "shutil", "random", "statistics", "fractions", "decimal", "difflib", "csv",
                     "logging", "inspect", "typing", "dataclasses", "enum", "datetime", "calendar", "heapq",
                     "bisect", "zipfile", "tarfile", "urllib.parse", "email", "http.client"]
TEMPLATE = "summarize: {post}"
SCHEMES = ("none", "no-e", "hard", "soft")
ROUGE_PACKAGES = ("rouge_score", "nltk", "defusedxml")  # what ROUGE imports that the device image lacks


def sec_newer(ctx, error, log) -> dict:
    """Every part in turn (``error`` and ``log`` are gpu_check's); the section's peak is the parts' largest."""
    size = SMOKE if ctx.args.smoke else FULL
    parts = [("seq2seq_" + ("bart" if "bart" in preset else "t5"), lambda c, p=preset: seq2seq(c, size, p))
             for preset in size["seq2seq"]]
    parts += [("schemes", lambda c: schemes(c, size)), ("key_free", lambda c: key_free(c, size)),
              ("clip", lambda c: clip(c, size))]
    out = {"sizes": size}
    for name, fn in parts:
        ctx.reset_memory()
        t0 = time.perf_counter()
        try:
            out[name] = fn(ctx)
        except Exception as exc:
            out[name] = error(exc)
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
        out[name].setdefault("peak_mem_mib", ctx.peak_mib())
        r = out[name]
        log(f"newer {name}: {(r.get('summary') or r.get('error') or r.get('skipped', ''))[:150]} ({r['seconds']} s)")
    peaks = [v["peak_mem_mib"] for v in out.values() if isinstance(v, dict) and v.get("peak_mem_mib") is not None]
    out["peak_mem_mib"] = max(peaks, default=None)
    out["summary"] = "; ".join(f"{k} " + ("FAILED" if "error" in v else "skipped" if "skipped" in v else v["summary"])
                               for k, v in out.items() if isinstance(v, dict) and "seconds" in v)
    return out


def prepare(folder: Path) -> None:
    """What the device run carries for this section (~3 MB): CLIP's BPE file and ``rouge.zip``
    (``ROUGE_PACKAGES`` as installed here, pure Python, without tests and caches)."""
    import importlib.util

    from lmlab.invert.clip import find_bpe

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(find_bpe(), folder)
    with zipfile.ZipFile(folder / "rouge.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for package in ROUGE_PACKAGES:
            root = Path(importlib.util.find_spec(package).origin).parent
            for f in sorted(root.rglob("*")):
                parts = f.relative_to(root).parts
                if f.is_file() and not {"__pycache__", "test", "tests"} & set(parts) and f.suffix != ".pyc":
                    archive.write(f, Path(package, *parts))


def assets(ctx) -> Path | None:
    given = getattr(ctx.args, "newer_assets", None)
    return Path(given) if given else None


def rouge_available(ctx) -> str | None:
    """None when rouge_score imports (unpacking --newer-assets' rouge.zip onto sys.path first if it
    does not), else why not."""
    try:
        from rouge_score import rouge_scorer  # noqa: F401  (and nltk, which it imports)
        return None
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
    archive = assets(ctx) / "rouge.zip" if assets(ctx) else None
    if archive is None or not archive.is_file():
        return why
    target = ctx.work / "rouge-site"
    with zipfile.ZipFile(archive) as z:
        z.extractall(target)
    sys.path.insert(0, str(target))
    for name in [m for m in sys.modules if m.split(".")[0] in ROUGE_PACKAGES]:  # a half-imported earlier try
        del sys.modules[name]
    try:
        from rouge_score import rouge_scorer  # noqa: F401,F811
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc} (also with {archive})"


def cli(argv: list[str]) -> dict:
    """``lmlab ARGV`` in this process; its last stdout line as JSON (one error with stderr's tail if it fails)."""
    from lmlab.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"lmlab {' '.join(argv)} exited {rc}: {stderr.getvalue()[-1500:]}")
    return json.loads(stdout.getvalue().strip().splitlines()[-1])


# --- encoder-decoder fine-tuning and ROUGE -----------------------------------------------------


def docstrings(ctx) -> Path:
    """train / validation / test .jsonl of {post, summary} from a few standard-library modules, once;
    split here by position (lmlab's split by module may leave a split of so few modules empty)."""
    from lmlab.databuild import docstring_rows, write_splits

    folder = ctx.work / "docstrings"
    if not folder.exists():
        rows = sorted(docstring_rows(DOCSTRING_MODULES), key=lambda r: r["source"])
        test, rest = rows[::4], [r for i, r in enumerate(rows) if i % 4]
        write_splits(folder, {"train": [r for i, r in enumerate(rest) if i % 6], "validation": rest[::6], "test": test})
    return folder


def seq2seq_model(ctx, preset: str) -> Path:
    """``preset``'s architecture, random weights, with gpu_check's tokenizer: its vocabulary, and its
    EOS as pad, end and decoder start (as T5's </s> / <pad>); BART's BOS is the tokenizer's."""
    from lmlab.models import build_model, load_tokenizer, preset_config
    from lmlab.progress import transformers_bars_off

    tokenizer = load_tokenizer(ctx.model)
    config = preset_config(preset)
    eos = tokenizer.eos_token_id
    config.vocab_size = len(tokenizer)
    config.pad_token_id = config.eos_token_id = config.decoder_start_token_id = eos
    if config.model_type == "bart":
        config.bos_token_id, config.forced_eos_token_id = tokenizer.bos_token_id, eos
    folder = ctx.work / f"model-{preset}"
    with transformers_bars_off():
        build_model(config, device=str(ctx.device)).save_pretrained(folder)  # random init on the GPU: fast
    tokenizer.save_pretrained(folder)
    return folder


def seq2seq(ctx, size: dict, preset: str) -> dict:
    from lmlab.engine import read_metrics
    from lmlab.finetune import FinetuneConfig, run

    data, model = docstrings(ctx), seq2seq_model(ctx, preset)
    out_dir, steps = ctx.work / f"s2s-{preset}", size["s2s_steps"]
    cfg = FinetuneConfig(model=str(model), task="summarization", dataset=str(data), template=TEMPLATE, method="lora",
                         rank=16, alpha=32.0, max_iters=steps, eval_interval=steps, eval_limit=64,
                         batch_size=size["s2s_batch"], max_length=size["s2s_length"], device=ctx.device_name,
                         dtype="bf16", out_dir=str(out_dir), no_progress=True, json=True)
    ctx.reset_memory()
    result = run(cfg)
    rows = [r for r in read_metrics(out_dir) if r.get("train_loss") is not None]
    out = {"preset": preset, "model_type": json.loads((model / "config.json").read_text())["model_type"],
           "steps": result["steps"], "train_losses": [round(r["train_loss"], 4) for r in rows],
           "val_loss": result["last_val_loss"], "tokens_per_s": rows[-1]["tokens_per_s"],
           "trainable": result["trainable"], "train_seconds": round(result["seconds"], 2),
           "train_peak_mem_mib": ctx.peak_mib()}
    t0 = time.perf_counter()
    if why := rouge_available(ctx):  # the summaries alone, as evaluate would write them
        out["rouge"] = {"skipped": f"rouge_score not importable ({why})"}
        out["summaries"] = summaries(ctx, out_dir, data, size)
    else:
        report = ctx.work / f"rouge-{preset}.json"
        r = cli(["evaluate", str(out_dir), "--limit", str(size["s2s_eval"]), "--max-new-tokens", str(size["s2s_tokens"]),
                 "--batch-size", "16", "--device", ctx.device_name, "--dtype", "bf16", "--output", str(report),
                 "--json", "--no-progress"])
        examples = json.loads(report.read_text())["examples"]
        out["rouge"] = {"n": r["n"], **{t: round(m["f"], 4) for t, m in r["mean"].items()},
                        "empty_predictions": sum(not e["prediction"].strip() for e in examples),
                        "sample": examples[0]["prediction"][:100]}
    out["eval_seconds"] = round(time.perf_counter() - t0, 2)
    rouge1 = out["rouge"].get("rouge1")
    out["summary"] = (f"loss {rows[0]['train_loss']:.2f}->{rows[-1]['train_loss']:.2f} val {out['val_loss']:.2f} "
                      f"{out['tokens_per_s']:.0f} tok/s, " + (f"rouge1 {rouge1:.3f}" if rouge1 is not None else "no ROUGE"))
    return out


def summaries(ctx, run_dir: Path, data: Path, size: dict) -> dict:
    """What ``lmlab evaluate RUN`` generates before it scores: the run in bf16, greedy summaries of the test split."""
    from lmlab.data import subsample
    from lmlab.rouge import generate_summaries
    from lmlab.sft import SftData, held_out_pairs, summarization_items
    from lmlab.train import load_checkpoint

    model, tokenizer, _ = load_checkpoint(run_dir, device=ctx.device, dtype=torch.bfloat16)
    spec = SftData(source=str(data), template=TEMPLATE, max_length=size["s2s_length"])
    rows = subsample(held_out_pairs(spec, "test")[1], size["s2s_eval"])
    items = summarization_items(tokenizer, rows, spec, seq2seq=True)
    predictions = generate_summaries(model, tokenizer, items, max_new_tokens=size["s2s_tokens"], batch_size=16,
                                     progress=False)
    return {"n": len(predictions), "empty": sum(not p.strip() for p in predictions), "sample": predictions[0][:100]}


# --- watermark schemes' token counts, and the key-free classifier ----------------------------------


def schemes(ctx, size: dict) -> dict:
    from lmlab.models import load_tokenizer

    prompts = [p for p in (HERE / "watermark_prompts.txt").read_text().splitlines() if p.strip()][:size["wm_prompts"]]
    (ctx.work / "wm_prompts.txt").write_text("\n".join(prompts) + "\n")
    texts, n = ctx.work / "wm_texts.jsonl", size["wm_tokens"]
    r = cli(["watermark", "generate", "--schemes", ",".join(SCHEMES), "--prompts", str(ctx.work / "wm_prompts.txt"),
             "--output", str(texts), "--model", ctx.model, "--max-new-tokens", str(n), "--seed", "0",
             "--device", ctx.device_name, "--dtype", "bf16", "--json", "--no-progress"])
    records = [json.loads(line) for line in texts.read_text().splitlines()]
    tokenizer = load_tokenizer(ctx.model)  # the texts re-encoded: BPE may merge differently than sampled
    retokenized = [len(tokenizer(rec["text"], add_special_tokens=False)["input_ids"]) for rec in records]
    order = [(s, j) for s in SCHEMES for j in range(len(prompts))]
    bad = [i for i, rec in enumerate(records)
           if not (rec["tokens"] == n and not rec["ended_by_eos"] or rec["ended_by_eos"] and rec["tokens"] < n)]
    out = {"texts": len(records), "expected_texts": len(order), "max_new_tokens": n,
           "in_order": [(rec["scheme"], rec["prompt_index"]) for rec in records] == order,
           "tokens": r["tokens"], "counts_consistent": not bad and r["tokens"] == [rec["tokens"] for rec in records],
           "inconsistent": bad, "ended_early_by_scheme": r["ended_early_by_scheme"],
           "retokenized_differs": sum(a != b for a, b in zip(retokenized, r["tokens"])),
           "texts_with_e": {s: sum("e" in rec["text"].lower() for rec in records if rec["scheme"] == s) for s in SCHEMES},
           "seconds_generate": round(r["seconds"], 2)}
    ctx.wm_texts = texts if out["texts"] == out["expected_texts"] else None
    early = sum(out["ended_early_by_scheme"].values())
    out["summary"] = (f"{out['texts']}/{out['expected_texts']} texts, counts "
                      f"{'exact' if out['counts_consistent'] else 'WRONG'}, ended early {early}, {r['seconds']:.1f} s")
    return out


def key_free(ctx, size: dict) -> dict:
    texts = getattr(ctx, "wm_texts", None)
    if texts is None:
        return {"skipped": "no texts from the schemes part"}
    truth = [{"none": 1, "no-e": 2, "hard": 3, "soft": 4}[json.loads(line)["scheme"]]
             for line in texts.read_text().splitlines()]
    out, guesses, features = {"texts": len(truth)}, {}, {}
    for dtype in ("bf16", "fp32"):
        guess_file = ctx.work / f"keyfree-{dtype}.npy"
        ctx.sync()
        t0 = time.perf_counter()
        r = cli(["watermark", "classify", "--input", str(texts), "--key-free", "--balanced", str(size["wm_prompts"]),
                 "--model", ctx.model, "--device", ctx.device_name, "--dtype", dtype, "--output", str(guess_file),
                 "--json", "--no-progress"])
        guesses[dtype] = r["guesses"]
        features[dtype] = json.loads(Path(r["report"]).read_text())["texts"]
        out[dtype] = {"accuracy": sum(g == t for g, t in zip(r["guesses"], truth)) / len(truth), "counts": r["counts"],
                      "seconds": round(time.perf_counter() - t0, 2)}
    out["agreement"] = sum(a == b for a, b in zip(guesses["bf16"], guesses["fp32"])) / len(truth)
    diffs = {f: [abs(a[f] - b[f]) for a, b in zip(features["bf16"], features["fp32"])
                 if a.get(f) is not None and b.get(f) is not None] for f in ("nll", "top1", "topk", "entropy", "surprise")}
    out["feature_max_abs_diff"] = {f: round(max(d), 5) if d else None for f, d in diffs.items()}
    out["summary"] = (f"acc bf16 {out['bf16']['accuracy']:.2f} fp32 {out['fp32']['accuracy']:.2f} agree "
                      f"{out['agreement']:.2f}, max |dnll| {out['feature_max_abs_diff']['nll']}")
    return out


# --- CLIP text-tower inversion -------------------------------------------------------------------


@contextlib.contextmanager
def private_cache(folder: Path):
    """LMLAB_CACHE set to ``folder`` (the vocabulary's embeddings are encoded afresh and left nowhere)."""
    before = os.environ.get("LMLAB_CACHE")
    os.environ["LMLAB_CACHE"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LMLAB_CACHE", None)
        else:
            os.environ["LMLAB_CACHE"] = before


def clip_bpe(ctx, folder: Path) -> str:
    """CLIP's BPE file into ``folder``: --newer-assets', else an installed package's, else a stand-in of
    the real format (byte-symbol pairs: the loading path is the same, the words are not CLIP's)."""
    from lmlab.errors import LmlabError
    from lmlab.invert.clip import BPE_FILE, bytes_to_unicode, find_bpe

    try:
        source = find_bpe(assets(ctx))
        shutil.copy(source, folder / BPE_FILE)
        return str(source)
    except (LmlabError, OSError):
        symbols = list(bytes_to_unicode().values())
        with gzip.open(folder / BPE_FILE, "wt", encoding="utf-8") as f:
            f.write("\n".join(["#version: 0.2", *[f"{a} {b}" for a in symbols for b in symbols][:48894], ""]))
        return "stand-in"


def clip(ctx, size: dict) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from bench_invert import normalise
    from lmlab.invert import InvertConfig, invert, load_encoder
    from lmlab.invert.clip import BPE_FILE, OPEN_CLIP_FILE, bpe_tokenizer, hf_to_open_clip, write_open_clip_config
    from lmlab.io import save_tensors

    folder = ctx.work / "clip"
    folder.mkdir(exist_ok=True)
    bpe = clip_bpe(ctx, folder)
    tokenizer = bpe_tokenizer(folder / BPE_FILE)
    width = size["clip_width"]
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=size["clip_layers"], num_attention_heads=max(1, width // 64),
                            projection_dim=width, max_position_embeddings=77, hidden_act="gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        tower = CLIPTextModelWithProjection(config)
    save_tensors(folder / OPEN_CLIP_FILE, hf_to_open_clip(tower))
    write_open_clip_config(folder, config)
    del tower
    ctx.reset_memory()
    secrets = [s.strip() for s in (HERE / "invert_secrets.txt").read_text().splitlines() if s.strip()]
    secrets = secrets[:size["clip_targets"]]
    with private_cache(ctx.work / "clip-cache"):
        t0 = time.perf_counter()
        encoder = load_encoder(f"clip:{folder}", device=ctx.device, dtype=torch.bfloat16)
        load_s = time.perf_counter() - t0
        targets = encoder.encode(secrets)
        t0 = time.perf_counter()
        guesses = invert(targets, encoder, InvertConfig(time_budget=size["clip_budget"], vocab_words=size["clip_vocab"]),
                         progress=False)
        wall = time.perf_counter() - t0
    rows = [{"secret": s, "guess": g.text, "cosine": round(g.cosine, 5), "seconds": round(g.seconds, 2),
             "steps": g.steps, "exact": normalise(g.text) == normalise(s)} for s, g in zip(secrets, guesses)]
    out = {"bpe": bpe, "width": width, "layers": size["clip_layers"], "dtype": str(next(encoder.model.parameters()).dtype),
           "encoder_device": str(encoder.device), "load_seconds": round(load_s, 2), "targets": len(rows),
           "time_budget": size["clip_budget"], "vocab_words": size["clip_vocab"], "exact": sum(r["exact"] for r in rows),
           "mean_cosine": round(sum(r["cosine"] for r in rows) / len(rows), 5), "wall_seconds": round(wall, 2),
           "vocabulary_and_setup_seconds": round(wall - sum(g.seconds for g in guesses), 2), "rows": rows}
    out["summary"] = (f"{out['exact']}/{len(rows)} exact, cos {out['mean_cosine']:.4f}, {out['dtype']} on "
                      f"{out['encoder_device']}, vocab+setup {out['vocabulary_and_setup_seconds']} s")
    return out
