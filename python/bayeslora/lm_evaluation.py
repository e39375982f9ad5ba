"""``bayeslora evaluate`` on a causal-LM checkpoint (issue #14): perplexity, token accuracy and token ECE
in mean mode and under the posterior predictive (MC), and out-of-domain detection by per-sequence
scores (``bl.lm.evaluate``'s ``sequence_nll``, ``sequence_entropy``, ``sequence_mutual_info``;
AUROC / FPR95 by ``bayeslora.metrics``, OOD as the positives)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import metrics

SEQUENCE_SCORES = ("sequence_nll", "sequence_entropy", "sequence_mutual_info")


def _rows(tokenizer: Any, name: str, seed: int, block: int, split: str | None) -> tuple[list, str]:
    """The rows of text source ``name``: every part of a ``text:``/``jsonl:`` file (a file handed to
    evaluate is a test set), the test part of a named source, unless ``split`` says otherwise."""
    from .data.text import load_text_source
    from .train.lm_data import source_rows

    if split is None:
        split = "all" if name.startswith(("text:", "jsonl:")) else "test"
    return source_rows(tokenizer, load_text_source(name, seed), split, block), split


def evaluate_lm(
    path: str | os.PathLike,
    data: str | None = None,
    ood: Sequence[str] | None = None,
    samples: int = 16,
    seed: int = 0,
    max_eval: int | None = None,
    split: str | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Evaluate a causal-LM checkpoint.

    Args:
        data: a text source (``bayeslora.data.text``; default: the one it was trained on), cut into
            blocks of the run's ``max_length`` tokens.
        ood: out-of-domain text sources (default: none), cut alike.
        samples: S posterior samples (0: mean mode only). Mean mode is always reported; MC too
            when S > 0 and the adapters have a posterior.
        split: ``"test"`` or ``"all"`` for every source; None: all of a file, the test part of a
            named source.

    Returns ``in_domain`` with ``mean`` (and ``mc``) metrics (nll, perplexity, token_accuracy,
    ece, tokens, sequences), and per OOD source its metrics and ``auroc_<score>`` / ``fpr95_<score>``
    of the per-sequence scores (under MC when there is a posterior, else mean mode).
    """
    from .train.lm_pipeline import lm_metrics, load_lm_checkpoint, scalar_metrics

    model, tokenizer, run = load_lm_checkpoint(path)
    settings = run["settings"]
    block = int(settings["max_length"])
    data = data or run.get("data_source") or settings["data"]
    rows, used_split = _rows(tokenizer, data, seed, block, split)
    rows = rows[:max_eval]
    mc = samples > 0 and settings["method"] != "lora"
    mean = lm_metrics(model, rows, 0, seed, batch_size)
    in_domain: dict[str, Any] = {"mean": scalar_metrics(mean)}
    scored = mean
    if mc:
        scored = lm_metrics(model, rows, samples, seed, batch_size)
        in_domain["mc"] = scalar_metrics(scored)
    result: dict[str, Any] = {
        "task": "causal-lm",
        "source": str(path),
        "kind": "checkpoint",
        "engine": "torch",
        "method": settings["method"],
        "data": data,
        "split": used_split,
        "samples": samples if mc else 0,
        "seed": seed,
        "n": len(rows),
        "block_size": block,
        "in_domain": in_domain,
        "ood": {},
    }
    for name in ood or ():
        o_rows = _rows(tokenizer, name, seed, block, split)[0][:max_eval]
        o = lm_metrics(model, o_rows, samples if mc else 0, seed, batch_size)
        result["ood"][name] = {
            **scalar_metrics(o),
            **{f"auroc_{k}": metrics.auroc(scored[k], o[k]) for k in SEQUENCE_SCORES},
            **{f"fpr95_{k}": metrics.fpr_at_95_tpr(scored[k], o[k]) for k in SEQUENCE_SCORES},
        }
    return result


def format_lm_result(r: dict[str, Any]) -> str:
    """A readable text table of an :func:`evaluate_lm` result."""
    lines = [
        f"{r['source']} (causal LM, {r['engine']}), {r['data']} {r['split']}: {r['n']} blocks of "
        f"≤ {r['block_size']} tokens, samples={r['samples']}"
    ]
    for mode, m in r["in_domain"].items():
        lines.append(
            f"  {mode:4} perplexity {m['perplexity']:.3f}  NLL {m['nll']:.4f}  token accuracy "
            f"{m['token_accuracy']:.4f}  ECE {m['ece']:.4f}  ({m['tokens']} tokens)"
        )
    for name, o in r["ood"].items():
        cells = "  ".join(
            f"{k.removeprefix('sequence_')}: AUROC {o[f'auroc_{k}']:.4f}" for k in SEQUENCE_SCORES
        )
        lines.append(f"  OOD {name} ({o['sequences']} blocks, perplexity {o['perplexity']:.3f}): {cells}")
    return "\n".join(lines)
