"""The ``bayeslora`` command line (console script ``bayeslora.cli:main``; ``python -m bayeslora.cli``).

One module per group of commands, each adding its subparsers and handlers; none imports torch at its
top (the commands that need it import it when they run):

- ``parser.py``: the parser, ``--version`` and :func:`main` (one-line errors, exit codes);
- ``output.py``: what every command prints (text or ``--json``) and its one-line errors;
- ``train.py``: ``train`` (options default to the recipe's) and ``quickstart``;
- ``evaluate.py``: ``evaluate`` and ``analyze``;
- ``score.py``: ``score``, in one process or on Dask;
- ``export.py``: ``export``, ``export-peft`` and ``import-peft``.
"""

from __future__ import annotations

from .parser import build_parser, main
from .train import _settings as _settings  # TrainSettings of parsed options (tests)

__all__ = ["build_parser", "main"]
