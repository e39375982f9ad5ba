"""``bayeslora export`` (a runtime bundle), ``export-peft`` and ``import-peft`` (PEFT LoRA directories):
the commands that load a trained adapter (torch) and write a directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import BayesLoRAError, ConfigError
from ..files import ADAPTER_WEIGHTS, BUNDLE_META, PEFT_CONFIG, RUN_FILE, SEQ_CLS_HEAD_WEIGHTS
from .output import emit, fail


def add_export(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bayeslora export`` to the subparsers ``subparsers``."""
    p = subparsers.add_parser(
        "export",
        help="export a trained adapter and its base model as a runtime bundle",
        description="Export CKPT as a bundle the torch-free runtime scores: a `bayeslora train` output "
        "directory, or an adapter directory (bl.save_adapter) on top of the base HF model --model DIR.",
    )
    _add_trained_source(p)
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to write")
    _add_force(p, "bundle")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight storage dtype")
    p.add_argument("--no-prune", action="store_true", help="remove masked ranks only (no pruning at τ)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per input (default: tokenizer's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=_export)


def _add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help=f"replace --out even if it is a non-empty directory that is not a {what} bayeslora wrote",
    )


def _check_out(args: argparse.Namespace, kind: str, *sources: str | None) -> None:
    """Refuse a bad --out before anything is loaded (the writer checks again)."""
    from .._atomic import check_output_dir

    check_output_dir(args.out, kind=kind, force=args.force, sources=[s for s in sources if s])


def _add_trained_source(p: argparse.ArgumentParser) -> None:
    """The CKPT argument of the export commands and the --model it may need (see _load_trained)."""
    p.add_argument("ckpt", help="training checkpoint (bayeslora train --out) or adapter directory")
    p.add_argument(
        "--model", default=None, metavar="DIR", help="base HF model directory (adapter directories)"
    )


def _wrote(args: argparse.Namespace, key: str, out: str | Path, ranks: dict[str, int], kind: str) -> int:
    """Report a written directory: ``{key: out, "ranks": ..., "total_rank": ...}`` with ``--json``,
    else ``wrote OUT (N <kind> modules, total rank T)``; returns exit code 0."""
    total = sum(ranks.values())
    emit(
        args,
        {key: str(out), "ranks": ranks, "total_rank": total},
        f"wrote {out} ({len(ranks)} {kind} modules, total rank {total})",
    )
    return 0


def _num_labels(ckpt: Path) -> int | None:
    from safetensors import safe_open

    with safe_open(str(ckpt / ADAPTER_WEIGHTS), framework="numpy") as f:
        for key in f.keys():
            if key.endswith(SEQ_CLS_HEAD_WEIGHTS):
                return int(f.get_slice(key).get_shape()[0])
    return None


def _load_trained(ckpt: Path, model_dir: str | None) -> tuple[Any, Any, dict | None]:
    """(model, tokenizer or None, run.json or None) of a ``bayeslora train`` checkpoint, or of an
    adapter directory (``bl.save_adapter``) loaded onto the base HF model ``model_dir``."""
    if (ckpt / RUN_FILE).is_file():
        from ..train.pipeline import load_checkpoint

        return load_checkpoint(ckpt)
    if model_dir is None:
        raise ConfigError(f"{ckpt} is an adapter directory: name its base model with --model DIR")
    from transformers import AutoModelForSequenceClassification

    from ..nn.checkpoint import load_adapter

    n = _num_labels(ckpt) if (ckpt / ADAPTER_WEIGHTS).exists() else None
    kwargs = {"num_labels": n} if n is not None else {}
    model = AutoModelForSequenceClassification.from_pretrained(Path(model_dir), **kwargs).eval()
    load_adapter(model, ckpt)
    return model, None, None


