"""Temperature scaling against a brute-force grid search of the NLL (computed with scipy and sklearn)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss

from bayeslora import metrics
from bayeslora.calibration import T_MAX, T_MIN, apply_temperature, fit_temperature, temperature_nll
from bayeslora.errors import InvalidValueError, ShapeError

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
GRID = np.exp(np.linspace(math.log(T_MIN), math.log(T_MAX), 1501))


def _reference_nll(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
    return float(-np.mean(scipy.special.log_softmax(logits / t, axis=1)[np.arange(len(labels)), labels]))


cases = st.fixed_dictionaries(
    {
        "n": st.integers(1, 200),
        "c": st.integers(2, 6),
        "scale": st.floats(0.1, 20.0),  # how over/under-confident the logits are
        "noise": st.floats(0.0, 1.0),  # fraction of labels not drawn from the logits
        "seed": st.integers(0, 2**32 - 1),
    }
)


def _draw(case: dict) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(case["seed"])
    z = rng.normal(0.0, 1.0, (case["n"], case["c"]))
    p = scipy.special.softmax(z, axis=1)
    y = np.array([rng.choice(case["c"], p=row) for row in p])
    flip = rng.random(case["n"]) < case["noise"]
    y[flip] = rng.integers(0, case["c"], int(flip.sum()))
    return z * case["scale"], y


@SETTINGS
@given(cases)
def test_fit_matches_brute_force_grid(case):
    z, y = _draw(case)
    t = fit_temperature(z, y)
    assert T_MIN <= t <= T_MAX
    grid_nll = np.array([_reference_nll(z, y, g) for g in GRID])
    best = int(np.argmin(grid_nll))
    # never worse than the best grid point, and in the grid's neighbourhood of the optimum
    assert _reference_nll(z, y, t) <= grid_nll[best] + 1e-9
    lo, hi = GRID[max(best - 1, 0)], GRID[min(best + 1, len(GRID) - 1)]
    assert lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)


@SETTINGS
@given(cases, st.floats(0.05, 20.0))
def test_apply_and_nll_match_scipy_and_sklearn(case, t):
    z, y = _draw(case)
    p = apply_temperature(z, t)
    np.testing.assert_allclose(p, scipy.special.softmax(z / t, axis=1), rtol=1e-10, atol=1e-15)
    assert temperature_nll(z, y, t) == pytest.approx(_reference_nll(z, y, t), rel=1e-10, abs=1e-12)
    # where no probability is clipped, sklearn's log_loss is the same number
    if p[np.arange(len(y)), y].min() > 1e-12:
        assert temperature_nll(z, y, t) == pytest.approx(
            log_loss(y, p, labels=list(range(z.shape[1]))), rel=1e-8
        )
        assert metrics.nll(p, y) == pytest.approx(temperature_nll(z, y, t), rel=1e-8, abs=1e-12)
    else:  # temperature_nll is exact; metrics.nll clips p_y at machine epsilon like sklearn
        assert temperature_nll(z, y, t) >= metrics.nll(p, y) - 1e-12


def test_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 3.0, (20000, 3))
    y = np.array([rng.choice(3, p=row) for row in scipy.special.softmax(z / 2.5, axis=1)])
    assert fit_temperature(z, y) == pytest.approx(2.5, rel=0.05)


def test_separable_data_stops_at_the_lower_bound():
    z = np.array([[3.0, -1.0], [-2.0, 4.0], [1.0, 0.5]])
    y = z.argmax(1)
    assert fit_temperature(z, y) == pytest.approx(T_MIN)
    assert fit_temperature(z, y, t_min=0.5) == pytest.approx(0.5)
    # all wrong and confident: the NLL falls towards uniform, the fit stops at the upper bound
    assert fit_temperature(z, 1 - y) == pytest.approx(T_MAX)


def test_constant_logits_and_single_example():
    assert fit_temperature(np.zeros((4, 3)), [0, 1, 2, 0]) == 1.0
    assert fit_temperature(np.array([[1.0, 1.0]]), [1]) == 1.0
    t = fit_temperature(np.array([[2.0, 0.0]]), [0])
    assert t == pytest.approx(T_MIN)


def test_matches_torch_lbfgs_reference():
    """Guo et al.'s recipe (optimise T with torch LBFGS on the NLL) lands on the same temperature."""
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 4.0, (500, 4))
    y = np.array([rng.choice(4, p=row) for row in scipy.special.softmax(z / 3.0, axis=1)])
    logits, target = torch.from_numpy(z), torch.from_numpy(y)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    assert fit_temperature(z, y) == pytest.approx(log_t.exp().item(), rel=1e-4)


def test_bad_inputs():
    with pytest.raises(ShapeError):
        fit_temperature(np.zeros((0, 2)), [])
    with pytest.raises(ShapeError):
        fit_temperature(np.zeros(3), [0, 1, 0])
    with pytest.raises(ShapeError):
        fit_temperature(np.zeros((3, 2)), [0, 1])
    with pytest.raises(InvalidValueError, match="NaN"):
        fit_temperature(np.array([[np.nan, 0.0]]), [0])
    with pytest.raises(InvalidValueError):
        fit_temperature(np.zeros((2, 2)), [0, 2])
    with pytest.raises(InvalidValueError, match="temperature"):
        apply_temperature(np.zeros((2, 2)), 0.0)
    with pytest.raises(InvalidValueError, match="temperature"):
        apply_temperature(np.zeros((2, 2)), float("inf"))
    with pytest.raises(InvalidValueError, match="t_min < t_max"):
        fit_temperature(np.ones((2, 2)), [0, 1], t_min=2.0, t_max=1.0)
