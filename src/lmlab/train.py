"""Instruction fine-tuning for classification: the loop, checkpoints, metrics and resume.

The model arrives with its adaptation method applied (model -> method -> trainer). accelerate
handles devices, several processes (``accelerate launch``) and trackers; the loop itself is short
so the two things that make it fast stay visible:

* the loss is on the label tokens only, and with left padding those sit in the last k columns of
  every row, so the LM head runs on k+1 positions instead of all T (``logits_to_keep``; the head
  is ~20 % of SmolLM2's FLOPs);
* batches group examples of similar length (little padding), in a seeded order that ``--resume``
  replays exactly.

Checkpoints: ``best/`` (lowest validation loss) and ``last/`` hold the method's files (a PEFT
adapter for LoRA); ``last/`` also holds the trainer state. Both are written to a temporary folder
and swapped in whole, so a kill never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab import peft
from lmlab.data import Encoded, left_pad_batch, length_grouped_batches
from lmlab.errors import Interrupted, LmlabError
from lmlab.io import (
    atomic_dir,
    committed_dir,
    load_tensors,
    save_tensors,
    write_json,
    write_text,
)

STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """lr: peak AdamW learning rate (linear warmup, cosine decay to 10 %). batch_size: examples per
    micro-batch per process; grad_accum: micro-batches per optimizer step. max_iters: optimizer
    steps (else ``epochs`` over the training split). eval_interval: steps between passes over the
    validation items ``train`` is given. dropout: the base model's dropout probability."""

    out_dir: str
    lr: float = 2.5e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_iters: int | None = None
    epochs: float = 1.0
    eval_interval: int = 50
    warmup: float = 0.05
    weight_decay: float = 0.0
    dropout: float = 0.0
    seed: int = 1337
    log_interval: int = 10
    report_to: str = "none"
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "eval_interval", "log_interval"):
            if getattr(self, name) <= 0:
                raise LmlabError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_iters is not None and self.max_iters <= 0:
            raise LmlabError(f"max-iters must be positive, got {self.max_iters}")
        if self.lr <= 0 or self.epochs <= 0:
            raise LmlabError("lr and epochs must be positive")
        if not 0 <= self.dropout < 1:
            raise LmlabError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise LmlabError(f"report-to must be none, tensorboard or wandb, got {self.report_to!r}")


