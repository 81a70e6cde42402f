"""Prompting strategies on math word problems (GSM8K, Cobbe et al. 2021).

* ``zero-shot``: the question alone, "Question: ...\\nAnswer:";
* ``instruction``: the same after an explicit instruction to answer with a number;
* ``few-shot``: k solved exemplars from the training split, answers as bare numbers
  (in-context learning, Brown et al. 2020);
* ``cot``: k exemplars with worked rationales, GSM8K's own solutions ending "The answer is n."
  (chain-of-thought prompting, Wei et al. 2022);
* ``zero-shot-cot``: "Let's think step by step." then a second, answer-extraction prompt
  "Therefore, the answer (arabic numerals) is" after the reasoning (Kojima et al. 2022).

Generation is greedy and batched; it stops at a new "Question:" (transformers' ``stop_strings``)
and the text is also cut there afterwards, so a few-shot model cannot pad its answer with
invented problems. The answer is read after "####", else after "The answer is", else as the last
number; unparseable counts as wrong.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lmlab.errors import LmlabError

STRATEGIES = ("zero-shot", "instruction", "few-shot", "cot", "zero-shot-cot")
INSTRUCTION = ("Solve the following math word problem. Reply with the final answer only, as a number, "
               "with no explanation.")
COT_TRIGGER = "Let's think step by step."
EXTRACTION = "Therefore, the answer (arabic numerals) is"
STOP = ("\nQuestion:", "\nQ:")


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the worked rationale, calculator annotations removed, without the final "#### n"
    answer: str  # the normalised final number


@dataclass(frozen=True, kw_only=True)
class PromptConfig:
    strategy: str
    shots: int = 8  # exemplars for few-shot and cot
    seed: int = 0  # which exemplars
    chat: bool = False  # wrap the prompt in the tokenizer's chat template (one user turn)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise LmlabError(f"unknown strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.shots < 0:
            raise LmlabError(f"shots must be >= 0, got {self.shots}")


# --- answers ---------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")


def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5', '12.0' -> '12', '-3' -> '-3'; None if there is no number."""
    match = _NUMBER.search(text)
    if not match:
        return None
    raw = match.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def extract_answer(text: str) -> str | None:
    """The final number of a generation: after "####", else after "The answer is", else the last one."""
    for marker in ("####", "the answer is"):
        at = text.lower().rfind(marker)
        if at >= 0:
            found = normalize_number(text[at + len(marker):])
            if found is not None:
                return found
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def parse_problem(row: dict, where: str) -> Problem:
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str) or "####" not in answer:
        raise LmlabError(f"{where}: expected 'question' and an 'answer' ending in '#### <number>'")
    rationale, _, final = answer.rpartition("####")
    number = normalize_number(final)
    if number is None:
        raise LmlabError(f"{where}: no number after '####'")
    return Problem(question.strip(), re.sub(r"<<[^>]*>>", "", rationale).strip(), number)


def load_problems(dataset: str, split: str) -> list[Problem]:
    """GSM8K rows from a local folder (``{split}.jsonl``) or the hub (``gsm8k``, config ``main``)."""
    from pathlib import Path

    from lmlab.data import _read_hub, _read_jsonl

    folder = Path(dataset)
    if folder.is_dir():
        path = folder / f"{split}.jsonl"
        if not path.exists():
            raise LmlabError(f"{folder} has no {split}.jsonl")
        rows, where = _read_jsonl(path), str(path)
    elif folder.suffix or dataset.startswith((".", "/", "~")):
        raise LmlabError(f"dataset {dataset!r}: no such folder")
    else:
        rows, where = _read_hub(dataset, split, "main" if dataset.endswith("gsm8k") else None), f"{dataset}/{split}"
    if not rows:
        raise LmlabError(f"{where}: no problems")
    return [parse_problem(r, f"{where} row {i}") for i, r in enumerate(rows, 1)]


# --- prompts ---------------------------------------------------------------------------------


def exemplars(train: list[Problem], k: int, seed: int, avoid: str = "") -> list[Problem]:
    """k training problems drawn with ``seed`` (never the question being asked)."""
    pool = [p for p in train if p.question != avoid]
    if k > len(pool):
        raise LmlabError(f"{k} exemplars asked for but the training split has {len(pool)} problems")
    return random.Random(seed).sample(pool, k)


