"""Inverting a full-width CLIP text tower: ViT-H/14's (the 1024-dimensional tower of Stable Diffusion 2's
text encoder and of the open_clip laion2B models), with RANDOM weights and CLIP's real tokenizer.

    python bench/bench_invert_clip.py [--limit 5] [--time-budget 300] [--vocab-words 4096] [--threads 1]

No real CLIP weights can be had offline (no PyPI package ships them), so the tower is built at the
real width (hidden 1024, 24 layers, 16 heads, MLP 4096, projection 1024, 49,408 tokens, 77 positions,
GELU) with seeded random weights, written as an open_clip checkpoint (safetensors) and loaded back
through ``--encoder clip:PATH``, as a real one would be. The secrets are embedded with that tower and
only their embeddings reach the search (self-consistent: it measures the search and its speed at
full width, not how recoverable a trained CLIP's embeddings are; a random tower's space is not
semantic). Secrets whose words are not all among the searched vocabulary are skipped (counted).
Writes bench/results/invert_clip.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
VIT_H14_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, projection_dim=1024, max_position_embeddings=77, hidden_act="gelu")


def build_checkpoint(folder: Path, seed: int, tower: dict) -> float:
    """A random ViT-H/14 text tower as an open_clip checkpoint in ``folder``; seconds taken."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from lmlab.invert.clip import OPEN_CLIP_FILE, bpe_tokenizer, find_bpe, hf_to_open_clip, write_open_clip_config
    from lmlab.io import save_tensors

    t0 = time.perf_counter()
    tok = bpe_tokenizer(find_bpe())
    config = CLIPTextConfig(**tower, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config)
    save_tensors(folder / OPEN_CLIP_FILE, hf_to_open_clip(model))
    write_open_clip_config(folder, config)
    return time.perf_counter() - t0


def main() -> None:
    from lmlab.invert import InvertConfig, candidate_words, invert, load_encoder, vocabulary
    from lmlab.io import write_json
    from lmlab.models import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--secrets", default=str(HERE / "invert_secrets.txt"))
    ap.add_argument("--limit", type=int, default=5, help="first N usable secrets")
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds per target")
    ap.add_argument("--vocab-words", type=int, default=4096, help="most frequent whole words searched (0: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--seed", type=int, default=0, help="weights and search")
    ap.add_argument("--width", type=int, default=1024, help="smaller towers for a quick try (ViT-H/14: 1024)")
    ap.add_argument("--layers", type=int, default=24, help="(ViT-H/14: 24)")
    ap.add_argument("--checkpoint", default=None, help="folder of the random tower (default: in lmlab's cache)")
    ap.add_argument("--out", default=str(HERE / "results" / "invert_clip.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tower = {**VIT_H14_TEXT, "hidden_size": args.width, "intermediate_size": 4 * args.width,
             "num_attention_heads": max(1, args.width // 64), "projection_dim": args.width,
             "num_hidden_layers": args.layers}
    name = f"clip-text-random-w{args.width}-l{args.layers}-s{args.seed}"
    folder = Path(args.checkpoint or cache_dir() / "bench" / name)
    built = None if (folder / "open_clip_model.safetensors").exists() else build_checkpoint(folder, args.seed, tower)

    t0 = time.perf_counter()
    encoder = load_encoder(f"clip:{folder}")
    load_seconds = time.perf_counter() - t0
    limit = args.vocab_words or None
    words = set(candidate_words(encoder.tokenizer, **({"limit": limit} if limit else {})))
    lines = [s.strip() for s in Path(args.secrets).read_text().splitlines() if s.strip()]
    usable = [s for s in lines if all(w in words for w in s.lower().split())]
    secrets = usable[:args.limit]
    if not secrets:
        raise SystemExit(f"no secret in {args.secrets} has all its words among the {len(words)} searched")
    t0 = time.perf_counter()
    vocabulary(encoder, progress=True, limit=limit)  # encoded once (cached): timed apart from the search
    vocab_seconds = time.perf_counter() - t0
    targets = encoder.encode(secrets)
    config = InvertConfig(time_budget=args.time_budget, seed=args.seed, vocab_words=limit)
    guesses = invert(targets, encoder, config)
    rows = [{"secret": s, "guess": g.text, "cosine": round(g.cosine, 5), "seconds": round(g.seconds, 1),
             "steps": g.steps, "exact": g.text == s} for s, g in zip(secrets, guesses)]
    steps = sum(g.steps for g in guesses)
    summary = {
        "targets": len(rows), "exact": sum(r["exact"] for r in rows),
        "mean_cosine": round(sum(r["cosine"] for r in rows) / len(rows), 5),
        "min_cosine": min(r["cosine"] for r in rows),
        "seconds_per_target": round(sum(g.seconds for g in guesses) / len(rows), 1),
        "seconds_per_step": round(sum(g.seconds for g in guesses) / max(steps, 1), 1),
        "steps_per_target": round(steps / len(rows), 1),
        "vocabulary_words": len(words), "vocabulary_seconds": round(vocab_seconds, 1),
        "build_and_write_seconds": None if built is None else round(built, 1),
        "load_seconds": round(load_seconds, 1),
        "secrets_skipped_out_of_vocabulary": len(lines) - len(usable),
    }
    machine = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "load_average": os.getloadavg()}
    write_json(args.out, {"encoder": f"random CLIP text tower {name} (open_clip checkpoint), CLIP's real tokenizer",
                          "tower": tower, "config": config.__dict__, "machine": machine,
                          "summary": summary, "rows": rows})
    print("| secret | guess | cosine | s | steps | exact |\n|---|---|---:|---:|---:|:-:|")
    for r in rows:
        print(f"| {r['secret']} | {r['guess']} | {r['cosine']:.4f} | {r['seconds']:.0f} | {r['steps']} | "
              f"{'yes' if r['exact'] else 'no'} |")
    s = summary
    print(f"\n**{s['exact']}/{s['targets']} exact; cosine mean {s['mean_cosine']:.4f}, min {s['min_cosine']:.4f}; "
          f"{s['seconds_per_target']} s per target, {s['seconds_per_step']} s per step; vocabulary "
          f"{s['vocabulary_words']} words in {s['vocabulary_seconds']} s; {torch.get_num_threads()} thread(s)** "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
