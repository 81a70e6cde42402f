"""``lmlab scaling`` and ``lmlab memory``: the planning calculators of ``lmlab.calc``."""

from __future__ import annotations

import argparse

from lmlab.cli._args import positive_float, positive_int, print_json
from lmlab.errors import LmlabError


def _fit(args: argparse.Namespace):
    from lmlab.calc.scaling import ChinchillaFit

    return ChinchillaFit(E=args.E, A=args.A, B=args.B, alpha=args.alpha, beta=args.beta)


def cmd_scaling(args: argparse.Namespace) -> int:
    from lmlab.calc import scaling

    fit = _fit(args)
    x, y = scaling.exponents(fit)
    out: dict = {"constants": {"E": fit.E, "A": fit.A, "B": fit.B, "alpha": fit.alpha, "beta": fit.beta},
                 "exponents": {"x": x, "y": y}}
    if args.params is not None and args.tokens is None and args.unique_tokens is None:
        raise LmlabError("--params needs --tokens (a training run) or --unique-tokens with --target-loss")
    if args.tokens is not None and args.params is None:
        raise LmlabError("--tokens needs --params")
    if args.params is None and args.compute is None:
        raise LmlabError("give --params N --tokens D, or --compute C (optionally with --unique-tokens D)")
    if args.params is not None and args.tokens is not None:
        n, d = args.params, args.tokens
        out.update(params=n, tokens=d, compute=scaling.compute(n, d), loss=scaling.loss(n, d, fit),
                   loss_of_params=scaling.loss_of_params(n, fit), loss_of_tokens=scaling.loss_of_tokens(d, fit),
                   balanced_tokens=scaling.balanced_tokens(n, fit))
    if args.compute is not None:
        n_opt, d_opt = scaling.compute_optimal(args.compute, fit)
        out.update(compute=args.compute, optimal_params=n_opt, optimal_tokens=d_opt,
                   loss=scaling.loss(n_opt, d_opt, fit) if "loss" not in out else out["loss"],
                   optimal_loss=scaling.loss(n_opt, d_opt, fit))
        if args.unique_tokens is not None:
            out["reuse"] = scaling.optimal_epochs(args.compute, args.unique_tokens, fit)
    if args.target_loss is not None:
        if args.params is None or args.unique_tokens is None:
            raise LmlabError("--target-loss needs --params N and --unique-tokens D")
        out["repeat"] = scaling.extra_epochs_for_loss(args.params, args.unique_tokens, args.target_loss, fit)
        out.setdefault("compute", 6 * args.params * args.unique_tokens * (1 + out["repeat"]["extra_epochs"]))
        out.setdefault("loss", out["repeat"]["loss"])
    if args.plot:
        scaling.plot(args.plot, fit)
        out["plot"] = args.plot
    if args.json:
        print_json(out)
        return 0
    print(f"L(N, D) = {fit.E} + {fit.A}/N^{fit.alpha} + {fit.B}/D^{fit.beta};  N_opt ∝ C^{x:.4f}, D_opt ∝ C^{y:.4f}")
    labels = {"params": "parameters N", "tokens": "tokens D", "compute": "compute C = 6ND (FLOPs)",
              "loss": "loss L(N, D)", "loss_of_params": "A/N^alpha", "loss_of_tokens": "B/D^beta",
              "balanced_tokens": "compute-optimal D for this N", "optimal_params": "compute-optimal N",
              "optimal_tokens": "compute-optimal D", "optimal_loss": "loss at the optimum"}
    for key, label in labels.items():
        if key in out:
            print(f"{label:32} {out[key]:.4g}")
    for key, title in (("repeat", "repeating the unique data to reach the target"),
                       ("reuse", "best use of the budget with this unique data")):
        if key in out:
            print(title + ": " + ", ".join(f"{k} {v:.4g}" for k, v in out[key].items()))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from lmlab.calc import memory

    if args.preset not in memory.PRESETS:
        raise LmlabError(f"unknown preset {args.preset!r}; choose one of {', '.join(memory.PRESETS)}")
    shape = memory.PRESETS[args.preset]
    if args.bytes_per_param is not None:
        shape = replace(shape, bytes_per_param=args.bytes_per_param)
    matrices = memory.parse_matrices(args.matrices)
    out = {"preset": args.preset, **memory.storage(shape, args.tasks, matrices, args.lora_rank)}
    if args.budget:
        out["budget_bytes"] = memory.parse_bytes(args.budget)
        out["rank_for_budget"] = memory.rank_for_budget(shape, args.tasks, matrices, out["budget_bytes"])
    if args.json:
        print_json(out)
        return 0
    h = memory.human_bytes
    print(f"{args.preset}: {shape.params:.4g} parameters at {shape.bytes_per_param:g} bytes = {h(out['base_bytes'])}; "
          f"{args.tasks} tasks")
    print(f"{'strategy':34}{'per task':>14}{'all tasks + base':>18}{'without base':>16}")
    names = {"full": "full fine-tuning", "matrices": f"fine-tune {','.join(matrices)} only",
             "lora": f"LoRA r={args.lora_rank} on {','.join(matrices)}"}
    for key, name in names.items():
        print(f"{name:34}{h(out['per_task_bytes'][key]):>14}{h(out['total_bytes'][key]):>18}"
              f"{h(out['total_bytes_without_base'][key]):>16}")
    if args.budget:
        print(f"largest LoRA rank within {h(out['budget_bytes'])} (base included): {out['rank_for_budget']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("scaling", help="Chinchilla scaling-law calculator: loss, compute, optimal N and D, data reuse")
    p.add_argument("--params", type=positive_float, default=None, help="model parameters N")
    p.add_argument("--tokens", type=positive_float, default=None, help="training tokens D")
    p.add_argument("--compute", type=positive_float, default=None, help="compute budget C in FLOPs")
    p.add_argument("--unique-tokens", type=positive_float, default=None,
                   help="unique tokens available (data reuse: with --target-loss and --params, or with --compute)")
    p.add_argument("--target-loss", type=positive_float, default=None, help="loss to reach by repeating data")
    g = p.add_argument_group("constants (Hoffmann et al. 2022)")
    g.add_argument("--E", type=float, default=1.69)
    g.add_argument("--A", type=positive_float, default=406.4)
    g.add_argument("--B", type=positive_float, default=410.7)
    g.add_argument("--alpha", type=positive_float, default=0.34)
    g.add_argument("--beta", type=positive_float, default=0.28)
    p.add_argument("--plot", default=None, help="PNG of iso-loss curves and the compute-optimal frontier")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_scaling)

    p = sub.add_parser("memory", help="storage for K task-adapted copies: full, chosen matrices, LoRA")
    p.add_argument("--preset", default="gpt3-175b", help="gpt3-175b (default), gpt2, gpt2-medium, gpt2-large, "
                                                         "gpt2-xl, smollm2-135m, llama-7b")
    p.add_argument("--tasks", type=positive_int, default=100, help="number of tasks K (100)")
    p.add_argument("--lora-rank", type=positive_int, default=4)
    p.add_argument("--matrices", default="q,v", help="adapted matrices per layer: q,k,v,o,fc1,fc2 (q,v)")
    p.add_argument("--bytes-per-param", type=positive_float, default=None,
                   help="override the preset's (2 = fp16 for GPT-3, 4 = fp32 for the small models)")
    p.add_argument("--budget", default=None, help="a storage budget (e.g. 400GB): the largest LoRA rank that fits")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_memory)
