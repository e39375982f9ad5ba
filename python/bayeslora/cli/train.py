"""``bayeslora train`` (every option defaults to the chosen recipe's value) and ``bayeslora quickstart``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .output import emit


def _schedule(text: str) -> int | float:
    """A schedule value: an integer is a number of steps, a decimal a fraction of the run."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a step count nor a fraction") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction of the run is in [0, 1]")
    return value


def _noise_scale(text: str) -> float | str:
    if text == "fit":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'fit' or a number > 0") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a noise scale is > 0")
    return value


def _add_train_options(p: argparse.ArgumentParser, defaults: Any) -> None:
    """Every option defaults to SUPPRESS: only what the user gives overrides the recipe (the
    defaults in the help are the default recipe's, ``select``)."""

    def opt(flag: str, help: str = "", **kw: Any) -> None:
        name = flag.lstrip("-").replace("-", "_")
        shown = getattr(defaults, name, None)
        text = f"{help} (default: {shown})" if help else f"default: {shown}"
        p.add_argument(flag, default=argparse.SUPPRESS, help=text, **kw)

    opt(
        "--recipe",
        "where the defaults come from: select (the authors' training, then the validation rank "
        "cut and a refit half-way), paper (the authors' GLUE harness: additive posterior, "
        "noise-free training forward, 1e-6·KL, prune ℓ > 4) or vi (ours, variational: gate "
        "posterior, per-example KL, τ = 3)",
        choices=["select", "paper", "vi"],
    )
    opt("--model", "HF model directory, or 'default' (all-MiniLM-L6-v2)")
    opt(
        "--data",
        "vader-movies | vader-tweets | vader-amazon | vader-nyt | bbc | snli (sentence pairs) | csv:PATH "
        "(columns text,label; text,text_pair,label for sentence pairs) | jsonl:PATH (the same fields)",
    )
    opt("--method", choices=["bayeslora", "lora", "mcdropout"])
    opt("--posterior", choices=["gate", "additive"])
    opt("--rank", "initial rank r0 of every adapter", type=int)
    opt("--alpha", "LoRA alpha (scale = alpha / r0)", type=float)
    opt("--targets", "module names or suffixes, a regex, or all-linear", nargs="+")
    opt(
        "--epochs",
        "training epochs; default: at least 2 and at least 150 optimizer steps (at most 20 epochs)",
        type=float,
    )
    opt("--lr", "learning rate of factors and head", type=float)
    opt("--rank-lr", "learning rate of log_alpha/log_sigma2", type=float)
    opt("--batch-size", type=int)
    opt("--max-length", type=int)
    opt("--max-train", "use at most this many training examples", type=int)
    p.add_argument(
        "--kl-scale",
        type=float,
        default=argparse.SUPPRESS,
        help="multiplier of the KL term (default: 1e-6 without 1/N; recipe vi: 0.02 of the "
        "per-example KL for the gate posterior, 0.01 for additive)",
    )
    opt("--kl-group", choices=["params", "unit"])
    steps = " (an integer: steps; a decimal in [0, 1]: a fraction of the run)"
    opt("--kl-freeze", "steps with no KL term" + steps, type=_schedule)
    opt("--kl-warmup", "steps of linear KL warm-up" + steps, type=_schedule)
    opt("--sample-start", "first step with noise" + steps, type=_schedule)
    opt("--init-log-alpha", type=float)
    opt("--prune-threshold", type=float)
    opt("--prune-start", "first pruning pass" + steps, type=_schedule)
    opt("--prune-every", "steps between pruning passes" + steps, type=_schedule)
    opt(
        "--refit-start",
        "settle the ranks here, then train the surviving factors with the KL off" + steps,
        type=_schedule,
    )
    opt(
        "--rank-select",
        "how the ranks are settled at --refit-start: threshold (τ) or validation (the smallest "
        "cut of the relevance order within --select-tolerance of the validation NLL)",
        choices=["threshold", "validation"],
    )
    opt("--select-tolerance", "validation NLL (nats) a rank cut may cost", type=float)
    opt(
        "--noise-scale",
        "multiply the learned posterior variance by this after training, or 'fit': the value in "
        "(0, 1] with the lowest MC validation NLL (a tempered posterior)",
        type=_noise_scale,
    )
    opt("--min-rank", type=int)
    opt("--samples", "MC samples for the final evaluation", type=int)
    opt("--seed", type=int)


