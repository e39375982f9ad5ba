"""The ``bayeslora`` command line. Each command registers a subparser; ``--json`` prints JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import BayesLoRAError, ConfigError
from .files import ADAPTER_WEIGHTS, BUNDLE_META, PEFT_CONFIG, RUN_FILE, SEQ_CLS_HEAD_WEIGHTS


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))
    else:
        print(text)


# ---- train ------------------------------------------------------------------------------------
def _schedule(text: str) -> int | float:
    """A schedule value: an integer is a number of steps, a decimal a fraction of the run."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a step count nor a fraction") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction of the run is in [0, 1]")
    return value


def _noise_scale(text: str) -> float | str:
    if text == "fit":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'fit' or a number > 0") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a noise scale is > 0")
    return value


def _add_train_options(p: argparse.ArgumentParser, defaults: Any) -> None:
    """Every option defaults to SUPPRESS: only what the user gives overrides the recipe (the
    defaults in the help are the default recipe's, ``select``)."""

    def opt(flag: str, help: str = "", **kw: Any) -> None:
        name = flag.lstrip("-").replace("-", "_")
        shown = getattr(defaults, name, None)
        text = f"{help} (default: {shown})" if help else f"default: {shown}"
        p.add_argument(flag, default=argparse.SUPPRESS, help=text, **kw)

    opt(
        "--recipe",
        "where the defaults come from: select (the authors' training, then the validation rank "
        "cut and a refit half-way), paper (the authors' GLUE harness: additive posterior, "
        "noise-free training forward, 1e-6·KL, prune ℓ > 4) or vi (ours, variational: gate "
        "posterior, per-example KL, τ = 3)",
        choices=["select", "paper", "vi"],
    )
    opt("--model", "HF model directory, or 'default' (all-MiniLM-L6-v2)")
    opt(
        "--data",
        "vader-movies | vader-tweets | vader-amazon | vader-nyt | bbc | csv:PATH (columns text,label)",
    )
    opt("--method", choices=["bayeslora", "lora", "mcdropout"])
    opt("--posterior", choices=["gate", "additive"])
    opt("--rank", "initial rank r0 of every adapter", type=int)
    opt("--alpha", "LoRA alpha (scale = alpha / r0)", type=float)
    opt("--targets", "module names or suffixes, a regex, or all-linear", nargs="+")
    opt(
        "--epochs",
        "training epochs; default: at least 2 and at least 150 optimizer steps (at most 20 epochs)",
        type=float,
    )
    opt("--lr", "learning rate of factors and head", type=float)
    opt("--rank-lr", "learning rate of log_alpha/log_sigma2", type=float)
    opt("--batch-size", type=int)
    opt("--max-length", type=int)
    opt("--max-train", "use at most this many training examples", type=int)
    p.add_argument(
        "--kl-scale",
        type=float,
        default=argparse.SUPPRESS,
        help="multiplier of the KL term (default: 1e-6 without 1/N; recipe vi: 0.02 of the "
        "per-example KL for the gate posterior, 0.01 for additive)",
    )
    opt("--kl-group", choices=["params", "unit"])
    steps = " (an integer: steps; a decimal in [0, 1]: a fraction of the run)"
    opt("--kl-freeze", "steps with no KL term" + steps, type=_schedule)
    opt("--kl-warmup", "steps of linear KL warm-up" + steps, type=_schedule)
    opt("--sample-start", "first step with noise" + steps, type=_schedule)
    opt("--init-log-alpha", type=float)
    opt("--prune-threshold", type=float)
    opt("--prune-start", "first pruning pass" + steps, type=_schedule)
    opt("--prune-every", "steps between pruning passes" + steps, type=_schedule)
    opt(
        "--refit-start",
        "settle the ranks here, then train the surviving factors with the KL off" + steps,
        type=_schedule,
    )
    opt(
        "--rank-select",
        "how the ranks are settled at --refit-start: threshold (τ) or validation (the smallest "
        "cut of the relevance order within --select-tolerance of the validation NLL)",
        choices=["threshold", "validation"],
    )
    opt("--select-tolerance", "validation NLL (nats) a rank cut may cost", type=float)
    opt(
        "--noise-scale",
        "multiply the learned posterior variance by this after training, or 'fit': the value in "
        "(0, 1] with the lowest MC validation NLL (a tempered posterior)",
        type=_noise_scale,
    )
    opt("--min-rank", type=int)
    opt("--samples", "MC samples for the final evaluation", type=int)
    opt("--seed", type=int)


