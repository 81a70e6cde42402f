"""Export a run as a folder the Hugging Face libraries load with nothing of lmlab installed.

LoRA exports two ways: merged (``W = W0 + (alpha / r) B A`` written into the base weights, a plain
transformers model: ``AutoModelForCausalLM.from_pretrained(DIR)``), or as the PEFT adapter folder
(``peft.PeftModel.from_pretrained(base, DIR)``). BitFit and full fine-tuning are plain weights
already, so they always export as a transformers model. Bottleneck adapters and prefix tuning add
computation no transformers architecture has (an extra MLP per sublayer; extra keys and values in
every attention), so they cannot be merged; without ``merge`` their lmlab files are exported with a
card that says lmlab loads them. Every export carries the tokenizer and a model card (``README.md``
with YAML front matter: base model, method and settings, training data, metrics, the command).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab import peft
from lmlab.errors import LmlabError
from lmlab.io import atomic_dir, committed_dir, load_tensors, read_json, save_tensors, write_json, write_text
from lmlab.progress import transformers_bars_off

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Hub ids of the embedded models (lmlab ships their weights as GGUF; the card names the original).
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
PLAIN = ("bitfit", "full")  # their checkpoints are plain weights of the base architecture
UNMERGEABLE = {
    "adapter": "bottleneck adapters add an MLP after every attention and feed-forward sublayer, which no "
               "transformers architecture has",
    "prefix": "prefix tuning adds trained keys and values to every attention layer, which no transformers "
              "architecture has",
}
_LMLAB_FILES = {"adapter": ("bottleneck_config.json", "bottleneck_model.safetensors"),
                "prefix": ("prefix_config.json", "prefix_model.safetensors")}
_SKIP_OPTIONS = ("json", "no_progress", "func", "command", "config")  # output only: no effect on the weights


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """run: a run folder (its best checkpoint), or RUN/best, RUN/last. output: the folder to write.
    merge: LoRA merged into the weights (a plain transformers model) instead of a PEFT adapter.
    dtype: auto (merged: the base model's own dtype; adapter: as trained), fp32, bf16 or fp16.
    push_to_hub: a hub repo id to upload the folder to. An existing ``output`` is replaced as a whole
    (the command line refuses one without --overwrite)."""

    run: str
    output: str
    merge: bool = False
    dtype: str = "auto"
    push_to_hub: str | None = None

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise LmlabError(f"--dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")


def find_checkpoint(run: str | Path) -> tuple[Path, dict]:
    """(checkpoint folder, the run's run.json or {}) for RUN (meaning RUN/best), RUN/best or RUN/last."""
    path = Path(run)
    if (path / "run.json").exists():
        path = path / "best"
    found = committed_dir(path)
    if found is None or not found.is_dir():
        raise LmlabError(f"no run or checkpoint at {run}")
    run_file = found.parent / "run.json"
    return found, (read_json(run_file) if run_file.exists() else {})


def base_model_id(name: str) -> str:
    """What the exported files name as their base: an embedded model's hub id, else ``name`` itself."""
    return HUB_IDS.get(name, name)


def export(cfg: ExportConfig) -> dict:
    """Write the export folder atomically (and upload it with ``push_to_hub``); returns a summary."""
    from lmlab import hub

    checkpoint, run_info = find_checkpoint(cfg.run)
    method = peft.detect(checkpoint)
    if cfg.merge and method in UNMERGEABLE:
        raise LmlabError(f"--merge: {method} cannot be merged into a plain transformers model ({UNMERGEABLE[method]}); "
                         "export without --merge for its lmlab files")
    base = run_info.get("model") or _recorded_base(checkpoint)
    if not base:
        raise LmlabError(f"{checkpoint} has no run.json beside it naming its base model")
    out = Path(cfg.output)
    if out.resolve() in (checkpoint.resolve(), *checkpoint.resolve().parents):
        raise LmlabError(f"--output {out} would replace the run it exports")
    if cfg.push_to_hub and not hub.hub_reachable():
        raise LmlabError(f"--push-to-hub {cfg.push_to_hub}: the Hugging Face hub is unreachable (offline?); "
                         "nothing was written")
    merged = (method == "lora" and cfg.merge) or method in PLAIN
    kind = "transformers" if merged else "peft" if method == "lora" else "lmlab"
    with atomic_dir(out) as tmp:
        if merged:
            dtype = _write_model(checkpoint, base, cfg.dtype, tmp)
        else:
            dtype = _write_method_files(checkpoint, method, base, cfg.dtype, tmp)
            _write_tokenizer(base, tmp)
        card = model_card(run_info, checkpoint, method, base, kind, dtype)
        write_text(tmp / "README.md", card)
        files = sorted(p.name for p in tmp.iterdir())
    result = {"output": str(out), "run": str(cfg.run), "checkpoint": str(checkpoint), "method": method,
              "format": kind, "merged": merged, "dtype": dtype, "base_model": base_model_id(base),
              "files": files, "pushed": None}
    if cfg.push_to_hub:
        result["pushed"] = push(out, cfg.push_to_hub)
    return result


def _recorded_base(checkpoint: Path) -> str | None:
    for name in ("adapter_config.json", "bitfit_config.json", "bottleneck_config.json", "prefix_config.json"):
        if (checkpoint / name).is_file():
            return read_json(checkpoint / name).get("base_model_name_or_path")
    return None


def _base_dtype(base: str) -> str:
    """The dtype the base model's config records (what its own weights are stored in), else fp32."""
    from lmlab.models import model_config

    config = model_config(base)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    return names.get(stored, "fp32")


def _write_model(checkpoint: Path, base: str, dtype: str, out: Path) -> str:
    """The run's model with its method merged in (computed in fp32, then cast), as safetensors."""
    from transformers import GenerationConfig

    from lmlab.peft import lora
    from lmlab.train import load_checkpoint

    dtype = _base_dtype(base) if dtype == "auto" else dtype
    model, tokenizer, _ = load_checkpoint(checkpoint, base, device="cpu", dtype=torch.float32)
    copies = lora.module_copies(model)
    if lora.lora_layers(model) or copies:
        lora.merge_and_unload(model)
    if copies and getattr(model.config, "tie_word_embeddings", False):
        # a trained copy of the LM head or the embeddings unties them; tied, from_pretrained would
        # overwrite one with the other
        model.config.tie_word_embeddings = False
    model.to(DTYPES[dtype])
    with transformers_bars_off():
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not (out / "generation_config.json").exists():
        GenerationConfig.from_model_config(model.config).save_pretrained(out)
    return dtype


def _write_method_files(checkpoint: Path, method: str, base: str, dtype: str, out: Path) -> str:
    """A LoRA checkpoint as a PEFT adapter folder naming its base; an adapter / prefix checkpoint's
    lmlab files. Weights are cast to ``dtype`` (auto: kept as trained)."""
    config_file, weights_file = ("adapter_config.json", "adapter_model.safetensors") if method == "lora" \
        else _LMLAB_FILES[method]
    tensors = load_tensors(checkpoint / weights_file)
    if dtype == "auto":
        stored = {t.dtype for t in tensors.values() if t.is_floating_point()}
        dtype = next((k for k, v in DTYPES.items() if {v} == stored), "fp32")
    save_tensors(out / weights_file, {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v
                                      for k, v in tensors.items()}, metadata={"format": "pt"})
    config = read_json(checkpoint / config_file)
    write_json(out / config_file, {**config, "base_model_name_or_path": base_model_id(base)})
    return dtype


def _write_tokenizer(base: str, out: Path) -> None:
    from lmlab.models import load_tokenizer

    tokenizer = load_tokenizer(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out)


# --- the model card ---------------------------------------------------------------------------


def lmlab_command(run_info: dict) -> str:
    """The lmlab command line that repeats the run, from its recorded options."""
    command = "dpo" if run_info.get("task") == "dpo" else "finetune"
    parts = ["lmlab", command]
    for key, value in sorted((run_info.get("options") or {}).items()):
        if key in _SKIP_OPTIONS or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            parts += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return shlex.join(parts)


def run_metrics(checkpoint: Path) -> dict:
    """Best validation loss and its step, the last step (from the checkpoints' trainer states), and
    the evaluation results the run folder holds (a sweep's ``result.json``, ``eval*.json``)."""
    metrics: dict = {}
    best, last = checkpoint.parent / "best" / "trainer_state.json", checkpoint.parent / "last" / "trainer_state.json"
    own = checkpoint / "trainer_state.json"
    if last.is_file():
        state = read_json(last)
        metrics.update(best_val_loss=state.get("best_val_loss"), best_step=state.get("best_step"),
                       last_step=state.get("step"), last_val_loss=state.get("last_val_loss"))
    elif best.is_file():
        state = read_json(best)
        metrics.update(best_val_loss=state.get("val_loss"), best_step=state.get("step"))
    if own.is_file():
        state = read_json(own)
        metrics["exported_step"] = state.get("step")
    evaluations = {p.name: read_json(p) for p in sorted(checkpoint.parent.glob("eval*.json"))}
    if (checkpoint.parent / "result.json").is_file():
        evaluations["result.json"] = read_json(checkpoint.parent / "result.json")
    if evaluations:
        metrics["evaluation"] = evaluations
    return {k: v for k, v in metrics.items() if v is not None}


def model_card(run_info: dict, checkpoint: Path, method: str, base: str, kind: str, dtype: str) -> str:
    """README.md: YAML front matter (what the hub indexes, and lmlab's record of the run), then text."""
    import yaml

    from lmlab.hub import looks_like_hub_id

    base_id = base_model_id(base)
    settings = dict(run_info.get("method_config") or {"method": method})
    data = {k: run_info[k] for k in ("dataset", "data", "task", "text_column", "label_column", "label_words",
                                     "template", "max_length") if run_info.get(k) is not None}
    metrics = run_metrics(checkpoint)
    command = lmlab_command(run_info) if run_info.get("options") else None
    front = {"library_name": "peft" if kind == "peft" else "transformers" if kind == "transformers" else "lmlab"}
    if looks_like_hub_id(base_id):  # the hub accepts only a hub id here; a local folder is named below
        front["base_model"] = base_id
    tags = ["lmlab", method, *(["merged"] if kind == "transformers" and method == "lora" else [])]
    front["tags"] = tags + (["text-generation"] if kind != "lmlab" else [])
    front["lmlab"] = {"method": settings, "data": data, "metrics": metrics, "dtype": dtype,
                      "checkpoint": checkpoint.name, **({"command": command} if command else {}),
                      "options": run_info.get("options") or {}}
    load = {
        "transformers": "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                        "model = AutoModelForCausalLM.from_pretrained(DIR)\ntokenizer = AutoTokenizer.from_pretrained(DIR)",
        "peft": f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({base_id!r})\nmodel = PeftModel.from_pretrained(base, DIR)",
        "lmlab": f"# needs lmlab: {UNMERGEABLE.get(method, '')}\nfrom lmlab.train import load_checkpoint\n\n"
                 f"model, tokenizer, _ = load_checkpoint(DIR, {base!r})",
    }[kind]
    what = {"transformers": "a plain transformers model" + (" (LoRA merged into the weights)" if method == "lora" else ""),
            "peft": "a PEFT LoRA adapter", "lmlab": f"lmlab's {method} files"}[kind]
    lines = [f"# {method} fine-tune of {base_id}", "",
             f"Exported by `lmlab export` from `{checkpoint}` as {what}, {dtype}.", "",
             "## Load", "", "```python", load, "```", "", "## Method", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()] + ["", "## Training data", ""]
    lines += [f"- {k}: {v!r}" for k, v in data.items()] or ["- not recorded"]
    lines += ["", "## Metrics", ""]
    lines += [f"- {k}: {v}" for k, v in metrics.items() if k != "evaluation"] or ["- not recorded"]
    for name, result in metrics.get("evaluation", {}).items():
        lines.append(f"- evaluation ({name}): {result}")
    if command:
        lines += ["", "## Command", "", "```bash", command, "```"]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(lines) + "\n"


def push(folder: str | Path, repo: str) -> str:
    """Create ``repo`` on the hub if needed and upload ``folder``; one line on any failure."""
    from huggingface_hub import create_repo, upload_folder

    try:
        repo_id = create_repo(repo, exist_ok=True).repo_id
        info = upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="lmlab export")
    except Exception as exc:  # noqa: BLE001 - the hub client raises many kinds (auth, network, name)
        reason = " ".join(str(exc).split())[:200]
        raise LmlabError(f"--push-to-hub {repo}: {type(exc).__name__}: {reason} (the folder {folder} is written)") \
            from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


__all__ = ["ExportConfig", "base_model_id", "export", "find_checkpoint", "lmlab_command", "model_card", "push",
           "run_metrics"]
