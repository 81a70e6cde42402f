"""``lmlab.finetune.run(config)``: one fine-tuning run from Python, as ``lmlab finetune`` runs it.

``FinetuneConfig`` has one field per ``lmlab finetune`` option, with the same name (dashes as
underscores) and the same default, so a sweep, a script and the command line describe a run the
same way. ``run`` loads the model on its device and precision, applies the method, encodes the
data and hands the task to the engine (``lmlab.engine``): model -> method -> trainer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from lmlab.errors import LmlabError
from lmlab.models import DEFAULT_MODEL


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """A fine-tuning run. Method options: ``rank``/``alpha``/``lora_dropout``/``target`` (LoRA;
    None: ``LoraConfig``'s defaults, alpha 4 x rank; ``target`` "all-linear": every linear layer but
    the head), ``use_rslora``/``use_dora``/``modules_to_save`` (LoRA's options as in peft;
    ``modules_to_save`` as "lm_head,wte"), ``bottleneck``/``train_layer_norms``
    (adapter), ``prefix_length``/``prefix_hidden`` (prefix). Data: ``task`` classification
    (``dataset``, columns, ``template`` with a ``{text}`` slot, ``label_words`` as "w0,w1"), completion
    or summarization (``block_size``, ``val_fraction``, ``summary_column``, ``template`` with a
    ``{post}`` slot, default ``{post}\\nTL;DR:``; an encoder-decoder model such as T5 summarizes
    only, its encoder reading the prompt: ``lmlab.seq2seq``), chat (``lmlab.chat``: alpaca, ShareGPT or
    messages rows; loss on the assistant turns); ``chat_template`` (auto, on, off: the tokenizer's
    chat template for chat and classification, recorded resolved in run.json). Training: see
    ``engine.TrainConfig``.
    ``load_in_4bit``/``load_in_8bit``: QLoRA's quantised frozen base (CUDA, bitsandbytes)."""

    model: str = DEFAULT_MODEL
    method: str = "lora"
    rank: int | None = None  # None: LoRA's default, ``lmlab.peft.lora.LoraConfig.r`` (128)
    alpha: float | None = None  # None: 4 x rank (``lora.default_alpha``), also when recorded so
    lora_dropout: float | None = None  # None: ``LoraConfig.dropout`` (0.05)
    target: str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: str | None = None
    bottleneck: int = 64
    train_layer_norms: bool = False
    prefix_length: int = 10
    prefix_hidden: int | None = None
    task: str = "classification"
    dataset: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    template: str | None = None
    label_words: str | None = None
    max_length: int = 256
    block_size: int = 128
    val_fraction: float = 0.1
    summary_column: str = "summary"
    chat_template: str = "auto"  # on / off / auto: on for task chat when the tokenizer has one, off otherwise
    dropout: float = 0.0
    lr: float = 2.5e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_iters: int | None = None
    epochs: float = 1.0
    eval_interval: int = 50
    eval_limit: int | None = 300
    max_grad_norm: float | None = 1.0  # 0 or None: no clipping
    seed: int = 1337
    out_dir: str = "runs/finetune"
    resume: bool = False
    report_to: str = "none"
    no_progress: bool = False
    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    json: bool = False  # quiet: no banner (the command prints the result as JSON)

    def __post_init__(self):
        # LoRA's rank and dropout are LoraConfig's when not given, and recorded as numbers in run.json
        from lmlab.peft.lora import LoraConfig

        for name, default in (("rank", LoraConfig.r), ("lora_dropout", LoraConfig.dropout)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)

    @classmethod
    def from_options(cls, options: dict) -> FinetuneConfig:
        """From a mapping of option names (a sweep's run, a parsed command line); an unknown name
        is one error that names it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in options if k.replace("-", "_") not in known)
        if unknown:
            raise LmlabError(f"unknown finetune option {unknown[0]!r} (see lmlab finetune --help)")
        return cls(**{k.replace("-", "_"): v for k, v in options.items()})

    def check(self) -> FinetuneConfig:
        """Every setting that can be checked without data or a model (types included), as one
        error naming the setting; returns the config. A sweep checks all its runs this way first."""
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type
            accepted = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
            base = kind.replace(" | None", "").split(" | ")[0]
            if value is None and "None" in kind:
                continue
            wrong_bool = base != "bool" and isinstance(value, bool)
            if base in accepted and (not isinstance(value, accepted[base]) or wrong_bool):
                raise LmlabError(f"finetune option {f.name}: expected {base}, got {value!r}")
        self.train_config()
        method_config(self)
        _ = self.bits
        if self.task not in ("classification", "completion", "summarization", "chat"):
            raise LmlabError(f"task must be classification, completion, summarization or chat, got {self.task!r}")
        if self.chat_template not in ("auto", "on", "off"):
            raise LmlabError(f"chat template must be auto, on or off, got {self.chat_template!r}")
        if self.chat_template == "on" and self.task in ("completion", "summarization"):
            raise LmlabError(f"--chat-template on is for --task chat and classification, not {self.task}")
        check_template(self)
        return self

    @property
    def bits(self) -> int | None:
        if self.load_in_4bit and self.load_in_8bit:
            raise LmlabError("choose one of --load-in-4bit and --load-in-8bit")
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None

    def train_config(self):
        from lmlab.engine import TrainConfig

        return TrainConfig(out_dir=self.out_dir, lr=self.lr, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           max_iters=self.max_iters, epochs=self.epochs, eval_interval=self.eval_interval,
                           max_grad_norm=self.max_grad_norm or None, dropout=self.dropout, seed=self.seed,
                           report_to=self.report_to, resume=self.resume, progress=not self.no_progress,
                           device=self.device, dtype=self.dtype, gradient_checkpointing=self.gradient_checkpointing)


def method_config(options):
    """The typed config of ``options.method`` (a FinetuneConfig, or parsed options of the same names)."""
    from lmlab import peft

    if options.method == "lora":
        targets = tuple(t.strip() for t in options.target.split(",") if t.strip()) if options.target else None
        if targets and len(targets) == 1 and targets[0].lower() == "all-linear":
            targets = "all-linear"  # peft's shorthand, not a module name
        given = {"r": options.rank, "alpha": options.alpha, "dropout": options.lora_dropout}
        # not given (None): LoraConfig's defaults, alpha = lora.default_alpha(rank)
        return peft.make_config("lora", **{k: v for k, v in given.items() if v is not None}, target_modules=targets,
                                use_rslora=options.use_rslora, use_dora=options.use_dora,
                                modules_to_save=options.modules_to_save)
    if options.method == "adapter":
        return peft.make_config("adapter", bottleneck=options.bottleneck, train_layer_norms=options.train_layer_norms)
    if options.method == "prefix":
        return peft.make_config("prefix", length=options.prefix_length, hidden=options.prefix_hidden)
    return peft.make_config(options.method)


def task_format(options, saved: dict | None = None):
    """The TaskFormat from options, falling back to a run's saved settings, then to defaults."""
    from lmlab.data import TaskFormat

    saved = saved or {}
    words = options.label_words.split(",") if options.label_words else saved.get("label_words")
    kwargs = {"template": options.template or saved.get("template"),
              "label_words": tuple(w.strip() for w in words) if words else None,
              "text_column": options.text_column or saved.get("text_column"),
              "label_column": options.label_column or saved.get("label_column")}
    return TaskFormat(**{k: v for k, v in kwargs.items() if v is not None})


