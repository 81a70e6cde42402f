"""Checkpoints of a training run: ``best/`` and ``last/`` written atomically, and resume.

``best/`` holds the method's files (a PEFT adapter for LoRA) at the lowest validation loss;
``last/`` also holds the trainable tensors, the optimizer state (one file per process when the
optimizer is sharded: FSDP, ZeRO), every process's random state and the step, so a resumed run
replays exactly what an uninterrupted one would have done. Under FSDP / ZeRO-3 the trainable
parameters are gathered from all processes first (every process takes part); only the main
process writes.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmlab import devices, peft
from lmlab.errors import LmlabError
from lmlab.io import atomic_dir, committed_dir, load_tensors, load_torch, read_json, save_tensors, write_json

STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"

if TYPE_CHECKING:
    from lmlab.engine import TrainConfig


def trainable_state(accelerator, wrapped) -> tuple[Any, dict | None, dict]:
    """(unwrapped model, full state dict or None, trainable tensors). Under FSDP / DeepSpeed the
    parameters are sharded across processes: ``get_state_dict`` gathers them (every process must
    call it); otherwise the unwrapped model's own tensors are the full state."""
    model = accelerator.unwrap_model(wrapped)
    names = [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]
    if sharded(accelerator):
        full = accelerator.get_state_dict(wrapped)
        return model, full, {n: full[n] for n in names if n in full}
    own = dict(model.named_parameters())
    return model, None, {n: own[n] for n in names}