def _settings(args: argparse.Namespace) -> Any:
    from ..train.settings import DEFAULT_RECIPE, TrainSettings

    fields = TrainSettings.__dataclass_fields__
    given = {k: getattr(args, k) for k in fields if hasattr(args, k) and k != "recipe"}
    return TrainSettings.for_recipe(getattr(args, "recipe", DEFAULT_RECIPE), **given)


def _run_train(args: argparse.Namespace) -> int:
    from ..train.pipeline import train
    from . import lm

    if lm.is_lm(args):
        return lm.run_train(args, emit)
    lm.refuse_lm_options(args)
    quiet = args.json
    summary = train(
        _settings(args),
        args.out,
        progress=not quiet,
        log=(lambda *a: print(*a, file=sys.stderr)) if quiet else print,
    )
    payload = {k: v for k, v in summary.items() if k not in ("model", "tokenizer", "data", "log_history")}
    m = summary["metrics"]["test_mean"]
    text = (
        f"saved {args.out}: total rank {summary['total_rank']}/{summary['initial_total_rank']}, "
        f"test accuracy {m['accuracy']:.4f}, NLL {m['nll']:.4f}, ECE {m['ece']:.4f}"
    )
    emit(args, payload, text)
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    """Add ``bayeslora train`` to the subparsers ``sub``."""
    from ..train.settings import TrainSettings

    p = sub.add_parser(
        "train",
        help="fine-tune a classifier with BayesLoRA, LoRA or MC dropout",
        description="Fine-tune a sequence classifier; writes adapter/ and run.json to --out.",
    )
    from .lm import add_train_options

    _add_train_options(p, TrainSettings())
    add_train_options(p)
    p.add_argument("--out", required=True, help="output directory (checkpoint)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_run_train)


def _run_quickstart(args: argparse.Namespace) -> int:
    from ..lm_quickstart import run_lm_quickstart
    from ..quickstart import run_quickstart

    run = run_lm_quickstart if args.task == "causal-lm" else run_quickstart
    result = run(
        args.out,
        seed=args.seed,
        max_train=args.max_train,
        epochs=args.epochs,
        quiet=args.json,
        max_eval=args.max_eval,
    )
    emit(args, result, f"report: {result['report']}")
    return 0


def add_quickstart(sub: argparse._SubParsersAction) -> None:
    """Add ``bayeslora quickstart`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "quickstart",
        help="the whole idea in one command, on the default model and data",
        description="Train BayesLoRA and plain LoRA on VADER movie reviews with all-MiniLM-L6-v2, "
        "compare ranks, accuracy and calibration, detect out-of-domain text, export a bundle, score "
        "sentences with the Rust runtime, and write report.md with plots.",
    )
    p.add_argument("--out", default="bayeslora-quickstart", help="output directory")
    p.add_argument(
        "--task",
        choices=["classification", "causal-lm"],
        default="classification",
        help="causal-lm: BayesLoRA vs LoRA on SmolLM2-135M-Instruct and Shakespeare's plays, "
        "fortunes as out-of-domain text",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-train", type=int, default=None, help="training examples per run (default: quickstart's)"
    )
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument(
        "--max-eval",
        type=int,
        default=None,
        help="evaluate on at most this many examples per set (also caps the validation examples of "
        "the rank cut: for smoke runs)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with the results")
    p.set_defaults(handler=_run_quickstart)