def check_template(options) -> None:
    """``--template`` fits the task: classification's has a ``{text}`` slot, summarization's a
    ``{post}`` slot; completion and chat take none."""
    template = options.template
    if template is None:
        return
    if options.task in ("completion", "chat"):
        raise LmlabError(f"--template is for classification ({{text}}) and summarization ({{post}}), "
                         f"not --task {options.task}")
    if options.task == "summarization":
        from lmlab.sft import split_template

        split_template(template)
    elif "{text}" not in template:
        hint = " ({post} is summarization's slot)" if "{post}" in template else ""
        raise LmlabError(f"the classification template needs a {{text}} slot{hint}, e.g. "
                         f"'Review: {{text}}\\nSentiment:'; got {template!r}")


def sft_data(options):
    """The SftData of a completion, summarization or chat run."""
    from lmlab.sft import SUMMARY_TEMPLATE, SftData

    if not options.dataset:
        raise LmlabError(f"--task {options.task} needs --dataset: "
                         + ("a plain-text file" if options.task == "completion" else
                            "a .jsonl of alpaca, ShareGPT or messages rows, or a folder with train/validation .jsonl"
                            if options.task == "chat" else "a .jsonl of {post, summary} "
                            "or a folder with train/validation .jsonl"))
    check_template(options)
    return SftData(source=options.dataset, val_fraction=options.val_fraction, block_size=options.block_size,
                   max_length=options.max_length, post_column=options.text_column or "post",
                   summary_column=options.summary_column, template=options.template or SUMMARY_TEMPLATE)


