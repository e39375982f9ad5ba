"""The ``bayeslora`` command line. Each command registers a subparser; ``--json`` prints JSON."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="bayeslora",
        description="Bayesian LoRA: learned adapter rank, calibrated uncertainty, torch-free scoring.",
    )
    parser.add_argument("--version", action="version", version=f"bayeslora {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_analyze(subparsers)
    return parser


def _add_analyze(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="per-module ranks, relevance and SVD alignment of a checkpoint or bundle",
        description="Rank analysis (SPEC §8): which rank directions did the posterior keep, and do "
        "they align with the singular directions of ΔW? Needs no torch.",
    )
    p.add_argument("path", metavar="CKPT|BUNDLE", help="adapter checkpoint or runtime bundle directory")
    p.add_argument("--plots", metavar="DIR", help="write spectrum.png and alignment.png here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--threads", type=int, default=None, help="threads for the analysis (default: all)")
    p.set_defaults(handler=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    import json

    from .analysis import analyze
    from .errors import BayesLoRAError

    try:
        report = analyze(args.path, num_threads=args.threads)
    except BayesLoRAError as e:
        print(f"bayeslora analyze: {e}", file=sys.stderr)
        return 1
    plots = []
    if args.plots:
        from ._analysis_plots import write_plots

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
