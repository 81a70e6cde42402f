"""ROUGE of generated summaries (Lin 2004), with Google's ``rouge-score`` (the scorer the
summarization papers report), and the greedy summaries a summarization run is scored on.
"""

from __future__ import annotations

from lmlab.data import Encoded
from lmlab.errors import LmlabError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: list[str], references: list[str], stemmer: bool = True) -> dict:
    """ROUGE-1/2/L precision, recall and F1 (Lin 2004) per example and averaged, with Google's
    ``rouge-score`` package (the scorer the summarization papers report).

    ``k`` predictions per reference (``generate --samples k`` writes each prompt's samples one after
    another) are scored against their reference each; ``best_of_k`` then averages, per reference,
    the best F1 of its k samples."""
    from rouge_score import rouge_scorer

    if not predictions or not references:
        raise LmlabError("no predictions to score" if not predictions else "no references")
    if len(predictions) % len(references):
        raise LmlabError(f"{len(predictions)} predictions for {len(references)} references: expected the same "
                         "number, or k samples for each reference in order")
    k = len(predictions) // len(references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stemmer)
    rows = []
    for i, pred in enumerate(predictions):
        scores = scorer.score(references[i // k], pred)  # (target, prediction)
        rows.append({t: {"precision": s.precision, "recall": s.recall, "f": s.fmeasure} for t, s in scores.items()})
    mean = {t: {m: sum(r[t][m] for r in rows) / len(rows) for m in ("precision", "recall", "f")} for t in ROUGE_TYPES}
    result = {"n": len(rows), "references": len(references), "k": k, "mean": mean, "examples": rows}
    if k > 1:
        groups = [rows[j:j + k] for j in range(0, len(rows), k)]
        result["best_of_k"] = {t: sum(max(r[t]["f"] for r in g) for g in groups) / len(groups) for t in ROUGE_TYPES}
    return result


def format_rouge(result: dict) -> str:
    k = result.get("k", 1)
    lines = [f"ROUGE over {result['n']} examples" + (f" ({k} samples for each of {result['references']} "
                                                       "references)" if k > 1 else ""),
             f"{'':8}{'precision':>10}{'recall':>10}{'F1':>10}" + (f"{'best-of-' + str(k) + ' F1':>16}" if k > 1 else "")]
    for t in ROUGE_TYPES:
        m = result["mean"][t]
        lines.append(f"{t:8}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f']:>10.4f}"
                     + (f"{result['best_of_k'][t]:>16.4f}" if k > 1 else ""))
    return "\n".join(lines)


def generate_summaries(model, tokenizer, items: list[Encoded], *, max_new_tokens: int = 40, batch_size: int = 8,
                       progress: bool = False) -> list[str]:
    """Greedy summaries of the prompts of summarization ``items`` (the very ids the model trained
    on: the run's template around the post, ``<post>\nTL;DR:`` by default; an encoder-decoder
    model's encoder reads them and its decoder writes the summary), each cut at its first line as
    ``generate --first-line`` does."""
    from lmlab.generate import SamplingConfig, sample

    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    outputs = sample(model, tokenizer, [list(i.prompt_ids) for i in items], config, progress=progress)
    return [texts[0].strip().split("\n")[0].strip() for texts in outputs]
