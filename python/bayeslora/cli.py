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
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


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