def _settings(args: argparse.Namespace) -> Any:
    from .train.pipeline import DEFAULT_RECIPE, TrainSettings

    fields = TrainSettings.__dataclass_fields__
    given = {k: getattr(args, k) for k in fields if hasattr(args, k) and k != "recipe"}
    return TrainSettings.for_recipe(getattr(args, "recipe", DEFAULT_RECIPE), **given)


def _run_train(args: argparse.Namespace) -> int:
    from . import lm_cli
    from .train.pipeline import train

    if lm_cli.is_lm(args):
        return lm_cli.run_train(args, _emit)
    quiet = args.json
    summary = train(
        _settings(args),
        args.out,
        progress=not quiet,
        log=(lambda *a: print(*a, file=sys.stderr)) if quiet else print,
    )
    payload = {k: v for k, v in summary.items() if k not in ("model", "tokenizer", "data", "log_history")}
    m = summary["metrics"]["test_mean"]
    text = (
        f"saved {args.out}: total rank {summary['total_rank']}/{summary['initial_total_rank']}, "
        f"test accuracy {m['accuracy']:.4f}, NLL {m['nll']:.4f}, ECE {m['ece']:.4f}"
    )
    _emit(args, payload, text)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train.pipeline import TrainSettings

    p = sub.add_parser(
        "train",
        help="fine-tune a classifier with BayesLoRA, LoRA or MC dropout",
        description="Fine-tune a sequence classifier; writes adapter/ and run.json to --out.",
    )
    from .lm_cli import add_train_options

    _add_train_options(p, TrainSettings())
    add_train_options(p)
    p.add_argument("--out", required=True, help="output directory (checkpoint)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_run_train)


# ---- quickstart -------------------------------------------------------------------------------
def _run_quickstart(args: argparse.Namespace) -> int:
    from .lm_quickstart import run_lm_quickstart
    from .quickstart import run_quickstart

    run = run_lm_quickstart if args.task == "causal-lm" else run_quickstart
    result = run(
        args.out,
        seed=args.seed,
        max_train=args.max_train,
        epochs=args.epochs,
        quiet=args.json,
        max_eval=args.max_eval,
    )
    _emit(args, result, f"report: {result['report']}")
    return 0


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="the whole idea in one command, on the default model and data",
        description="Train BayesLoRA and plain LoRA on VADER movie reviews with all-MiniLM-L6-v2, "
        "compare ranks, accuracy and calibration, detect out-of-domain text, export a bundle, score "
        "sentences with the Rust runtime, and write report.md with plots.",
    )
    p.add_argument("--out", default="bayeslora-quickstart", help="output directory")
    p.add_argument(
        "--task",
        choices=["classification", "causal-lm"],
        default="classification",
        help="causal-lm: BayesLoRA vs LoRA on SmolLM2-135M-Instruct and Shakespeare's plays, "
        "fortunes as out-of-domain text (a few minutes per run on 2 cores)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-train", type=int, default=None, help="training examples per run (default: quickstart's)"
    )
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument(
        "--max-eval", type=int, default=None, help="evaluate on at most this many examples per set"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with the results")
    p.set_defaults(handler=_run_quickstart)


# ---- evaluate ---------------------------------------------------------------------------------
def _run_evaluate(args: argparse.Namespace) -> int:
    from . import lm_cli
    from .evaluation import evaluate, format_result

    if lm_cli.is_lm_checkpoint(args.source):
        return lm_cli.run_evaluate(args, _emit)
    result = evaluate(
        args.source,
        data=args.data or "vader-movies",
        ood=["bbc"] if args.ood is None else args.ood,
        shift=args.shift,
        samples=args.samples,
        seed=args.seed,
        max_eval=args.max_eval,
        plots=args.plots,
        num_threads=args.threads,
        split=args.split,
    )
    _emit(args, result, format_result(result))
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="accuracy, NLL, Brier, ECE/MCE, shift, OOD AUROC/FPR95, AURC of a checkpoint or bundle",
        description="Evaluate a training checkpoint (torch) or an exported bundle (Rust runtime, no torch) "
        "on the test split of --data, on shifted domains, and on out-of-domain sets.",
    )
    p.add_argument("source", help="checkpoint directory (bayeslora train --out) or bundle (bayeslora export)")
    p.add_argument(
        "--data",
        default=None,
        help="in-domain dataset: every row of csv:PATH (a file given here is a test set), the test "
        "split of a named dataset (default: vader-movies; for a causal-LM checkpoint, a text source "
        "- text:PATH, jsonl:PATH, shakespeare - default: the one it was trained on)",
    )
    p.add_argument(
        "--split",
        choices=["test", "all"],
        default=None,
        help="score this split of every set instead: test (the seed's 10 %% test split, e.g. of a "
        "CSV that holds a whole dataset) or all rows",
    )
    p.add_argument(
        "--ood",
        nargs="*",
        default=None,
        help="out-of-domain datasets (default: bbc; for a causal-LM checkpoint, text sources such as "
        "text:PATH or fortunes, default none)",
    )
    p.add_argument("--shift", nargs="*", default=None, help="shifted datasets with the same labels")
    p.add_argument("--samples", type=int, default=16, help="posterior samples (0 = mean mode)")
    p.add_argument("--seed", type=int, default=0, help="split seed (use the training seed) and noise seed")
    p.add_argument("--max-eval", type=int, default=None, help="at most this many examples per set")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (bundles)")
    p.add_argument("--plots", default=None, help="directory for PNG plots")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_run_evaluate)


