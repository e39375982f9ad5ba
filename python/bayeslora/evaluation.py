"""``bayeslora evaluate``: in-domain, shifted-domain and out-of-domain metrics of a checkpoint or bundle.

A training checkpoint (``bayeslora train`` output: ``run.json`` + ``adapter/``) is scored with torch;
an exported bundle (``bayeslora.json`` + ``model.safetensors``) with the Rust runtime, torch-free.
Both give the fields of docs/method.md §6 per input; the metrics (docs/method.md §7) are computed by
``bayeslora.metrics``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import metrics
from .data.splits import Split
from .data.tables import is_file_spec
from .errors import BundleError
from .files import BUNDLE_META, RUN_FILE

SCORES = metrics.UNCERTAINTY_SCORES
VADER_DOMAINS = ("vader-movies", "vader-tweets", "vader-amazon", "vader-nyt")


class Predictor(Protocol):
    """(texts [N], the second segments [N] of sentence pairs or None) -> fields of docs/method.md §6."""

    def __call__(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]: ...


def load_predictor(
    path: str | os.PathLike, samples: int, seed: int, num_threads: int | None = None
) -> tuple[Predictor, dict[str, Any]]:
    """A function ``(texts, text_pairs) -> fields of docs/method.md §6`` for a checkpoint (torch) or
    a bundle (Rust runtime); ``text_pairs`` is None for single texts."""
    path = Path(path)
    if (path / BUNDLE_META).is_file():
        from .runtime import Scorer, read_meta

        scorer = Scorer(path, num_threads=num_threads)
        meta = read_meta(path)

        def predict_bundle(
            texts: Sequence[str], text_pairs: Sequence[str] | None = None
        ) -> dict[str, np.ndarray]:
            pairs = None if text_pairs is None else list(text_pairs)
            out = scorer.score(list(texts), samples=samples, seed=seed, text_pairs=pairs)
            return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}

        info = {
            "kind": "bundle",
            "engine": "rust",
            "labels": meta.get("labels"),
            "method": meta.get("method"),
        }
        return predict_bundle, info
    if (path / RUN_FILE).is_file():
        from .train.pipeline import load_checkpoint, predict

        model, tokenizer, run = load_checkpoint(path)
        max_length = int(run["settings"]["max_length"])

        def predict_ckpt(
            texts: Sequence[str], text_pairs: Sequence[str] | None = None
        ) -> dict[str, np.ndarray]:
            probs = predict(
                model,
                tokenizer,
                list(texts),
                samples,
                seed,
                max_length,
                text_pairs=None if text_pairs is None else list(text_pairs),
            )
            return metrics.uncertainty(probs)

        info = {
            "kind": "checkpoint",
            "engine": "torch",
            "labels": run["label_names"],
            "method": run["settings"]["method"],
        }
        return predict_ckpt, info
    raise BundleError(f"{path}: neither a bundle (bayeslora.json) nor a training checkpoint (run.json)")


SPLITS = ("test", "all")


def eval_set(name: str, seed: int, split: str | None = None) -> tuple[Split, tuple[str, ...]]:
    """(examples, label names) that ``evaluate`` scores for dataset ``name``; the examples'
    ``text_pairs`` are set for sentence-pair data.

    ``split``: ``"test"`` (the seed's test split), ``"all"`` (every row), or None: every row of a
    ``csv:`` / ``jsonl:`` file (a file handed to evaluate is a test set), the test split of a named
    dataset.
    """
    from .data import is_file_spec, load_dataset, read_rows

    if split is None:
        split = "all" if is_file_spec(name) else "test"
    if split not in SPLITS:
        raise BundleError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all" and is_file_spec(name):
        rows = read_rows(name)
        return Split(rows.texts, rows.labels, rows.text_pairs), rows.label_names
    ds = load_dataset(name, seed=seed)
    return (ds.all if split == "all" else ds.test), tuple(ds.label_names)


def _score(predict: Predictor, part: Split) -> dict[str, np.ndarray]:
    return predict(part.texts, part.text_pairs)


def _in_domain(out: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    probs = out["probs"]
    res = {k: float(v) for k, v in metrics.summary(probs, labels).items()}
    res["aurc"] = float(metrics.aurc(probs, labels))
    return res


def evaluate(
    path: str | os.PathLike,
    data: str = "vader-movies",
    ood: Sequence[str] = ("bbc",),
    shift: Sequence[str] | None = None,
    samples: int = 16,
    seed: int = 0,
    max_eval: int | None = None,
    plots: str | os.PathLike | None = None,
    num_threads: int | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint or bundle.

    Args:
        path: checkpoint or bundle directory.
        data: in-domain dataset: every row of a ``csv:`` file, the test split (from ``seed``) of a
            named dataset, unless ``split`` says otherwise.
        split: ``"test"`` or ``"all"`` for every set (see :func:`eval_set`); None: per set as above.
        ood: out-of-domain datasets (their labels are ignored); AUROC/FPR95 with each score.
        shift: datasets with the same labels from other domains (default: the other VADER domains
            when ``data`` is a VADER domain); their test splits are scored like the in-domain one.
        samples: posterior samples (0 = mean mode).
        max_eval: at most this many examples per set.
        plots: directory for PNG plots (reliability, risk–coverage, score histograms).
    """
    predict, info = load_predictor(path, samples, seed, num_threads)
    part, label_names = eval_set(data, seed, split)
    if info.get("labels") and list(info["labels"]) != list(label_names):
        raise BundleError(
            f"{path} was trained with labels {info['labels']}, but {data} has {list(label_names)}"
        )
    part = part.head(max_eval)
    labels = part.labels
    out_in = _score(predict, part)
    result: dict[str, Any] = {
        "source": str(path),
        **info,
        "data": data,
        "samples": samples,
        "seed": seed,
        "n": len(part),
        "split": split or ("all" if is_file_spec(data) else "test"),
        "in_domain": _in_domain(out_in, labels),
    }
    if shift is None:
        shift = [d for d in VADER_DOMAINS if d != data] if data in VADER_DOMAINS else []
    result["shift"] = {}
    for name in shift:
        s_part = eval_set(name, seed, split)[0].head(max_eval)
        result["shift"][name] = _in_domain(_score(predict, s_part), s_part.labels)
    s_in = metrics.uncertainty_scores(out_in)
    result["ood"] = {}
    ood_scores = {}
    for name in ood:
        o_part = eval_set(name, seed, split)[0].head(max_eval)
        s_out = metrics.uncertainty_scores(_score(predict, o_part))
        ood_scores[name] = s_out
        result["ood"][name] = {
            "n": len(o_part),
            **{f"auroc_{k}": metrics.auroc(s_in[k], s_out[k]) for k in SCORES},
            **{f"fpr95_{k}": metrics.fpr_at_95_tpr(s_in[k], s_out[k]) for k in SCORES},
        }
    if plots is not None:
        from . import plots as P

        d = Path(plots)
        P.reliability_diagram(d / "reliability.png", out_in["probs"], labels, title=f"{data} test")
        curves = {"confidence": (out_in["probs"], labels)}
        curves.update({f"score: {k}": (out_in["probs"], labels, s_in[k]) for k in ("entropy", "mutual_info")})
        P.risk_coverage_plot(d / "risk_coverage.png", curves)
        for name, s_out in ood_scores.items():
            for k in SCORES:
                P.score_histograms(
                    d / f"hist_{name}_{k}.png",
                    s_in[k],
                    s_out[k],
                    name=k,
                    labels=(f"{data} (test)", f"{name} (OOD)"),
                )
        result["plots"] = str(d)
    return result


def format_result(r: dict[str, Any]) -> str:
    """A readable text table of an :func:`evaluate` result."""
    m = r["in_domain"]
    lines = [
        f"{r['source']} ({r['kind']}, {r['engine']}), {r['data']} {r['split']} n={r['n']}, "
        f"samples={r['samples']}",
        f"  accuracy {m['accuracy']:.4f}  NLL {m['nll']:.4f}  Brier {m['brier']:.4f}  ECE {m['ece']:.4f}  "
        f"MCE {m['mce']:.4f}  AURC {m['aurc']:.4f}",
    ]
    for name, s in r["shift"].items():
        lines.append(
            f"  shift {name:14} accuracy {s['accuracy']:.4f}  NLL {s['nll']:.4f}  ECE {s['ece']:.4f}"
        )
    for name, o in r["ood"].items():
        cells = "  ".join(f"{k}: AUROC {o[f'auroc_{k}']:.4f} FPR95 {o[f'fpr95_{k}']:.4f}" for k in SCORES)
        lines.append(f"  OOD {name} (n={o['n']}): {cells}")
    return "\n".join(lines)
