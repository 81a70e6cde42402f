"""Prompting strategies on math word problems (GSM8K, Cobbe et al. 2021).

* ``zero-shot``: the question alone, "Question: ...\\nAnswer:";
* ``instruction``: the same after an explicit instruction to answer with a number;
* ``few-shot``: k solved exemplars from the training split, answers as bare numbers
  (in-context learning, Brown et al. 2020);
* ``cot``: k exemplars with worked rationales, GSM8K's own solutions ending "The answer is n."
  (chain-of-thought prompting, Wei et al. 2022);
* ``zero-shot-cot``: "Let's think step by step." opens the answer; a second generation continues
  the reasoning with "Therefore, the answer (arabic numerals) is" (Kojima et al. 2022, two-stage).

The k exemplars are one fixed draw per seed, shared by every problem and by few-shot and cot (as
Wei et al.'s fixed set of 8), with the asked question itself never among them. With a chat
template each exemplar is a user turn and an assistant turn (lm-eval's "few-shot as multi-turn").

Generation is greedy and batched (``lmlab.generate.sample``). It stops early at a new "Question:"
or "Q:" line with a stopping criterion (transformers' ``stop_strings``), and the text is cut there
afterwards too (post-hoc truncation), so a few-shot model cannot pad its answer with invented
problems. The answer is read by ``extract_answer``; unparseable counts as wrong.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation

from lmlab.errors import LmlabError

STRATEGIES = ("zero-shot", "instruction", "few-shot", "cot", "zero-shot-cot")
INSTRUCTION = ("Solve the following math word problem. Reply with the final answer only, as a number, "
               "with no explanation.")
COT_TRIGGER = "Let's think step by step."  # Kojima et al. 2022, Table 4's best template
EXTRACTION = "Therefore, the answer (arabic numerals) is"  # Kojima et al.'s answer trigger for arithmetic
STOP = ("\nQuestion:", "\nQ:")
EXTRACTION_TOKENS = 16  # stage two needs a number only: "$1,234.50" is ~8 tokens


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the worked rationale, calculator annotations <<...>> removed, without "#### n"
    answer: str  # the normalised final number


@dataclass(frozen=True, kw_only=True)
class PromptConfig:
    """How problems are put to the model.

    strategy: one of ``STRATEGIES``. shots: exemplars for few-shot and cot (Wei et al. use 8 on
    GSM8K). seed: which exemplars are drawn. chat: render with the tokenizer's chat template.
    """

    strategy: str
    shots: int = 8
    seed: int = 0
    chat: bool = False

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise LmlabError(f"unknown strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.shots < 0:
            raise LmlabError(f"shots must be >= 0, got {self.shots}")

    @property
    def uses_exemplars(self) -> bool:
        return self.strategy in ("few-shot", "cot")


# --- answers ---------------------------------------------------------------------------------

# A sign only when attached and not after a word or number ("10-5" and "10 - 5" read 10 and 5);
# commas only as thousands separators ("3,4" is two numbers, "1,2345" reads 1 then 2345); a trailing "." is not a decimal point.
_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
                     r"|(?<![\w.])[-\u2212]?\$?\.\d+")
_MARKERS = (re.compile(r"####"), re.compile(r"\\boxed\{"), re.compile(r"answer is", re.IGNORECASE))


def normalize_number(text: str) -> str | None:
    """The first number in ``text``, canonical: '$1,234.50' -> '1234.5', '12.0' -> '12'; else None."""
    match = _NUMBER.search(text)
    if not match:
        return None
    raw = match.group(0).replace(",", "").replace("$", "").replace("\u2212", "-")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():  # as digits, not str(int(...)): over 4300 digits that raises
        return "0" if value.is_zero() else format(value.to_integral_value(), "f")
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final answer of a generation: the number after the last "####" (GSM8K's own format),
    else after the last "\\boxed{", else on the line after the last "answer is", else the last
    number anywhere; None (unparseable) when there is no number at all."""
    for marker in _MARKERS:
        hits = list(marker.finditer(text))
        if hits:
            found = normalize_number(text[hits[-1].end():].split("\n", 1)[0])
            if found is not None:
                return found
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def cut_at_stop(text: str) -> str:
    """``text`` up to the first stop string (a new "Question:" / "Q:" line)."""
    return text[:min([i for i in (text.find(s) for s in STOP) if i >= 0], default=len(text))]


