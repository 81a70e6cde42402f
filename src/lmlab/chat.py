"""Instruction and chat data, one chat template from training to generation.

Reading: three common row formats become one list of ``{"role", "content"}`` messages:

* alpaca: ``instruction``, optional ``input`` (appended after a blank line), ``output``;
* ShareGPT: ``conversations`` of ``{"from", "value"}`` with ``from`` human / gpt / system;
* OpenAI-style: ``messages`` of ``{"role", "content"}`` (user / assistant / system).

Rendering: with the tokenizer's chat template (``apply_chat_template``), else the plain format
``PLAIN`` (GPT-2 has no template)::

    <system>\\n\\n            (when there is a system turn)
    User: <user>\\n
    Assistant: <reply><eos>\\n

The loss goes on every assistant turn (its reply and the end-of-turn the template writes after
it) and nothing else. The conversation is rendered prefix by prefix: up to an assistant turn with
the generation prompt, then through that turn; each difference is tokenised alone and the pieces
concatenated. A reply's tokens are then exactly those the model writes after the generation
prompt at inference, and no ``{% generation %}`` markers are needed (SmolLM2's template has none);
any template whose render of a prefix of a conversation is a prefix of the whole render works,
and one that is not (some templates drop earlier turns' reasoning) is one error.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.data import Encoded, TaskFormat
from lmlab.errors import LmlabError

SETTINGS = ("auto", "on", "off")
PLAIN = "User: ...\\nAssistant: ...<eos>"
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


# --- reading ---------------------------------------------------------------------------------


def messages_of(row: dict, where: str) -> list[dict]:
    """The ``{role, content}`` messages of one alpaca, ShareGPT or OpenAI-style row, checked."""
    if "messages" in row or "conversations" in row:
        turns = row.get("messages", row.get("conversations"))
        if not isinstance(turns, list) or not turns:
            raise LmlabError(f"{where}: 'messages' / 'conversations' must be a non-empty list of turns")
        messages = []
        for n, turn in enumerate(turns, 1):
            role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
            content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
            if role not in ROLES or not isinstance(content, str):
                raise LmlabError(f"{where}, turn {n}: expected {{role, content}} or {{from, value}} with a role of "
                                 f"{', '.join(ROLES)}, got {turn!r:.80}")
            messages.append({"role": ROLES[role], "content": content})
    elif "instruction" in row:
        fields = (row.get("instruction"), row.get("input") or "", row.get("output"))
        if not all(isinstance(f, str) for f in fields):
            raise LmlabError(f"{where}: alpaca rows need string instruction, output (and input)")
        instruction, extra, output = fields
        user = instruction.strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        raise LmlabError(f"{where}: not a chat row: expected 'messages' (role/content), 'conversations' "
                         f"(from/value) or 'instruction'/'output' (alpaca); keys: {', '.join(map(str, row))}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise LmlabError(f"{where}: no assistant turn with text (nothing to train on)")
    return messages


def read_conversations(source: str, val_fraction: float = 0.1) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, validation) conversations from one .jsonl (split by position, as summarization
    does) or a folder with train.jsonl and validation.jsonl; every row is checked."""
    from lmlab.data import read_jsonl
    from lmlab.sft import split_by_position

    path = Path(source)
    if path.is_dir():
        files = [path / f"{s}.jsonl" for s in ("train", "validation")]
        if not all(f.is_file() for f in files):
            raise LmlabError(f"{path} needs train.jsonl and validation.jsonl")
        named = [(f, read_jsonl(f)) for f in files]
    elif path.is_file():
        rows = read_jsonl(path)
        named = [(path, part) for part in split_by_position(rows, val_fraction)]
    else:
        raise LmlabError(f"chat data {path}: no such file or folder")
    out = []
    for (file, rows), split in zip(named, ("train", "validation")):
        if not rows:
            raise LmlabError(f"chat data {path}: the {split} split is empty")
        out.append([messages_of(row, f"{file} ({split} row {n})") for n, row in enumerate(rows, 1)])
    return out[0], out[1]


