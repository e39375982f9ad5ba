"""Temperature scaling (Guo et al. 2017): the cheap calibration baseline of docs/method.md §7, numpy only.

One scalar T divides the logits; it is fitted by minimising the validation NLL. The NLL is convex
in 1/T, hence unimodal in log T, so a golden-section search on log T over ``[T_MIN, T_MAX]`` finds
its minimum without scipy. On perfectly separable validation data the NLL keeps falling as T → 0
and the fit stops at ``T_MIN`` (a bound, not a failure).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .errors import InvalidValueError, ShapeError
from .metrics import check_labels, float_array

T_MIN = 0.05
T_MAX = 20.0

__all__ = ["T_MAX", "T_MIN", "apply_temperature", "fit_temperature", "temperature_nll"]

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...


def _check_logits(logits: ArrayLike) -> NDArray[np.float64]:
    z = float_array("logits", logits, 2)
    if z.shape[0] == 0:
        raise ShapeError("logits is empty (N = 0)")
    if z.shape[1] == 0:
        raise ShapeError("logits has no classes (C = 0)")
    return z


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0.0:
        raise InvalidValueError(f"temperature must be a finite positive number, got {temperature!r}")
    return t


def _log_softmax(z: NDArray[np.float64]) -> NDArray[np.float64]:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def apply_temperature(logits: ArrayLike, temperature: float) -> NDArray[np.float64]:
    """Class probabilities ``softmax(logits / T)``.

    Args:
        logits: ``[N, C]`` unnormalised scores.
        temperature: T > 0 (T > 1 softens, T < 1 sharpens).

    Returns:
        ``[N, C]`` float64 probabilities.
    """
    z = _check_logits(logits)
    return np.exp(_log_softmax(z / _check_temperature(temperature)))


def _nll(z: NDArray[np.float64], y: NDArray[np.int64], temperature: float) -> float:
    return float(-np.mean(_log_softmax(z / temperature)[np.arange(z.shape[0]), y]))


def temperature_nll(logits: ArrayLike, labels: ArrayLike, temperature: float) -> float:
    """Mean NLL of ``labels`` under ``softmax(logits / T)`` (exact log-softmax, no clipping).

    Args:
        logits: ``[N, C]``; labels: ``[N]`` integers in ``[0, C)``; temperature: T > 0.
    """
    z = _check_logits(logits)
    y = check_labels(labels, z.shape[0], z.shape[1])
    return _nll(z, y, _check_temperature(temperature))


def fit_temperature(
    logits_val: ArrayLike,
    labels_val: ArrayLike,
    t_min: float = T_MIN,
    t_max: float = T_MAX,
    tol: float = 1e-9,
) -> float:
    """Temperature that minimises the validation NLL, searched on log T within ``[t_min, t_max]``.

    Args:
        logits_val: ``[N, C]`` validation logits of the (mean-mode) model.
        labels_val: ``[N]`` integer labels in ``[0, C)``.
        t_min, t_max: search bounds (the answer is clamped to them, e.g. ``t_min`` for separable data).
        tol: stop when the bracket on log T is narrower than this.

    Returns:
        T as a Python float. Logits that are constant in every row (the NLL does not depend on T)
        give 1.0.
    """
    z = _check_logits(logits_val)
    y = check_labels(labels_val, z.shape[0], z.shape[1])
    t_min, t_max = _check_temperature(t_min), _check_temperature(t_max)
    if t_min >= t_max:
        raise InvalidValueError(f"need t_min < t_max, got [{t_min}, {t_max}]")
    z = z - z.max(axis=1, keepdims=True)
    if not np.any(z):
        return 1.0

    def f(log_t: float) -> float:
        return _nll(z, y, math.exp(log_t))

    a, b = math.log(t_min), math.log(t_max)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:  # minimum in [a, d]
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:  # minimum in [c, b]
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    # the interior probes never touch the bounds; a monotone NLL is best at an end point
    candidates = [(f(math.log(t_min)), t_min), (f(math.log(t_max)), t_max)]
    mid = (a + b) / 2.0
    candidates.append((f(mid), math.exp(mid)))
    return float(min(candidates)[1])
