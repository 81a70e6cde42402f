"""The one training loop every trainer shares (fine-tuning for classification, SFT, DPO).

A task hands the engine only what is its own (``Task``): the lengths of its training examples,
how a micro-batch of them becomes tensors, the loss of a batch and an evaluation. The engine does
the rest, once: device placement, mixed precision, gradient accumulation and clipping, the
learning-rate schedule (linear warm-up, cosine to 10 %), periodic evaluation, metrics.jsonl and
trackers, best/ and last/ checkpoints written atomically, Ctrl-C, and resume that replays the same
batches, optimizer state and random state (CPU and CUDA generators).

Built on accelerate: ``accelerate launch`` runs it on several processes (DDP, FSDP, DeepSpeed
through ``--config_file``), each process taking every ``world``-th micro-batch; saving gathers the
full state of the trainable parameters and only the main process writes.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from lmlab import checkpoint, devices, peft
from lmlab.checkpoint import check_out_dir  # noqa: F401  (re-exported)
from lmlab.data import length_grouped_batches
from lmlab.errors import Interrupted, LmlabError
from lmlab.io import json_safe, write_json, write_text
from lmlab.schedule import lengthened, lr_at, scheduled_lr  # noqa: F401  (re-exported)

@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """lr: peak AdamW learning rate (linear warmup, cosine decay to 10 %). batch_size: examples per
    micro-batch per process; grad_accum: micro-batches per optimizer step. max_iters: optimizer
    steps (else ``epochs`` over the training split). eval_interval: steps between evaluations.
    max_grad_norm: clip the gradients' global L2 norm to this (None: no clipping; 1.0 as
    transformers' Trainer). dropout: the base model's dropout probability. device / dtype: where
    and in which precision (``lmlab.devices``); the model arrives there, the engine puts batches
    there and runs bf16 / fp16 as autocast mixed precision with fp32 trainable weights."""

    out_dir: str
    lr: float = 2.5e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_iters: int | None = None
    epochs: float = 1.0
    eval_interval: int = 50
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    dropout: float = 0.0
    seed: int = 1337
    log_interval: int = 10
    report_to: str = "none"
    resume: bool = False
    progress: bool = True
    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "eval_interval", "log_interval"):
            if getattr(self, name) <= 0:
                raise LmlabError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_iters is not None and self.max_iters <= 0:
            raise LmlabError(f"max-iters must be positive, got {self.max_iters}")
        if self.lr <= 0 or self.epochs <= 0:
            raise LmlabError("lr and epochs must be positive")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise LmlabError(f"max-grad-norm must be positive (or none), got {self.max_grad_norm}")
        if not 0 <= self.dropout < 1:
            raise LmlabError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise LmlabError(f"report-to must be none, tensorboard or wandb, got {self.report_to!r}")
        if self.device not in devices.DEVICES and not self.device.startswith("cuda:"):
            raise LmlabError(f"device must be one of {', '.join(devices.DEVICES)}, got {self.device!r}")
        if self.dtype not in devices.DTYPE_CHOICES:
            raise LmlabError(f"dtype must be one of {', '.join(devices.DTYPE_CHOICES)}, got {self.dtype!r}")


class Task(Protocol):
    """What a trainer supplies. ``loss`` returns (loss, metrics, tokens): metrics are 0-d tensors or
    numbers averaged over the log window as ``train_<name>``; tokens count the batch's real
    (non-padding) tokens. ``evaluate`` returns ``{"loss": (sum, count), ...}`` over the held-out
    items at ``indices`` (of ``val_size``); the engine adds them up over processes and logs each
    sum / count as ``val_<name>``; the mean ``loss`` picks the best checkpoint."""

    name: str
    lengths: list[int]
    val_size: int

    def collate(self, indices: list[int], device: torch.device) -> Any: ...

    def loss(self, model, batch) -> tuple[torch.Tensor, dict, Any]: ...

    def evaluate(self, model, device: torch.device, indices: list[int]) -> dict[str, tuple[Any, Any]]: ...

    def plot(self, rows: list[dict], out_dir: Path, title: str) -> None: ...


@dataclass(frozen=True)
class TrainResult:
    steps: int
    best_val_loss: float
    best_step: int
    last_val_loss: float
    seconds: float
    out_dir: str


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


def fit(model, task: Task, method_config, cfg: TrainConfig, run_info: dict | None = None) -> TrainResult:
    """Train ``model`` (method applied, on ``cfg.device``) on ``task``; checkpoints and metrics go to
    ``cfg.out_dir``. Returns when ``max_iters`` (or ``epochs``) steps are done; raises
    ``Interrupted`` after saving ``last/`` on SIGINT/SIGTERM."""
    from accelerate.utils import set_seed

    out = checkpoint.check_out_dir(cfg)
    device = devices.select_device(cfg.device)
    dtype = devices.model_dtype(devices.select_dtype(cfg.dtype, device, warn_slow=False),
                                getattr(model, "config", None), quiet=True)  # T5: fp32 (the loader said so)
    accelerator = _accelerator(cfg, device, dtype, out)
    set_seed(cfg.seed)
    set_dropout(model, cfg.dropout)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    world, rank = accelerator.num_processes, accelerator.process_index
    schedule = BatchSchedule(task.lengths, cfg.batch_size, cfg.seed, world)
    if schedule.per_epoch == 0:
        raise LmlabError(f"the training split has {len(task.lengths)} examples: fewer than one batch per process")
    total = cfg.max_iters or max(1, int(cfg.epochs * max(1, schedule.per_epoch // cfg.grad_accum)))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"step": 0, "best_val_loss": float("inf"), "best_step": 0, "last_val_loss": float("nan"), "seconds": 0.0}
    if cfg.resume:
        state = checkpoint.resume(out, model, optimizer, state, accelerator)
    segments = state.get("schedule") or [{"from": 0, "total": total}]  # older checkpoints: the plain schedule
    state["schedule"] = lengthened(segments, state["step"], total, cfg.warmup, cfg.lr)
    _deepspeed_batch_size(accelerator, cfg.batch_size)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    if "_sharded_optimizer" in state:  # a sharded optimizer's state is loaded once it is sharded again
        optimizer.load_state_dict(state.pop("_sharded_optimizer"))
    device = accelerator.device
    params = list(wrapped.parameters())  # all of them: accelerate's FSDP clipping expects the module's own
    if accelerator.is_main_process:
        write_json(out / "run.json", {**(run_info or {}), "train": asdict(cfg), "total_steps": total,
                                      "processes": world, "distributed": str(accelerator.distributed_type.value),
                                      "method_config": {"method": peft.method_name(method_config),
                                                        **asdict(method_config)}})
        _rewrite_metrics(out, state["step"])
    if cfg.report_to != "none":
        accelerator.init_trackers("lmlab", config={k: v for k, v in asdict(cfg).items() if v is not None})

    bar = _progress(total, state["step"], cfg.progress and accelerator.is_local_main_process, task.name)
    wrapped.train()
    step, window, window_tokens, window_t0 = state["step"], [], 0, time.time()
    start_time = time.time() - state["seconds"]

    def evaluate() -> dict:
        with accelerator.autocast():
            return validate(task, wrapped, accelerator, device)

    with _stop_requests() as stop:
        while step < total:
            lr = scheduled_lr(step, state["schedule"], cfg.warmup, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg.grad_accum):
                # accumulate(): no gradient all-reduce before the last micro-batch, and backward()
                # divides the loss by grad_accum (DeepSpeed: its engine steps on the last one)
                with accelerator.accumulate(wrapped):
                    batch = task.collate(schedule.batch(step * cfg.grad_accum + micro, rank), device)
                    loss, metrics, tokens = task.loss(wrapped, batch)
                    accelerator.backward(loss)
                window.append({k: v.detach() if torch.is_tensor(v) else v for k, v in metrics.items()})
                window_tokens = window_tokens + tokens * world
            if cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            is_eval = step % cfg.eval_interval == 0 or step == total
            if step % cfg.log_interval == 0 or is_eval:
                row = {"step": step, "lr": lr, **{f"train_{k}": float(sum(w[k] for w in window)) / len(window)
                                                  for k in window[0]},
                       "tokens": int(window_tokens),
                       "tokens_per_s": float(window_tokens) / max(time.time() - window_t0, 1e-9), "val_loss": None}
                if is_eval:
                    row.update({f"val_{k}": v for k, v in evaluate().items()})
                    state["last_val_loss"] = row["val_loss"]
                bar.set_postfix({k.replace("train_", ""): f"{v:.4f}" for k, v in row.items()
                                 if k in ("train_loss", "val_loss") and v is not None})
                window, window_tokens, window_t0 = [], 0, time.time()
                state.update(step=step, seconds=time.time() - start_time)
                _log_row(out, row, accelerator if cfg.report_to != "none" else None)
                if is_eval:
                    checkpoint.save_checkpoints(out, accelerator, wrapped, method_config, optimizer, state, step,
                                                row["val_loss"])
                accelerator.wait_for_everyone()
            if _stop_now(stop, accelerator):  # SIGINT/SIGTERM: keep every completed step, then stop
                state.update(step=step, seconds=time.time() - start_time)
                checkpoint.save_last(out, accelerator, wrapped, method_config, optimizer, state)
                bar.close()
                raise Interrupted(f"stopped at step {step} of {total}, saved in {out / 'last'}; continue with --resume")
    bar.close()
    if cfg.report_to != "none":
        accelerator.end_training()
    if accelerator.is_main_process:
        task.plot(read_metrics(out), out, (run_info or {}).get("method", ""))
    accelerator.free_memory()  # the wrapped model and optimizer state go when the caller lets go
    return TrainResult(step, state["best_val_loss"], state["best_step"], state["last_val_loss"],
                       time.time() - start_time, str(out))


def validation_shard(size: int, rank: int, world: int, split: bool) -> list[int]:
    """The held-out items one process evaluates: every ``world``-th from ``rank`` when the
    processes split the set, else all of them."""
    return list(range(rank, size, world)) if split else list(range(size))


def validate(task: Task, wrapped, accelerator, device: torch.device) -> dict[str, float]:
    """The task's validation metrics over the whole held-out set. Under DDP (and ZeRO-1/2) each
    process scores its share with its own whole copy of the model and the sums are added up across
    processes; under FSDP / ZeRO-3 the parameters are gathered by the wrapper's forward only, which
    every process must run alike, so each process scores the whole set."""
    sharded = checkpoint.sharded_forward(accelerator)
    split = accelerator.num_processes > 1 and not sharded
    model = wrapped if sharded else accelerator.unwrap_model(wrapped)
    indices = validation_shard(task.val_size, accelerator.process_index, accelerator.num_processes, split)
    sums = task.evaluate(model, device, indices)
    totals = torch.stack([torch.stack([torch.as_tensor(s, dtype=torch.float32, device=device).reshape(()),
                                       torch.as_tensor(c, dtype=torch.float32, device=device).reshape(())])
                          for s, c in sums.values()])  # (metrics, 2): sum, count
    if split:
        totals = accelerator.reduce(totals, reduction="sum")
    return {name: float(t[0] / t[1].clamp(min=1)) for name, t in zip(sums, totals)}


def _stop_now(stop, accelerator) -> bool:
    """Whether to stop after this step. With several processes, one signalled process stops them
    all at the same step (each would otherwise wait for the others in a different collective)."""
    if accelerator.num_processes == 1:
        return stop.is_set()
    flag = torch.tensor(float(stop.is_set()), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum") > 0)


def _deepspeed_batch_size(accelerator, batch_size: int) -> None:
    """DeepSpeed configs usually leave the micro-batch size "auto", which accelerate fills from a
    DataLoader; the engine has none, so it says the size itself."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size


