"""bayeslora.metrics against independent references: sklearn, torchmetrics, scipy, direct numpy loops.

Calibration-bin convention: we use (lo, hi]; torchmetrics uses ``torch.bucketize(right=True)``, i.e.
[lo, hi) plus a 16th bin holding confidence 1.0. The two agree on every confidence that is not exactly
on an edge, so the torchmetrics comparison keeps confidences >= 1e-5 away from the edges (torchmetrics
also rounds confidences to float32) and the edge rule is tested separately against a direct computation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
    roc_curve,
)
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multiclass_calibration_error,
)

from bayeslora import metrics as M
from bayeslora.errors import InvalidValueError, ShapeError
from bayeslora.nn.prediction import summarize
from subprocesses import blocking_shim, run_python

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
N_BINS = 15


def _random_probs(rng: np.random.Generator, n: int, c: int, ties: bool) -> np.ndarray:
    """Random probability rows; ``ties`` puts them on a coarse grid, so that confidences repeat across
    rows and (for grids 15 and 30) fall exactly on calibration-bin edges."""
    conc = rng.choice([0.2, 1.0, 5.0])
    p = rng.dirichlet(np.full(c, conc), size=n)
    if ties:
        grid = int(rng.choice([5, 7, 15, 30]))
        k = np.floor(p * grid)
        k[np.arange(n), rng.integers(0, c, n)] += grid - k.sum(1)  # rows sum to grid exactly
        p = k / grid
    return p


problems = st.fixed_dictionaries(
    {
        "n": st.integers(1, 300),
        "c": st.integers(2, 6),
        "seed": st.integers(0, 2**32 - 1),
        "ties": st.booleans(),
    }
)


def _draw(case: dict) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(case["seed"])
    p = _random_probs(rng, case["n"], case["c"], case["ties"])
    # labels correlated with the prediction so accuracy/calibration are not trivially ~1/C
    y = np.where(rng.random(case["n"]) < 0.6, p.argmax(1), rng.integers(0, case["c"], case["n"]))
    return p, y


# --------------------------------------------------------------------------------------- in-domain


@SETTINGS
@given(problems)
def test_accuracy_nll_brier_match_sklearn(case):
    p, y = _draw(case)
    labels = list(range(p.shape[1]))
    assert M.accuracy(p, y) == pytest.approx(accuracy_score(y, p.argmax(1)), abs=1e-12)
    assert M.nll(p, y) == pytest.approx(log_loss(y, p, labels=labels), rel=1e-9, abs=1e-12)
    assert M.brier(p, y) == pytest.approx(
        brier_score_loss(y, p, labels=labels, scale_by_half=False), rel=1e-9, abs=1e-12
    )


@SETTINGS
@given(problems.map(lambda c: {**c, "c": 2}))
def test_binary_brier_is_twice_sklearn_binary_brier(case):
    p, y = _draw(case)
    # sklearn's binary Brier scores the positive-class probability only: (p1 - y)^2 = half of ours
    assert M.brier(p, y) == pytest.approx(2 * brier_score_loss(y, p[:, 1]), rel=1e-9, abs=1e-12)


def _off_edges(p: np.ndarray, margin: float = 1e-5) -> np.ndarray:
    """Rows whose confidence is >= margin from every bin edge and whose argmax is unique."""
    conf = p.max(1)
    dist = np.abs(conf[:, None] - np.linspace(0, 1, N_BINS + 1)[None, :]).min(1)
    unique_max = (p == conf[:, None]).sum(1) == 1
    return (dist >= margin) & unique_max


@SETTINGS
@given(problems)
def test_ece_mce_match_torchmetrics(case):
    p, y = _draw(case)
    keep = _off_edges(p)
    if not keep.any():
        return
    p, y = p[keep], y[keep]
    pt, yt = torch.from_numpy(p), torch.from_numpy(y)
    c = p.shape[1]
    ref_ece = multiclass_calibration_error(pt, yt, num_classes=c, n_bins=N_BINS, norm="l1").item()
    ref_mce = multiclass_calibration_error(pt, yt, num_classes=c, n_bins=N_BINS, norm="max").item()
    # torchmetrics computes in float32
    assert M.ece(p, y) == pytest.approx(ref_ece, abs=2e-6)
    assert M.mce(p, y) == pytest.approx(ref_mce, abs=2e-6)
    conf, ok = p.max(1), (p.argmax(1) == y)
    ref_bin = binary_calibration_error(torch.from_numpy(conf), torch.from_numpy(ok.astype(np.int64)), N_BINS)
    assert M.calibration_error(conf, ok, N_BINS, "l1") == pytest.approx(ref_bin.item(), abs=2e-6)


def _direct_binned(conf: np.ndarray, ok: np.ndarray, n_bins: int) -> tuple[float, float, list[int]]:
    """ECE, MCE and counts with bins (lo, hi] written as explicit comparisons (0 joins the first bin)."""
    edges = np.linspace(0, 1, n_bins + 1)
    ece, mce, counts = 0.0, 0.0, []
    for b in range(n_bins):
        inside = (conf > edges[b]) & (conf <= edges[b + 1])
        if b == 0:
            inside |= conf == 0.0
        counts.append(int(inside.sum()))
        if inside.any():
            gap = abs(ok[inside].mean() - conf[inside].mean())
            ece += inside.mean() * gap
            mce = max(mce, gap)
    return ece, mce, counts


def test_bin_edges_go_to_the_lower_bin():
    edges = np.linspace(0, 1, N_BINS + 1)
    # binary rows whose confidence is exactly an edge >= 0.5, plus 1.0
    on_edge = edges[edges >= 0.5]
    p = np.stack([on_edge, 1.0 - on_edge], 1)
    y = np.arange(len(on_edge)) % 2
    diagram = M.reliability_diagram(p, y)
    idx = np.searchsorted(edges, on_edge) - 1  # edge k belongs to bin k-1
    expected = np.bincount(idx, minlength=N_BINS)
    np.testing.assert_array_equal(diagram["count"], expected)
    assert diagram["count"][-1] >= 1  # confidence 1.0 is in the last bin, not an extra one
    ref_ece, ref_mce, ref_counts = _direct_binned(p.max(1), (p.argmax(1) == y).astype(float), N_BINS)
    assert list(diagram["count"]) == ref_counts
    assert M.ece(p, y) == pytest.approx(ref_ece, abs=1e-12)
    assert M.mce(p, y) == pytest.approx(ref_mce, abs=1e-12)
    # confidence 0 goes to the first bin
    conf = np.array([0.0, edges[1], edges[1] + 1e-9])
    ok = np.array([1, 0, 1])
    ref_ece, ref_mce, ref_counts = _direct_binned(conf, ok.astype(float), N_BINS)
    assert ref_counts[:2] == [2, 1]
    assert M.calibration_error(conf, ok, N_BINS, "l1") == pytest.approx(ref_ece, abs=1e-12)
    assert M.calibration_error(conf, ok, N_BINS, "max") == pytest.approx(ref_mce, abs=1e-12)


@SETTINGS
@given(problems, st.integers(1, 20))
def test_calibration_matches_direct_computation_with_ties_and_edges(case, n_bins):
    p, y = _draw(case)
    conf, ok = p.max(1), (p.argmax(1) == y).astype(float)
    ref_ece, ref_mce, ref_counts = _direct_binned(conf, ok, n_bins)
    assert M.ece(p, y, n_bins) == pytest.approx(ref_ece, abs=1e-12)
    assert M.mce(p, y, n_bins) == pytest.approx(ref_mce, abs=1e-12)
    d = M.reliability_diagram(p, y, n_bins)
    assert list(d["count"]) == ref_counts
    assert d["count"].sum() == len(y)
    empty = d["count"] == 0
    assert np.isnan(d["confidence"][empty]).all() and np.isnan(d["accuracy"][empty]).all()
    np.testing.assert_allclose(d["lo"], np.linspace(0, 1, n_bins + 1)[:-1])
    np.testing.assert_allclose(d["hi"], np.linspace(0, 1, n_bins + 1)[1:])
    filled = ~empty
    np.testing.assert_allclose(
        np.sum(d["count"][filled] / len(y) * np.abs(d["accuracy"][filled] - d["confidence"][filled])),
        M.ece(p, y, n_bins),
        atol=1e-12,
    )


# --------------------------------------------------------------------------------------------- OOD

score_cases = st.fixed_dictionaries(
    {
        "n_in": st.integers(1, 200),
        "n_out": st.one_of(st.integers(1, 200), st.sampled_from([20, 40, 100])),  # TPR hits 0.95 exactly
        "seed": st.integers(0, 2**32 - 1),
        "ties": st.booleans(),
        "shift": st.floats(-1.0, 3.0),
    }
)


def _draw_scores(case: dict) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(case["seed"])
    s_in = rng.normal(0.0, 1.0, case["n_in"])
    s_out = rng.normal(case["shift"], 1.0, case["n_out"])
    if case["ties"]:
        s_in, s_out = np.round(s_in * 2) / 2, np.round(s_out * 2) / 2
    return s_in, s_out


@SETTINGS
@given(score_cases)
def test_auroc_and_fpr95_match_sklearn(case):
    s_in, s_out = _draw_scores(case)
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    s = np.r_[s_in, s_out]
    assert M.auroc(s_in, s_out) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert M.fpr_at_95_tpr(s_in, s_out) == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)
    ours_fpr, ours_tpr = M.roc_curve(s_in, s_out)
    np.testing.assert_allclose(ours_fpr, fpr[1:], atol=1e-12)  # sklearn prepends (0, 0)
    np.testing.assert_allclose(ours_tpr, tpr[1:], atol=1e-12)


def test_auroc_extremes_and_all_ties():
    assert M.auroc([0.0, 0.1], [0.5, 0.7]) == 1.0
    assert M.auroc([0.5, 0.7], [0.0, 0.1]) == 0.0
    assert M.auroc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
    assert M.fpr_at_95_tpr([1.0, 1.0], [1.0, 1.0, 1.0]) == 1.0
    assert M.fpr_at_95_tpr([0.0, 0.1], [0.5, 0.7]) == 0.0
    # 20 OOD scores: TPR reaches exactly 0.95 after 19 of them, before the in-domain score 0.5
    s_out = np.r_[np.arange(1.0, 20.0), -1.0]
    assert M.fpr_at_95_tpr([0.5, -2.0], s_out) == 0.0
    assert M.fpr_at_95_tpr([0.5, -2.0], np.r_[np.arange(1.0, 19.0), -1.0, -1.5]) == 0.5


# --------------------------------------------------------------------------------------- selective


def _direct_aurc(p: np.ndarray, y: np.ndarray, unc: np.ndarray) -> tuple[float, list, list]:
    err = (p.argmax(1) != y).astype(float)
    n = len(y)
    per_input_risk = [err[unc <= unc[i]].mean() for i in range(n)]
    levels = np.unique(unc)
    cov = [np.mean(unc <= t) for t in levels]
    risk = [err[unc <= t].mean() for t in levels]
    return float(np.mean(per_input_risk)), cov, risk


@SETTINGS
@given(problems, st.booleans())
def test_risk_coverage_and_aurc_match_direct_computation(case, use_score):
    p, y = _draw(case)
    rng = np.random.default_rng(case["seed"] + 1)
    score = np.round(rng.random(len(y)) * 5) if use_score else None
    unc = score if use_score else -p.max(1)
    ref_aurc, ref_cov, ref_risk = _direct_aurc(p, y, unc)
    cov, risk = M.risk_coverage(p, y, score)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    np.testing.assert_allclose(risk, ref_risk, atol=1e-12)
    assert cov[-1] == pytest.approx(1.0)
    assert risk[-1] == pytest.approx(1.0 - M.accuracy(p, y))
    assert M.aurc(p, y, score) == pytest.approx(ref_aurc, abs=1e-12)


def test_aurc_without_ties_is_mean_of_prefix_risks():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(4), size=50)
    y = rng.integers(0, 4, 50)
    err = (p.argmax(1) != y)[np.argsort(-p.max(1))]
    geifman = np.mean([err[: k + 1].mean() for k in range(50)])
    assert M.aurc(p, y) == pytest.approx(geifman, abs=1e-12)
    cov, _ = M.risk_coverage(p, y)
    np.testing.assert_allclose(cov, np.arange(1, 51) / 50)


# ------------------------------------------------------------------------------------- uncertainty

sample_cases = st.fixed_dictionaries(
    {
        "n": st.integers(1, 40),
        "s": st.integers(1, 12),
        "c": st.integers(2, 5),
        "seed": st.integers(0, 2**32 - 1),
    }
)


@SETTINGS
@given(sample_cases)
def test_uncertainty_matches_torch_summarize_and_scipy(case):
    rng = np.random.default_rng(case["seed"])
    logits = rng.normal(0, 2, (case["n"], case["s"], case["c"]))
    sp = np.exp(logits - logits.max(-1, keepdims=True))
    sp /= sp.sum(-1, keepdims=True)
    ours = M.uncertainty(sp)
    ref = summarize(torch.from_numpy(sp))
    assert set(ours) == set(ref)
    np.testing.assert_array_equal(ours["label"], ref["label"].numpy())
    for key in ("probs", "confidence", "entropy", "expected_entropy", "mutual_info", "variance"):
        np.testing.assert_allclose(ours[key], ref[key].double().numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(
        ours["entropy"], scipy.stats.entropy(sp.mean(1), axis=1), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(
        ours["expected_entropy"], scipy.stats.entropy(sp, axis=2).mean(1), rtol=1e-10, atol=1e-12
    )
    assert (ours["mutual_info"] >= 0).all()


def test_uncertainty_single_sample_has_no_epistemic_part():
    p = np.array([[[0.2, 0.8]], [[0.5, 0.5]]])
    u = M.uncertainty(p)
    np.testing.assert_allclose(u["mutual_info"], 0.0, atol=1e-12)
    np.testing.assert_allclose(u["variance"], 0.0, atol=1e-12)
    np.testing.assert_allclose(u["entropy"], u["expected_entropy"])


# ------------------------------------------------------------------------------------- edge cases


def test_summary_collects_every_metric():
    p, y = _draw({"n": 80, "c": 3, "seed": 5, "ties": False})
    s = M.summary(p, y)
    assert tuple(s) == tuple(M.SUMMARY_KEYS)
    assert s["n"] == 80
    for key in ("accuracy", "nll", "brier", "ece", "mce", "aurc"):
        assert s[key] == getattr(M, key)(p, y)


def test_one_class_and_single_example():
    one = np.ones((5, 1))
    y0 = np.zeros(5, int)
    assert M.accuracy(one, y0) == 1.0
    assert M.nll(one, y0) == pytest.approx(0.0, abs=1e-12)
    assert M.brier(one, y0) == 0.0
    assert M.ece(one, y0) == 0.0 and M.mce(one, y0) == 0.0
    assert M.aurc(one, y0) == 0.0
    # a single example; labels from only one of three classes
    p = np.array([[0.1, 0.7, 0.2]])
    assert M.nll(p, [2]) == pytest.approx(log_loss([2], p, labels=[0, 1, 2]))
    assert M.ece(p, [1]) == pytest.approx(0.3)
    assert M.mce(p, [2]) == pytest.approx(0.7)
    assert M.aurc(p, [2]) == 1.0
    assert M.auroc([0.3], [0.4]) == 1.0


def test_boolean_and_integral_float_labels_are_accepted():
    p = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    y = np.array([False, True, True])
    assert M.accuracy(p, y) == M.accuracy(p, y.astype(int)) == M.accuracy(p, y.astype(float)) == 2 / 3


def test_confident_mistake_has_finite_nll_like_sklearn():
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert M.nll(p, [1, 0]) == pytest.approx(log_loss([1, 0], p, labels=[0, 1]), rel=1e-9)


@pytest.mark.parametrize(
    "probs, labels, err, match",
    [
        (np.zeros((0, 3)), np.zeros(0, int), ShapeError, "N = 0"),
        (np.full((2, 2), 0.5), [0, 1, 1], ShapeError, "labels has 3"),
        (np.full(4, 0.25), [0], ShapeError, "2-D"),
        (np.full((2, 2), 0.5), [[0], [1]], ShapeError, "1-D"),
        (np.array([[0.5, np.nan], [0.5, 0.5]]), [0, 1], InvalidValueError, "NaN"),
        (np.array([[np.inf, 0.5], [0.5, 0.5]]), [0, 1], InvalidValueError, "NaN or infinite"),
        (np.array([[0.6, 0.6], [0.5, 0.5]]), [0, 1], InvalidValueError, "sum to 1"),
        (np.array([[2.0, -1.0], [0.5, 0.5]]), [0, 1], InvalidValueError, "logits"),
        (np.full((2, 2), 0.5), [0, 2], InvalidValueError, r"\[0, 2\)"),
        (np.full((2, 2), 0.5), [-1, 0], InvalidValueError, r"\[0, 2\)"),
        (np.full((2, 2), 0.5), [0.5, 1.0], InvalidValueError, "integers"),
        (np.full((2, 2), 0.5), ["a", "b"], InvalidValueError, "integers"),
    ],
)
@pytest.mark.parametrize(
    "fn", [M.accuracy, M.nll, M.brier, M.ece, M.mce, M.aurc, M.summary, M.reliability_diagram]
)
def test_bad_inputs_raise_clear_errors(fn, probs, labels, err, match):
    with pytest.raises(err, match=match):
        fn(probs, labels)


def test_bad_scores_and_samples_raise():
    with pytest.raises(ShapeError):
        M.auroc([], [0.1])
    with pytest.raises(ShapeError):
        M.fpr_at_95_tpr([0.1], [])
    with pytest.raises(InvalidValueError, match="NaN"):
        M.auroc([0.1, np.nan], [0.2])
    with pytest.raises(ShapeError, match=r"1-D"):
        M.auroc(np.ones((2, 2)), [0.2])
    with pytest.raises(ShapeError):
        M.uncertainty(np.full((2, 2), 0.5))
    with pytest.raises(ShapeError):
        M.uncertainty(np.zeros((2, 0, 2)))
    with pytest.raises(InvalidValueError, match="sum to 1"):
        M.uncertainty(np.full((2, 3, 2), 0.2))
    with pytest.raises(ShapeError, match="score"):
        M.aurc(np.full((2, 2), 0.5), [0, 1], score=[0.1])
    with pytest.raises(InvalidValueError, match="n_bins"):
        M.ece(np.full((2, 2), 0.5), [0, 1], n_bins=0)
    with pytest.raises(InvalidValueError, match="norm"):
        M.calibration_error([0.5], [1], norm="l2")
    with pytest.raises(InvalidValueError, match="0/1"):
        M.calibration_error([0.5], [2])


def test_float32_softmax_rows_are_accepted():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 5, (1000, 10)).astype(np.float32)
    p = torch.softmax(torch.from_numpy(z), -1).numpy()
    assert 0.0 <= M.ece(p, rng.integers(0, 10, 1000)) <= 1.0


# ------------------------------------------------------------------------------------- no torch


def test_metrics_calibration_plots_work_without_torch(tmp_path):
    code = f"""
        import numpy as np
        import bayeslora.metrics, bayeslora.calibration, bayeslora.plots
        p = np.array([[0.9, 0.1], [0.3, 0.7]])
        print(bayeslora.metrics.summary(p, [0, 0])['accuracy'])
        print(bayeslora.calibration.fit_temperature(np.log(p), [0, 0]))
        print(bayeslora.plots.rank_bars({str(tmp_path / "r.png")!r}, {{'a.q': 4}}, {{'a.q': 2}}))
    """
    result = run_python(code, shim=blocking_shim(tmp_path / "shim"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "0.5"
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_uncertainty_scores_from_fields():
    rng = np.random.default_rng(3)
    sp = rng.dirichlet(np.ones(3), size=(6, 5))
    fields = M.uncertainty(sp)
    scores = M.uncertainty_scores(fields)
    assert tuple(scores) == tuple(M.UNCERTAINTY_SCORES)
    mean = sp.mean(1)
    np.testing.assert_allclose(scores["1-confidence"], 1.0 - mean.max(1))
    np.testing.assert_allclose(scores["entropy"], -(mean * np.log(mean)).sum(1))
    with pytest.raises(ShapeError):
        M.uncertainty_scores({**fields, "entropy": np.zeros((6, 1))})