def label_loss(model, input_ids, attention_mask, position_ids, labels) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of the label tokens (the last k columns of a left-padded batch).

    Logits at positions T-k-1 .. T-2 predict tokens T-k .. T-1, so only k+1 positions are projected.
    Returns the loss and the number of label tokens it averages over.
    """
    k = labels.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=k + 1, use_cache=False)
    logits = out.logits[:, :-1, :]  # (B, k, V)
    n = int((labels != -100).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, reduction="sum") / max(n, 1)
    return loss, n


def set_dropout(model, p: float) -> None:
    """Set the base model's dropout (not a method's own, e.g. LoRA's ``lora_dropout``)."""
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = p


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to ``peak``, then cosine decay to 10 % of it at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validation_loss(model, items: list[Encoded], pad_id: int, batch_size: int) -> float:
    """Label-token loss over ``items`` (eval mode: merged LoRA, no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    for start in range(0, len(order), batch_size):
        batch = left_pad_batch([items[i] for i in order[start:start + batch_size]], pad_id)
        loss, n = label_loss(model, *batch)
        total, count = total + float(loss) * n, count + n
    model.train(was_training)
    return total / max(count, 1)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    best_val_loss: float
    best_step: int
    last_val_loss: float
    seconds: float
    out_dir: str


def train(model, tokenizer, method_config, train_items: list[Encoded], val_items: list[Encoded],
          cfg: TrainConfig, run_info: dict | None = None) -> TrainResult:
    """Fine-tune ``model`` (method already applied) and write checkpoints and metrics to ``cfg.out_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = check_out_dir(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=_tracker(cfg.report_to),
                              project_dir=str(out))
    set_seed(cfg.seed)
    set_dropout(model, cfg.dropout)
    world, rank = accelerator.num_processes, accelerator.process_index
    pad_id = tokenizer.pad_token_id
    schedule = BatchSchedule([len(i) for i in train_items], cfg.batch_size, cfg.seed, world)
    batches_per_epoch = schedule.per_epoch
    if batches_per_epoch == 0:
        raise LmlabError(f"the training split has {len(train_items)} examples: fewer than one batch per process")
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum)
    total = cfg.max_iters or max(1, int(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup * total)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"step": 0, "best_val_loss": float("inf"), "best_step": 0, "last_val_loss": float("nan"), "seconds": 0.0}
    if cfg.resume:
        state = _resume(out, model, optimizer, state)
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.is_main_process:
        write_json(out / "run.json", {**(run_info or {}), "train": asdict(cfg), "total_steps": total,
                                      "method_config": _config_dict(method_config)})
        _rewrite_metrics(out, state["step"])
    if cfg.report_to != "none":
        accelerator.init_trackers("lmlab", config={k: v for k, v in asdict(cfg).items() if v is not None})

    bar = _progress(total, state["step"], cfg.progress and accelerator.is_local_main_process)
    model.train()
    step, window_loss, window_tokens, window_t0 = state["step"], [], 0, time.time()
    start_time = time.time() - state["seconds"]
    with _stop_requests() as stop:
        while step < total:
            lr = lr_at(step, total, warmup, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg.grad_accum):
                items = [train_items[i] for i in schedule.batch(step * cfg.grad_accum + micro, rank)]
                batch = left_pad_batch(items, pad_id)
                loss, _ = label_loss(model, *batch)
                accelerator.backward(loss / cfg.grad_accum)
                window_loss.append(loss.item())
                window_tokens += int(batch[1].sum()) * world
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(window_loss[-cfg.grad_accum:]) / cfg.grad_accum:.4f}")
            is_eval = step % cfg.eval_interval == 0 or step == total
            if step % cfg.log_interval == 0 or is_eval:
                row = {"step": step, "train_loss": sum(window_loss) / len(window_loss), "lr": lr,
                       "tokens_per_s": window_tokens / max(time.time() - window_t0, 1e-9), "val_loss": None}
                if is_eval:
                    row["val_loss"] = validation_loss(accelerator.unwrap_model(model), val_items, pad_id, 2 * cfg.batch_size)
                    state["last_val_loss"] = row["val_loss"]
                    bar.set_postfix(loss=f"{row['train_loss']:.4f}", val=f"{row['val_loss']:.4f}")
                window_loss, window_tokens, window_t0 = [], 0, time.time()
                state.update(step=step, seconds=time.time() - start_time)
                if accelerator.is_main_process:
                    _log_row(out, row, accelerator if cfg.report_to != "none" else None)
                    if is_eval:
                        _save_checkpoints(out, accelerator.unwrap_model(model), method_config, optimizer, state,
                                          step, row["val_loss"])
                accelerator.wait_for_everyone()
            if stop.is_set():  # SIGINT/SIGTERM: keep every completed step, then stop
                state.update(step=step, seconds=time.time() - start_time)
                if accelerator.is_main_process:
                    _save_last(out, accelerator.unwrap_model(model), method_config, optimizer, state)
                bar.close()
                raise Interrupted(f"stopped at step {step} of {total}, saved in {out / 'last'}; continue with --resume")
    bar.close()
    if cfg.report_to != "none":
        accelerator.end_training()
    if accelerator.is_main_process:
        from lmlab.plots import plot_losses

        plot_losses(read_metrics(out), out / "loss.png", title=f"{(run_info or {}).get('method', '')} fine-tuning")
    return TrainResult(step, state["best_val_loss"], state["best_step"], state["last_val_loss"],
                       time.time() - start_time, str(out))


@contextmanager
def _stop_requests():
    """SIGINT/SIGTERM set a flag instead of raising mid-step (an interrupted optimizer step would
    leave weights half-updated); the loop checks it between steps. Handlers are restored after."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: flag.set())
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class BatchSchedule:
    """Which examples form the ``index``-th micro-batch of each process. The order depends only on
    (seed, epoch), so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, world: int):
        self.lengths, self.batch_size, self.seed, self.world = lengths, batch_size, seed, world
        self._epoch, self._batches = 0, length_grouped_batches(lengths, batch_size, seed)
        self.per_epoch = len(self._batches) // world  # micro-batches per process per epoch

    def batch(self, index: int, rank: int) -> list[int]:
        epoch, pos = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = length_grouped_batches(self.lengths, self.batch_size, self.seed + epoch)
        return self._batches[pos * self.world + rank]


