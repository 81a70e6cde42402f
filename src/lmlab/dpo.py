"""Direct preference optimisation (Rafailov et al. 2023, "Direct Preference Optimization").

For a prompt x with a preferred completion y_w and a rejected one y_l, the loss (Eq. 7) is

    −log σ(β [(log πθ(y_w|x) − log π_ref(y_w|x)) − (log πθ(y_l|x) − log π_ref(y_l|x))]),

with log π(y|x) summed over the completion tokens only. β(log πθ − log π_ref) is the implicit
reward of a completion; the run logs both rewards, their margin and the share of pairs where the
chosen reward is higher (preference accuracy).

The reference never changes, so its log-probabilities are computed once per pair before training
and cached in the run folder (as TRL's ``precompute_ref_log_probs``): with LoRA from the same
model with the adapter disabled (``lora.disabled``, no second copy), with every other method (full,
adapter, prefix, BitFit) from the model as it is before the first step, so no frozen copy stays
in memory either and the first step's loss is log 2. Chosen and rejected
completions go through one forward pass, left-padded so their tokens sit in the last k columns
and the LM head runs there only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.data import Encoded, left_pad_batch
from lmlab.errors import LmlabError
from lmlab.models import last_block_on_rows

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


def completion_logps(model, items: list[Encoded], pad_id: int, device=None) -> torch.Tensor:
    """Σ log p(completion tokens | prompt) per item, (N,); the head runs on the last k + 1 columns.
    The batch is made on ``device`` (default: the model's)."""
    from lmlab.devices import model_device

    ids, mask, pos, labels = left_pad_batch(items, pad_id, device=device or model_device(model))  # labels (N, k)
    k = labels.shape[1]
    with last_block_on_rows(model):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=k + 1,
                       use_cache=False).logits[:, :-1].float()  # (N, k, V)
    logp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * (labels != -100)).sum(-1)


def pair_items(pairs: list[Pair]) -> list[Encoded]:
    """The chosen completions, then the rejected ones, each after its prompt (one batch)."""
    return [Encoded(p.prompt_ids, p.chosen_ids, 0) for p in pairs] + \
           [Encoded(p.prompt_ids, p.rejected_ids, 0) for p in pairs]


def pair_logps(model, pairs: list[Pair], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probabilities of a batch of pairs from one forward pass."""
    logps = completion_logps(model, pair_items(pairs), pad_id, device)
    return logps[:len(pairs)], logps[len(pairs):]


# --- data ------------------------------------------------------------------------------------


def read_pairs(path: str | Path) -> list[dict]:
    from lmlab.data import read_jsonl

    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no such file: {path}")
    rows = read_jsonl(path)
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
    """The reference policy's log-probabilities: ``model`` as it is now, LoRA adapters disabled
    (on the model's device; returned on the CPU, where they are cached)."""
    from lmlab.peft import lora

    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    with lora.disabled(model):
        for start in range(0, len(pairs), batch_size):
            c, r = pair_logps(model, pairs[start:start + batch_size], pad_id)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


METRICS = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy")  # per pair, averaged


@torch.no_grad()
def pair_metric_sums(model, pairs: list[Pair], ref: tuple[torch.Tensor, torch.Tensor], pad_id: int, beta: float,
                     batch_size: int, device=None) -> dict[str, tuple[torch.Tensor, int]]:
    """Per metric of ``METRICS``, (its sum over ``pairs``, the number of pairs), in eval mode;
    ``ref`` holds the pairs' reference log-probabilities, row for row."""
    from lmlab.devices import model_device

    device = device or model_device(model)
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(METRICS), device=device)
    for start in range(0, len(pairs), batch_size):
        c, r = pair_logps(model, pairs[start:start + batch_size], pad_id, device)
        window = slice(start, start + batch_size)
        losses, chosen, rejected = dpo_loss(c.float(), r.float(), ref[0][window].to(device),
                                            ref[1][window].to(device), beta)
        margin = chosen - rejected
        sums = sums + torch.stack([x.sum() for x in (losses, chosen, rejected, margin, (margin > 0).float())])
    model.train(was_training)
    return {name: (sums[i], len(pairs)) for i, name in enumerate(METRICS)}


class DpoTask:
    """The engine's task for DPO: batches of pairs (chosen and rejected in one forward pass, with
    their cached reference log-probabilities), the DPO loss, and the held-out pairs' loss, rewards,
    margin and preference accuracy."""

    name = "DPO"

    def __init__(self, train_pairs: list[Pair], val_pairs: list[Pair], ref_train, ref_val, pad_id: int,
                 config: DpoConfig, eval_batch_size: int):
        self.train_pairs, self.val_pairs, self.ref_train, self.ref_val = train_pairs, val_pairs, ref_train, ref_val
        self.pad_id, self.config, self.eval_batch_size = pad_id, config, eval_batch_size
        self.lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in train_pairs]
        self.val_size = len(val_pairs)

    def collate(self, indices: list[int], device):
        batch = left_pad_batch(pair_items([self.train_pairs[i] for i in indices]), self.pad_id, device=device)
        index = torch.tensor(indices, device=self.ref_train[0].device)  # the cached log-probs stay on the CPU
        return batch, self.ref_train[0][index].to(device), self.ref_train[1][index].to(device)

    def loss(self, model, batch):
        (ids, mask, pos, labels), ref_chosen, ref_rejected = batch
        k = labels.shape[1]
        with last_block_on_rows(model):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=k + 1,
                           use_cache=False).logits[:, :-1].float()  # (2N, k, V)
        logp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0)[..., None])[..., 0]
        logps = (logp * (labels != -100)).sum(-1)
        n = len(ref_chosen)
        losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref_chosen, ref_rejected, self.config.beta)
        margin = chosen - rejected
        metrics = {"loss": losses.mean().detach(), "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean(),
                   "margin": margin.mean(), "accuracy": (margin > 0).float().mean()}
        return losses.mean(), metrics, mask.sum()

    def evaluate(self, model, device, indices: list[int]) -> dict:
        index = torch.tensor(indices, dtype=torch.long, device=self.ref_val[0].device)
        return pair_metric_sums(model, [self.val_pairs[i] for i in indices],
                                (self.ref_val[0][index], self.ref_val[1][index]), self.pad_id, self.config.beta,
                                self.eval_batch_size, device)

    def plot(self, rows: list[dict], out_dir: Path, title: str) -> None:
        plot_curves(rows, out_dir / "dpo.png")