def _accelerator(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, out: Path):
    """One Accelerator per run. accelerate keeps its state in a process-wide singleton; a second
    run in the same process with another precision would be refused, so that part is reset."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=devices.mixed_precision(dtype),
                       gradient_accumulation_steps=cfg.grad_accum, log_with=_tracker(cfg.report_to),
                       project_dir=str(out))


def set_dropout(model, p: float) -> None:
    """Set the base model's dropout (not a method's own, e.g. LoRA's ``lora_dropout``)."""
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = p


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them
    (Chen et al. 2016): memory per layer falls from O(activations) to O(layer input), for ~1/3 more
    compute. Non-reentrant checkpointing needs no trainable input, so frozen embeddings are fine."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LmlabError(f"{type(model).__name__} does not support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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


def is_main_process() -> bool:
    """Whether this is the process that prints and writes (the only one outside ``accelerate launch``
    and torchrun). Read from the environment they set, not from accelerate's process state: asking
    that first would fix it (on the CPU, as a single process) before the engine's Accelerator exists."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _tracker(report_to: str):
    if report_to == "none":
        return None
    import importlib.util

    if importlib.util.find_spec(report_to) is None:
        raise LmlabError(f"--report-to {report_to} needs the {report_to} package: pip install {report_to}")
    return report_to


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from lmlab.progress import bar

    return bar(total=total, initial=initial, enabled=enabled, desc=desc, unit="step")


# --- metrics -----------------------------------------------------------------------------------


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):  # not another file's bytes
            rows.append(row)
    return rows


def _rewrite_metrics(out: Path, upto_step: int) -> None:
    """On resume, drop rows logged after the checkpoint (those steps will run again)."""
    rows = [r for r in read_metrics(out) if r["step"] <= upto_step]
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _log_row(out: Path, row: dict, accelerator) -> None:
    """One metrics.jsonl line (main process only; non-finite numbers as null: valid JSON)."""
    if not is_main_process():
        return
    row = json_safe(row)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if accelerator is not None:
        accelerator.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=row["step"])