def _save_checkpoints(out: Path, model, method_config, optimizer, state: dict, step: int, val_loss: float) -> None:
    """After an evaluation: ``best`` (trainable weights only) if ``val_loss`` beats it, then ``last``."""
    if val_loss < state["best_val_loss"]:
        state.update(best_val_loss=val_loss, best_step=step)
        with atomic_dir(out / "best") as tmp:
            peft.save(model, method_config, tmp)
            write_json(tmp / STATE_FILE, {"step": step, "val_loss": val_loss})
    _save_last(out, model, method_config, optimizer, state)


def _save_last(out: Path, model, method_config, optimizer, state: dict) -> None:
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with atomic_dir(out / "last") as tmp:
        peft.save(model, method_config, tmp)  # first: full.save replaces the folder it is given
        save_tensors(tmp / TRAINABLE_FILE, trainable)
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / OPTIMIZER_FILE)
        write_json(tmp / STATE_FILE, state)


def _resume(out: Path, model, optimizer, state: dict) -> dict:
    last = committed_dir(out / "last")
    if last is None:
        raise LmlabError(f"--resume: {out} has no checkpoint to resume from")
    weights = load_tensors(last / TRAINABLE_FILE)
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(own) or any(weights[n].shape != own[n].shape for n in own):
        raise LmlabError(f"--resume: the checkpoint in {last} was made for another model or method")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(weights[n])
    saved_optim = torch.load(last / OPTIMIZER_FILE, weights_only=True)
    optimizer.load_state_dict(saved_optim["optimizer"])
    torch.set_rng_state(saved_optim["rng"])  # LoRA dropout draws continue as if never stopped
    saved = json.loads((last / STATE_FILE).read_text())
    print(f"lmlab: resuming {out} at step {saved['step']}", flush=True)
    return {**state, **saved}


def check_out_dir(cfg: TrainConfig) -> Path:
    """Fail before any work if the out dir is unwritable, or holds a run and --resume was not given."""
    out = Path(cfg.out_dir)
    _check_writable(out)
    has_run = committed_dir(out / "last") is not None
    if has_run and not cfg.resume:
        raise LmlabError(f"{out} already holds a run; pass --resume to continue it or choose another --out-dir")
    if cfg.resume and not has_run:
        raise LmlabError(f"--resume: {out} has no checkpoint to resume from")
    return out


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise LmlabError(f"cannot write to out dir {out}: {exc.strerror or exc}") from None


def _tracker(report_to: str):
    if report_to == "none":
        return None
    import importlib.util

    if importlib.util.find_spec(report_to) is None:
        raise LmlabError(f"--report-to {report_to} needs the {report_to} package: pip install {report_to}")
    return report_to


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="fine-tuning", unit="step", dynamic_ncols=True)


def _config_dict(config) -> dict:
    return {"method": peft.method_name(config), **asdict(config)}


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return rows


def _rewrite_metrics(out: Path, upto_step: int) -> None:
    """On resume, drop rows logged after the checkpoint (those steps will run again)."""
    rows = [r for r in read_metrics(out) if r["step"] <= upto_step]
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _log_row(out: Path, row: dict, accelerator) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if accelerator is not None:
        accelerator.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=row["step"])


def load_checkpoint(path: str | Path, model_name: str | None = None):
    """``(model, tokenizer, run_info)`` for a checkpoint ``finetune`` wrote: ``RUN/best``, ``RUN/last``
    or ``RUN`` itself (meaning its best). The base model comes from the run's ``run.json`` unless
    ``model_name`` is given; the method is recognised from the checkpoint's files."""
    from lmlab.io import read_json
    from lmlab.models import load_model

    path = Path(path)
    if (path / "run.json").exists():
        path = path / "best"
    found = committed_dir(path)
    if found is None:
        raise LmlabError(f"no checkpoint at {path}")
    run_file = found.parent / "run.json"
    run_info = read_json(run_file) if run_file.exists() else {}
    name = model_name or run_info.get("model")
    if name is None:
        raise LmlabError(f"{found} has no run.json beside it; pass --model to name its base model")
    model, tokenizer = load_model(name)
    peft.load(model, found)
    model.eval()
    return model, tokenizer, run_info
