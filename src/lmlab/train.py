"""Fine-tuning with the loss on label (or completion) tokens: classification and SFT's task for
the engine (``lmlab.engine``), and loading the checkpoints it writes.

Three things make it fast, and all hold on a GPU as on the CPU:

* the loss is on the label tokens only, and with left padding those sit in the last k columns of
  every row, so the LM head runs on k+1 positions instead of all T (``logits_to_keep``; the head
  is ~20 % of SmolLM2's FLOPs);
* so do the last block's attention output projection and MLP (``models.last_block_on_rows``:
  ~2.8 % of SmolLM2's matmul work, ~6 % of GPT-2's); its keys and values still read every position;
* batches group examples of similar length (little padding), in a seeded order that ``--resume``
  replays exactly (``engine.BatchSchedule``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab import peft
from lmlab.data import Encoded, left_pad_batch
from lmlab.models import last_block_on_rows
from lmlab.checkpoint import OPTIMIZER_FILE, STATE_FILE, TRAINABLE_FILE  # noqa: F401  (re-exported)
from lmlab.engine import (  # noqa: F401  (re-exported: the trainer's public names)
    TrainConfig,
    TrainResult,
    check_out_dir,
    fit,
    lr_at,
    read_metrics,
    set_dropout,
)
from lmlab.errors import LmlabError
from lmlab.io import committed_dir


def label_loss(model, input_ids, attention_mask, position_ids, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the label tokens (the last k columns of a left-padded batch).

    Logits at positions T-k-1 .. T-2 predict tokens T-k .. T-1, so only k+1 positions are projected.
    Returns the loss and the number of label tokens it averages over (a 0-d tensor on the device).
    """
    k = labels.shape[1]
    with last_block_on_rows(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=k + 1, use_cache=False)
    logits = out.logits[:, :-1, :]  # (B, k, V)
    n = (labels != -100).sum()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, reduction="sum") / n.clamp(min=1)
    return loss, n


def decoder_batch(items: list[Encoded], pad_id: int, device) -> tuple:
    """A decoder-only model's batch: prompt + completion rows, left-padded (``data.left_pad_batch``)."""
    return left_pad_batch(items, pad_id, device=device)


def decoder_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean label loss, label tokens, real tokens) of a ``decoder_batch``."""
    loss, n = label_loss(model, *batch)
    return loss, n, batch[1].sum()


@torch.no_grad()
def label_loss_sums(model, items: list[Encoded], batch_size: int, device, batch, loss,
                    progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed label-token loss, label tokens) over ``items`` in eval mode (merged LoRA, no
    dropout), batched by length; 0-d tensors on ``device``. ``batch(items, device)`` and
    ``loss(model, batch)`` read the items as a ``LabelTask`` does."""
    from lmlab.progress import bar

    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    for start in bar(range(0, len(order), batch_size), enabled=progress, desc="scoring", unit="batch"):
        mean, n, _ = loss(model, batch([items[i] for i in order[start:start + batch_size]], device))
        total, count = total + mean.float() * n, count + n
    model.train(was_training)
    return total, count


def validation_loss(model, items: list[Encoded], pad_id: int, batch_size: int, device=None,
                    progress: bool = False) -> float:
    """Label-token loss over ``items`` (eval mode: merged LoRA, no dropout), on ``device``
    (default: the model's)."""
    from lmlab.devices import model_device

    total, count = label_loss_sums(model, items, batch_size, device or model_device(model),
                                   lambda chunk, dev: decoder_batch(chunk, pad_id, dev), decoder_loss, progress)
    return float(total / count.clamp(min=1))