def train_dpo(model, tokenizer, method_config, train_pairs: list[Pair], val_pairs: list[Pair], config: DpoConfig,
              cfg, run_info: dict | None = None, reference=None) -> dict:
    """DPO with ``cfg`` (an ``engine.TrainConfig``) on the shared engine: length-grouped batches of
    pairs in a seeded order, AdamW with warm-up and cosine decay, gradient clipping, best/ and last/
    checkpoints, metrics.jsonl, resume, Ctrl-C, devices, mixed precision, ``accelerate launch``.

    ``reference``: a zero-argument callable returning another reference model (same vocabulary),
    called only when the reference log-probabilities are computed and dropped right after; by
    default the reference is ``model`` itself as it is now, LoRA adapters disabled."""
    from lmlab.engine import check_out_dir, fit, read_metrics
    from lmlab.io import load_tensors, save_tensors

    out = check_out_dir(cfg)
    pad_id = tokenizer.pad_token_id
    ref_path = out / REF_FILE
    if cfg.resume and ref_path.exists():
        saved = load_tensors(ref_path)
        ref_train, ref_val = (saved["train_chosen"], saved["train_rejected"]), (saved["val_chosen"], saved["val_rejected"])
    else:
        from lmlab import devices

        ref_model = reference() if reference is not None else model
        device = devices.model_device(model)
        dtype = devices.select_dtype(cfg.dtype, device, warn_slow=False)
        # the same autocast the engine runs the policy under, so that at step 0 policy = reference
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            ref_train = reference_logps(ref_model, train_pairs, pad_id, 2 * cfg.batch_size)
            ref_val = reference_logps(ref_model, val_pairs, pad_id, 2 * cfg.batch_size)
        del ref_model
        from lmlab.engine import is_main_process

        if is_main_process():
            save_tensors(ref_path, {"train_chosen": ref_train[0], "train_rejected": ref_train[1],
                                    "val_chosen": ref_val[0], "val_rejected": ref_val[1]})
    task = DpoTask(train_pairs, val_pairs, ref_train, ref_val, pad_id, config, 2 * cfg.batch_size)
    result = fit(model, task, method_config, cfg, {**(run_info or {}), "dpo": asdict(config)})
    return {**asdict(result), "final": read_metrics(out)[-1]}


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
        if ax.get_legend_handles_labels()[0]:
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