# --- rendering -------------------------------------------------------------------------------


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_template(setting: str | None, tokenizer, model=None, *, run_info: dict | None = None,
                 auto: bool = False) -> bool:
    """Whether prompts go through the tokenizer's chat template. ``on`` / ``off`` as said; ``auto``
    (or None): a run's recorded choice (``run_info["chat_template"]``), else ``auto`` (the
    command's default: on for ``--task chat`` and ``prompt``) when the tokenizer has a template and
    the model is not seq2seq. ``on`` without a template is one error."""
    if setting not in (None, *SETTINGS):
        raise LmlabError(f"--chat-template must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting in (None, "auto") and (run_info or {}).get("chat_template") in ("on", "off"):
        setting = run_info["chat_template"]
    if setting == "on":
        if not has_template(tokenizer):
            raise LmlabError("this tokenizer has no chat template; use --chat-template auto or off")
        return True
    seq2seq = model is not None and getattr(model.config, "is_encoder_decoder", False)
    return setting != "off" and auto and has_template(tokenizer) and not seq2seq


def plain_render(messages: list[dict], add_generation_prompt: bool, eos: str) -> str:
    """The ``PLAIN`` format (no chat template): User:/Assistant: lines, a reply ending in ``eos``."""
    text = ""
    for m in messages:
        if m["role"] == "system":
            text += m["content"] + "\n\n"
        elif m["role"] == "user":
            text += "User: " + m["content"] + "\n"
        else:
            text += "Assistant: " + m["content"] + eos + "\n"
    return text + ("Assistant:" if add_generation_prompt else "")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool, template: bool) -> str:
    if template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return plain_render(messages, add_generation_prompt, tokenizer.eos_token or "")


def _tokens(tokenizer, text: str, first: bool, template: bool) -> list[int]:
    """A template writes its own special tokens; the plain format gets the tokenizer's BOS (if it adds
    one) at the start only."""
    return tokenizer(text, add_special_tokens=first and not template)["input_ids"]


def user_turn_ids(tokenizer, text: str, template: bool) -> list[int]:
    """``text`` as one user turn, ready for the assistant's reply (the generation prompt)."""
    return _tokens(tokenizer, render(tokenizer, [{"role": "user", "content": text}], True, template), True, template)


def conversation_ids(tokenizer, messages: list[dict], template: bool) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation rendered prefix by prefix; the mask is 1 on each
    assistant turn's tokens (reply and end of turn), 0 elsewhere. Turns after the last assistant
    turn are dropped (nothing to learn from them)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids: list[int] = []
    mask: list[int] = []
    done = ""  # the text rendered so far
    for i, m in enumerate(messages[:last + 1]):
        if m["role"] != "assistant":
            continue
        for text, loss in ((render(tokenizer, messages[:i], True, template), 0),
                           (render(tokenizer, messages[:i + 1], False, template), 1)):
            if not text.startswith(done):
                raise LmlabError("the chat template does not render a conversation prefix by prefix (an earlier "
                                 "turn changes when a later one is added); use --chat-template off")
            piece = _tokens(tokenizer, text[len(done):], not done, template)
            ids += piece
            mask += [loss] * len(piece)
            done = text
    return ids, mask


def chat_items(tokenizer, conversations: list[list[dict]], template: bool, max_length: int) -> list[Encoded]:
    """One ``Encoded`` per conversation: the prompt is everything before the first assistant token,
    the completion the rest with its loss mask; a conversation longer than ``max_length`` is cut at
    the end, and one with no assistant token left is dropped (a warning counts them)."""
    import warnings

    items = []
    for messages in conversations:
        ids, mask = conversation_ids(tokenizer, messages, template)
        ids, mask = ids[:max_length], mask[:max_length]
        if 1 not in mask:
            continue
        start = mask.index(1)
        end = len(mask) - mask[::-1].index(1)  # no trailing tokens without loss
        completion_mask = tuple(mask[start:end])
        items.append(Encoded(ids[:start], ids[start:end], 0, None if all(completion_mask) else completion_mask))
    if len(items) < len(conversations):
        warnings.warn(f"{len(conversations) - len(items)} of {len(conversations)} conversations have no assistant "
                      f"token within --max-length {max_length} and are left out", stacklevel=2)
    if not items:
        raise LmlabError(f"no conversation has an assistant token within --max-length {max_length}")
    return items


# --- classification as a chat: template(text) is the user turn, the label word the reply -------


def label_ids(tokenizer, fmt: TaskFormat) -> list[list[int]]:
    """Each label word's tokens as the start of an assistant reply (no leading space)."""
    return [tokenizer(word, add_special_tokens=False)["input_ids"] for word in fmt.label_words]


def classification_items(tokenizer, fmt: TaskFormat, examples, max_length: int = 256) -> list[Encoded]:
    """``data.encode`` in the chat template: the prompt ``template(text)`` is the user turn, the
    label word the assistant's reply (its tokens the loss). A prompt too long loses the start of
    its text, as ``data.encode`` cuts it, so the instruction and the template's own tokens stay."""
    completions = label_ids(tokenizer, fmt)
    room = max_length - max(map(len, completions))
    items = []
    for e in examples:
        text = e.text
        while True:
            ids = user_turn_ids(tokenizer, fmt.prompt(text), True)
            if len(ids) <= room:
                break
            text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) - len(text_ids) + 8 > room:
                raise LmlabError(f"max_length {max_length} leaves no room for a prompt in the chat template")
            text = tokenizer.decode(text_ids[len(ids) - room:])
        items.append(Encoded(ids, completions[e.label], e.label))
    return items
