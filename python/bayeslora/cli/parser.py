"""The ``bayeslora`` parser, ``--version``, and ``main``: one handler per command, every failure one line
(exit code 2 for bad arguments, 1 otherwise; ``BAYESLORA_DEBUG=1`` shows the traceback)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import BayesLoRAError
from .bench import add_bench
from .evaluate import add_analyze, add_evaluate
from .export import add_export, add_export_peft, add_import_peft
from .output import one_line
from .score import add_score
from .train import add_quickstart, add_train


def _version_text() -> str:
    """``bayeslora VERSION (kernels: ISA)``: the instruction set the runtime runs on here."""
    from .. import __version__
    from ..runtime import isa

    try:
        kernels = isa()
    except BayesLoRAError as e:
        kernels = f"error: {one_line(e)}"
    return f"bayeslora {__version__} (kernels: {kernels})"


class _VersionAction(argparse.Action):
    """``--version``, worked out only when asked (it loads the runtime to name its kernels)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show the version and the runtime's instruction set, and exit")
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(_version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The ``bayeslora`` argument parser, every command with its handler (``args.handler``)."""
    parser = argparse.ArgumentParser(
        prog="bayeslora",
        description="Bayesian LoRA: learned adapter rank, calibrated uncertainty, torch-free scoring.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_quickstart(sub)
    add_train(sub)
    add_evaluate(sub)
    add_export(sub)
    add_score(sub)
    add_bench(sub)
    add_analyze(sub)
    add_export_peft(sub)
    add_import_peft(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bayeslora ARGV`` (default: ``sys.argv[1:]``); returns the exit code: 0, 1 on an error, 2 on
    a usage error, 130 when interrupted. Every error is one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # bitsandbytes (extra qlora) logs a warning on import on AVX-512-BF16 CPUs when the optional hub
    # package `kernels` is absent; its pure-torch fallback is used. stderr stays for our one line.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except BayesLoRAError as e:
        print(f"bayeslora: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # only the training commands write checkpoints as they go
        trains = args.command in ("train", "quickstart")
        note = "; the last checkpoint in --out stays loadable" if trains else ""
        print(f"bayeslora: interrupted{note}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `bayeslora score ... | head`: the reader left
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 1
    except Exception as e:  # no traceback, ever (BAYESLORA_DEBUG=1 shows it)
        if os.environ.get("BAYESLORA_DEBUG"):
            raise
        if isinstance(e, (OSError, ValueError)):  # bad files, paths and values (UnicodeError too)
            print(f"bayeslora: error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        else:
            print(
                f"bayeslora: error: internal error, {type(e).__name__}: {one_line(e)} "
                "(please report it; BAYESLORA_DEBUG=1 shows the traceback)",
                file=sys.stderr,
            )
        return 1
