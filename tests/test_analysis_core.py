"""Parity of the Rust rank-analysis numerics (docs/method.md §8) with numpy / scipy on the dense ΔW.

References: ``numpy.linalg.svd`` of the dense product ``s · B diag(ez) A``,
``scipy.linalg.subspace_angles``, ``scipy.stats.spearmanr``. Inputs: random, rank-deficient (zero
columns, exactly dependent columns) and ill-conditioned (geometrically graded) factors.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bayeslora import _core
from bayeslora.errors import InvalidValueError, ShapeError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("random", "zero_columns", "dependent", "ill_conditioned")


def make_factors(seed: int, r: int, d_in: int, d_out: int, kind: str) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((r, d_in))
    b = rng.standard_normal((d_out, r))
    ez = rng.uniform(0.2, 2.0, r)
    if kind == "zero_columns" and r > 0:
        k = rng.integers(0, r)
        a[k] = 0.0
        b[:, (k + 1) % r] = 0.0
    elif kind == "dependent" and r >= 2:
        a[1] = 2.5 * a[0]  # rank(A) < r: the components 0 and 1 share a direction
        b[:, -1] = b[:, 0] - b[:, 1]
    elif kind == "ill_conditioned" and r > 0:
        a *= np.logspace(0, -9, r)[:, None]  # condition number of A ~1e9
        b *= np.logspace(0, -4, r)[None, :]
    return a, b, ez


def dense(a: np.ndarray, b: np.ndarray, ez: np.ndarray, scale: float) -> np.ndarray:
    return scale * (b * ez) @ a


factor_args = dict(
    seed=st.integers(0, 2**31 - 1),
    r=st.integers(0, 10),
    d_in=st.integers(1, 40),
    d_out=st.integers(1, 40),
    kind=st.sampled_from(KINDS),
    scale=st.floats(0.05, 20.0),
)


@SETTINGS
@given(**factor_args)
def test_low_rank_svd_matches_numpy(seed, r, d_in, d_out, kind, scale):
    a, b, ez = make_factors(seed, r, d_in, d_out, kind)
    u, s, v = _core.low_rank_svd(a, b, ez, scale)
    w = dense(a, b, ez, scale)
    p = min(r, d_in, d_out)
    ref = np.linalg.svd(w, compute_uv=False)[:p]
    assert s.shape == (p,) and u.shape == (d_out, p) and v.shape == (d_in, p)
    s1 = max(ref[0] if p else 0.0, 1.0)
    np.testing.assert_allclose(s, ref, rtol=0, atol=1e-9 * s1)
    np.testing.assert_allclose((u * s) @ v.T, w, rtol=0, atol=1e-9 * s1)
    np.testing.assert_allclose(u.T @ u, np.eye(p), atol=1e-10)
    np.testing.assert_allclose(v.T @ v, np.eye(p), atol=1e-10)


def _subspace_inputs(seed: int, m: int, n: int, k: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, n))
    y = rng.standard_normal((m, k))
    if kind == "zero_columns":
        x[:, 0] = 0.0
    elif kind == "dependent" and n >= 2:
        x[:, -1] = x[:, 0] + 0.5 * x[:, 1]
    elif kind == "ill_conditioned":
        x *= np.logspace(0, -8, n)[None, :]
        y *= np.logspace(0, -6, k)[None, :]
    elif kind == "nearly_equal":
        j = min(n, k)
        y[:, :j] = x[:, :j] + 1e-7 * rng.standard_normal((m, j))
    return x, y


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 60),
    n=st.integers(1, 9),
    k=st.integers(1, 9),
    kind=st.sampled_from((*KINDS, "nearly_equal")),
)
def test_subspace_angles_match_scipy(seed, m, n, k, kind):
    x, y = _subspace_inputs(seed, m, n, k, kind)
    ours = _core.subspace_angles(x, y)
    ref = scipy.linalg.subspace_angles(x, y)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [9, 1])
def test_square_rank_deficient_regression(k):
    # A 9x9 matrix of rank 8: a Jacobi column left at rounding level once reported σ ≈ 4e-15·σ_1
    # (above orth's tolerance), so the rank came out 9 and the angles were wrong.
    x, y = _subspace_inputs(9, 9, 9, k, "dependent")
    ref = scipy.linalg.subspace_angles(x, y)
    ours = _core.subspace_angles(x, y)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_subspace_angles_known_values():
    h = scipy.linalg.hadamard(4).astype(float)
    np.testing.assert_allclose(_core.subspace_angles(h[:, :2], h[:, 2:]), [np.pi / 2] * 2, atol=1e-15)
    np.testing.assert_allclose(_core.subspace_angles(h[:, :2], h[:, :2]), [0.0, 0.0], atol=1e-7)
    assert _core.subspace_angles(np.zeros((4, 2)), h[:, :2]).shape == (0,)
    with pytest.raises(ShapeError):
        _core.subspace_angles(h[:, :2], np.ones((3, 1)))


@SETTINGS
@given(
    n=st.integers(0, 30),
    seed=st.integers(0, 2**31 - 1),
    ties=st.booleans(),
)
def test_spearman_matches_scipy(n, seed, ties):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, n).astype(float) if ties else rng.standard_normal(n)
    y = rng.integers(0, 3, n).astype(float) if ties else x + rng.standard_normal(n)
    ours = _core.spearman(x, y)
    if n < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        assert np.isnan(ours)
        return
    ref = scipy.stats.spearmanr(x, y).statistic
    assert ours == pytest.approx(ref, abs=1e-12)


def _module(seed: int, r: int, d_in: int, d_out: int, kind: str, scale: float):
    a, b, ez = make_factors(seed, r, d_in, d_out, kind)
    rel = np.random.default_rng(seed + 1).standard_normal(r)
    return a, b, ez, rel, scale


@SETTINGS
@given(**factor_args)
def test_module_analysis_matches_dense_route(seed, r, d_in, d_out, kind, scale):
    """Every per-module statistic against the numpy/scipy route on the dense ΔW."""
    a, b, ez, rel, scale = _module(seed, r, d_in, d_out, kind, scale)
    (m,) = _core.analyze_modules([(a, b, ez, rel, scale)], num_threads=1)
    w = dense(a, b, ez, scale)
    p = min(r, d_in, d_out)
    u_np, s_np, vt_np = np.linalg.svd(w, full_matrices=False)
    s_np, u_np, v_np = s_np[:p], u_np[:, :p], vt_np[:p].T
    s1 = max(s_np[0] if p else 0.0, 1.0)
    np.testing.assert_allclose(m["singular_values"], s_np, rtol=0, atol=1e-9 * s1)
    r_eff = int(np.linalg.matrix_rank(w)) if p else 0
    assert m["r_eff"] == r_eff

    mags = scale * np.abs(ez) * np.linalg.norm(b, axis=0) * np.linalg.norm(a, axis=1)
    np.testing.assert_allclose(m["magnitudes"], mags, rtol=1e-12, atol=0)
    order = np.argsort(rel, kind="stable")
    np.testing.assert_array_equal(m["order"], order)
    np.testing.assert_array_equal(m["magnitude_order"], np.argsort(-mags, kind="stable"))

    # Singular subspaces are well defined only across a gap: compare top-j where it is wide.
    sv = np.append(s_np, 0.0)
    gap_ok = [(sv[j - 1] - sv[j]) > 1e-4 * s1 for j in range(1, r_eff + 1)]
    assert len(m["angles_v"]) == r_eff == len(m["angles_u"])
    for j in range(1, r_eff + 1):
        if not gap_ok[j - 1]:
            continue
        sel = order[:j]
        ref_v = scipy.linalg.subspace_angles(a[sel].T, v_np[:, :j])
        ref_u = scipy.linalg.subspace_angles(b[:, sel], u_np[:, :j])
        np.testing.assert_allclose(m["angles_v"][j - 1], ref_v, rtol=0, atol=1e-6)
        np.testing.assert_allclose(m["angles_u"][j - 1], ref_u, rtol=0, atol=1e-6)

    # Best |cos| against the singular vectors (when every one of them is well defined).
    if r_eff and all(gap_ok) and (r_eff == 1 or np.min(-np.diff(s_np[:r_eff])) > 1e-4 * s1):
        with np.errstate(invalid="ignore", divide="ignore"):
            ca = np.abs(a @ v_np[:, :r_eff]) / np.linalg.norm(a, axis=1)[:, None]
            cb = np.abs(b.T @ u_np[:, :r_eff]) / np.linalg.norm(b, axis=0)[:, None]
        for ours, ref in ((m["cos_a"], ca), (m["cos_b"], cb)):
            zero = ~np.isfinite(ref).all(axis=1)
            assert np.isnan(ours[zero]).all()
            np.testing.assert_allclose(ours[~zero], ref[~zero].max(axis=1), atol=1e-6)

    if r_eff:
        sig = s_np
        np.testing.assert_allclose(m["energy"], np.cumsum(sig**2)[:r_eff] / np.sum(sig**2), atol=1e-9)
        pr = sig / sig.sum()
        pr = pr[pr > 0]
        assert m["effective_rank"] == pytest.approx(np.exp(-np.sum(pr * np.log(pr))), abs=1e-6)
        assert m["stable_rank"] == pytest.approx(np.sum(sig**2) / sig[0] ** 2, abs=1e-6)
    else:
        assert m["effective_rank"] == 0.0 and m["stable_rank"] == 0.0
    if r >= 2 and np.ptp(mags) > 0:
        ref = scipy.stats.spearmanr(rel, mags).statistic
        assert m["spearman"] == pytest.approx(ref, abs=1e-12)


def test_parallel_pool_gives_identical_results():
    mods = [_module(s, 6, 50, 40, KINDS[s % 4], 2.0) for s in range(10)]
    serial = _core.analyze_modules(mods, num_threads=1)
    parallel = _core.analyze_modules(mods, num_threads=2)
    for x, y in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(x["singular_values"], y["singular_values"])
        for ax, ay in zip(x["angles_v"], y["angles_v"], strict=True):
            np.testing.assert_array_equal(ax, ay)


def test_rank_zero_and_no_relevance():
    empty = (np.zeros((0, 5)), np.zeros((4, 0)), np.zeros(0), None, 1.0)
    (m,) = _core.analyze_modules([empty])
    assert m["r_eff"] == 0 and m["singular_values"].shape == (0,) and m["angles_v"] == []
    assert np.isnan(m["spearman"])
    a, b, ez, _, _ = _module(3, 4, 12, 9, "random", 1.0)
    (m,) = _core.analyze_modules([(a, b, ez, None, 1.0)])
    np.testing.assert_array_equal(m["order"], m["magnitude_order"])
    assert np.isnan(m["spearman"])


def test_errors_are_typed():
    a, b, ez, rel, _ = _module(0, 3, 5, 4, "random", 1.0)
    with pytest.raises(ShapeError):
        _core.analyze_modules([(a, b[:, :2].copy(), ez, rel, 1.0)])
    with pytest.raises(ShapeError):
        _core.analyze_modules([(a, b, ez, rel[:2].copy(), 1.0)])
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InvalidValueError):
        _core.analyze_modules([(bad, b, ez, rel, 1.0)])
    with pytest.raises(InvalidValueError):
        _core.low_rank_svd(a, b, ez, float("inf"))
    with pytest.raises(InvalidValueError):
        _core.spearman(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.analyze_modules([(np.asfortranarray(a), b, ez, rel, 1.0)])
