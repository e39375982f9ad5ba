"""``bayeslora evaluate`` (metrics of a checkpoint or bundle) and ``bayeslora analyze`` (ranks and SVD
alignment); neither needs torch for a bundle."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import BayesLoRAError
from .output import emit


def _run_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate, format_result
    from . import lm

    if lm.is_lm_checkpoint(args.source):
        return lm.run_evaluate(args, emit)
    result = evaluate(
        args.source,
        data=args.data or "vader-movies",
        ood=["bbc"] if args.ood is None else args.ood,
        shift=args.shift,
        samples=args.samples,
        seed=args.seed,
        max_eval=args.max_eval,
        plots=args.plots,
        num_threads=args.threads,
        split=args.split,
    )
    emit(args, result, format_result(result))
    return 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """Add ``bayeslora evaluate`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "evaluate",
        help="accuracy, NLL, Brier, ECE/MCE, shift, OOD AUROC/FPR95, AURC of a checkpoint or bundle",
        description="Evaluate a training checkpoint (torch) or an exported bundle (Rust runtime, no torch) "
        "on the test split of --data, on shifted domains, and on out-of-domain sets.",
    )
    p.add_argument("source", help="checkpoint directory (bayeslora train --out) or bundle (bayeslora export)")
    p.add_argument(
        "--data",
        default=None,
        help="in-domain dataset: every row of csv:PATH or jsonl:PATH (a file given here is a test set; "
        "a text_pair column or field makes it sentence pairs), the test "
        "split of a named dataset (default: vader-movies; for a causal-LM checkpoint, a text source "
        "- text:PATH, jsonl:PATH, shakespeare - default: the one it was trained on)",
    )
    p.add_argument(
        "--split",
        choices=["test", "all"],
        default=None,
        help="score this split of every set instead: test (the seed's 10 %% test split, e.g. of a "
        "CSV that holds a whole dataset) or all rows",
    )
    p.add_argument(
        "--ood",
        nargs="*",
        default=None,
        help="out-of-domain datasets (default: bbc; for a causal-LM checkpoint, text sources such as "
        "text:PATH or fortunes, default none)",
    )
    p.add_argument("--shift", nargs="*", default=None, help="shifted datasets with the same labels")
    p.add_argument("--samples", type=int, default=16, help="posterior samples (0 = mean mode)")
    p.add_argument("--seed", type=int, default=0, help="split seed (use the training seed) and noise seed")
    p.add_argument("--max-eval", type=int, default=None, help="at most this many examples per set")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (bundles)")
    p.add_argument("--plots", default=None, help="directory for PNG plots")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_run_evaluate)


def add_analyze(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bayeslora analyze`` to the subparsers ``subparsers``."""
    p = subparsers.add_parser(
        "analyze",
        help="per-module ranks, relevance and SVD alignment of a checkpoint or bundle",
        description="Rank analysis (docs/method.md §8): which rank directions did the posterior keep, and do "
        "they align with the singular directions of ΔW? Needs no torch.",
    )
    p.add_argument("path", metavar="CKPT|BUNDLE", help="adapter checkpoint or runtime bundle directory")
    p.add_argument("--plots", metavar="DIR", help="write spectrum.png and alignment.png here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--threads", type=int, default=None, help="threads for the analysis (default: all)")
    p.set_defaults(handler=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from ..analysis import analyze

    try:
        report = analyze(args.path, num_threads=args.threads)
    except BayesLoRAError as e:
        print(f"bayeslora analyze: {e}", file=sys.stderr)
        return 1
    plots = []
    if args.plots:
        from ..analysis.plots import write_plots

        plots = [str(p) for p in write_plots(report, args.plots)]
    if args.json:
        out = report.to_dict()
        out["plots"] = plots
        print(json.dumps(out))
    else:
        print(report.table())
        for p in plots:
            print(f"wrote {p}")
    return 0
