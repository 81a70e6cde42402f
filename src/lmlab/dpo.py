"""Direct preference optimisation (Rafailov et al. 2023, "Direct Preference Optimization").

For a prompt x with a preferred completion y_w and a rejected one y_l, the loss (Eq. 7) is

    −log σ(β [(log πθ(y_w|x) − log π_ref(y_w|x)) − (log πθ(y_l|x) − log π_ref(y_l|x))]),

with log π(y|x) summed over the completion tokens only. β(log πθ − log π_ref) is the implicit
reward of a completion; the run logs both rewards, their margin and the share of pairs where the
chosen reward is higher (preference accuracy).

The reference never changes, so its log-probabilities are computed once per pair before training
and cached in the run folder (as TRL's ``precompute_ref_log_probs``): with LoRA from the same
model with the adapter disabled (``lora.disabled``, no second copy), with full fine-tuning from
the weights before the first step, so no frozen copy stays in memory either. Chosen and rejected
completions go through one forward pass, left-padded so their tokens sit in the last k columns
and the LM head runs there only.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.data import Encoded, left_pad_batch
from lmlab.errors import Interrupted, LmlabError

REF_FILE = "ref_logps.safetensors"


@dataclass(frozen=True)
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True, kw_only=True)
class DpoConfig:
    beta: float = 0.1
    max_length: int = 512  # longest prompt + completion in tokens

    def __post_init__(self):
        if not self.beta > 0 or not math.isfinite(self.beta):
            raise LmlabError(f"beta must be a positive number, got {self.beta}")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (Eq. 7) and the chosen and rejected implicit rewards β(log πθ − log π_ref)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def completion_logps(model, items: list[Encoded], pad_id: int) -> torch.Tensor:
    """Σ log p(completion tokens | prompt) per item, (N,); the head runs on the last k + 1 columns."""
    ids, mask, pos, labels = left_pad_batch(items, pad_id)  # labels (N, k), -100 on padding
    k = labels.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=k + 1,
                   use_cache=False).logits[:, :-1].float()  # (N, k, V)
    logp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * (labels != -100)).sum(-1)


def pair_logps(model, pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probabilities of a batch of pairs from one forward pass."""
    items = [Encoded(p.prompt_ids, p.chosen_ids, 0) for p in pairs] + \
            [Encoded(p.prompt_ids, p.rejected_ids, 0) for p in pairs]
    logps = completion_logps(model, items, pad_id)
    return logps[:len(pairs)], logps[len(pairs):]


def batch_metrics(losses, chosen_rewards, rejected_rewards) -> dict:
    margin = chosen_rewards - rejected_rewards
    return {"loss": losses.mean().item(), "chosen_reward": chosen_rewards.mean().item(),
            "rejected_reward": rejected_rewards.mean().item(), "margin": margin.mean().item(),
            "accuracy": (margin > 0).float().mean().item()}


# --- data ------------------------------------------------------------------------------------


def read_pairs(path: str | Path) -> list[dict]:
    from lmlab.data import _read_jsonl

    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no such file: {path}")
    rows = _read_jsonl(path)
    if not rows:
        raise LmlabError(f"{path}: no preference pairs")
    for n, row in enumerate(rows, 1):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise LmlabError(f"{path}:{n}: missing {key!r} (each line needs prompt, chosen and rejected)")
        for key in ("chosen", "rejected"):
            if not row[key].strip():
                raise LmlabError(f"{path}:{n}: empty {key!r} completion")
    return rows


def encode_pairs(tokenizer, rows: list[dict], config: DpoConfig, context: int | None = None) -> list[Pair]:
    """Prompt and completions tokenised separately (completions end with EOS, as TRL's do)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    limit = min(config.max_length, context or config.max_length)
    pairs = []
    for n, row in enumerate(rows, 1):
        prompt = tokenizer(row["prompt"])["input_ids"]
        chosen = tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + eos
        rejected = tokenizer(row["rejected"], add_special_tokens=False)["input_ids"] + eos
        longest = len(prompt) + max(len(chosen), len(rejected))
        if longest > limit:
            raise LmlabError(f"pair {n}: prompt + completion is {longest} tokens, over the limit of {limit} "
                             f"(--max-length {config.max_length}, model context {context})")
        pairs.append(Pair(prompt, chosen, rejected))
    return pairs


# --- training --------------------------------------------------------------------------------


@torch.no_grad()
def reference_logps(model, pairs: list[Pair], pad_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference policy's log-probabilities: ``model`` as it is now, LoRA adapters disabled."""
    from lmlab.peft import lora

    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    with lora.disabled(model):
        for start in range(0, len(pairs), batch_size):
            c, r = pair_logps(model, pairs[start:start + batch_size], pad_id)
            chosen.append(c)
            rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def evaluate_pairs(model, pairs: list[Pair], ref: tuple[torch.Tensor, torch.Tensor], pad_id: int, beta: float,
                   batch_size: int) -> dict:
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(pairs), batch_size):
        c, r = pair_logps(model, pairs[start:start + batch_size], pad_id)
        parts.append(dpo_loss(c, r, ref[0][start:start + batch_size], ref[1][start:start + batch_size], beta))
    model.train(was_training)
    return batch_metrics(*(torch.cat(x) for x in zip(*parts)))


