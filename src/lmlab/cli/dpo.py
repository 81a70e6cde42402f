"""``lmlab dpo``: direct preference optimisation from {prompt, chosen, rejected} pairs."""

from __future__ import annotations

import argparse
import json
import sys

from lmlab.cli._args import DEFAULT_MODEL, add_device_args, positive_float, positive_int
from lmlab.cli._config import add_config_arg
from lmlab.errors import LmlabError


def _check_same_vocabulary(tokenizer, ref_tokenizer, name: str, ref_name: str) -> None:
    """The reference must score the very token ids the policy sees: same vocabulary, same ids."""
    ours, theirs = tokenizer.get_vocab(), ref_tokenizer.get_vocab()
    if ours != theirs:
        differ = len(set(ours.items()) ^ set(theirs.items()))
        raise LmlabError(f"--ref-model {ref_name} has another vocabulary than {name} ({len(theirs):,} vs "
                         f"{len(ours):,} tokens, {differ:,} entries differ): its log-probabilities would not "
                         "score the same token ids")


def cmd_dpo(args: argparse.Namespace) -> int:
    from lmlab.checkpoint import run_dir
    from lmlab.dpo import DpoConfig
    from lmlab.engine import TrainConfig

    if args.load_in_4bit and args.load_in_8bit:
        raise LmlabError("choose one of --load-in-4bit and --load-in-8bit")
    bits = 4 if args.load_in_4bit else 8 if args.load_in_8bit else None
    cfg = TrainConfig(out_dir=args.out_dir, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      max_iters=args.max_iters, epochs=args.epochs, eval_interval=args.eval_interval, seed=args.seed,
                      report_to=args.report_to, resume=args.resume, progress=not args.no_progress, log_interval=1,
                      max_grad_norm=args.max_grad_norm, device=args.device, dtype=args.dtype,
                      gradient_checkpointing=args.gradient_checkpointing)
    config = DpoConfig(beta=args.beta, max_length=args.max_length)
    with run_dir(cfg):  # an input error below leaves no empty --out-dir
        result, held_out = _train(args, cfg, config, bits)
    from lmlab.engine import is_main_process

    if not is_main_process():  # under accelerate launch / torchrun, one process reports
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        from lmlab.evaluate import format_accuracy

        final = result["final"]
        margin, accuracy = final.get("val_margin"), final.get("val_accuracy")
        print(f"done: {result['steps']} steps in {result['seconds']:.0f} s; validation reward margin "
              f"{float('nan') if margin is None else margin:.3f}, preference accuracy "
              f"{'n/a' if accuracy is None else format_accuracy(round(accuracy * held_out), held_out)}; "
              f"curves in {result['out_dir']}/dpo.png")
    return 0


def _train(args: argparse.Namespace, cfg, config, bits):
    """(the engine's result, held-out pairs) of the DPO run ``args`` describe."""
    from lmlab import devices, peft
    from lmlab.cli import method_config
    from lmlab.dpo import encode_pairs, read_pairs, split_pairs, train_dpo
    from lmlab.finetune import load_for_training
    from lmlab.models import load_model, load_tokenizer

    train_rows, val_rows = split_pairs(read_pairs(args.data), args.val_fraction)  # bad data fails before loading
    method = method_config(args)
    model, tokenizer = load_for_training(args.model, method, cfg, bits)
    reference = None
    if args.ref_model:
        _check_same_vocabulary(tokenizer, load_tokenizer(args.ref_model), args.model, args.ref_model)
        device = devices.model_device(model)
        dtype = devices.select_dtype(cfg.dtype, device, warn_slow=False)
        reference = lambda: load_model(args.ref_model, device=device, dtype=dtype)[0]  # loaded only while used
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    train_pairs = encode_pairs(tokenizer, train_rows, config, context)
    val_pairs = encode_pairs(tokenizer, val_rows, config, context)
    trainable, total = peft.count_parameters(model)
    if not args.json:
        print(f"lmlab: DPO ({args.method}, beta {args.beta}) on {args.model}: {trainable:,} of {total:,} parameters "
              f"train; {len(train_pairs)} pairs, {len(val_pairs)} held out", file=sys.stderr, flush=True)
    run_info = {"model": args.model, "ref_model": args.ref_model, "task": "dpo", "data": args.data, "method": args.method,
                "trainable": trainable, "total": total, "bits": bits,
                "options": {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}}
    return train_dpo(model, tokenizer, method, train_pairs, val_pairs, config, cfg, run_info, reference), len(val_pairs)


def register(sub) -> None:
    from lmlab.cli import add_method_args

    p = sub.add_parser("dpo", help="direct preference optimisation (LoRA or full) from prompt/chosen/rejected pairs")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", required=True, help=".jsonl with prompt, chosen and rejected per line")
    p.add_argument("--ref-model", default=None,
                   help="another reference policy (same vocabulary); default: the model itself before training "
                        "(with LoRA: adapters disabled, no second copy)")
    add_method_args(p)
    p.add_argument("--beta", type=positive_float, default=0.1, help="strength of the KL anchor to the reference (0.1)")
    p.add_argument("--lr", type=positive_float, default=5e-5, help="peak learning rate (5e-5)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="pairs per step")
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--max-iters", type=positive_int, default=None)
    p.add_argument("--epochs", type=positive_float, default=1.0)
    p.add_argument("--eval-interval", type=positive_int, default=20)
    p.add_argument("--val-fraction", type=float, default=0.1, help="the tail of the file held out (0.1)")
    p.add_argument("--max-length", type=positive_int, default=512)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out-dir", default="runs/dpo")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--report-to", default="none", choices=["none", "tensorboard", "wandb"])
    p.add_argument("--no-progress", action="store_true")
    add_device_args(p, training=True)
    p.add_argument("--json", action="store_true")
    add_config_arg(p)
    p.set_defaults(func=cmd_dpo)
