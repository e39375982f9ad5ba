"""Figures for reports: reliability diagram, risk–coverage, OOD score histograms, ranks per module.

matplotlib (Agg backend) is imported inside the functions, so importing this module costs nothing and
needs neither matplotlib nor torch. Every function takes ``out``: a path (a PNG is written there and
the path returned) or a matplotlib ``Axes`` to draw into (returned as given).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import metrics
from .errors import ShapeError

__all__ = ["rank_bars", "reliability_diagram", "risk_coverage_plot", "score_histograms"]

PathLike = str | os.PathLike

_DPI = 150


def _start(out: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """(figure or None, axes): a new Agg figure when ``out`` is a path, else the caller's axes."""
    if isinstance(out, (str, os.PathLike)):
        # a bare Figure on an Agg canvas: no pyplot, no global backend switch, no display needed
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, layout="constrained")
        FigureCanvasAgg(fig)
        return fig, fig.add_subplot()
    if not hasattr(out, "plot"):
        raise TypeError(f"out must be a file path or a matplotlib Axes, got {type(out).__name__}")
    return None, out


def _finish(fig: Any, ax: Any, out: Any) -> Any:
    if fig is None:
        return ax
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


def reliability_diagram(
    out: PathLike | Any,
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = 15,
    title: str | None = None,
) -> Any:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with bin counts.

    Args:
        out: PNG path, or an ``Axes`` to draw into.
        probs: ``[N, C]`` class probabilities; labels: ``[N]`` integer labels.
        n_bins: equal-width bins ``(lo, hi]`` on the max-prob confidence (docs/method.md §7: 15).
        title: figure title; default names ECE and MCE.

    Returns:
        The PNG path (a ``Path``) or the given ``Axes``.
    """
    d = metrics.reliability_diagram(probs, labels, n_bins)
    ece, mce = metrics.ece(probs, labels, n_bins), metrics.mce(probs, labels, n_bins)
    fig, ax = _start(out, (5.0, 5.0))
    width = d["hi"] - d["lo"]
    filled = d["count"] > 0
    acc = np.where(filled, d["accuracy"], 0.0)
    conf = np.where(filled, d["confidence"], 0.0)
    ax.bar(d["lo"], acc, width=width, align="edge", color="#4C72B0", edgecolor="white", label="accuracy")
    gap_lo, gap_hi = np.minimum(acc, conf), np.maximum(acc, conf)
    ax.bar(
        d["lo"][filled],
        (gap_hi - gap_lo)[filled],
        bottom=gap_lo[filled],
        width=width[filled],
        align="edge",
        color="#DD8452",
        alpha=0.45,
        edgecolor="#DD8452",
        hatch="//",
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="0.3", linewidth=1, label="perfect calibration")
    total = max(int(d["count"].sum()), 1)
    ax2 = ax.twinx()
    ax2.plot((d["lo"] + d["hi"]) / 2, d["count"] / total, "o-", color="0.45", markersize=3, linewidth=1)
    ax2.set_ylabel("fraction of inputs in bin (grey)")
    ax2.set_ylim(0, 1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"Reliability: ECE {ece:.3f}, MCE {mce:.3f} ({total} inputs)")
    ax.legend(loc="upper left", fontsize="small")
    return _finish(fig, ax, out)


def risk_coverage_plot(
    out: PathLike | Any,
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    title: str = "Selective prediction: risk vs coverage",
) -> Any:
    """Risk–coverage curves, one per method or uncertainty score, with AURC in the legend.

    Args:
        out: PNG path, or an ``Axes``.
        curves: name -> ``(probs [N, C], labels [N])`` (ranked by confidence) or
            ``(probs, labels, score [N])`` (ranked by the uncertainty score).
        title: axes title.
    """
    if not curves:
        raise ShapeError("curves is empty: give at least one name -> (probs, labels[, score])")
    fig, ax = _start(out, (6.0, 4.5))
    styles = ("-", "--", ":", "-.")
    for i, (name, args) in enumerate(curves.items()):
        probs, labels, *rest = args
        score = rest[0] if rest else None
        coverage, risk = metrics.risk_coverage(probs, labels, score)
        area = metrics.aurc(probs, labels, score)
        ax.step(
            np.r_[0.0, coverage],
            np.r_[risk[0], risk],
            where="pre",
            linestyle=styles[i % len(styles)],
            label=f"{name} (AURC {area:.3f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (fraction of inputs answered)")
    ax.set_ylabel("risk (error rate on answered inputs)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _finish(fig, ax, out)


def score_histograms(
    out: PathLike | Any,
    scores_in: ArrayLike,
    scores_out: ArrayLike,
    name: str = "uncertainty",
    labels: tuple[str, str] = ("in-domain", "out-of-domain"),
    bins: int = 30,
) -> Any:
    """Overlaid density histograms of an uncertainty score on in- and out-of-domain inputs.

    Args:
        out: PNG path, or an ``Axes``.
        scores_in: ``[N_in]`` scores of in-domain inputs (higher = more uncertain).
        scores_out: ``[N_out]`` scores of out-of-domain inputs.
        name: the score's name (x label), e.g. ``"mutual_info"``.
        labels: legend names of the two sets.
        bins: histogram bins over the pooled range.
    """
    auroc = metrics.auroc(scores_in, scores_out)
    fpr95 = metrics.fpr_at_95_tpr(scores_in, scores_out)
    s_in = np.asarray(scores_in, dtype=np.float64)
    s_out = np.asarray(scores_out, dtype=np.float64)
    fig, ax = _start(out, (6.0, 4.0))
    lo, hi = float(min(s_in.min(), s_out.min())), float(max(s_in.max(), s_out.max()))
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    ax.hist(s_in, bins=edges, density=True, alpha=0.55, color="#4C72B0", label=f"{labels[0]} (n={s_in.size})")
    ax.hist(
        s_out, bins=edges, density=True, alpha=0.55, color="#C44E52", label=f"{labels[1]} (n={s_out.size})"
    )
    ax.set_xlabel(f"{name} (higher = more uncertain)")
    ax.set_ylabel("density")
    ax.set_title(f"{name}: AUROC {auroc:.3f}, FPR@95%TPR {fpr95:.3f}")
    ax.legend(fontsize="small")
    return _finish(fig, ax, out)


def _short_names(names: Sequence[str]) -> list[str]:
    """Drop the dotted prefix every name shares (``bert.encoder.``), keeping names distinct and
    keeping the word before a layer number (``layer.3.attention...``, not ``3.attention...``)."""
    parts = [n.split(".") for n in names]
    if len(parts) < 2:
        return list(names)
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    if common and any(p[common].isdigit() for p in parts):
        common -= 1
    return [".".join(p[common:]) for p in parts]


def rank_bars(
    out: PathLike | Any,
    ranks_before: Mapping[str, int],
    ranks_after: Mapping[str, int],
    title: str | None = None,
) -> Any:
    """Horizontal bars of the adapter rank per module, before and after pruning.

    Args:
        out: PNG path, or an ``Axes``.
        ranks_before: module name -> rank before pruning (e.g. r0).
        ranks_after: module name -> rank after pruning; a module missing here counts as 0.
        title: axes title; default gives the totals.
    """
    names = list(ranks_before)
    if not names:
        raise ShapeError("ranks_before is empty")
    extra = sorted(set(ranks_after) - set(ranks_before))
    if extra:
        raise ShapeError(f"ranks_after names modules not in ranks_before: {extra[:3]}")
    before = np.array([int(ranks_before[n]) for n in names])
    after = np.array([int(ranks_after.get(n, 0)) for n in names])
    short = _short_names(names)
    height = max(3.0, 0.28 * len(names) + 1.2)
    longest = max(len(s) for s in short)
    fig, ax = _start(out, (min(4.0 + 0.075 * longest, 14.0), height))
    y = np.arange(len(names))
    ax.barh(y - 0.2, before, height=0.4, color="0.75", label=f"before pruning (total {before.sum()})")
    bars = ax.barh(y + 0.2, after, height=0.4, color="#4C72B0", label=f"after pruning (total {after.sum()})")
    ax.bar_label(bars, padding=2, fontsize="x-small")  # so a module pruned to 0 still shows a number
    ax.set_yticks(y, short, fontsize="small" if len(names) > 12 else "medium")
    ax.invert_yaxis()  # first module on top
    ax.set_xlabel("rank")
    ax.set_xlim(0, max(int(before.max()), int(after.max()), 1) * 1.08)
    ax.set_title(title or f"Adapter rank per module: total {before.sum()} -> {after.sum()}")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize="small", frameon=False)
    return _finish(fig, ax, out)
