"""What every command prints: its result (text, or one JSON object with ``--json``) and one-line errors."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    """Print ``payload`` as one JSON object with ``--json``, else ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))
    else:
        print(text)


def fail(message: str, code: int = 1) -> int:
    """Print ``bayeslora: error: MESSAGE`` to stderr; returns the exit code ``code``."""
    print(f"bayeslora: error: {message}", file=sys.stderr)
    return code


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (its type name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__
