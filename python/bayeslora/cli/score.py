"""``bayeslora score``: JSON lines of a bundle's scores, in one process or on a Dask cluster (no torch)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import BayesLoRAError
from .output import fail, one_line


def add_score(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bayeslora score`` to the subparsers ``subparsers``."""
    p = subparsers.add_parser(
        "score",
        help="score texts with a bundle, with uncertainty (no torch needed)",
        description="Score texts with an exported bundle on CPU. Prints one JSON line per input, in input "
        "order: text (and text_pair for sentence pairs), label, probs, confidence, entropy, "
        "expected_entropy, mutual_info, variance. With "
        "--workers or --scheduler the texts are scored on a Dask cluster (pip install 'bayeslora[dask]'), "
        "with the same numbers as in one process.",
    )
    p.add_argument("bundle", help="bundle directory written by `bayeslora export`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", action="extend", metavar="T", help="texts to score")
    src.add_argument(
        "--file",
        metavar="F",
        help="file with one text per line ('-' = stdin); a .jsonl file holds one JSON object per line "
        'with the text in its "text" field, and for sentence pairs the second text in "text_pair"',
    )
    p.add_argument(
        "--pair",
        nargs="+",
        action="extend",
        metavar="B",
        help="with --text: the second text of each sentence pair (one per --text), e.g. "
        "--text PREMISE --pair HYPOTHESIS",
    )
    p.add_argument("--samples", type=int, default=16, help="posterior samples per input (0 = mean mode)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise streams")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="K",
        help="runtime threads (default: all); with --workers, threads per worker (default: cores / N); "
        "with --scheduler, per worker (default: the worker's Dask threads)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="texts per runtime call (default 64), or per Dask task (default: spread over the workers, "
        "at most 1024)",
    )
    dask = p.add_mutually_exclusive_group()
    dask.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="score on a local Dask cluster of N worker processes (started and stopped here)",
    )
    dask.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="score on the Dask cluster of this scheduler (e.g. tcp://scheduler.example:8786); the bundle "
        "path must be readable on its workers",
    )
    p.add_argument("--json", action="store_true", help="JSON lines (the default and only output format)")
    p.set_defaults(handler=_score)


class _Refused(Exception):
    """A one-line refusal of ``score``'s input: (message, exit code)."""


def _read_texts(name: str) -> tuple[list[str], list[str] | None]:
    """The texts of ``--file``: non-blank lines, or the "text" fields of a .jsonl file (with their
    "text_pair" fields when every line has one, for sentence pairs)."""
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as e:
        raise _Refused(f"cannot read {name}: {e.strerror or e}", 1) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _Refused(f"{name} is not UTF-8 text (byte {e.start}, line {line})", 1) from None
    if not name.lower().endswith((".jsonl", ".ndjson")):
        return [line for line in text.splitlines() if line.strip()], None
    texts: list[str] = []
    pairs: list[str] = []
    with_pairs: bool | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _Refused(f"{name} line {n}: not JSON ({e.msg})", 1) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise _Refused(f'{name} line {n}: not a JSON object with a string "text" field', 1)
        if with_pairs is None:
            with_pairs = "text_pair" in record
        if with_pairs != ("text_pair" in record):
            raise _Refused(f'{name} line {n}: "text_pair" on some lines but not on others', 1)
        if with_pairs and not isinstance(record["text_pair"], str):
            raise _Refused(f'{name} line {n}: "text_pair" is not a string', 1)
        texts.append(record["text"])
        if with_pairs:
            pairs.append(record["text_pair"])
    return texts, pairs if with_pairs else None


def _score(args: argparse.Namespace) -> int:
    from ..runtime import MAX_SAMPLES, MAX_SEED, MAX_THREADS, Scorer, check_int

    try:
        check_int("--samples", args.samples, 0, MAX_SAMPLES)
        check_int("--seed", args.seed, 0, MAX_SEED)
        if args.threads is not None:
            check_int("--threads", args.threads, 1, MAX_THREADS)
        if args.workers is not None:
            check_int("--workers", args.workers, 1, MAX_THREADS)
    except BayesLoRAError as e:
        return fail(str(e), 2)  # a usage error
    if args.batch_size is not None and args.batch_size < 1:
        return fail("--batch-size must be >= 1", 2)
    pairs: list[str] | None = None
    if args.file is not None:
        if args.pair is not None:
            return fail('--pair goes with --text; in a --file (.jsonl) give each line a "text_pair"', 2)
        try:
            texts, pairs = _read_texts(args.file)
        except _Refused as e:
            return fail(*e.args)
    else:
        texts = list(args.text)
        if args.pair is not None:
            pairs = list(args.pair)
            if len(pairs) != len(texts):
                return fail(f"{len(texts)} --text but {len(pairs)} --pair: give one pair per text", 2)
        for flag, values in (("--text", texts), ("--pair", pairs or [])):
            for i, t in enumerate(values, 1):
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError:
                    return fail(
                        f"{flag}: argument {i} is not valid UTF-8 (or not in the locale's encoding)", 2
                    )
    if args.workers is not None or args.scheduler is not None:
        if pairs is not None:
            return fail("sentence pairs are scored in one process: drop --workers / --scheduler", 2)
        return _score_on_dask(args, texts)
    try:
        scorer = Scorer(args.bundle, num_threads=args.threads)
        batch = args.batch_size or 64
        for start in range(0, len(texts), batch):
            chunk = texts[start : start + batch]
            chunk_pairs = None if pairs is None else pairs[start : start + batch]
            records = scorer.records(chunk, samples=args.samples, seed=args.seed, text_pairs=chunk_pairs)
            for record in records:
                print(json.dumps(record, ensure_ascii=False))
    except BayesLoRAError as e:
        return fail(str(e))
    return 0


def _score_on_dask(args: argparse.Namespace, texts: list[str]) -> int:
    """``score`` on a Dask cluster: a LocalCluster of ``--workers`` processes, or ``--scheduler``'s."""
    import logging

    from .. import distributed as bl_distributed
    from ..runtime import shared_scorer

    try:
        scorer = shared_scorer(args.bundle, 1)  # the labels; a bad bundle fails before any cluster
        bl_distributed._require_distributed()
    except BayesLoRAError as e:
        return fail(str(e))
    from distributed import Client, LocalCluster

    cluster = client = None
    try:
        if args.workers is not None:
            num_threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
            cluster = LocalCluster(
                n_workers=args.workers,
                threads_per_worker=num_threads,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            client = Client(cluster)
        else:
            num_threads = args.threads
            try:
                client = Client(args.scheduler)
            except (OSError, ValueError, TypeError) as e:
                return fail(f"cannot connect to the Dask scheduler {args.scheduler}: {one_line(e)}")
        start = 0
        for part in bl_distributed.iter_score(
            args.bundle,
            texts,
            samples=args.samples,
            seed=args.seed,
            client=client,
            num_threads=num_threads,
            chunk_size=args.batch_size,
            progress=sys.stderr.isatty(),
        ):
            n = len(part["label"])
            for record in scorer.records_of(texts[start : start + n], part):
                print(json.dumps(record, ensure_ascii=False))
            start += n
    except BayesLoRAError as e:
        return fail(str(e))
    except Exception as e:
        if type(e).__module__.split(".")[0] not in ("distributed", "dask"):
            raise
        return fail(f"Dask: {type(e).__name__}: {one_line(e)}")  # e.g. KilledWorker
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return 0