def _fail(message: str, code: int = 1) -> int:
    print(f"bayeslora: error: {message}", file=sys.stderr)
    return code


# ---- score (torch-free) ------------------------------------------------------------------------
def _add_score(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="score texts with a bundle, with uncertainty (no torch needed)",
        description="Score texts with an exported bundle on CPU. Prints one JSON line per input, in input "
        "order: text, label, probs, confidence, entropy, expected_entropy, mutual_info, variance. With "
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
        'with the text in its "text" field',
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


def _read_texts(name: str) -> list[str]:
    """The texts of ``--file``: non-blank lines, or the "text" fields of a .jsonl file."""
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
        return [line for line in text.splitlines() if line.strip()]
    texts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _Refused(f"{name} line {n}: not JSON ({e.msg})", 1) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise _Refused(f'{name} line {n}: not a JSON object with a string "text" field', 1)
        texts.append(record["text"])
    return texts


def _score(args: argparse.Namespace) -> int:
    from .runtime import MAX_SAMPLES, MAX_SEED, MAX_THREADS, Scorer, check_int

    try:
        check_int("--samples", args.samples, 0, MAX_SAMPLES)
        check_int("--seed", args.seed, 0, MAX_SEED)
        if args.threads is not None:
            check_int("--threads", args.threads, 1, MAX_THREADS)
        if args.workers is not None:
            check_int("--workers", args.workers, 1, MAX_THREADS)
    except BayesLoRAError as e:
        return _fail(str(e), 2)  # a usage error
    if args.batch_size is not None and args.batch_size < 1:
        return _fail("--batch-size must be >= 1", 2)
    if args.file is not None:
        try:
            texts = _read_texts(args.file)
        except _Refused as e:
            return _fail(*e.args)
    else:
        texts = list(args.text)
        for i, t in enumerate(texts, 1):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                return _fail(f"--text: argument {i} is not valid UTF-8 (or not in the locale's encoding)", 2)
    if args.workers is not None or args.scheduler is not None:
        return _score_on_dask(args, texts)
    try:
        scorer = Scorer(args.bundle, num_threads=args.threads)
        batch = args.batch_size or 64
        for start in range(0, len(texts), batch):
            chunk = texts[start : start + batch]
            for record in scorer.records(chunk, samples=args.samples, seed=args.seed):
                print(json.dumps(record, ensure_ascii=False))
    except BayesLoRAError as e:
        return _fail(str(e))
    return 0


def _score_on_dask(args: argparse.Namespace, texts: list[str]) -> int:
    """``score`` on a Dask cluster: a LocalCluster of ``--workers`` processes, or ``--scheduler``'s."""
    import logging

    from . import distributed as bl_distributed
    from .runtime import shared_scorer

    try:
        scorer = shared_scorer(args.bundle, 1)  # the labels; a bad bundle fails before any cluster
        bl_distributed._require_distributed()
    except BayesLoRAError as e:
        return _fail(str(e))
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
                return _fail(f"cannot connect to the Dask scheduler {args.scheduler}: {_one_line(e)}")
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
        return _fail(str(e))
    except Exception as e:
        if type(e).__module__.split(".")[0] not in ("distributed", "dask"):
            raise
        return _fail(f"Dask: {type(e).__name__}: {_one_line(e)}")  # e.g. KilledWorker
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return 0


# ---- export ------------------------------------------------------------------------------------
def _add_export(subparsers: argparse._SubParsersAction) -> None:
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
    from ._atomic import check_output_dir

    check_output_dir(args.out, kind=kind, force=args.force, sources=[s for s in sources if s])


def _add_trained_source(p: argparse.ArgumentParser) -> None:
    """The CKPT argument of the export commands and the --model it may need (see _load_trained)."""
    p.add_argument("ckpt", help="training checkpoint (bayeslora train --out) or adapter directory")
    p.add_argument(
        "--model", default=None, metavar="DIR", help="base HF model directory (adapter directories)"
    )


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
        from .train.pipeline import load_checkpoint

        return load_checkpoint(ckpt)
    if model_dir is None:
        raise ConfigError(f"{ckpt} is an adapter directory: name its base model with --model DIR")
    from transformers import AutoModelForSequenceClassification

    from .nn.checkpoint import load_adapter

    n = _num_labels(ckpt) if (ckpt / ADAPTER_WEIGHTS).exists() else None
    kwargs = {"num_labels": n} if n is not None else {}
    model = AutoModelForSequenceClassification.from_pretrained(Path(model_dir), **kwargs).eval()
    load_adapter(model, ckpt)
    return model, None, None


def _export(args: argparse.Namespace) -> int:
    from .formats.bundle import export

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
        return _fail(str(e))
    meta = json.loads((out / BUNDLE_META).read_text())
    ranks = {name: m["rank"] for name, m in meta["modules"].items()}
    payload = {"bundle": str(out), "ranks": ranks, "total_rank": sum(ranks.values())}
    _emit(args, payload, f"wrote {out} ({len(ranks)} adapted modules, total rank {sum(ranks.values())})")
    return 0


# ---- PEFT interoperability ----------------------------------------------------------------------
def _add_export_peft(subparsers: argparse._SubParsersAction) -> None:
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
    from .formats.peft import export_peft

    try:
        _check_out(args, "peft", args.ckpt, args.model)
        model, _, _ = _load_trained(Path(args.ckpt), args.model)
        out = export_peft(model, args.out, prune=not args.no_prune, force=args.force)
    except BayesLoRAError as e:
        return _fail(str(e))
    cfg = json.loads((out / PEFT_CONFIG).read_text())
    ranks = cfg["rank_pattern"]
    payload = {"peft_dir": str(out), "ranks": ranks, "total_rank": sum(ranks.values())}
    _emit(args, payload, f"wrote {out} ({len(ranks)} LoRA modules, total rank {sum(ranks.values())})")
    return 0


def _add_import_peft(subparsers: argparse._SubParsersAction) -> None:
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
    from .config import BayesLoRAConfig
    from .formats.peft import import_peft_checkpoint

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
        return _fail(str(e))
    payload = {"checkpoint": str(args.out), "ranks": run["ranks"], "total_rank": run["total_rank"]}
    _emit(
        args,
        payload,
        f"wrote {args.out} ({len(run['ranks'])} adapted modules, total rank {run['total_rank']})",
    )
    return 0


def _version_text() -> str:
    """``bayeslora VERSION (kernels: ISA)``: the instruction set the runtime runs on here."""
    from . import __version__
    from .runtime import isa

    try:
        kernels = isa()
    except BayesLoRAError as e:
        kernels = f"error: {_one_line(e)}"
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
    parser = argparse.ArgumentParser(
        prog="bayeslora",
        description="Bayesian LoRA: learned adapter rank, calibrated uncertainty, torch-free scoring.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_quickstart(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_score(sub)
    _add_analyze(sub)
    _add_export_peft(sub)
    _add_import_peft(sub)
    return parser


def _add_analyze(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="per-module ranks, relevance and SVD alignment of a checkpoint or bundle",
        description="Rank analysis (docs/method.md §8): which rank directions did the posterior keep, and do "
        "they align with the singular directions of ΔW? Needs no torch.",
    )
    p.add_argument("path", metavar="CKPT|BUNDLE", help="adapter checkpoint or runtime bundle directory")
    p.add_argument("--plots", metavar="DIR", help="write spectrum.png and alignment.png here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--threads", type=int, default=None, help="threads for the analysis (default: all)")
    p.set_defaults(handler=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze

    try:
        report = analyze(args.path, num_threads=args.threads)
    except BayesLoRAError as e:
        print(f"bayeslora analyze: {e}", file=sys.stderr)
        return 1
    plots = []
    if args.plots:
        from .analysis.plots import write_plots

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
    try:
        return int(handler(args) or 0)
    except BayesLoRAError as e:
        print(f"bayeslora: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bayeslora: interrupted; the last checkpoint in --out stays loadable", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `bayeslora score ... | head`: the reader left
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 1
    except Exception as e:  # no traceback, ever (BAYESLORA_DEBUG=1 shows it)
        if os.environ.get("BAYESLORA_DEBUG"):
            raise
        if isinstance(e, (OSError, ValueError)):  # bad files, paths and values (UnicodeError too)
            print(f"bayeslora: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        else:
            print(
                f"bayeslora: error: internal error, {type(e).__name__}: {_one_line(e)} "
                "(please report it; BAYESLORA_DEBUG=1 shows the traceback)",
                file=sys.stderr,
            )
        return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
