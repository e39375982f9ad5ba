"""The causal-LM side of the command line (issue #14): ``bayeslora train --task causal-lm``,
``bayeslora evaluate`` on an LM checkpoint and ``bayeslora quickstart --task causal-lm``. The parsers
live in ``bayeslora.cli``; it calls these hooks."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

Emit = Callable[[argparse.Namespace, dict[str, Any], str], None]
_NOT_OPTIONS = ("out", "json", "handler", "command")


def add_train_options(p: argparse.ArgumentParser) -> None:
    """``--task`` and the options only a causal LM takes (the GPU knobs)."""
    p.add_argument(
        "--task",
        choices=["classification", "causal-lm"],
        default=argparse.SUPPRESS,
        help="classification (default) or causal-lm: fine-tune a causal LM on --data text:PATH, "
        "jsonl:PATH (records with prompt/response, or text) or shakespeare, --model DIR or smollm2",
    )
    p.add_argument(
        "--max-eval",
        type=int,
        default=argparse.SUPPRESS,
        help="causal-lm: evaluate on at most this many validation and test blocks",
    )
    p.add_argument(
        "--kl-temper",
        type=float,
        default=argparse.SUPPRESS,
        help="causal-lm: kl_scale = KL_TEMPER / (predicted tokens per block) unless --kl-scale is given "
        "(default 0, chosen on validation perplexity: benches/RESULTS_lm.md; 1 = the untempered ELBO)",
    )
    for flag, text in (
        ("--bf16", "causal-lm: cast the base model to bfloat16 (the adapters stay float32)"),
        ("--fp16", "causal-lm: cast the base model to float16 (the adapters stay float32)"),
        ("--gradient-checkpointing", "causal-lm: recompute activations in the backward pass"),
        ("--load-in-4bit", "causal-lm: an NF4 4-bit base (QLoRA; bitsandbytes, extra qlora; CUDA or CPU)"),
    ):
        p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)


def refuse_lm_options(args: argparse.Namespace) -> None:
    """A causal-LM-only option given without ``--task causal-lm`` is one ``ConfigError``."""
    from ..train.lm_pipeline import LMSettings
    from ..train.settings import TrainSettings

    lm_only = {f.name for f in dataclasses.fields(LMSettings)} - set(TrainSettings.__dataclass_fields__)
    given = sorted(k for k in vars(args) if k in lm_only and k not in ("task",))
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(f"{flags}: for --task causal-lm only")


def is_lm(args: argparse.Namespace) -> bool:
    return getattr(args, "task", "classification") == "causal-lm"


def lm_settings(args: argparse.Namespace) -> Any:
    """``LMSettings`` from the options given; a classification-only option is refused."""
    from ..train.lm_pipeline import LMSettings

    fields = {f.name for f in dataclasses.fields(LMSettings)}
    given = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}
    foreign = sorted(k for k in given if k not in fields)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise ConfigError(f"--task causal-lm does not take {flags} (classification options)")
    return LMSettings(**given)


def run_train(args: argparse.Namespace, emit: Emit) -> int:
    from ..train.lm_pipeline import train_lm

    quiet = args.json
    summary = train_lm(
        lm_settings(args),
        args.out,
        progress=not quiet,
        log=(lambda *a: print(*a, file=sys.stderr)) if quiet else print,
    )
    payload = {k: v for k, v in summary.items() if k not in ("model", "tokenizer", "log_history")}
    metrics = summary["metrics"]
    m = metrics.get("test_mc", metrics["test_mean"])
    text = (
        f"saved {args.out}: total rank {summary['total_rank']}/{summary['initial_total_rank']}, "
        f"test perplexity {m['perplexity']:.3f}, token accuracy {m['token_accuracy']:.4f}, "
        f"ECE {m['ece']:.4f}"
    )
    emit(args, payload, text)
    return 0


def run_evaluate(args: argparse.Namespace, emit: Emit) -> int:
    from ..lm_evaluation import evaluate_lm, format_lm_result

    if args.shift:
        raise ConfigError("--shift is for classifiers; a causal LM takes --data and --ood text sources")
    result = evaluate_lm(
        args.source,
        data=args.data,
        ood=args.ood,
        samples=args.samples,
        seed=args.seed,
        max_eval=args.max_eval,
        split=args.split,
    )
    emit(args, result, format_lm_result(result))
    return 0


def is_lm_checkpoint(path: str) -> bool:
    from ..train.lm_pipeline import is_lm_checkpoint as check

    return check(path)