def build_prompt(problem: Problem, config: PromptConfig, shots: list[Problem]) -> str:
    """The text the model continues (before any chat template)."""
    ask = f"Question: {problem.question}\nAnswer:"
    if config.strategy == "zero-shot":
        return ask
    if config.strategy == "instruction":
        return f"{INSTRUCTION}\n\n{ask}"
    if config.strategy == "zero-shot-cot":
        return f"{ask} {COT_TRIGGER}"
    if config.strategy == "few-shot":
        return "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots) + ask
    return "".join(f"Question: {s.question}\nAnswer: {s.solution} The answer is {s.answer}.\n\n"
                   for s in shots) + ask  # cot


def cut_at_stop(text: str) -> str:
    for stop in STOP:
        at = text.find(stop)
        if at >= 0:
            text = text[:at]
    return text


@dataclass(frozen=True)
class StrategyResult:
    strategy: str
    n: int
    correct: int
    unparseable: int
    records: list[dict]

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def summary(self) -> dict:
        return {"strategy": self.strategy, "n": self.n, "correct": self.correct, "accuracy": self.accuracy,
                "unparseable": self.unparseable}


def _encode(tokenizer, text: str, chat: bool, continuation: str = "") -> list[int]:
    """Prompt ids; with ``chat`` the text is one user turn and ``continuation`` starts the reply."""
    if not chat:
        return tokenizer(text + continuation)["input_ids"]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return list(ids) + (tokenizer(continuation, add_special_tokens=False)["input_ids"] if continuation else [])


def run_strategy(model, tokenizer, problems: list[Problem], train: list[Problem], config: PromptConfig, *,
                 max_new_tokens: int = 256, batch_size: int = 8, progress: bool = True) -> StrategyResult:
    """Generate for every problem with one strategy and score the extracted answers."""
    from lmlab.generate import SamplingConfig, sample

    if config.chat and not getattr(tokenizer, "chat_template", None):
        raise LmlabError("this tokenizer has no chat template; use --chat-template off")
    uses_shots = config.strategy in ("few-shot", "cot")
    texts = [build_prompt(p, config, exemplars(train, config.shots, config.seed + i, p.question) if uses_shots else [])
             for i, p in enumerate(problems)]
    if config.chat and config.strategy == "zero-shot-cot":  # the trigger opens the reply, as in Kojima et al.
        ids = [_encode(tokenizer, t.removesuffix(" " + COT_TRIGGER), True, COT_TRIGGER) for t in texts]
    else:
        ids = [_encode(tokenizer, t, config.chat) for t in texts]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, batch_size=batch_size, stop_strings=STOP)
    outputs = [cut_at_stop(o[0]) for o in sample(model, tokenizer, ids, sampling, progress=progress)]
    finals = outputs
    if config.strategy == "zero-shot-cot":  # stage 2: answer extraction after the reasoning
        second = [i + tokenizer(o + "\n" + EXTRACTION, add_special_tokens=False)["input_ids"] for i, o in zip(ids, outputs)]
        short = SamplingConfig(max_new_tokens=16, temperature=0, batch_size=batch_size, stop_strings=("\n",))
        finals = [cut_at_stop(o[0]) for o in sample(model, tokenizer, second, short, progress=progress)]
    records, correct, unparseable = [], 0, 0
    for p, text, out, final in zip(problems, texts, outputs, finals):
        predicted = normalize_number(final) if config.strategy == "zero-shot-cot" else extract_answer(final)
        correct += predicted == p.answer
        unparseable += predicted is None
        records.append({"strategy": config.strategy, "question": p.question, "answer": p.answer, "prompt": text,
                        "generation": out, **({"extraction": final} if final is not out else {}),
                        "predicted": predicted, "correct": predicted == p.answer})
    return StrategyResult(config.strategy, len(problems), correct, unparseable, records)


def format_table(results: list[StrategyResult]) -> str:
    lines = ["| strategy | accuracy | correct | n | unparseable |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r.strategy} | {r.accuracy:.1%} | {r.correct} | {r.n} | {r.unparseable} |" for r in results]
    return "\n".join(lines)