def _export(args: argparse.Namespace) -> int:
    from ..formats.bundle import export

    try:
        _check_out(args, "bundle", args.ckpt, args.model)
        model, tokenizer, run = _load_trained(Path(args.ckpt), args.model)
        if tokenizer is None:  # an adapter directory: the base model's tokenizer, if it has one
            from transformers import AutoTokenizer

            model_dir = Path(args.model)
            try:
                tokenizer = AutoTokenizer.from_pretrained(model_dir)
            except (OSError, ValueError):
                tokenizer = model_dir / "tokenizer.json" if (model_dir / "tokenizer.json").exists() else None
        max_length = args.max_length or (int(run["settings"]["max_length"]) if run else None)
        out = export(
            model,
            tokenizer,
            args.out,
            dtype=args.dtype,
            prune=not args.no_prune,
            max_length=max_length,
            force=args.force,
        )
    except BayesLoRAError as e:
        return fail(str(e))
    meta = json.loads((out / BUNDLE_META).read_text())
    ranks = {name: m["rank"] for name, m in meta["modules"].items()}
    return _wrote(args, "bundle", out, ranks, "adapted")


def add_export_peft(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bayeslora export-peft`` to the subparsers ``subparsers``."""
    p = subparsers.add_parser(
        "export-peft",
        help="write a trained adapter as a standard PEFT LoRA directory",
        description="Write the mean-mode adapter of CKPT (pruned ranks removed) as a PEFT LoRA directory "
        "(adapter_config.json + adapter_model.safetensors) that peft.PeftModel.from_pretrained loads; the "
        "posterior's rank parameters go to bayeslora_posterior.{json,safetensors} beside them.",
    )
    _add_trained_source(p)
    p.add_argument("--out", required=True, metavar="DIR", help="PEFT directory to write")
    _add_force(p, "PEFT export")
    p.add_argument("--no-prune", action="store_true", help="remove masked ranks only (no pruning at τ)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=_export_peft)


def _export_peft(args: argparse.Namespace) -> int:
    from ..formats.peft import export_peft

    try:
        _check_out(args, "peft", args.ckpt, args.model)
        model, _, _ = _load_trained(Path(args.ckpt), args.model)
        out = export_peft(model, args.out, prune=not args.no_prune, force=args.force)
    except BayesLoRAError as e:
        return fail(str(e))
    cfg = json.loads((out / PEFT_CONFIG).read_text())
    return _wrote(args, "peft_dir", out, cfg["rank_pattern"], "LoRA")


def add_import_peft(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bayeslora import-peft`` to the subparsers ``subparsers``."""
    p = subparsers.add_parser(
        "import-peft",
        help="turn a PEFT LoRA directory into a BayesLoRA checkpoint",
        description="Load a PEFT LoRA (adapter_config.json + adapter_model.safetensors) onto its base model "
        "as BayesLoRA adapters (PEFT's factors become the posterior means) and write a checkpoint that "
        "`bayeslora export` and `bayeslora evaluate` take.",
    )
    p.add_argument("peft_dir", help="PEFT adapter directory (save_pretrained)")
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="base HF model directory (default: base_model_name_or_path of the PEFT config, or 'default')",
    )
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint directory to write")
    _add_force(p, "checkpoint")
    p.add_argument(
        "--method",
        default=None,
        choices=["bayeslora", "lora", "mcdropout"],
        help="default: bayeslora, or what bayeslora_posterior.json (export-peft) says",
    )
    p.add_argument("--posterior", default=None, choices=["gate", "additive"], help="default: gate")
    p.add_argument("--init-log-alpha", type=float, default=None, help="initial log α (gate; default -3)")
    p.add_argument(
        "--init-log-sigma2", type=float, default=None, help="initial log σ² (additive; default -8)"
    )
    p.add_argument("--max-length", type=int, default=64, help="tokens per input for export/evaluate")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=_import_peft)


def _import_peft(args: argparse.Namespace) -> int:
    from ..config import BayesLoRAConfig
    from ..formats.peft import import_peft_checkpoint

    options = {
        k: getattr(args, k)
        for k in ("method", "posterior", "init_log_alpha", "init_log_sigma2")
        if getattr(args, k) is not None
    }
    try:
        # no options: restore the posterior export-peft saved beside the PEFT files, if any
        config = BayesLoRAConfig(**options) if options else None
        run = import_peft_checkpoint(
            args.peft_dir,
            args.out,
            model=args.model,
            config=config,
            max_length=args.max_length,
            force=args.force,
        )
    except BayesLoRAError as e:
        return fail(str(e))
    return _wrote(args, "checkpoint", args.out, run["ranks"], "adapted")
