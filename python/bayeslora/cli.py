"""The ``bayeslora`` command line. Each command registers a subparser; ``--json`` prints JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="bayeslora",
        description="Bayesian LoRA: learned adapter rank, calibrated uncertainty, torch-free scoring.",
    )
    parser.add_argument("--version", action="version", version=f"bayeslora {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_export(subparsers)
    _add_score(subparsers)
    return parser


def _fail(message: str) -> int:
    print(f"bayeslora: error: {message}", file=sys.stderr)
    return 2


# ---- score (torch-free) ------------------------------------------------------------------------
def _add_score(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="score texts with a bundle, with uncertainty (no torch needed)",
        description="Score texts with an exported bundle on CPU. Prints one JSON line per input: "
        "text, label, probs, confidence, entropy, expected_entropy, mutual_info, variance.",
    )
    p.add_argument("bundle", help="bundle directory written by `bayeslora export`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", action="extend", metavar="T", help="texts to score")
    src.add_argument("--file", metavar="F", help="file with one text per line ('-' = stdin)")
    p.add_argument("--samples", type=int, default=16, help="posterior samples per input (0 = mean mode)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise streams")
    p.add_argument("--threads", type=int, default=None, metavar="K", help="runtime threads (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per runtime call")
    p.add_argument("--json", action="store_true", help="JSON lines (the default and only output format)")
    p.set_defaults(handler=_score)


def _score(args: argparse.Namespace) -> int:
    from .errors import BayesLoRAError
    from .runtime import Scorer

    if args.file is not None:
        try:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        except OSError as e:
            return _fail(f"cannot read {args.file}: {e}")
        texts = [line for line in text.splitlines() if line.strip()]
    else:
        texts = list(args.text)
    if args.samples < 0:
        return _fail("--samples must be >= 0")
    if args.batch_size < 1:
        return _fail("--batch-size must be >= 1")
    try:
        scorer = Scorer(args.bundle, num_threads=args.threads)
        for start in range(0, len(texts), args.batch_size):
            chunk = texts[start : start + args.batch_size]
            for record in scorer.records(chunk, samples=args.samples, seed=args.seed):
                print(json.dumps(record, ensure_ascii=False))
    except BayesLoRAError as e:
        return _fail(str(e))
    return 0


# ---- export ------------------------------------------------------------------------------------
def _add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a trained adapter and its base model as a runtime bundle",
        description="Export CKPT (a directory written by bl.save_adapter) on top of the base HF model "
        "--model DIR as a bundle the torch-free runtime scores.",
    )
    p.add_argument("ckpt", help="adapter directory (bl.save_adapter)")
    p.add_argument("--model", required=True, metavar="DIR", help="base HF model directory")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight storage dtype")
    p.add_argument("--no-prune", action="store_true", help="remove masked ranks only (no pruning at τ)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per input (default: tokenizer's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=_export)


def _num_labels(ckpt: Path) -> int | None:
    from safetensors import safe_open

    from .io import ADAPTER_WEIGHTS

    with safe_open(str(ckpt / ADAPTER_WEIGHTS), framework="numpy") as f:
        for key in f.keys():
            if key.endswith(("classifier.weight", "classifier.out_proj.weight")):
                return int(f.get_slice(key).get_shape()[0])
    return None


def _export(args: argparse.Namespace) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .errors import BayesLoRAError
    from .export import export
    from .io import load_adapter

    ckpt, model_dir = Path(args.ckpt), Path(args.model)
    try:
        kwargs = {}
        n = _num_labels(ckpt) if (ckpt / "adapter.safetensors").exists() else None
        if n is not None:
            kwargs["num_labels"] = n
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs).eval()
        load_adapter(model, ckpt)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError):
            tokenizer = model_dir / "tokenizer.json" if (model_dir / "tokenizer.json").exists() else None
        out = export(
            model, tokenizer, args.out, dtype=args.dtype, prune=not args.no_prune, max_length=args.max_length
        )
    except BayesLoRAError as e:
        return _fail(str(e))
    meta = json.loads((out / "bayeslora.json").read_text())
    ranks = {name: m["rank"] for name, m in meta["modules"].items()}
    if args.json:
        print(json.dumps({"bundle": str(out), "ranks": ranks, "total_rank": sum(ranks.values())}))
    else:
        print(f"wrote {out} ({len(ranks)} adapted modules, total rank {sum(ranks.values())})")
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
