"""``lmlab scaling`` and ``lmlab memory``: the planning calculators of ``lmlab.calc``."""

from __future__ import annotations

import argparse

from lmlab.cli._args import positive_float, positive_int, print_json, refuse_existing
from lmlab.errors import LmlabError


def _fit(args: argparse.Namespace):
    from lmlab.calc.scaling import ChinchillaFit

    return ChinchillaFit(E=args.E, A=args.A, B=args.B, alpha=args.alpha, beta=args.beta)


def _percent(text: str) -> float:
    """argparse type: a relative change, "-1%" or "-0.01" (both mean a 1% decrease)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a relative change such as -1% or -0.01, got {text!r}") from None
    if not (value > -1 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a relative change above -100%, got {text!r}")
    return value


def _split(text: str) -> tuple[float, float]:
    """argparse type: "x,y", the exponents of N_opt = C^x and D_opt = C^y."""
    try:
        x, y = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two exponents x,y such as 0.46,0.54, got {text!r}") from None
    return x, y


def cmd_scaling_fit(args: argparse.Namespace) -> int:
    import sys

    from lmlab.calc import scaling_fit

    if args.runs is None:
        raise LmlabError("scaling fit needs --runs FILE (a CSV with columns params, tokens, loss)")
    n, d, loss = scaling_fit.read_runs(args.runs)
    print(f"fitting {len(n)} runs from {args.starts or 4500} starting points, {args.bootstrap} bootstrap resamples",
          file=sys.stderr)
    result = scaling_fit.fit(n, d, loss, bootstrap=args.bootstrap, seed=args.seed, starts=args.starts)
    out = {**result.as_dict(), "bootstrap": args.bootstrap, "seed": args.seed}
    if result.alpha <= 0 or result.beta <= 0:
        print(f"warning: the fitted exponents are not positive (alpha {result.alpha:.4g}, beta {result.beta:.4g}): "
              "these runs do not follow a decreasing power law", file=sys.stderr)
    if args.plot:
        scaling_fit.plot(args.plot, result, n, d, loss)
        out["plot"] = args.plot
    if args.json:
        print_json(out)
        return 0
    print(f"L(N, D) = E + A/N^alpha + B/D^beta fitted to {result.n_runs} runs (Huber loss {result.huber_loss:.4g}, "
          f"delta {scaling_fit.DELTA})")
    ci = result.intervals
    print(f"{'':34}{'value':>10}" + (f"   95% interval ({args.bootstrap} resamples)" if ci else ""))
    rows = [(name, name, out[name]) for name in scaling_fit.NAMES]
    rows += [("exponent_params", "a = beta/(alpha+beta), N ∝ C^a", out["exponent_params"]),
             ("exponent_tokens", "b = alpha/(alpha+beta), D ∝ C^b", out["exponent_tokens"])]
    for key, label, value in rows:
        interval = f"   [{ci[key][0]:.4g}, {ci[key][1]:.4g}]" if key in ci else ""
        print(f"{label:34}{value:>10.4g}{interval}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    """The calculator, or ``fit``; a law or sizes beyond floating point are one line, not a trace."""
    try:
        return _scaling(args)
    except (OverflowError, ZeroDivisionError) as exc:
        raise LmlabError(f"these constants and sizes leave floating-point range ({exc}); check --params, "
                         "--tokens, --compute and the exponents") from None


def _scaling(args: argparse.Namespace) -> int:
    from lmlab.calc import scaling

    refuse_existing([args.plot], args.overwrite, "--plot")
    if args.action == "fit":
        return cmd_scaling_fit(args)
    if args.runs is not None:
        raise LmlabError("--runs belongs to `lmlab scaling fit`")
    fit = _fit(args)
    x, y = scaling.exponents(fit)
    out: dict = {"constants": {"E": fit.E, "A": fit.A, "B": fit.B, "alpha": fit.alpha, "beta": fit.beta},
                 "exponents": {"x": x, "y": y}}
    if args.params is not None and args.tokens is None and args.unique_tokens is None:
        raise LmlabError("--params needs --tokens (a training run) or --unique-tokens with --target-loss")
    if (args.split_exponents or args.loss_change is not None or args.params_scale != 1.0) and args.tokens is None:
        raise LmlabError("--split-exponents, --loss-change and --params-scale need a run: --params N --tokens D")
    if args.params_scale != 1.0 and args.loss_change is None:
        raise LmlabError("--params-scale needs --loss-change")
    if args.loss_change is not None and args.target_loss is not None:
        raise LmlabError("give --loss-change or --target-loss, not both")
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
    if args.split_exponents:
        k = 6.0 if args.compute_formula == "6ND" else 1.0
        x_split, y_split = args.split_exponents
        out["split"] = {"x": x_split, "y": y_split, "compute_formula": args.compute_formula,
                        **scaling.simple_split(args.params, args.tokens, x_split, y_split, k)}
    if args.loss_change is not None:
        out["loss_change"] = {"change": args.loss_change, "params_scale": args.params_scale,
                              **scaling.loss_change(args.params, args.tokens, args.loss_change, args.params_scale, fit)}
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
    if "split" in out:
        s = out["split"]
        print(f"simple law N* = C^{s['x']:g}, D* = {'C/(6N*)' if s['compute_formula'] == '6ND' else 'C/N*'}, "
              f"C = {s['compute_formula']} = {s['compute']:.4g}: N* {s['optimal_params']:.4g}, "
              f"D* {s['optimal_tokens']:.4g}; N/N* = {s['params_ratio']:.4g}: "
              f"{'optimal' if s['optimal'] else 'not optimal'}")
        print(f"  optimal with these tokens: N = {s['params_for_tokens']:.4g}; "
              f"optimal with these parameters: D = {s['tokens_for_params']:.4g}")
    if "loss_change" in out:
        c = out["loss_change"]

        def fmt(value):
            return "unreachable" if value is None else f"{value:.4g}"

        print(f"target loss {c['target_loss']:.4g} ({100 * c['change']:+.3g}% of {c['loss']:.4g})" + (
              f"; N = {c['params']:.4g} on the same {args.tokens:.4g} unique tokens gives {c['loss_at_params']:.4g} "
              f"({100 * c['loss_change_at_params']:+.3g}%)" if args.params_scale != 1.0 else ""))
        print(f"  fresh tokens for the target at N = {c['params']:.4g}: {fmt(c['tokens_for_target'])}; "
              f"parameters for the target on one pass: {fmt(c['params_for_target'])}")
        if c["repeat"] is None:
            print(f"  repeating the data: {c['repeat_unreachable']}")
        else:
            print("  repeating the data: " + ", ".join(f"{k} {v:.4g}" for k, v in c["repeat"].items()))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from lmlab.calc import memory

    shape = memory.model_shape(args.model)
    if args.bytes_per_param is not None:
        shape = replace(shape, bytes_per_param=args.bytes_per_param)
    matrices = memory.parse_matrices(args.target)
    out = {"model": args.model, **memory.storage(shape, args.tasks, matrices, args.rank)}
    if args.budget:
        out["budget_bytes"] = memory.parse_bytes(args.budget)
        out["rank_for_budget"] = memory.rank_for_budget(shape, args.tasks, matrices, out["budget_bytes"])
    if args.json:
        print_json(out)
        return 0
    h = memory.human_bytes
    print(f"{args.model}: {shape.params:.4g} parameters at {shape.bytes_per_param:g} bytes = {h(out['base_bytes'])}; "
          f"{args.tasks} tasks")
    print(f"{'strategy':34}{'per task':>14}{'all tasks + base':>18}{'without base':>16}")
    names = {"full": "full fine-tuning", "matrices": f"fine-tune {','.join(matrices)} only",
             "lora": f"LoRA r={args.rank} on {','.join(matrices)}"}
    for key, name in names.items():
        print(f"{name:34}{h(out['per_task_bytes'][key]):>14}{h(out['total_bytes'][key]):>18}"
              f"{h(out['total_bytes_without_base'][key]):>16}")
    if args.budget:
        print(f"largest LoRA rank within {h(out['budget_bytes'])} (base included): {out['rank_for_budget']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("scaling", help="Chinchilla scaling-law calculator: loss, compute, optimal N and D, data reuse; "
                                       "`scaling fit --runs runs.csv` fits the law to runs")
    # "--loss-change -1%": let a leading minus with a percent sign read as a value, not as an option
    import re

    from lmlab.cli._args import nonnegative_int

    p._negative_number_matcher = re.compile(r"^-\d+%?$|^-\d*\.\d+%?$")
    p.add_argument("action", nargs="?", choices=["fit"], default=None,
                   help="fit: fit E, A, B, alpha, beta to --runs (Hoffmann et al. 2022, approach 3); "
                        "without it, the calculator")
    p.add_argument("--params", type=positive_float, default=None, help="model parameters N")
    p.add_argument("--tokens", type=positive_float, default=None, help="training tokens D")
    p.add_argument("--compute", type=positive_float, default=None, help="compute budget C in FLOPs")
    p.add_argument("--unique-tokens", type=positive_float, default=None,
                   help="unique tokens available (data reuse: with --target-loss and --params, or with --compute)")
    p.add_argument("--target-loss", type=positive_float, default=None, help="loss to reach by repeating data")
    p.add_argument("--loss-change", type=_percent, default=None,
                   help="with --params N --tokens D (D unique tokens, one pass): target loss (1 + change) L(N, D), "
                        "e.g. -1%% or -0.01; prints the fresh tokens, the one-pass model size and the extra epochs "
                        "over D that reach it (off)")
    p.add_argument("--params-scale", type=positive_float, default=1.0,
                   help="with --loss-change: answer for a model of s*N parameters on the same D unique tokens, "
                        "and print the loss change that scaling alone brings (1.0)")
    p.add_argument("--split-exponents", type=_split, default=None, metavar="X,Y",
                   help="simple law N* = C^x (x + y = 1): is --params/--tokens optimal, and which N (D kept) or "
                        "D (N kept) would be (off)")
    p.add_argument("--compute-formula", choices=["ND", "6ND"], default="6ND",
                   help="C for --split-exponents, C = kND with k = 1 or 6; the budget leaves D* = C/(kN*) (6ND)")
    g = p.add_argument_group("constants (Hoffmann et al. 2022)")
    g.add_argument("--E", type=float, default=1.69, help="the irreducible loss E")
    g.add_argument("--A", type=positive_float, default=406.4, help="A in A/N^alpha")
    g.add_argument("--B", type=positive_float, default=410.7, help="B in B/D^beta")
    g.add_argument("--alpha", type=positive_float, default=0.34, help="alpha in A/N^alpha")
    g.add_argument("--beta", type=positive_float, default=0.28, help="beta in B/D^beta")
    p.add_argument("--plot", default=None, help="PNG of iso-loss curves and the compute-optimal frontier; "
                                                "with fit: observed vs fitted loss and iso-loss curves with the runs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot")
    p.add_argument("--json", action="store_true")
    g = p.add_argument_group("fit (lmlab scaling fit)")
    g.add_argument("--runs", default=None, help="CSV with columns params, tokens, loss (one row per run, >= 5 runs)")
    g.add_argument("--bootstrap", type=nonnegative_int, default=200,
                   help="resamples of the runs for 95%% percentile intervals, 0 = none (200)")
    g.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (0)")
    g.add_argument("--starts", type=positive_int, default=None,
                   help="run L-BFGS from the N best points of the 4500-point grid (all of them)")
    p.set_defaults(func=cmd_scaling)

    p = sub.add_parser("memory", help="storage for K task-adapted copies: full, chosen matrices, LoRA")
    p.add_argument("--model", default="gpt3-175b",
                   help="gpt3-175b (default), llama-7b, or what lmlab params --model takes: gpt2, gpt2-medium, "
                        "gpt2-large, gpt2-xl, smollm2-135m, phi-1_5, phi-2, phi-3-mini, t5-small, t5-base, "
                        "flan-t5-small, flan-t5-base, flan-t5-large, bart-base, bart-large, tiny-*, a folder or "
                        "a hub id")
    p.add_argument("--tasks", type=positive_int, default=100, help="number of tasks K (100)")
    p.add_argument("--rank", "-r", type=positive_int, default=4, help="LoRA rank r (Hu et al. use 4 for GPT-3)")
    p.add_argument("--target", default="q,v",
                   help="adapted matrices: q,k,v,o and fc1,fc2 (GPT-2, Phi, BART), gate,up,down (Llama, Phi-3) or "
                        "wi,wo / wi_0,wi_1,wo (T5), or module names as lmlab params takes them (c_attn: GPT-2's "
                        "fused q,k,v; in T5 and BART q also names the decoder's cross-attention query)")
    # the spellings before params and memory shared their flags, still accepted
    p.add_argument("--preset", dest="model", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--lora-rank", dest="rank", type=positive_int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--matrices", dest="target", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--bytes-per-param", type=positive_float, default=None,
                   help="override the preset's (2 = fp16 for GPT-3, 4 = fp32 for the small models)")
    p.add_argument("--budget", default=None, help="a storage budget (e.g. 400GB): the largest LoRA rank that fits")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_memory)