# --- data ------------------------------------------------------------------------------------


def parse_problem(row: dict, where: str) -> Problem:
    """One GSM8K row: ``question`` and ``answer`` = rationale + "#### <number>"."""
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str) or "####" not in answer:
        missing = [k for k, v in (("question", question), ("answer", answer)) if not isinstance(v, str)]
        what = f"no {' or '.join(repr(k) for k in missing)} field" if missing else "no '####' in the answer"
        raise LmlabError(f"{where}: {what}; expected 'question' and an 'answer' ending in '#### <number>'")
    rationale, _, final = answer.rpartition("####")
    number = normalize_number(final)
    if number is None:
        raise LmlabError(f"{where}: no number after '####'")
    return Problem(question.strip(), re.sub(r"<<[^>]*>>", "", rationale).strip(), number)


def load_problems(dataset: str, split: str) -> list[Problem]:
    """GSM8K-format problems from a local folder (``{split}.jsonl``) or the hub (``gsm8k``, config
    ``main``), with the errors of ``lmlab.data``."""
    from pathlib import Path

    from lmlab.data import read_hub, read_jsonl

    folder = Path(dataset)
    if folder.is_dir():
        path = folder / f"{split}.jsonl"
        if not path.exists():
            raise LmlabError(f"{folder} has no {split}.jsonl")
        rows, where = read_jsonl(path), str(path)
    elif folder.suffix or dataset.startswith((".", "/", "~")):
        raise LmlabError(f"dataset {dataset!r}: no such folder")
    else:
        config = "main" if dataset in ("gsm8k", "openai/gsm8k") else None
        rows, where = read_hub(dataset, split, config), f"{dataset}/{split}"
    if not rows:
        raise LmlabError(f"{where}: no problems")
    return [parse_problem(r, f"{where}, row {i}") for i, r in enumerate(rows, 1)]


# --- prompts ---------------------------------------------------------------------------------


def exemplars(train: list[Problem], k: int, seed: int, avoid: str = "") -> list[Problem]:
    """k training problems drawn with ``seed``: the same draw for every asked question, except
    that the question ``avoid`` (the one being asked) is never among them."""
    order = random.Random(seed).sample(range(len(train)), len(train))  # one shuffle per seed, whatever avoid is
    pool = [train[i] for i in order if train[i].question != avoid]
    if k > len(pool):
        raise LmlabError(f"{k} exemplars asked for but the training split has {len(pool)} problems; lower --shots")
    return pool[:k]


def build_turns(problem: Problem, config: PromptConfig, shots: list[Problem]) -> list[tuple[str, str]]:
    """(question, answer) pairs: the solved exemplars, then the problem with the opening of its answer
    ("" or, for zero-shot-cot, the step-by-step trigger)."""
    if config.strategy == "few-shot":
        solved = [(s.question, s.answer) for s in shots]
    elif config.strategy == "cot":
        solved = [(s.question, f"{s.solution} The answer is {s.answer}.") for s in shots]
    else:
        solved = []
    return [*solved, (problem.question, COT_TRIGGER if config.strategy == "zero-shot-cot" else "")]


def build_prompt(problem: Problem, config: PromptConfig, shots: list[Problem]) -> str:
    """The plain-text prompt the model continues: "Question: ...\\nAnswer: ..." blocks."""
    turns = build_turns(problem, config, shots)
    head = f"{INSTRUCTION}\n\n" if config.strategy == "instruction" else ""
    body = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in turns[:-1])
    question, opening = turns[-1]
    return f"{head}{body}Question: {question}\nAnswer:" + (f" {opening}" if opening else "")


def build_messages(problem: Problem, config: PromptConfig, shots: list[Problem]) -> tuple[list[dict], str]:
    """The chat version: one user and one assistant turn per exemplar, then the problem as a user
    turn; returns the messages and the text that opens the assistant's reply."""
    turns = build_turns(problem, config, shots)
    messages = []
    for q, a in turns[:-1]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    question, opening = turns[-1]
    head = f"{INSTRUCTION}\n\n" if config.strategy == "instruction" else ""
    return [*messages, {"role": "user", "content": head + question}], opening


