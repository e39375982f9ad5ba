"""Classification metrics (docs/method.md §7) and the uncertainty decomposition (§6), in numpy.

This module never imports torch (the torch-free runtime and ``bayeslora evaluate`` on a bundle use it).
Inputs are array-likes; they are validated once and computed in float64.

Conventions (each one is also stated where it applies):

- ``probs`` is ``[N, C]``, rows are probability vectors (non-negative, summing to 1 within
  ``PROB_SUM_ATOL``); ``labels`` is ``[N]`` of integers in ``[0, C)``. The predicted label is the
  first argmax (numpy's tie rule).
- Calibration bins: ``n_bins`` equal-width bins on the max-prob confidence, half-open on the left,
  ``(lo, hi]``; a confidence exactly on an edge belongs to the lower bin, and a confidence of exactly 0
  to the first bin. Edges are ``numpy.linspace(0, 1, n_bins + 1)``. (torchmetrics uses ``[lo, hi)``
  plus an extra bin for confidence 1.0; the two agree for every confidence not exactly on an edge.)
- OOD scores: higher means more uncertain; out-of-domain inputs are the positive class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .errors import InvalidValueError, ShapeError

PROB_SUM_ATOL = 1e-4
"""How far a row of ``probs`` may sum from 1 (float32 softmax outputs are well inside this)."""

_EPS = float(np.finfo(np.float64).eps)  # lower clip of a probability inside a log (as sklearn's log_loss)

__all__ = [
    "PROB_SUM_ATOL",
    "SUMMARY_KEYS",
    "accuracy",
    "aurc",
    "auroc",
    "bin_edges",
    "brier",
    "calibration_error",
    "ece",
    "fpr_at_95_tpr",
    "mce",
    "nll",
    "reliability_diagram",
    "risk_coverage",
    "roc_curve",
    "summary",
    "uncertainty",
]


# ---------------------------------------------------------------------------------------------------
# validation


def _finite(name: str, x: NDArray[np.float64]) -> None:
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise InvalidValueError(f"{name} contains {bad} NaN or infinite value(s)")


def float_array(name: str, x: ArrayLike, ndim: int) -> NDArray[np.float64]:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InvalidValueError(f"{name} must be numeric: {err}") from err
    if arr.ndim != ndim:
        raise ShapeError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    _finite(name, arr)
    return arr


def _check_probs(probs: ArrayLike, name: str = "probs") -> NDArray[np.float64]:
    p = float_array(name, probs, 2)
    n, c = p.shape
    if n == 0:
        raise ShapeError(f"{name} is empty (N = 0): metrics need at least one example")
    if c == 0:
        raise ShapeError(f"{name} has no classes (C = 0)")
    if np.any(p < -PROB_SUM_ATOL) or np.any(p > 1 + PROB_SUM_ATOL):
        raise InvalidValueError(f"{name} has values outside [0, 1]: are these logits? (use a softmax)")
    sums = p.sum(1)
    off = np.abs(sums - 1.0) > PROB_SUM_ATOL
    if np.any(off):
        i = int(np.argmax(off))
        raise InvalidValueError(
            f"{name} rows must sum to 1 (within {PROB_SUM_ATOL}); row {i} sums to {sums[i]:.6g}"
            f" ({int(off.sum())} bad row(s))"
        )
    return np.clip(p, 0.0, 1.0)


def check_labels(labels: ArrayLike, n: int, c: int) -> NDArray[np.int64]:
    raw = np.asarray(labels)
    if raw.ndim != 1:
        raise ShapeError(f"labels must be 1-D [N], got shape {raw.shape}")
    if raw.shape[0] != n:
        raise ShapeError(f"labels has {raw.shape[0]} entries but probs has {n} rows")
    if raw.dtype.kind not in "biuf":
        raise InvalidValueError(f"labels must be integers, got dtype {raw.dtype}")
    if raw.dtype.kind == "f":
        _finite("labels", raw)
        if np.any(raw != np.round(raw)):
            raise InvalidValueError("labels must be integers, got non-integral floats")
    y = raw.astype(np.int64)
    if n and (y.min() < 0 or y.max() >= c):
        raise InvalidValueError(f"labels must lie in [0, {c}), got range [{y.min()}, {y.max()}]")
    return y


def _probs_labels(probs: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    p = _check_probs(probs)
    return p, check_labels(labels, p.shape[0], p.shape[1])


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InvalidValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def _scores(name: str, x: ArrayLike) -> NDArray[np.float64]:
    s = float_array(name, x, 1)
    if s.shape[0] == 0:
        raise ShapeError(f"{name} is empty: need at least one score")
    return s


# ---------------------------------------------------------------------------------------------------
# in-domain metrics


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of examples whose argmax class equals the label.

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels in ``[0, C)``.
    """
    p, y = _probs_labels(probs, labels)
    return float(np.mean(p.argmax(1) == y))


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood ``-mean_i log p_i[y_i]`` (natural log).

    The probability of the true class is clipped below at float64 machine epsilon (as
    ``sklearn.metrics.log_loss``), so a confident mistake costs about 36 nats, not infinity.

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels in ``[0, C)``.
    """
    return float(np.mean(nll_per_example(probs, labels)))


def nll_per_example(probs: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """``[N]`` negative log-likelihoods ``-log p_i[y_i]``, clipped as :func:`nll`.

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels in ``[0, C)``.
    """
    p, y = _probs_labels(probs, labels)
    return -np.log(np.maximum(p[np.arange(p.shape[0]), y], _EPS))


def brier(probs: ArrayLike, labels: ArrayLike) -> float:
    """Multiclass Brier score ``mean_i Σ_c (p_ic − 1[y_i = c])²`` (range [0, 2]; no halving).

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels in ``[0, C)``.
    """
    p, y = _probs_labels(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def bin_edges(n_bins: int = 15) -> NDArray[np.float64]:
    """The ``n_bins + 1`` equal-width calibration bin edges on [0, 1]."""
    return np.linspace(0.0, 1.0, _check_n_bins(n_bins) + 1)


def _bin_index(confidence: NDArray[np.float64], n_bins: int) -> NDArray[np.int64]:
    # searchsorted(side="left") - 1 puts c in bin i iff edges[i] < c <= edges[i+1]: (lo, hi]
    idx = np.searchsorted(bin_edges(n_bins), confidence, side="left") - 1
    return np.clip(idx, 0, n_bins - 1).astype(np.int64)


def _binned(
    confidence: NDArray[np.float64], correct: NDArray[np.float64], n_bins: int
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    idx = _bin_index(confidence, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        mean_acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    return count.astype(np.int64), mean_conf, mean_acc


def calibration_error(confidence: ArrayLike, correct: ArrayLike, n_bins: int = 15, norm: str = "l1") -> float:
    """Binned top-label calibration error from confidences and correctness flags.

    ``norm="l1"``: ECE ``Σ_b (n_b / N) |acc_b − conf_b|``; ``norm="max"``: MCE ``max_b |acc_b − conf_b|``
    over non-empty bins. Bins are ``(lo, hi]`` (see the module docstring).

    Args:
        confidence: ``[N]`` confidences in [0, 1] (usually the max probability).
        correct: ``[N]`` 1 where the prediction is right, 0 where wrong (bool or 0/1).
        n_bins: number of equal-width bins.
        norm: ``"l1"`` (ECE) or ``"max"`` (MCE).
    """
    n_bins = _check_n_bins(n_bins)
    conf = _scores("confidence", confidence)
    if np.any(conf < 0) or np.any(conf > 1):
        raise InvalidValueError("confidence must lie in [0, 1]")
    ok = float_array("correct", np.asarray(correct, dtype=np.float64), 1)
    if ok.shape != conf.shape:
        raise ShapeError(f"correct has shape {ok.shape}, confidence has {conf.shape}")
    if np.any((ok != 0) & (ok != 1)):
        raise InvalidValueError("correct must be 0/1 or boolean")
    count, mean_conf, mean_acc = _binned(conf, ok, n_bins)
    gap = np.abs(mean_acc - mean_conf)
    filled = count > 0
    if norm == "l1":
        return float(np.sum(count[filled] / conf.shape[0] * gap[filled]))
    if norm == "max":
        return float(np.max(gap[filled]))
    raise InvalidValueError(f"norm must be 'l1' or 'max', got {norm!r}")


def _conf_correct(probs: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    p, y = _probs_labels(probs, labels)
    return p.max(1), (p.argmax(1) == y).astype(np.float64)


def ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error on the max-prob confidence, ``n_bins`` equal-width bins ``(lo, hi]``.

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels in ``[0, C)``.
        n_bins: number of bins (docs/method.md §7: 15).
    """
    conf, ok = _conf_correct(probs, labels)
    return calibration_error(conf, ok, n_bins, "l1")