def load_for_training(model_name: str, method, cfg, bits: int | None = None):
    """``(model, tokenizer)`` on ``cfg.device``, ``method`` applied, ready for the engine.

    Mixed precision as in QLoRA and transformers' Trainer: on a GPU a frozen base is stored in the
    compute dtype (bf16 / fp16; or 4/8-bit with ``bits``), every trainable parameter is fp32, and
    the engine runs the forward under autocast. Full fine-tuning keeps fp32 master weights, and so
    do CPU runs (memory is not what limits them, and the CPU's autocast does not cover every op a
    half-precision base beside fp32 trainables needs) and FSDP runs (which flatten parameters of
    one dtype and bring their own mixed-precision policy)."""
    import os

    import torch

    from lmlab import devices, peft

    device = devices.select_device(cfg.device)
    if cfg.dtype == "fp16" and device.type == "cpu":
        raise LmlabError("--dtype fp16 trains on a GPU only (torch has no fp16 autocast on the CPU); use fp32 "
                         "or bf16 there")
    from lmlab.models import load_model, model_config

    dtype = devices.select_dtype(cfg.dtype, device)
    if dtype == torch.float16:  # the compute dtype: full fine-tuning stores fp32 but autocasts to it
        dtype = devices.model_dtype(dtype, model_config(model_name))
    method_name = peft.method_name(method)
    if bits is not None and method_name != "lora":
        raise LmlabError(f"--load-in-{bits}bit trains LoRA on a quantised frozen base (QLoRA); "
                         f"--method {method_name} would have to train quantised weights")
    if cfg.gradient_checkpointing and method_name == "prefix" and getattr(method, "hidden", None):
        raise LmlabError("--gradient-checkpointing with --prefix-hidden: the prefix MLP runs once inside the "
                         "first checkpointed layer and its recomputation differs; drop one of the two")
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"  # set by accelerate launch
    model, tokenizer = load_model(model_name, device=device, dtype=storage_dtype(method_name, device, dtype, fsdp),
                                  bits=bits)
    torch.manual_seed(cfg.seed)  # the method's initial weights (LoRA's A, adapters' W_down) follow --seed
    if bits is not None:
        prepare_kbit(model)
    peft.apply(model, method)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if bits is None:
        model.to(device)
    return model, tokenizer


def storage_dtype(method: str, device, dtype, fsdp: bool = False):
    """The dtype the base model is stored in for training (see ``load_for_training``)."""
    import torch

    return torch.float32 if method == "full" or device.type == "cpu" or fsdp else dtype


def prepare_kbit(model) -> None:
    """The usual k-bit preparation (as peft's ``prepare_model_for_kbit_training``): the model frozen,
    and its remaining floating-point weights that are not quantised (norms, embeddings, head) kept
    in fp32 for stable training. Gradient checkpointing is the engine's option."""
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16) and p.ndim == 1:
            p.data = p.data.float()


# What a resumed run may change: how long it runs, where and how it reports, where it runs.
RESUMABLE = {"resume", "max_iters", "epochs", "no_progress", "json", "report_to", "device", "dtype", "out_dir"}


def resumed(config: FinetuneConfig) -> FinetuneConfig:
    """The recorded run's settings for ``--resume`` (from its ``run.json``): a setting given that
    differs from the record (and from its default) is one error that names it; only how long the
    run goes (``max_iters``/``epochs``) and how and where it runs may change."""
    from pathlib import Path

    from lmlab.io import read_json

    run_file = Path(config.out_dir) / "run.json"
    saved = read_json(run_file) if run_file.exists() else {}  # a damaged file: one error, not a traceback
    recorded = saved.get("options") if isinstance(saved, dict) else None
    if not recorded:  # a run written before options were recorded: the flags as given
        return config
    defaults = FinetuneConfig()
    for f in fields(FinetuneConfig):
        if f.name in RESUMABLE or f.name not in recorded:
            continue
        given, was = getattr(config, f.name), recorded[f.name]
        if given != getattr(defaults, f.name) and given != was:
            flag = "--" + f.name.replace("_", "-")
            raise LmlabError(f"--resume continues the run in {config.out_dir} as recorded: {flag} {given} differs "
                             f"from its {was}; drop {flag}, or start a new run in another --out-dir")
    keep = {name: getattr(config, name) for name in RESUMABLE}
    for name in ("max_iters", "epochs"):  # not given: as recorded
        if getattr(config, name) == getattr(defaults, name):
            keep[name] = recorded.get(name, keep[name])
    known = {f.name for f in fields(FinetuneConfig)}
    return FinetuneConfig(**{**{k: v for k, v in recorded.items() if k in known and k not in RESUMABLE}, **keep})


