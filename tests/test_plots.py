"""Plots: each writes a readable PNG, and what it draws is the data the metrics (and references) give."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
from matplotlib.figure import Figure
from matplotlib.image import imread
from sklearn.metrics import roc_auc_score

from bayeslora import metrics, plots
from bayeslora.errors import ShapeError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (400, 3))
    y = np.array([rng.choice(3, p=row) for row in scipy.special.softmax(z / 2, axis=1)])
    return scipy.special.softmax(z, axis=1), y


def _axes():
    return Figure().add_subplot()


def _check_png(path, expected):
    assert path == expected
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_reliability_diagram_png_and_bars(data, tmp_path):
    p, y = data
    out = tmp_path / "sub" / "reliability.png"
    _check_png(plots.reliability_diagram(out, p, y), out)
    ax = _axes()
    assert plots.reliability_diagram(ax, p, y, n_bins=10) is ax
    d = metrics.reliability_diagram(p, y, n_bins=10)
    accuracy_bars = ax.containers[0]
    heights = np.array([bar.get_height() for bar in accuracy_bars])
    np.testing.assert_allclose(heights, np.nan_to_num(d["accuracy"]))
    np.testing.assert_allclose([bar.get_x() for bar in accuracy_bars], d["lo"])
    assert f"{metrics.ece(p, y, 10):.3f}" in ax.get_title()
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None


def test_risk_coverage_plot_draws_the_curves(data, tmp_path):
    p, y = data
    score = np.random.default_rng(1).random(len(y))
    curves = {"confidence": (p, y), "random": (p, y, score)}
    out = tmp_path / "rc.png"
    _check_png(plots.risk_coverage_plot(out, curves), out)
    ax = _axes()
    plots.risk_coverage_plot(ax, curves)
    lines = ax.get_lines()
    assert len(lines) == 2
    cov, risk = metrics.risk_coverage(p, y, score)
    np.testing.assert_allclose(lines[1].get_xdata()[1:], cov)
    np.testing.assert_allclose(lines[1].get_ydata()[1:], risk)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[0] == f"confidence (AURC {metrics.aurc(p, y):.3f})"
    with pytest.raises(ShapeError):
        plots.risk_coverage_plot(ax, {})


def test_score_histograms_match_numpy_and_sklearn(tmp_path):
    rng = np.random.default_rng(2)
    s_in, s_out = rng.gamma(2, 0.05, 500), rng.gamma(4, 0.06, 150)
    out = tmp_path / "hist.png"
    _check_png(plots.score_histograms(out, s_in, s_out, "mutual_info"), out)
    ax = _axes()
    plots.score_histograms(ax, s_in, s_out, "entropy", bins=20)
    edges = np.linspace(min(s_in.min(), s_out.min()), max(s_in.max(), s_out.max()), 21)
    density_in, _ = np.histogram(s_in, edges, density=True)
    np.testing.assert_allclose([b.get_height() for b in ax.containers[0]], density_in)
    y = np.r_[np.zeros(500), np.ones(150)]
    assert f"AUROC {roc_auc_score(y, np.r_[s_in, s_out]):.3f}" in ax.get_title()
    assert "entropy" in ax.get_xlabel()
    # all scores equal: still draws (degenerate range) and AUROC is 0.5
    plots.score_histograms(_axes(), np.ones(3), np.ones(2))


def test_rank_bars_short_names_and_values(tmp_path):
    names = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(3) for m in ("query", "value")]
    before = dict.fromkeys(names, 8)
    after = {n: i for i, n in enumerate(names[:-1])}  # the last module is gone
    out = tmp_path / "ranks.png"
    _check_png(plots.rank_bars(out, before, after), out)
    ax = _axes()
    plots.rank_bars(ax, before, after)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "layer.0.attention.self.query" and labels[-1] == "layer.2.attention.self.value"
    np.testing.assert_allclose([b.get_width() for b in ax.containers[0]], [8] * 6)
    np.testing.assert_allclose([b.get_width() for b in ax.containers[1]], [0, 1, 2, 3, 4, 0])
    assert "48" in ax.get_title() and "10" in ax.get_title()
    assert plots._short_names(["a.q", "b.q"]) == ["a.q", "b.q"]
    assert plots._short_names(["m.x.q", "m.x.v"]) == ["q", "v"]
    with pytest.raises(ShapeError):
        plots.rank_bars(ax, {}, {})
    with pytest.raises(ShapeError, match="not in ranks_before"):
        plots.rank_bars(ax, {"a": 1}, {"b": 1})


def test_out_must_be_path_or_axes(data):
    with pytest.raises(TypeError, match="Axes"):
        plots.reliability_diagram(42, *data)