def mce(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Maximum calibration error: the largest ``|accuracy − confidence|`` over non-empty bins.

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels in ``[0, C)``.
        n_bins: number of bins (docs/method.md §7: 15).
    """
    conf, ok = _conf_correct(probs, labels)
    return calibration_error(conf, ok, n_bins, "max")


def reliability_diagram(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict[str, NDArray]:
    """Per-bin data of a reliability diagram.

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels in ``[0, C)``.
        n_bins: number of equal-width bins ``(lo, hi]``.

    Returns:
        ``lo [B]``, ``hi [B]`` (bin edges), ``count [B]`` (int), ``confidence [B]`` (mean confidence)
        and ``accuracy [B]`` (fraction correct); the last two are NaN in empty bins.
    """
    n_bins = _check_n_bins(n_bins)
    conf, ok = _conf_correct(probs, labels)
    count, mean_conf, mean_acc = _binned(conf, ok, n_bins)
    edges = bin_edges(n_bins)
    return {"lo": edges[:-1], "hi": edges[1:], "count": count, "confidence": mean_conf, "accuracy": mean_acc}


# ---------------------------------------------------------------------------------------------------
# out-of-domain detection


def _ood_inputs(score_in: ArrayLike, score_out: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    s_in = _scores("score_in", score_in)
    s_out = _scores("score_out", score_out)
    scores = np.concatenate([s_in, s_out])
    is_out = np.concatenate([np.zeros(s_in.shape[0], np.int64), np.ones(s_out.shape[0], np.int64)])
    return scores, is_out


def _average_ranks(x: NDArray[np.float64]) -> NDArray[np.float64]:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # boundaries of runs of equal values; every member of a run gets the run's mean rank (1-based)
    starts = np.flatnonzero(np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]]))
    ends = np.concatenate([starts[1:], [x.shape[0]]])
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(x.shape[0], np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(score_in: ArrayLike, score_out: ArrayLike) -> float:
    """Area under the ROC curve for telling out-of-domain (positive) from in-domain inputs.

    Equals the probability that a random OOD input scores higher than a random in-domain one, ties
    counting one half (the Mann-Whitney statistic; the same as sklearn's trapezoidal
    ``roc_auc_score`` with ties).

    Args:
        score_in: ``[N_in]`` uncertainty scores of in-domain inputs (higher = more uncertain).
        score_out: ``[N_out]`` scores of out-of-domain inputs.
    """
    scores, is_out = _ood_inputs(score_in, score_out)
    n_out = int(is_out.sum())
    n_in = is_out.shape[0] - n_out
    ranks = _average_ranks(scores)
    u = ranks[is_out == 1].sum() - n_out * (n_out + 1) / 2.0
    return float(u / (n_out * n_in))


def roc_curve(score_in: ArrayLike, score_out: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """ROC points ``(fpr, tpr)``, one per distinct score (threshold: flag OOD when score >= t).

    Args:
        score_in: ``[N_in]`` in-domain scores; score_out: ``[N_out]`` out-of-domain scores.

    Returns:
        ``fpr [K]``, ``tpr [K]`` for the K distinct scores in decreasing order (no (0, 0) point).
    """
    scores, is_out = _ood_inputs(score_in, score_out)
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    pos = is_out[order]
    last_of_run = np.flatnonzero(np.concatenate([s[1:] != s[:-1], [True]]))
    tp = np.cumsum(pos)[last_of_run]
    fp = (last_of_run + 1) - tp
    return fp / (pos.shape[0] - pos.sum()), tp / pos.sum()


def fpr_at_95_tpr(score_in: ArrayLike, score_out: ArrayLike) -> float:
    """False-positive rate at the first threshold whose true-positive rate reaches 95%.

    OOD inputs are positives. The thresholds are the distinct scores (no interpolation between ROC
    points), i.e. the smallest FPR among ROC points with TPR >= 0.95 — what one reads off
    ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.

    Args:
        score_in: ``[N_in]`` in-domain scores (higher = more uncertain).
        score_out: ``[N_out]`` out-of-domain scores.
    """
    fpr, tpr = roc_curve(score_in, score_out)
    return float(fpr[np.argmax(tpr >= 0.95)])


# ---------------------------------------------------------------------------------------------------
# selective prediction


def risk_coverage(
    probs: ArrayLike, labels: ArrayLike, score: ArrayLike | None = None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Risk–coverage curve of selective prediction.

    Inputs are accepted from most to least certain (by decreasing max probability, or by increasing
    ``score`` when given). Inputs with equal certainty are accepted together, so the curve has one
    point per distinct certainty value and does not depend on the order of ties.

    Args:
        probs: ``[N, C]`` class probabilities (the prediction is the argmax).
        labels: ``[N]`` integer labels in ``[0, C)``.
        score: optional ``[N]`` uncertainty (higher = less certain), e.g. ``mutual_info``.

    Returns:
        ``coverage [K]`` (increasing, last = 1) and ``risk [K]`` (error rate among accepted inputs).
    """
    conf, ok = _conf_correct(probs, labels)
    if score is None:
        unc = -conf
    else:
        unc = float_array("score", score, 1)
        if unc.shape != conf.shape:
            raise ShapeError(f"score has shape {unc.shape}, expected ({conf.shape[0]},)")
    order = np.argsort(unc, kind="mergesort")
    u = unc[order]
    errors = np.cumsum(1.0 - ok[order])
    last_of_run = np.flatnonzero(np.concatenate([u[1:] != u[:-1], [True]]))
    accepted = last_of_run + 1.0
    return accepted / conf.shape[0], errors[last_of_run] / accepted


def aurc(probs: ArrayLike, labels: ArrayLike, score: ArrayLike | None = None) -> float:
    """Area under the risk–coverage curve (step rule; lower is better).

    Without ties this is ``(1/N) Σ_k risk(k)``, the mean risk after accepting the k most certain
    inputs (Geifman et al. 2019). With ties, a group of equally certain inputs is accepted at once.

    Args:
        probs: ``[N, C]``; labels: ``[N]``; score: optional ``[N]`` uncertainty (see ``risk_coverage``).
    """
    coverage, risk = risk_coverage(probs, labels, score)
    width = np.diff(np.concatenate([[0.0], coverage]))
    return float(np.sum(width * risk))


# ---------------------------------------------------------------------------------------------------
# uncertainty decomposition and summary


def _entropy(p: NDArray[np.float64]) -> NDArray[np.float64]:
    return -np.sum(p * np.log(np.maximum(p, 1e-30)), axis=-1)


def uncertainty(sample_probs: ArrayLike) -> dict[str, NDArray]:
    """The fields of docs/method.md §6 from per-sample class probabilities (float64; numpy twin of
    ``prediction.summarize``).

    Args:
        sample_probs: ``[N, S, C]`` class probabilities of S posterior samples per input.

    Returns:
        ``probs [N, C]`` (mean over samples), ``label [N]`` (int64 argmax), ``confidence [N]``,
        ``entropy [N]`` (total, of the mean), ``expected_entropy [N]`` (aleatoric, mean of per-sample
        entropies), ``mutual_info [N]`` (epistemic = total − aleatoric, clipped at 0), ``variance [N]``
        (population variance over samples of the predicted class's probability).
    """
    p = float_array("sample_probs", sample_probs, 3)
    n, s, c = p.shape
    if n == 0 or s == 0 or c == 0:
        raise ShapeError(f"sample_probs must be non-empty [N, S, C], got shape {p.shape}")
    _check_probs(p.reshape(n * s, c), "sample_probs")
    p = np.clip(p, 0.0, 1.0)
    mean = p.mean(1)
    label = mean.argmax(-1).astype(np.int64)
    total = _entropy(mean)
    aleatoric = _entropy(p).mean(1)
    chosen = p[np.arange(n), :, label]  # [N, S]
    return {
        "probs": mean,
        "label": label,
        "confidence": mean.max(-1),
        "entropy": total,
        "expected_entropy": aleatoric,
        "mutual_info": np.maximum(total - aleatoric, 0.0),
        "variance": chosen.var(1),
    }


UNCERTAINTY_SCORES: Sequence[str] = ("entropy", "mutual_info", "1-confidence")


def uncertainty_scores(fields: Mapping[str, ArrayLike]) -> dict[str, NDArray[np.float64]]:
    """Per-input uncertainty scores (higher = more uncertain) for OOD detection and selective
    prediction, from the docs/method.md §6 fields of :func:`uncertainty` (or the runtime's ``score``).

    Returns ``{"entropy", "mutual_info", "1-confidence"}``, each float64 ``[N]``.
    """
    return {
        "entropy": float_array("entropy", fields["entropy"], 1),
        "mutual_info": float_array("mutual_info", fields["mutual_info"], 1),
        "1-confidence": 1.0 - float_array("confidence", fields["confidence"], 1),
    }


SUMMARY_KEYS: Sequence[str] = ("n", "accuracy", "nll", "brier", "ece", "mce", "aurc")


def summary(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict[str, float | int]:
    """All in-domain metrics at once: ``n`` (int) and ``accuracy, nll, brier, ece, mce, aurc`` (floats).

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels in ``[0, C)``.
        n_bins: calibration bins for ECE/MCE.
    """
    p, y = _probs_labels(probs, labels)
    return {
        "n": int(p.shape[0]),
        "accuracy": accuracy(p, y),
        "nll": nll(p, y),
        "brier": brier(p, y),
        "ece": ece(p, y, n_bins),
        "mce": mce(p, y, n_bins),
        "aurc": aurc(p, y),
    }
