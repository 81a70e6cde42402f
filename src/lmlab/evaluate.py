"""Classification accuracy of a causal LM, from its generations or from label log-likelihoods.

Generation mode is the reference experiment's definition: build the prompt, greedily generate a
few tokens (batched, left-padded, KV cache), and read the label word at the start of the text;
anything else is wrong and counted as unparseable. Scoring mode compares the label words'
log-likelihoods after the prompt in one forward pass per batch, so it can never be unparseable.
"""

from __future__ import annotations

import copy
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from lmlab.data import (
    Encoded,
    Example,
    TaskFormat,
    encode,
    label_token_ids,
    left_pad_batch,
)
from lmlab.devices import model_device
from lmlab.errors import LmlabError
from lmlab.kvcache import cache_arg, left_padded_cache, output_cache, prefix_cache, shared_prefix_length
from lmlab.models import last_block_on_rows


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    n: int
    correct: int
    unparseable: int
    confusion: list[list[int]]  # rows: true label; columns: predicted label, then "unparseable"
    predictions: list[int | None] = field(repr=False)  # label id per example, None = unparseable
    generations: list[str] = field(repr=False)  # decoded new tokens; empty in scoring mode
    seconds: float = 0.0

    @property
    def examples_per_s(self) -> float:
        return self.n / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "examples_per_s": self.examples_per_s}


def parse_label(text: str, label_words) -> int | None:
    """The label whose word starts ``text`` (leading space and case ignored, whole word), else None.

    Longer label words are tried first, so ("good", "good enough") reads "good enough." as the
    second; the words of a multi-word label may be separated by any whitespace. Case is ignored by
    ``casefold``, which unlike ``lower`` maps each character alone (``lower`` writes a Greek
    capital sigma as final or not by what follows it).
    """
    head = text.lstrip().casefold()
    for i in sorted(range(len(label_words)), key=lambda i: -len(label_words[i])):
        pattern = r"\s+".join(map(re.escape, label_words[i].casefold().split()))
        if re.match(pattern + r"(?!\w)", head):
            return i
    return None


def label_decided(text: str, label_words) -> bool:
    """Whether no continuation of ``text`` can change ``parse_label(text, label_words)``, so that
    generation may stop there with the same prediction.

    Still open: while a label word could grow out of the text (it is empty, "posit", "very "), while
    a label word ends exactly at its end (the next character says whether it is a whole word), and
    while it ends in half a UTF-8 character (U+FFFD, which the next token may make a letter).
    """
    if text.endswith("\ufffd"):
        return False
    head = text.lstrip().casefold()
    for label in label_words:
        words = label.casefold().split()
        match = re.match(r"\s+".join(map(re.escape, words)), head)
        if match is not None and match.end() == len(head):
            return False
        if match is None and _could_become(head, words):
            return False
    return True


def _could_become(head: str, words: list[str]) -> bool:
    """Whether ``head`` is a proper prefix of a text that starts with ``words`` separated by whitespace."""
    rest = head
    for k, word in enumerate(words):
        if len(rest) <= len(word):
            return word.startswith(rest)
        if not rest.startswith(word) or k == len(words) - 1:
            return False
        after = rest[len(word):].lstrip()
        if len(after) == len(rest) - len(word):  # no whitespace after a word that is not the last
            return False
        rest = after
    return False


def summarize(predictions: list[int | None], labels: list[int], n_labels: int, generations=(),
              seconds: float = 0.0) -> EvalResult:
    """Accuracy, unparseable count and confusion matrix; unparseable counts as wrong."""
    confusion = [[0] * (n_labels + 1) for _ in range(n_labels)]
    for p, y in zip(predictions, labels, strict=True):
        confusion[y][n_labels if p is None else p] += 1
    correct = sum(p == y for p, y in zip(predictions, labels))
    n = len(labels)
    return EvalResult(correct / n if n else 0.0, n, correct, sum(p is None for p in predictions), confusion,
                      list(predictions), list(generations), seconds)


# --- running the model -----------------------------------------------------------------------