def prompt_ids(tokenizer, problem: Problem, config: PromptConfig, shots: list[Problem]) -> list[int]:
    """Token ids of the prompt: plain text (with the tokenizer's special tokens), or the chat
    template with the generation prompt and the reply's opening after it."""
    if not config.chat:
        return tokenizer(build_prompt(problem, config, shots))["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise LmlabError("this tokenizer has no chat template; use --chat-template off")
    messages, opening = build_messages(problem, config, shots)
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])
    return ids + (tokenizer(opening, add_special_tokens=False)["input_ids"] if opening else [])


# --- running ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrategyResult:
    strategy: str
    n: int
    correct: int
    unparseable: int
    seconds: float
    records: list[dict] = field(repr=False)  # one per problem: prompt, generation(s), predicted, correct

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "records"} | {"accuracy": self.accuracy}


def _greedy(model, tokenizer, ids: list[list[int]], max_new_tokens: int, batch_size: int, progress: bool) -> list[str]:
    from lmlab.generate import SamplingConfig, sample

    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, batch_size=batch_size, stop_strings=STOP)
    return [cut_at_stop(texts[0]) for texts in sample(model, tokenizer, ids, config, progress=progress)]


def run_strategy(model, tokenizer, problems: list[Problem], train: list[Problem], config: PromptConfig, *,
                 max_new_tokens: int = 256, batch_size: int = 8, progress: bool = True) -> StrategyResult:
    """Greedy generations for every problem with one strategy, and their accuracy.

    zero-shot-cot generates twice: the reasoning, then ``EXTRACTION`` after prompt + reasoning,
    whose first number is the answer (Kojima et al.'s answer cleansing); the others are read
    with ``extract_answer``. Causal LMs and encoder-decoders (T5) alike.
    """
    if not problems:
        raise LmlabError("no problems to prompt")
    shots = {p.question: exemplars(train, config.shots, config.seed, p.question) if config.uses_exemplars else []
             for p in problems}
    t0 = time.perf_counter()
    ids = [prompt_ids(tokenizer, p, config, shots[p.question]) for p in problems]
    outputs = _greedy(model, tokenizer, ids, max_new_tokens, batch_size, progress)
    finals = outputs
    if config.strategy == "zero-shot-cot":  # stage 2: x + z + " " + trigger, as Kojima et al.'s code
        tails = [f"{o.rstrip()} {EXTRACTION}" for o in outputs]
        if config.chat:  # the reply goes on inside the assistant turn
            second = [i + tokenizer(t, add_special_tokens=False)["input_ids"] for i, t in zip(ids, tails)]
        else:  # retokenised whole, so special tokens stay where they belong (T5's </s> at the end)
            second = [tokenizer(build_prompt(p, config, []) + t)["input_ids"] for p, t in zip(problems, tails)]
        finals = _greedy(model, tokenizer, second, EXTRACTION_TOKENS, batch_size, progress)
    seconds = time.perf_counter() - t0
    records = []
    for p, i, out, final in zip(problems, ids, outputs, finals, strict=True):
        predicted = normalize_number(final) if config.strategy == "zero-shot-cot" else extract_answer(out)
        records.append({"strategy": config.strategy, "question": p.question, "answer": p.answer,
                        "prompt": tokenizer.decode(i), "generation": out,
                        **({"extraction": final} if config.strategy == "zero-shot-cot" else {}),
                        "predicted": predicted, "correct": predicted == p.answer})
    return StrategyResult(config.strategy, len(problems), sum(r["correct"] for r in records),
                          sum(r["predicted"] is None for r in records), seconds, records)


def format_table(results: list[StrategyResult]) -> str:
    """A Markdown table: accuracy, counts, unparseable and time per strategy."""
    from lmlab.evaluate import format_accuracy

    lines = ["| strategy | accuracy | unparseable | s/problem |", "|---|---:|---:|---:|"]
    lines += [f"| {r.strategy} | {format_accuracy(r.correct, r.n)} | {r.unparseable} | {r.seconds / r.n:.2f} |"
              for r in results]
    return "\n".join(lines)