def clean_name(name: str) -> str:
    """A parameter's name as the plain model has it (FSDP and activation checkpointing wrap modules)."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def save_checkpoints(out: Path, accelerator, wrapped, method_config, optimizer, state: dict, step: int,
                     val_loss: float) -> None:
    """After an evaluation: ``best`` (the method's files) if ``val_loss`` beats it, then ``last``."""
    if val_loss < state["best_val_loss"]:
        state.update(best_val_loss=val_loss, best_step=step)
        model, full, _ = trainable_state(accelerator, wrapped)
        if accelerator.is_main_process:
            with atomic_dir(out / "best") as tmp:
                peft.save(model, method_config, tmp, state_dict=full)
                write_json(tmp / STATE_FILE, {"step": step, "val_loss": val_loss})
    save_last(out, accelerator, wrapped, method_config, optimizer, state)


def sharded(accelerator) -> bool:
    """Whether each process holds only part of the parameters and optimizer state (FSDP, DeepSpeed)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def sharded_forward(accelerator) -> bool:
    """Whether the parameters themselves are split across processes between forwards (FSDP, ZeRO-3),
    so that every forward must go through the wrapper on every process alike; ZeRO-1/2 split only
    the optimizer state and gradients."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 3) == 3


def save_last(out: Path, accelerator, wrapped, method_config, optimizer, state: dict) -> None:
    """``last/``: the method's files, the trainable tensors, the optimizer and random state, the step.
    Sharded optimizers (FSDP, ZeRO) hold a different part on every process: each process stages its
    own ``optimizer.rank<N>.pt`` and the main process moves them into the folder before it commits."""
    model, full, trainable = trainable_state(accelerator, wrapped)
    optim_state = {"optimizer": optimizer.state_dict(), "rng": devices.rng_state()}
    if accelerator.num_processes > 1 and not sharded(accelerator):
        from accelerate.utils import gather_object

        # each process drew its own dropout masks (batches differ in shape): keep every generator
        optim_state["rng_per_rank"] = gather_object([optim_state["rng"]])
    if accelerator.scaler is not None:
        optim_state["scaler"] = accelerator.scaler.state_dict()
    is_sharded = sharded(accelerator)
    staging = out / f".last.rank-optimizers.{state['step']}"
    if is_sharded:
        staging.mkdir(exist_ok=True)
        torch.save(optim_state, staging / f"optimizer.rank{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        import shutil

        with atomic_dir(out / "last") as tmp:
            peft.save(model, method_config, tmp, state_dict=full)  # first: full.save replaces the folder it is given
            save_tensors(tmp / TRAINABLE_FILE, trainable)
            if is_sharded:
                for part in staging.iterdir():
                    part.rename(tmp / part.name)
            else:
                torch.save(optim_state, tmp / OPTIMIZER_FILE)
            write_json(tmp / STATE_FILE, state)
        shutil.rmtree(staging, ignore_errors=True)
    if is_sharded:
        accelerator.wait_for_everyone()  # the staging folder is gone before any process saves again


def resume(out: Path, model, optimizer, state: dict, accelerator) -> dict:
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
    ranked = last / f"optimizer.rank{accelerator.process_index}.pt"
    if (last / OPTIMIZER_FILE).exists():
        saved_optim = _optimizer_file(last / OPTIMIZER_FILE)
        optimizer.load_state_dict(saved_optim["optimizer"])  # moves the state to the parameters' device
    elif ranked.exists():  # a sharded run: the optimizer is restored after accelerate wraps it (see fit)
        saved_optim = _optimizer_file(ranked)
        state = {**state, "_sharded_optimizer": saved_optim["optimizer"]}
    else:
        raise LmlabError(f"--resume: {last} has no optimizer state for process {accelerator.process_index} "
                         f"(was it written by a run with another number of processes?)")
    per_rank = saved_optim.get("rng_per_rank") or []
    rank_rng = per_rank[accelerator.process_index] if len(per_rank) == accelerator.num_processes else None
    devices.set_rng_state(rank_rng or saved_optim["rng"])  # dropout draws continue as if never stopped
    if "scaler" in saved_optim and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved_optim["scaler"])
    saved = read_json(last / STATE_FILE)
    if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
        raise LmlabError(f"--resume: {last / STATE_FILE} is not a trainer state")
    # written as null when not yet finite (valid JSON): no best yet, no evaluation yet
    saved["best_val_loss"] = float("inf") if saved.get("best_val_loss") is None else saved["best_val_loss"]
    saved["last_val_loss"] = float("nan") if saved.get("last_val_loss") is None else saved["last_val_loss"]
    if accelerator.is_main_process:
        import sys

        print(f"lmlab: resuming {out} at step {saved['step']}", file=sys.stderr, flush=True)
    return {**state, **saved}


def _optimizer_file(path: Path) -> dict:
    """A saved optimizer state: tensors and plain containers only (``io.load_torch``)."""
    saved = load_torch(path)
    if not isinstance(saved, dict) or "optimizer" not in saved or "rng" not in saved:
        raise LmlabError(f"--resume: {path} is not an optimizer state lmlab wrote")
    return saved


def check_out_dir(cfg: TrainConfig) -> Path:
    """Fail before any work if the out dir is unwritable, is in use by another run (``lock_out_dir``),
    or holds a run and --resume was not given."""
    out = Path(cfg.out_dir)
    _check_writable(out)
    lock_out_dir(out)
    has_run = committed_dir(out / "last") is not None
    if has_run and not cfg.resume:
        raise LmlabError(f"{out} already holds a run; pass --resume to continue it or choose another --out-dir")
    if cfg.resume and not has_run:
        raise LmlabError(f"--resume: {out} has no checkpoint to resume from")
    clear_leftovers(out)
    return out


def clear_leftovers(out: Path) -> None:
    """Remove what killed runs left half-written in ``out``: ``atomic_path`` / ``atomic_dir``
    temporaries (``.<name>.<random>.tmp``, a full checkpoint each) and sharded saves' staging
    folders, which would otherwise pile up with every kill. Only while this process holds the
    folder's lock (no other run writes there). A swapped-out ``.<name>.old`` goes only beside its
    ``<name>`` (a kill after the swap, before its removal); alone, it is the checkpoint
    (``io.committed_dir``)."""
    import shutil

    import re

    if out.resolve() not in _held:
        return
    ours = r"(last|best|run\.json|metrics\.jsonl|trainer_state\.json|loss\.png|dpo\.png|result\.json" \
           r"|results\.csv|results\.md|val_loss\.png)"  # only what lmlab writes: --out-dir may be anyone's
    for entry in out.iterdir():
        name = entry.name
        if (re.fullmatch(rf"\.{ours}\..+\.tmp", name) or re.fullmatch(r"\.(last|best)\.rank-optimizers\..*", name)
                or (re.fullmatch(r"\.(last|best)\.old", name) and (out / name[1:-4]).exists())):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextmanager
def run_dir(cfg: TrainConfig):
    """``check_out_dir`` for the length of a run, the folder unlocked after it; a run that fails
    before writing anything there (bad data, a mistyped model) removes the folder it created, so
    an input error leaves no empty out folder behind."""
    import shutil

    out = Path(cfg.out_dir)
    fresh = not out.exists()
    taken = Path(out).resolve() not in _held
    try:
        check_out_dir(cfg)
        yield out
    except BaseException:
        if fresh and out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_FILE}:
            unlock_out_dir(out)
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if taken:
            unlock_out_dir(out)