@contextmanager
def _inference(model):
    """Eval mode (dropout off, LoRA merged), then inference mode; the caller's mode is restored.

    ``eval()`` runs before ``inference_mode``: a LoRA merge inside it would leave the merged
    weights as inference tensors, which can never take part in autograd again.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _batches(items: list[Encoded], batch_size: int, desc: str, progress: bool):
    """Index lists of similar-length items, longest first (least padding; the slowest batch
    comes first, so the progress bar's estimate is honest); each is counted on a tqdm bar."""
    from lmlab.progress import bar

    order = sorted(range(len(items)), key=lambda i: -len(items[i]))
    with bar(total=len(items), enabled=progress, desc=desc, unit="ex") as shown:
        for start in range(0, len(order), batch_size):
            yield order[start:start + batch_size]
            shown.update(min(batch_size, len(order) - start))


def _seq2seq(model) -> bool:
    """Whether ``model`` is an encoder-decoder (T5, BART): its prompts go to the encoder."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _pad_id(tokenizer) -> int:
    """Any id works under a zero attention mask; GPT-2-style tokenizers have no pad token."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _encode(tokenizer, fmt: TaskFormat, examples: list[Example], max_length: int, chat: bool = False) -> list[Encoded]:
    """The items finetune trains on: the raw template, or with ``chat`` the prompt as a user turn of
    the chat template and the label word as the reply (``lmlab.chat.classification_items``)."""
    if not examples:
        raise LmlabError("no examples to evaluate")
    if chat:
        from lmlab.chat import classification_items

        return classification_items(tokenizer, fmt, examples, max_length)
    return encode(tokenizer, fmt, examples, max_length)


def evaluate_generation(model, tokenizer, fmt: TaskFormat, examples: list[Example], *, batch_size: int = 16,
                        max_new_tokens: int = 3, max_length: int = 256, progress: bool = True,
                        shared_prefix: bool = True, stop_when_decided: bool = True, temperature: float = 0.0,
                        top_k: int = 0, seed: int = 0, chat: bool = False) -> EvalResult:
    """Generation in length-sorted, left-padded batches with the KV cache; the new tokens are
    decoded and parsed with ``parse_label``. Greedy by default; ``temperature`` > 0 samples (with
    ``top_k`` if > 0; the LoRA homework decodes with temperature 0.6, top-k 200), seeded by
    ``seed`` on the model's device without touching the caller's random state.

    Left padding puts every prompt's last token in the last column, where generation continues;
    ``generate`` derives position ids from the attention mask, so a padded row generates what it
    would alone. With ``shared_prefix``, the token prefix every prompt shares runs once and each
    batch starts from copies of its KV cache (``lmlab.kvcache``). With ``stop_when_decided``, a
    batch stops as soon as every row's label is ``label_decided`` (each generation is then a prefix
    of the full one, parsed the same). ``chat``: prompts in the chat template, as ``_encode`` says.
    """
    items = _encode(tokenizer, fmt, examples, max_length, chat)
    if _seq2seq(model):  # the encoder reads the prompt; the decoder writes the label (lmlab.seq2seq)
        from lmlab.generate import SamplingConfig, sample

        t0 = time.perf_counter()
        config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                                batch_size=batch_size)
        texts = [t[0] for t in sample(model, tokenizer, [list(i.prompt_ids) for i in items], config,
                                      progress=progress)]
        return summarize([parse_label(t, fmt.label_words) for t in texts], [e.label for e in examples],
                         len(fmt.label_words), texts, time.perf_counter() - t0)
    pad = _pad_id(tokenizer)
    eos = model.generation_config.eos_token_id
    shared = shared_prefix_length([it.prompt_ids for it in items]) if shared_prefix else 0
    texts = [""] * len(items)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": 1.0} \
        if temperature > 0 else {"do_sample": False}
    device = model_device(model)
    forked = [device] if device.type == "cuda" else []
    t0 = time.perf_counter()
    with _inference(model), torch.random.fork_rng(devices=forked, device_type=device.type if forked else "cuda"):
        torch.manual_seed(seed)
        prefix = prefix_cache(model, items[0].prompt_ids[:shared]) if shared else None
        for idx in _batches(items, batch_size, "generating", progress):
            ids, mask, _, _ = left_pad_batch([items[i] for i in idx], pad, with_completion=False,
                                             device=model_device(model))  # (B, T)
            cache = left_padded_cache(prefix, (mask == 0).sum(1).tolist()) if prefix is not None else None
            stop = _stop_when_decided(tokenizer, fmt.label_words, ids.shape[1]) if stop_when_decided else None
            with last_block_on_rows(model):  # generate's forwards keep one position's logits (logits_to_keep=1)
                out = model.generate(input_ids=ids, attention_mask=mask, **cache_arg(model, cache),
                                     stopping_criteria=stop,
                                     max_new_tokens=max_new_tokens, **sampling, num_beams=1, pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id if eos is None else eos)
            for i, text in zip(idx, tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)):
                texts[i] = text
    predictions = [parse_label(t, fmt.label_words) for t in texts]
    return summarize(predictions, [e.label for e in examples], len(fmt.label_words), texts,
                     time.perf_counter() - t0)


