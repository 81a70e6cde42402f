"""Supervised fine-tuning data for generation tasks: causal-LM completion and summarization.

Both become the (prompt, completion) ``Encoded`` items the classification trainer already trains
on, with the loss on the completion tokens only, so every method, checkpoint and resume works
unchanged:

* completion: a plain-text corpus cut into blocks of ``block_size`` tokens (nanoGPT's
  tinyshakespeare set-up); the first token of a block is its "prompt", the rest its completion,
  so the loss covers every token that has a predecessor in the block;
* summarization: a template with a ``{post}`` slot as the prompt, by default ``<post>\\nTL;DR:``
  (Stiennon et al. 2020's TL;DR format), and `` <summary><eos>`` as the completion; long posts are
  cut at their end, never the summary nor the template's tail. An encoder-decoder model (T5,
  Raffel et al. 2020, whose convention is ``summarize: {post}``) reads the prompt in its encoder
  and has ``<summary><eos>`` as its decoder's labels (``lmlab.seq2seq``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmlab.data import Encoded
from lmlab.errors import LmlabError

TASKS = ("classification", "completion", "summarization")
TLDR = "\nTL;DR:"
SUMMARY_TEMPLATE = "{post}" + TLDR  # the TL;DR prompt: the post, a newline, "TL;DR:"


@dataclass(frozen=True, kw_only=True)
class SftData:
    """Where the text comes from and how it is cut."""

    source: str  # completion: a .txt file; summarization: a .jsonl file or a folder with train/validation .jsonl
    val_fraction: float = 0.1  # the tail of the corpus / file that validates (split by position, no shuffle)
    block_size: int = 128  # completion: tokens per training block
    max_length: int = 256  # summarization: longest prompt + summary in tokens
    post_column: str = "post"
    summary_column: str = "summary"
    template: str = SUMMARY_TEMPLATE  # summarization: the prompt, with one {post} slot

    def __post_init__(self):
        split_template(self.template)
        if not 0 < self.val_fraction < 1:
            raise LmlabError(f"val fraction must be in (0, 1), got {self.val_fraction}")
        if self.block_size < 2:
            raise LmlabError(f"block size must be at least 2, got {self.block_size}")


def split_by_position(items: list, val_fraction: float) -> tuple[list, list]:
    """The first (1 - val_fraction) for training, the rest for validation, as nanoGPT splits text."""
    cut = int(len(items) * (1 - val_fraction))
    return items[:cut], items[cut:]


# --- completion ------------------------------------------------------------------------------


def read_corpus(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"corpus {path}: no such file (completion needs a plain-text file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LmlabError(f"corpus {path} is not UTF-8 text") from None
    if not text.strip():
        raise LmlabError(f"corpus {path} is empty")
    return text


def blocks(ids: list[int], block_size: int) -> list[Encoded]:
    """Non-overlapping blocks of ``block_size`` tokens; a shorter tail is dropped unless it is all there is."""
    starts = range(0, max(1, len(ids) - block_size + 1), block_size)
    out = [Encoded(ids[s:s + 1], ids[s + 1:s + block_size], 0) for s in starts]
    return [b for b in out if b.completion_ids]


def completion_items(tokenizer, data: SftData) -> tuple[list[Encoded], list[Encoded]]:
    """(train, validation) blocks of the corpus, split by position before cutting."""
    ids = tokenizer(read_corpus(data.source), add_special_tokens=False)["input_ids"]
    train, val = split_by_position(ids, data.val_fraction)
    train_blocks, val_blocks = blocks(train, data.block_size), blocks(val, data.block_size)
    if not train_blocks or not val_blocks:
        raise LmlabError(f"corpus {data.source} has {len(ids)} tokens: too few for a training and a validation "
                         f"block of {data.block_size}")
    return train_blocks, val_blocks


# --- summarization ---------------------------------------------------------------------------


def read_pairs(data: SftData) -> tuple[list[dict], list[dict]]:
    """(train, validation) rows with the post and summary columns, from one .jsonl (split by
    position) or a folder with train.jsonl and validation.jsonl; every row is checked."""
    from lmlab.data import read_jsonl

    source = Path(data.source)
    if source.is_dir():
        splits = tuple(read_jsonl(source / f"{s}.jsonl") if (source / f"{s}.jsonl").exists() else None
                       for s in ("train", "validation"))
        if splits[0] is None or splits[1] is None:
            raise LmlabError(f"{source} needs train.jsonl and validation.jsonl")
        train, val = splits
    elif source.is_file():
        train, val = split_by_position(read_jsonl(source), data.val_fraction)
    else:
        raise LmlabError(f"summarization data {source}: no such file or folder")
    for name, rows in (("train", train), ("validation", val)):
        if not rows:
            raise LmlabError(f"summarization data {source}: the {name} split is empty")
        for n, row in enumerate(rows, 1):
            for column in (data.post_column, data.summary_column):
                if not isinstance(row.get(column), str) or not row[column].strip():
                    raise LmlabError(f"{source} ({name} row {n}): missing or empty {column!r}")
    return train, val


def held_out_pairs(data: SftData, split: str | None = None) -> tuple[str, list[dict]]:
    """(split name, rows) to evaluate summaries on: a data folder's ``test.jsonl`` (the default when
    there is one), else the validation rows finetune held out; ``train`` for the training rows."""
    from lmlab.data import read_jsonl

    test = Path(data.source) / "test.jsonl"
    split = split or ("test" if test.is_file() else "validation")
    if split == "test":
        if not test.is_file():
            raise LmlabError(f"{data.source} has no test.jsonl; use --split validation (the held-out tail)")
        rows = read_jsonl(test)
        for n, row in enumerate(rows, 1):
            for column in (data.post_column, data.summary_column):
                if not isinstance(row.get(column), str) or not row[column].strip():
                    raise LmlabError(f"{test} (row {n}): missing or empty {column!r}")
        return split, rows
    train, val = read_pairs(data)
    return split, train if split == "train" else val


def split_template(template: str) -> tuple[str, str]:
    """(head, tail): the template's text before and after its one ``{post}`` slot."""
    count = template.count("{post}")
    if count != 1:
        hint = " ({text} is classification's slot)" if "{text}" in template else ""
        raise LmlabError(f"the summarization template needs {'one' if count else 'a'} {{post}} slot{hint}, "
                         "e.g. '{post}\\nTL;DR:' or 'summarize: {post}'; got " + repr(template))
    head, tail = template.split("{post}")
    return head, tail


