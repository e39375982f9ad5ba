"""``bayeslora bench``: how fast a bundle scores on this machine (no torch)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import BayesLoRAError
from .output import fail

_NOTE = (
    "GFLOP/s counts a full forward pass per input and per sample (what an eager framework computes: "
    "projections, feed-forward, attention, head); the runtime executes less (the last layer for token 0 "
    "only, and at S > 0 layer 0's products once for all samples), so the share of the peak is "
    "forward-equivalent, not what the cores did. Peak: FMA chains of the kernels' widest vectors on as "
    "many cores, the larger of two measurements right before and after each case. Tokenizing is not timed."
)


def add_bench(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bayeslora bench`` to the subparsers ``subparsers``."""
    p = subparsers.add_parser(
        "bench",
        help="time a bundle's scoring on this machine: inputs/s per threads, batch and samples (no torch)",
        description="Time the runtime scoring a bundle on this CPU for every combination of --threads, "
        "--batch and --samples: milliseconds per call (median and best), inputs per second, GFLOP/s and "
        "their share of the FMA peak measured on as many cores. Inputs are random token ids of "
        "--seq-len tokens, or texts of --file through the bundle's tokenizer. Prints a Markdown table, "
        "or one JSON object per case with --json.",
    )
    p.add_argument("bundle", help="bundle directory written by `bayeslora export`")
    p.add_argument(
        "--threads",
        nargs="+",
        type=int,
        default=None,
        metavar="K",
        help="runtime thread counts (default: 1 and all cores)",
    )
    p.add_argument(
        "--batch", nargs="+", type=int, default=[1, 8], metavar="B", help="inputs per call (default: 1 8)"
    )
    p.add_argument(
        "--samples",
        nargs="+",
        type=int,
        default=[0, 16],
        metavar="S",
        help="posterior samples per input, 0 = mean mode (default: 0 16)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--seq-len",
        type=int,
        default=None,
        metavar="T",
        help="tokens per random input (default: the bundle's max_length, at most 128)",
    )
    src.add_argument("--file", metavar="F", help="score the first texts of this file (one per line) instead")
    p.add_argument(
        "--min-time", type=float, default=1.0, metavar="SEC", help="seconds of timed calls per case"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and of the posterior noise")
    p.add_argument("--json", action="store_true", help="one JSON object per case instead of the table")
    p.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    from .. import benchmark as bench
    from ..distributed import _progress
    from ..runtime import MAX_SAMPLES, MAX_SEED, MAX_THREADS, check_int
    from .score import _read_texts, _Refused

    try:
        for k in args.threads or []:
            check_int("--threads", k, 1, MAX_THREADS)
        for b in args.batch:
            check_int("--batch", b, 1, bench.MAX_BATCH)
        for s in args.samples:
            check_int("--samples", s, 0, MAX_SAMPLES)
        check_int("--seed", args.seed, 0, MAX_SEED)
        if args.seq_len is not None:
            check_int("--seq-len", args.seq_len, 1, 1 << 20)
    except BayesLoRAError as e:
        return fail(str(e), 2)  # a usage error
    if not 0 < args.min_time <= bench.MAX_MIN_TIME:
        return fail(f"--min-time must be in (0, {bench.MAX_MIN_TIME:g}] seconds, got {args.min_time:g}", 2)
    texts = None
    if args.file is not None:
        try:
            texts, pairs = _read_texts(args.file)
        except _Refused as e:
            return fail(*e.args)
        if not texts:
            return fail(f"{args.file} has no texts", 1)
        if pairs is not None:
            return fail(f"{args.file}: sentence pairs are not benchmarked; give one text per line", 2)
    threads = args.threads or [1, bench.cores()]
    try:
        head = bench.header(args.bundle)
        if not args.json:
            print(f"bayeslora bench {args.bundle}: {head}", flush=True)
        cases = len(set(threads)) * len(args.batch) * len(args.samples)
        bar = _progress(sys.stderr.isatty(), cases, "case", desc="bench")

        def on_case(r: bench.BenchResult) -> None:
            if args.json:
                print(json.dumps(r.as_dict()), flush=True)
            if bar is not None:
                bar.update(1)

        try:
            results = bench.benchmark(
                args.bundle,
                threads=threads,
                batches=args.batch,
                samples=args.samples,
                seq_len=args.seq_len,
                texts=texts,
                min_time=args.min_time,
                seed=args.seed,
                on_case=on_case,
            )
        finally:
            if bar is not None:
                bar.close()
    except BayesLoRAError as e:
        return fail(str(e))
    if not args.json:
        print()
        print(bench.table(results))
        print()
        print(_NOTE)
    return 0
