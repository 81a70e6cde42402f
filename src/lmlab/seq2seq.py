"""Fine-tuning an encoder-decoder model (T5, Raffel et al. 2020; BART): the engine's task for it,
and its label scores for classification.

The items are the same ``Encoded`` (prompt ids, completion ids) a decoder-only model trains on, read
the other way round: the encoder reads the prompt (for summarization the template around the post,
e.g. T5's ``summarize: {post}``), and the decoder's labels are the completion (the summary and its
EOS). The decoder reads the labels shifted right behind its start token (teacher forcing, as
transformers does when given ``labels``), and the loss is the mean cross-entropy of the label
tokens, padding (-100) excluded. Checkpoints, resume, best/last, metrics and trackers are the
engine's (``lmlab.engine.fit``), unchanged. Classification falls out the same way: the prompt in
the encoder, the label word as the decoder's target (T5's text-to-text form), scored by the
decoder's log-probabilities of each label's tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.data import Encoded
from lmlab.errors import LmlabError

TASKS = ("summarization", "classification")  # what an encoder-decoder model runs for here


def is_seq2seq(model_or_config) -> bool:
    """Whether a model (or its config) is an encoder-decoder."""
    config = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(config, "is_encoder_decoder", False))


def check_task(task: str, name: str) -> None:
    """One line for a task an encoder-decoder model is not fine-tuned or evaluated for here."""
    if task not in TASKS:
        raise LmlabError(f"{name} is an encoder-decoder model: lmlab runs it for --task summarization or "
                         f"classification, not {task}")


def collate(items: list[Encoded], pad_id: int, *, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded encoder ids and attention mask (B, T) and decoder labels (B, L), -100 past each
    label's end. Built on the CPU, then moved to ``device`` in one transfer per tensor."""
    cpu = torch.device("cpu")
    width, k = max(len(it.prompt_ids) for it in items), max(len(it.completion_ids) for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long, device=cpu)
    mask = torch.zeros((len(items), width), dtype=torch.long, device=cpu)
    labels = torch.full((len(items), k), -100, dtype=torch.long, device=cpu)
    for i, it in enumerate(items):
        input_ids[i, :len(it.prompt_ids)] = torch.tensor(it.prompt_ids, device=cpu)
        mask[i, :len(it.prompt_ids)] = 1
        target = it.completion_ids if it.loss_mask is None else \
            [t if keep else -100 for t, keep in zip(it.completion_ids, it.loss_mask, strict=True)]
        labels[i, :len(target)] = torch.tensor(target, device=cpu)
    device = torch.device(device)
    return tuple(t.to(device, non_blocking=device.type == "cuda") for t in (input_ids, mask, labels))


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """The decoder's input: ``start_id``, then the labels but the last, -100 read as ``pad_id``
    (T5's ``_shift_right``); (B, L) -> (B, L), on the labels' device."""
    shifted = labels.new_full(labels.shape, pad_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start_id
    return shifted.masked_fill(shifted == -100, pad_id)


def seq2seq_loss(model, input_ids, attention_mask, labels, start_id: int, pad_id: int):
    """Mean cross-entropy of the label tokens under teacher forcing, and their count (a 0-d tensor
    on the device); equals transformers' ``model(..., labels=labels).loss``."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                decoder_input_ids=shift_right(labels, start_id, pad_id), use_cache=False)
    logits = out.logits  # (B, L, V)
    n = (labels != -100).sum()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, reduction="sum") / n.clamp(min=1)
    return loss, n


def decoder_ids(model) -> tuple[int, int]:
    """(decoder start id, pad id) from the model's config (T5: both the pad id)."""
    config = model.config
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
    if start is None:
        raise LmlabError(f"{type(model).__name__}'s config names no decoder_start_token_id nor pad_token_id")
    return start, config.pad_token_id if config.pad_token_id is not None else start


def task(model, tokenizer, train_items: list[Encoded], val_items: list[Encoded], eval_batch_size: int):
    """The engine's task for an encoder-decoder ``model``: a ``train.LabelTask`` whose batches put
    the prompt in the encoder (right-padded, ``collate``) and the completion in the decoder's labels,
    with the loss of ``seq2seq_loss`` (the model's decoder start and pad ids)."""
    from lmlab.train import LabelTask

    start, decoder_pad = decoder_ids(model)
    pad_id = tokenizer.pad_token_id

    def loss(model, batch):
        input_ids, mask, labels = batch
        mean, n = seq2seq_loss(model, input_ids, mask, labels, start, decoder_pad)
        return mean, n, mask.sum() + n

    return LabelTask(train_items, val_items, pad_id, eval_batch_size,
                     batch=lambda items, device: collate(items, pad_id, device=device), loss=loss)


def label_logprobs(model, items: list[Encoded], completions: list[list[int]], pad_id: int,
                   batch_size: int) -> torch.Tensor:
    """log p(label tokens | prompt) for every item and label, summed over the label's tokens; (N, L).
    The encoder runs once per batch, and each label's decoder pass reads its output. Call under
    ``torch.inference_mode`` with the model in eval mode (``evaluate.label_logprobs`` does)."""
    from lmlab.devices import model_device

    device = model_device(model)
    start, decoder_pad = decoder_ids(model)
    scores = torch.empty(len(items), len(completions), device=device)
    for s in range(0, len(items), batch_size):
        batch = [Encoded(it.prompt_ids, [0], 0) for it in items[s:s + batch_size]]
        ids, mask, _ = collate(batch, pad_id, device=device)  # (B, T)
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
        for j, completion in enumerate(completions):
            labels = torch.tensor([completion], device=device).expand(len(batch), -1)  # (B, k)
            logits = model(encoder_outputs=encoded, attention_mask=mask, use_cache=False,
                           decoder_input_ids=shift_right(labels, start, decoder_pad)).logits  # (B, k, V)
            logp = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            scores[s:s + len(batch), j] = logp.sum(-1)
    return scores.cpu()
