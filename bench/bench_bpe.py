"""BPE: lmlab's trainer and encoder against the Hugging Face `tokenizers` (Rust) ones, same corpus,
same vocabulary size, one run; also checks that both learn the same merges and split the corpus
into the same tokens (their ids differ: the two number the 256 byte tokens differently).

    python bench/bench_bpe.py --corpus ../shared/data/tinyshakespeare/input.txt --out bench/results/bpe.json

`tokenizers` uses every core unless RAYON_NUM_THREADS says otherwise; the table gives its threads.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from lmlab.bpe import to_text, train
from lmlab.io import write_json


def hf_train(text: str, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return hf


def best_of(runs: int, fn):
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="../shared/data/tinyshakespeare/input.txt")
    ap.add_argument("--vocab-sizes", default="512,1000,4000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="bench/results/bpe.json")
    args = ap.parse_args()
    text = Path(args.corpus).read_text(encoding="utf-8")
    rows = []
    for vocab_size in map(int, args.vocab_sizes.split(",")):
        t_ours, ours = best_of(args.runs, lambda v=vocab_size: train(text, v))
        t_hf, hf = best_of(args.runs, lambda v=vocab_size: hf_train(text, v))
        same = [(to_text(a), to_text(b)) for a, b in ours.merges] == [tuple(m) for m in
                                                                     json.loads(hf.to_str())["model"]["merges"]]
        e_ours, ids = best_of(args.runs, lambda t=ours: (t._cache.clear(), t.encode(text))[1])
        e_hf, enc = best_of(args.runs, lambda t=hf: t.encode(text))
        same_tokens = [to_text(ours.tokens[i]) for i in ids] == enc.tokens  # ids differ: HF numbers bytes its way
        rows.append({"vocab_size": vocab_size, "same_merges": same, "same_tokens": same_tokens,
                     "train_s": {"lmlab": t_ours, "tokenizers": t_hf}, "encode_s": {"lmlab": e_ours, "tokenizers": e_hf},
                     "tokens": len(ids)})
    result = {"corpus": args.corpus, "chars": len(text), "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "all"),
              "cpus": os.cpu_count(), "rows": rows}
    write_json(args.out, result)
    print(f"{len(text):,} characters; tokenizers threads: {result['rayon_threads']} of {os.cpu_count()}")
    print("| vocab | same merges / tokens | train lmlab | train tokenizers | ratio | encode lmlab | encode tokenizers | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, e = r["train_s"], r["encode_s"]
        print(f"| {r['vocab_size']} | {r['same_merges']} / {r['same_tokens']} | {t['lmlab']:.2f} s | {t['tokenizers']:.2f} s "
              f"| {t['lmlab'] / t['tokenizers']:.1f}x | {e['lmlab']:.2f} s | {e['tokenizers']:.2f} s "
              f"| {e['lmlab'] / e['tokenizers']:.1f}x |")


if __name__ == "__main__":
    main()