class LabelTask:
    """The engine's task for classification, SFT and summarization: ``Encoded`` items (prompt ids,
    completion ids), loss on the completion tokens, validation loss on held-out items. A decoder-only
    model reads ``decoder_batch``es; ``seq2seq.task`` gives an encoder-decoder its own ``batch``
    (prompt in the encoder, completion as the decoder's labels) and ``loss``."""

    name = "fine-tuning"

    def __init__(self, train_items: list[Encoded], val_items: list[Encoded], pad_id: int, eval_batch_size: int,
                 *, batch=None, loss=None):
        self.train_items, self.val_items, self.pad_id = train_items, val_items, pad_id
        self.eval_batch_size, self.val_size = eval_batch_size, len(val_items)
        self.lengths = [len(i) for i in train_items]
        self.batch = batch or (lambda items, device: decoder_batch(items, pad_id, device))
        self.items_loss = loss or decoder_loss

    def collate(self, indices: list[int], device):
        return self.batch([self.train_items[i] for i in indices], device)

    def loss(self, model, batch):
        loss, _, tokens = self.items_loss(model, batch)
        return loss, {"loss": loss}, tokens

    def evaluate(self, model, device, indices: list[int]) -> dict:
        return {"loss": label_loss_sums(model, [self.val_items[i] for i in indices], self.eval_batch_size, device,
                                        self.batch, self.items_loss)}

    def plot(self, rows: list[dict], out_dir: Path, title: str) -> None:
        from lmlab.plots import plot_losses

        plot_losses(rows, out_dir / "loss.png", title=f"{title} fine-tuning")


def train(model, tokenizer, method_config, train_items: list[Encoded], val_items: list[Encoded],
          cfg: TrainConfig, run_info: dict | None = None) -> TrainResult:
    """Fine-tune ``model`` (method already applied) on ``train_items``; see ``engine.fit``. An
    encoder-decoder model reads each prompt in its encoder and has the completion as its decoder's
    labels (``lmlab.seq2seq``)."""
    from lmlab import seq2seq

    if seq2seq.is_seq2seq(model):
        task = seq2seq.task(model, tokenizer, train_items, val_items, 2 * cfg.batch_size)
    else:
        task = LabelTask(train_items, val_items, tokenizer.pad_token_id, 2 * cfg.batch_size)
    return fit(model, task, method_config, cfg, run_info)


def load_checkpoint(path: str | Path, model_name: str | None = None, *, device="cpu", dtype=None,
                    bits: int | None = None):
    """``(model, tokenizer, run_info)`` for a checkpoint ``finetune`` wrote: ``RUN/best``, ``RUN/last``
    or ``RUN`` itself (meaning its best), on ``device`` in ``dtype`` (default fp32); also any PEFT
    adapter folder, or a hub id of one. The base model comes from the run's ``run.json`` (else the
    adapter's ``base_model_name_or_path``) unless ``model_name`` is given; the method is recognised
    from the checkpoint's files."""
    from lmlab.devices import is_quantized, model_dtype
    from lmlab.hub import download_adapter, looks_like_hub_id
    from lmlab.io import read_json
    from lmlab.models import load_model

    path = Path(path)
    if not path.exists() and looks_like_hub_id(str(path)):
        path = download_adapter(str(path))
    if (path / "run.json").exists():
        path = path / "best"
    found = committed_dir(path)
    if found is None:
        raise LmlabError(f"no checkpoint at {path}")
    run_file = found.parent / "run.json"
    run_info = read_json(run_file) if run_file.exists() else {}
    adapter_file = found / "adapter_config.json"
    adapter = read_json(adapter_file) if adapter_file.is_file() and not run_info else {}
    name = model_name or run_info.get("model") or adapter.get("base_model_name_or_path")
    if name is None:
        raise LmlabError(f"{found} has no run.json beside it; pass --model to name its base model")
    model, tokenizer = load_model(name, device=device, dtype=dtype, bits=bits)
    dtype = model_dtype(dtype, model.config, quiet=True) if dtype is not None else None  # T5: not fp16
    peft.load(model, found)
    if not is_quantized(model):
        model.to(device=device, dtype=dtype or torch.float32)  # the method's own weights too
    model.eval()
    return model, tokenizer, run_info