def _stop_when_decided(tokenizer, label_words, prompt_width: int):
    """A ``generate`` stopping criterion: a row is done once its new text's label is decided.

    None for a tokenizer that cleans up spaces when decoding: a later token can then rewrite text
    already decoded (" positive '" then " ." reads " positive '."), so no point is safe to stop at.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    if getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None

    class LabelDecided(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
            texts = tokenizer.batch_decode(input_ids[:, prompt_width:], skip_special_tokens=True)
            return torch.tensor([label_decided(t, label_words) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([LabelDecided()])


def evaluate_scoring(model, tokenizer, fmt: TaskFormat, examples: list[Example], *, batch_size: int = 16,
                     max_length: int = 256, progress: bool = True, chat: bool = False) -> EvalResult:
    """Predict the label with the highest ``label_logprobs``; never unparseable."""
    t0 = time.perf_counter()
    scores = label_logprobs(model, tokenizer, fmt, examples, batch_size=batch_size, max_length=max_length,
                            progress=progress, chat=chat)
    return summarize(scores.argmax(-1).tolist(), [e.label for e in examples], len(fmt.label_words),
                     seconds=time.perf_counter() - t0)


def label_logprobs(model, tokenizer, fmt: TaskFormat, examples: list[Example], *, batch_size: int = 16,
                   max_length: int = 256, progress: bool = False, shared_prefix: bool = True,
                   chat: bool = False) -> torch.Tensor:
    """log p(label tokens | prompt) for every example and label, summed over a label's tokens; (N, L).

    Each prompt runs once and the LM head only where a label token is predicted: on the prompt's
    last position for every label's first token (SmolLM2's 49k-wide head costs 57 MFLOP a position
    against 213 for the body, so 1 position instead of all ~46 saves ~20%), and for a label of
    k > 1 tokens on its first k - 1 tokens, run after a copy of the prompt's KV cache: a label
    costs k - 1 positions, not the prompt again. With ``shared_prefix``, the token prefix every
    prompt shares (the template's instruction) runs once and its KV cache serves every batch.
    """
    items = _encode(tokenizer, fmt, examples, max_length, chat)
    if chat:
        from lmlab.chat import label_ids

        completions = label_ids(tokenizer, fmt)  # the reply's first tokens: no leading space
    else:
        completions = label_token_ids(tokenizer, fmt)
    pad = _pad_id(tokenizer)
    if _seq2seq(model):
        from lmlab import seq2seq

        with _inference(model):
            return seq2seq.label_logprobs(model, items, completions, pad, batch_size)
    scores = torch.empty(len(items), len(completions), device=model_device(model))  # (N, L)
    shared = shared_prefix_length([it.prompt_ids for it in items]) if shared_prefix else 0
    with _inference(model):
        prefix = prefix_cache(model, items[0].prompt_ids[:shared]) if shared else None
        for idx in _batches(items, batch_size, "scoring", progress):
            logits, cache, mask, next_pos = _prompt_forward(model, [items[i] for i in idx], pad, shared, prefix)
            first = logits.float().log_softmax(-1)  # (B, V)
            for j, completion in enumerate(completions):
                scores[idx, j] = first[:, completion[0]] + _continuation_logprob(model, completion, cache, mask, next_pos)
    return scores.cpu()


def _prompt_forward(model, batch: list[Encoded], pad_id: int, shared: int, prefix):
    """Run the left-padded prompts of ``batch`` (after the prefix cache, if any, which stands for
    their first ``shared`` columns): next-token logits (B, V), the KV cache, its attention mask
    (B, T) and each row's next position (B,)."""
    ids, mask, pos, _ = left_pad_batch(batch, pad_id, with_completion=False, device=model_device(model))
    cache = left_padded_cache(prefix, (mask == 0).sum(1).tolist()) if prefix is not None else None
    start = shared if prefix is not None else 0
    with last_block_on_rows(model):
        out = model(input_ids=ids[:, start:], attention_mask=mask, position_ids=pos[:, start:],
                    **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], output_cache(out), mask, pos[:, -1] + 1


def _continuation_logprob(model, completion: list[int], cache, mask: torch.Tensor, next_pos: torch.Tensor):
    """Sum of log p(completion[t] | prompt, completion[:t]) over t >= 1 for each row, run on a
    copy of the prompts' ``cache`` (the next label continues the prompt, not this one); (B,)."""
    rows, k, device = mask.shape[0], len(completion) - 1, mask.device
    if k == 0:
        return torch.zeros(rows, device=device)
    logits = model(input_ids=torch.tensor([completion[:-1]], device=device).expand(rows, -1),
                   attention_mask=torch.cat([mask, mask.new_ones(rows, k)], 1),
                   position_ids=next_pos[:, None] + torch.arange(k, device=device),
                   **cache_arg(model, copy.deepcopy(cache)), use_cache=True).logits  # (B, k, V)
    logp = logits.float().log_softmax(-1)
    targets = torch.tensor([completion[1:]], device=device).expand(rows, -1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)


def format_accuracy(correct: int, n: int) -> str:
    """Accuracy as every command prints it: a percentage with one decimal and the count."""
    return f"{100 * correct / n:.1f} % ({correct}/{n})" if n else "n/a (0/0)"


def format_report(result: EvalResult, label_words) -> str:
    """Accuracy, unparseable count, speed and an aligned confusion matrix (rows = true label)."""
    names = [*label_words, "unparseable"]
    width = max(map(len, names)) + 2
    lines = [f"accuracy     {format_accuracy(result.correct, result.n)}",
             f"unparseable  {result.unparseable}",
             f"speed        {result.examples_per_s:.1f} examples/s",
             "confusion (rows: true, columns: predicted)",
             " " * width + "".join(name.rjust(width) for name in names)]
    for word, row in zip(label_words, result.confusion):
        lines.append(word.ljust(width) + "".join(str(c).rjust(width) for c in row))
    return "\n".join(lines)


def run_record(checkpoint) -> dict:
    """The ``run.json`` of a checkpoint (``RUN``, ``RUN/best`` or ``RUN/last``); {} if it has none."""
    from pathlib import Path

    from lmlab.io import read_json

    for run_file in (Path(checkpoint) / "run.json", Path(checkpoint).parent / "run.json"):
        if run_file.is_file():
            return read_json(run_file)
    return {}


def evaluate_checkpoint(checkpoint, *, split: str = "test", limit: int | None = None, scoring: bool = False,
                        batch_size: int = 16, device="cpu", dtype=None, progress: bool = False) -> EvalResult:
    """Classification accuracy of a ``finetune`` checkpoint on its run's data set, template and
    label words (from ``run.json``), on ``device`` in ``dtype``; what a sweep reports per run."""
    from lmlab.data import DEFAULT_DATASET, load_splits, subsample
    from lmlab.finetune import task_format
    from lmlab.train import load_checkpoint

    bits = run_record(checkpoint).get("bits")  # QLoRA: its 4-bit base
    model, tokenizer, run_info = load_checkpoint(checkpoint, device=device, dtype=dtype, bits=bits)
    fmt = task_format(_Saved(), run_info)
    examples = subsample(load_splits(run_info.get("dataset") or DEFAULT_DATASET, fmt, (split,))[split], limit)
    max_length = run_info.get("max_length", 256)
    chat = run_info.get("chat_template") == "on"  # as the run trained
    if scoring:
        return evaluate_scoring(model, tokenizer, fmt, examples, batch_size=batch_size, max_length=max_length,
                                progress=progress, chat=chat)
    return evaluate_generation(model, tokenizer, fmt, examples, batch_size=batch_size, max_length=max_length,
                               progress=progress, chat=chat)


class _Saved:
    """No overriding options: every setting comes from the run."""

    label_words = template = text_column = label_column = None


def perplexity(model, tokenizer, items: list[Encoded], batch_size: int = 8, progress: bool = False) -> dict:
    """Mean token cross-entropy of the completions and its exponential (the perplexity)."""
    import math

    from lmlab.train import validation_loss

    loss = validation_loss(model, items, _pad_id(tokenizer), batch_size, progress=progress)
    return {"n": len(items), "loss": loss, "perplexity": math.exp(loss),
            "tokens": sum(len(i.completion_ids) if i.loss_mask is None else sum(i.loss_mask) for i in items)}