def train_dpo(model, tokenizer, method_config, train_pairs: list[Pair], val_pairs: list[Pair], config: DpoConfig,
              cfg, run_info: dict | None = None, reference=None) -> dict:
    """DPO with ``cfg`` (a ``train.TrainConfig``): batches of pairs in a seeded order, AdamW with
    warm-up and cosine decay, best/ and last/ checkpoints, metrics.jsonl, resume, Ctrl-C safe.

    ``reference``: a zero-argument callable returning another reference model (same vocabulary),
    called only when the reference log-probabilities are computed and dropped right after; by
    default the reference is ``model`` itself as it is now, LoRA adapters disabled."""
    import random

    from lmlab import peft
    from lmlab.io import load_tensors, save_tensors, write_json
    from lmlab.train import (
        _log_row,
        _progress,
        _resume,
        _rewrite_metrics,
        _save_checkpoints,
        _save_last,
        _stop_requests,
        check_out_dir,
        lr_at,
        read_metrics,
    )

    out = check_out_dir(cfg)
    torch.manual_seed(cfg.seed)
    pad_id = tokenizer.pad_token_id
    per_epoch = max(1, len(train_pairs) // cfg.batch_size)
    total = cfg.max_iters or max(1, int(cfg.epochs * per_epoch // cfg.grad_accum))
    warmup = int(cfg.warmup * total)
    ref_path = out / REF_FILE
    if cfg.resume and ref_path.exists():
        saved = load_tensors(ref_path)
        ref_train, ref_val = (saved["train_chosen"], saved["train_rejected"]), (saved["val_chosen"], saved["val_rejected"])
    else:
        ref_model = reference() if reference is not None else model
        ref_train = reference_logps(ref_model, train_pairs, pad_id, 2 * cfg.batch_size)
        ref_val = reference_logps(ref_model, val_pairs, pad_id, 2 * cfg.batch_size)
        del ref_model
        save_tensors(ref_path, {"train_chosen": ref_train[0], "train_rejected": ref_train[1],
                                "val_chosen": ref_val[0], "val_rejected": ref_val[1]})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"step": 0, "best_val_loss": float("inf"), "best_step": 0, "last_val_loss": float("nan"), "seconds": 0.0}
    if cfg.resume:
        state = _resume(out, model, optimizer, state)
    write_json(out / "run.json", {**(run_info or {}), "train": asdict(cfg), "dpo": asdict(config), "total_steps": total,
                                  "method_config": {"method": peft.method_name(method_config), **asdict(method_config)}})
    _rewrite_metrics(out, state["step"])
    bar = _progress(total, state["step"], cfg.progress)
    model.train()
    step, start_time, window = state["step"], time.time() - state["seconds"], []
    with _stop_requests() as stop:
        while step < total:
            lr = lr_at(step, total, warmup, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg.grad_accum):
                index = step * cfg.grad_accum + micro
                epoch, pos = divmod(index, per_epoch)
                order = list(range(len(train_pairs)))
                random.Random(cfg.seed + epoch).shuffle(order)
                idx = order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
                chosen, rejected = pair_logps(model, [train_pairs[i] for i in idx], pad_id)
                parts = dpo_loss(chosen, rejected, ref_train[0][idx], ref_train[1][idx], config.beta)
                (parts[0].mean() / cfg.grad_accum).backward()
                window.append(batch_metrics(*parts))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            is_eval = step % cfg.eval_interval == 0 or step == total
            if step % cfg.log_interval == 0 or is_eval:
                row = {"step": step, "lr": lr, **{f"train_{k}": sum(w[k] for w in window) / len(window) for k in window[0]}}
                window = []
                if is_eval:
                    val = evaluate_pairs(model, val_pairs, ref_val, pad_id, config.beta, 2 * cfg.batch_size)
                    row.update({f"val_{k}": v for k, v in val.items()})
                    state["last_val_loss"] = val["loss"]
                    bar.set_postfix(margin=f"{val['margin']:.3f}", acc=f"{val['accuracy']:.2f}")
                state.update(step=step, seconds=time.time() - start_time)
                _log_row(out, row, None)
                if is_eval:
                    _save_checkpoints(out, model, method_config, optimizer, state, step, row["val_loss"])
            if stop.is_set():
                state.update(step=step, seconds=time.time() - start_time)
                _save_last(out, model, method_config, optimizer, state)
                bar.close()
                raise Interrupted(f"stopped at step {step} of {total}, saved in {out / 'last'}; continue with --resume")
    bar.close()
    plot_curves(read_metrics(out), out / "dpo.png")
    return {"steps": step, "best_val_loss": state["best_val_loss"], "best_step": state["best_step"],
            "last_val_loss": state["last_val_loss"], "seconds": time.time() - start_time, "out_dir": str(out),
            "final": read_metrics(out)[-1]}


def plot_curves(rows: list[dict], path: Path) -> None:
    """Reward margin and preference accuracy against steps, training and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmlab.io import write_atomic

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "margin", "reward margin"), (axes[1], "accuracy", "preference accuracy")):
        for split, style in (("train", "-"), ("val", "o-")):
            points = [(r["step"], r[f"{split}_{key}"]) for r in rows if r.get(f"{split}_{key}") is not None]
            if points:
                ax.plot(*zip(*points), style, label=split)
        ax.set(xlabel="step", title=title)
        ax.legend()
        ax.grid(alpha=0.3)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def split_pairs(rows: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    if not 0 < val_fraction < 1:
        raise LmlabError(f"val fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(rows) * (1 - val_fraction))
    if cut == 0 or cut == len(rows):
        raise LmlabError(f"{len(rows)} pairs are too few to hold out a validation fraction of {val_fraction}")
    return rows[:cut], rows[cut:]