def child_dir(parent: str | Path, name: str) -> Path:
    """``parent/name`` for a ``name`` that comes from data or a config (a sweep's run): one plain
    folder name, so that nothing is written outside ``parent`` (no ``..``, no absolute path, no
    separator, no leading dot that would hide it)."""
    import os

    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if (not isinstance(name, str) or not name or name.startswith(".") or "\0" in name
            or any(sep in name for sep in separators)):
        raise LmlabError(f"{name!r} is not a plain folder name inside {parent} (no separators, no leading dot)")
    return Path(parent) / name


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{id(out)}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise LmlabError(f"cannot write to out dir {out}: {exc.strerror or exc}") from None


# --- one run per folder ---------------------------------------------------------------------------

LOCK_FILE = ".lmlab.lock"
_held: dict[Path, Any] = {}  # resolved folder -> open lock file (this process's locks)


def lock_out_dir(out: str | Path) -> bool:
    """Claim ``out`` for this process: a second run (finetune, dpo, sweep) on the same folder is
    refused in one line while this one lives. An OS lock (``flock``) on ``out/.lmlab.lock``: the
    kernel drops it when the process ends, however it ends, so the lock of a killed run is never
    stale; the file only names the holder (pid, host) for the message. Re-entrant in one process
    (``finetune.run`` and the engine both check the folder); only the main process of a
    torchrun / ``accelerate launch`` run locks, its other ranks share the folder. Returns whether
    this call took the lock (False: already held here, or another rank's). Without ``fcntl``
    (Windows) there is no lock."""
    import os
    import socket

    try:
        import fcntl
    except ImportError:  # Windows: no flock; two runs on one folder are not detected there
        return False
    key = Path(out).resolve()
    if key in _held or int(os.environ.get("RANK", "0")) != 0:  # as engine.is_main_process
        return False
    path = key / LOCK_FILE
    try:
        key.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise LmlabError(f"cannot write to out dir {out}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise LmlabError(f"{out} is in use by another lmlab run ({holder}); wait for it to end or choose "
                         "another --out-dir") from None
    handle.seek(0)
    left = handle.read().split()  # a holder that ends cleanly empties the file
    if len(left) == 4 and left[3] == socket.gethostname() and left[1].isdigit() and not _alive(int(left[1])):
        import sys

        print(f"lmlab: {out}: its last run (pid {left[1]}) was killed; this run takes the folder over",
              file=sys.stderr)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    if not _held:
        import atexit

        atexit.register(_release_all)
    _held[key] = handle
    return True


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def unlock_out_dir(out: str | Path) -> None:
    """Release this process's lock on ``out`` (a no-op if it holds none)."""
    handle = _held.pop(Path(out).resolve(), None)
    if handle is not None:
        handle.seek(0)
        handle.truncate()  # an empty file: the next run knows this one ended cleanly
        handle.close()  # closing the last descriptor releases the flock


def _release_all() -> None:
    for key in list(_held):
        unlock_out_dir(key)


@contextmanager
def out_dir_lock(out: str | Path):
    """``lock_out_dir`` for the length of a ``with`` block (released after it if taken by it)."""
    taken = lock_out_dir(out)
    try:
        yield
    finally:
        if taken:
            unlock_out_dir(out)