def summary_prompt(post: str, template: str = SUMMARY_TEMPLATE) -> str:
    """The prompt text of one post (by default ``<post>\\nTL;DR:``)."""
    head, tail = split_template(template)
    return head + post.strip() + tail


def special_suffix_length(tokenizer) -> int:
    """How many special ids the tokenizer appends to a text (T5's ``</s>``: 1; GPT-2, Llama: 0)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
    return len(full) - starts[0] - len(plain) if starts else 0


def summarization_items(tokenizer, rows: list[dict], data: SftData, *, seq2seq: bool = False) -> list[Encoded]:
    """Prompt ``template`` around the post (``<post>\\nTL;DR:`` by default), completion
    `` <summary><eos>``; for an encoder-decoder model the summary tokenised with the tokenizer's
    special tokens, as transformers' ``text_target`` (T5 ``<summary></s>``, BART ``<s><summary></s>``).

    The head and the post are tokenised together, with the tokenizer's special tokens (its BOS);
    the post is cut at its end to fit ``max_length``, and the tail (tokenised alone, as before any
    template existed) and any special ids the tokenizer appends (T5's ``</s>``) are kept whole."""
    head, tail = split_template(data.template)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    head_length = len(tokenizer(head, add_special_tokens=False)["input_ids"]) if head else 0
    n_suffix = special_suffix_length(tokenizer)
    items = []
    for row in rows:
        if seq2seq:  # the decoder's target as transformers' text_target: T5 "x </s>", BART "<s> x </s>"
            summary = tokenizer(row[data.summary_column].strip())["input_ids"]
            summary += eos if summary[-1:] != eos else []
        else:
            summary = tokenizer(" " + row[data.summary_column].strip(), add_special_tokens=False)["input_ids"] + eos
        ids = tokenizer(head + row[data.post_column].strip())["input_ids"]  # with BOS if the tokenizer adds one
        body, suffix = ids[:len(ids) - n_suffix], ids[len(ids) - n_suffix:]
        room = data.max_length - len(summary) - len(tail_ids) - len(suffix)
        if room < 4 + head_length:
            raise LmlabError(f"a summary of {len(summary)} tokens leaves no room for its post in "
                             f"--max-length {data.max_length}")
        items.append(Encoded(body[:room] + tail_ids + suffix, summary, 0))
    return items


def task_items(task: str, tokenizer, data: SftData, *, seq2seq: bool = False) -> tuple[list[Encoded], list[Encoded]]:
    """(train, validation) items of a generation task (``seq2seq``: for an encoder-decoder model)."""
    if task == "completion":
        return completion_items(tokenizer, data)
    if task == "summarization":
        train, val = read_pairs(data)
        return (summarization_items(tokenizer, train, data, seq2seq=seq2seq),
                summarization_items(tokenizer, val, data, seq2seq=seq2seq))
    raise LmlabError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")