def run(config: FinetuneConfig) -> dict:
    """Fine-tune as ``config`` says; returns the summary (``engine.TrainResult`` fields, parameter
    counts and the resolved settings). With ``resume``, the run continues as its ``run.json`` says."""
    from lmlab.checkpoint import run_dir

    if config.resume:
        config = resumed(config)
    cfg = config.train_config()
    with run_dir(cfg):
        return _run(config, cfg)


def _encoder_decoder(config: FinetuneConfig) -> bool:
    """Whether the model is an encoder-decoder (from its config, before any weights load); one line
    for what lmlab does not run on one."""
    from lmlab import seq2seq
    from lmlab.models import model_config, model_spec

    model_cfg = model_config(config.model)
    if not seq2seq.is_seq2seq(model_cfg):
        return False
    seq2seq.check_task(config.task, config.model)
    if config.method == "prefix":  # BitFit only where the model has biases (BART, not T5)
        other = "lora, adapter, bitfit or full" if model_spec(model_cfg).has_bias else "lora, adapter or full"
        raise LmlabError(f"{config.model} is an encoder-decoder model: --method prefix is for decoder-only "
                         f"models here; use {other}")
    return True


def _run(config: FinetuneConfig, cfg) -> dict:
    import sys

    from lmlab import peft
    from lmlab.data import DEFAULT_DATASET, encode, load_splits, subsample
    from lmlab.train import train

    method = method_config(config)
    bits = config.bits
    if config.chat_template == "on" and config.task in ("completion", "summarization"):
        raise LmlabError(f"--chat-template on is for --task chat and classification, not {config.task}")
    check_template(config)
    seq2seq = _encoder_decoder(config)
    if config.task == "classification":
        fmt = task_format(config)
        dataset = config.dataset or DEFAULT_DATASET
        splits = load_splits(dataset, fmt, ("train", "validation"))
    elif config.task in ("completion", "summarization"):
        from lmlab.sft import read_corpus, read_pairs

        data = sft_data(config)
        dataset = data.source
        read_pairs(data) if config.task == "summarization" else read_corpus(data.source)  # bad data: fail first
    elif config.task == "chat":
        from lmlab.chat import read_conversations

        data = sft_data(config)
        dataset = data.source
        conversations = read_conversations(data.source, data.val_fraction)  # bad data: fail first
    else:
        raise LmlabError(f"task must be classification, completion, summarization or chat, got {config.task!r}")
    model, tokenizer = load_for_training(config.model, method, cfg, bits)
    from lmlab import chat

    # auto: the chat template for --task chat; classification keeps its raw template unless asked
    template = chat.use_template(config.chat_template, tokenizer, model, auto=config.task == "chat")
    if config.task == "classification":
        encode_as = chat.classification_items if template else encode  # the label word as the reply, or raw
        train_items = encode_as(tokenizer, fmt, splits["train"], config.max_length)
        val_items = encode_as(tokenizer, fmt, subsample(splits["validation"], config.eval_limit), config.max_length)
        task_info = asdict(fmt)
    elif config.task == "chat":
        train_items = chat.chat_items(tokenizer, conversations[0], template, config.max_length)
        val_items = subsample(chat.chat_items(tokenizer, conversations[1], template, config.max_length),
                              config.eval_limit)
        task_info = asdict(data)
    else:
        from lmlab.sft import task_items

        train_items, val_items = task_items(config.task, tokenizer, data, seq2seq=seq2seq)
        val_items = subsample(val_items, config.eval_limit)
        task_info = asdict(data)
    trainable, total = peft.count_parameters(model)
    run_info = {"model": config.model, "task": config.task, "dataset": dataset, "method": config.method,
                "max_length": config.max_length, "eval_limit": config.eval_limit, "trainable": trainable,
                "total": total, "bits": bits, **task_info, "chat_template": "on" if template else "off",
                "options": asdict(config)}
    from lmlab.engine import is_main_process

    if not config.json and is_main_process():
        print(f"lmlab: {config.method} on {config.model}: {trainable:,} of {total:,} parameters train "
              f"({100 * trainable / total:.3f} %); {len(train_items)} training {config.task} examples",
              file=sys.stderr, flush=True)
    result = train(model, tokenizer, method, train_items, val_items, cfg, run_info)
    return {**asdict(result), "trainable": trainable, "total": total, "percent": 100 * trainable / total}
