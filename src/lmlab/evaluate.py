"""Classification accuracy of a causal LM, from its generations or from label log-likelihoods.

Generation mode is the reference experiment's definition: build the prompt, greedily generate a
few tokens (batched, left-padded, KV cache), and read the label word at the start of the text;
anything else is wrong and counted as unparseable. Scoring mode compares the label words'
log-likelihoods after the prompt in one forward pass, so it can never be unparseable.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

import torch

from lmlab.data import Example, TaskFormat, encode, label_token_ids, left_pad_batch


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    n: int
    correct: int
    unparseable: int
    confusion: list[list[int]]  # rows: true label; columns: predicted label, then "unparseable"
    predictions: list[int | None] = field(repr=False)
    generations: list[str] = field(repr=False)
    seconds: float = 0.0

    @property
    def examples_per_s(self) -> float:
        return self.n / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "examples_per_s": self.examples_per_s}


def parse_label(text: str, label_words) -> int | None:
    """The label whose word starts ``text`` (case-insensitive, whole word), else None."""
    head = text.lstrip().lower()
    for i, word in enumerate(label_words):
        if re.match(re.escape(word.lower()) + r"(?![\w])", head):
            return i
    return None


def summarize(predictions: list[int | None], labels: list[int], n_labels: int, generations=(), seconds=0.0) -> EvalResult:
    """Accuracy, unparseable count and confusion matrix; unparseable counts as wrong."""
    confusion = [[0] * (n_labels + 1) for _ in range(n_labels)]
    for p, y in zip(predictions, labels):
        confusion[y][n_labels if p is None else p] += 1
    correct = sum(p == y for p, y in zip(predictions, labels))
    n = len(labels)
    return EvalResult(correct / n if n else 0.0, n, correct, sum(p is None for p in predictions), confusion,
                      list(predictions), list(generations), seconds)


def _length_order(items) -> list[int]:
    return sorted(range(len(items)), key=lambda i: len(items[i]))


def _bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="ex", dynamic_ncols=True)


@torch.inference_mode()
def evaluate_generation(model, tokenizer, fmt: TaskFormat, examples: list[Example], *, batch_size: int = 16,
                        max_new_tokens: int = 3, max_length: int = 256, progress: bool = True) -> EvalResult:
    """Greedy generation in length-sorted, left-padded batches with the KV cache."""
    model.eval()
    items = encode(tokenizer, fmt, examples, max_length)
    texts: list[str] = [""] * len(items)
    t0 = time.perf_counter()
    order = _length_order(items)
    with _bar(len(items), progress, "generating") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask, _, _ = left_pad_batch([items[i] for i in idx], tokenizer.pad_token_id, with_completion=False)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for i, row in zip(idx, out[:, ids.shape[1]:]):
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
            bar.update(len(idx))
    predictions = [parse_label(t, fmt.label_words) for t in texts]
    return summarize(predictions, [e.label for e in examples], len(fmt.label_words), texts,
                     time.perf_counter() - t0)


@torch.inference_mode()
def evaluate_scoring(model, tokenizer, fmt: TaskFormat, examples: list[Example], *, batch_size: int = 32,
                     max_length: int = 256, progress: bool = True) -> EvalResult:
    """argmax over labels of log p(label tokens | prompt).

    When every label word is one token, one forward of the prompt with the LM head on the last
    position only (``logits_to_keep=1``) scores all labels; otherwise each label's completion is
    scored in its own forward over prompt + completion.
    """
    model.eval()
    labels = label_token_ids(tokenizer, fmt)
    prompts = encode(tokenizer, fmt, examples, max_length)
    single = all(len(c) == 1 for c in labels)
    scores = torch.empty(len(prompts), len(labels))
    t0 = time.perf_counter()
    order = _length_order(prompts)
    with _bar(len(prompts), progress, "scoring") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = [prompts[i] for i in idx]
            if single:
                ids, mask, pos, _ = left_pad_batch(batch, tokenizer.pad_token_id, with_completion=False)
                logp = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             logits_to_keep=1).logits[:, -1].float().log_softmax(-1)  # (B, V)
                scores[idx] = logp[:, [c[0] for c in labels]]
            else:
                for j, completion in enumerate(labels):
                    scores[idx, j] = _completion_logprob(model, batch, completion, tokenizer.pad_token_id)
            bar.update(len(idx))
    predictions = scores.argmax(-1).tolist()
    return summarize(predictions, [e.label for e in examples], len(labels), seconds=time.perf_counter() - t0)


def _completion_logprob(model, batch, completion: list[int], pad_id: int) -> torch.Tensor:
    """Sum of log p(completion tokens | prompt) for each prompt of ``batch``; (B,)."""
    from lmlab.data import Encoded

    k = len(completion)
    ids, mask, pos, labels = left_pad_batch([Encoded(b.prompt_ids, completion, 0) for b in batch], pad_id)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=k + 1).logits[:, :-1]
    logp = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, k)
    return logp.sum(-1)


def format_report(result: EvalResult, label_words) -> str:
    """Accuracy, unparseable count and an aligned confusion matrix (rows = true label)."""
    names = list(label_words) + ["unparseable"]
    width = max(len(w) for w in names) + 2
    lines = [f"accuracy     {result.accuracy:.4f}  ({result.correct}/{result.n})",
             f"unparseable  {result.unparseable}",
             f"speed        {result.examples_per_s:.1f} examples/s",
             "confusion (rows: true, columns: predicted)",
             " " * width + "".join(n.rjust(width) for n in names)]
    for word, row in zip(label_words, result.confusion):
        lines.append(word.ljust(width) + "".join(str(c).rjust(width) for c in row))
    return "\n".join(lines)
