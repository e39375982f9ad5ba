"""The defaults on data they were not tuned on (issue #19, §4): a 3-class CSV of a few hundred
Amazon review sentences (VADER's amazon domain: negative / neutral / positive), trained with
``bayeslora train`` and nothing but ``--data``, then evaluated on a held-out CSV."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

PER_CLASS_TRAIN, PER_CLASS_HELDOUT = 200, 60


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bayeslora.cli", *args], capture_output=True, text=True, timeout=1800, env=env
    )


def _write(path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


@pytest.fixture(scope="module")
def three_class_csvs(tmp_path_factory):
    from bayeslora.data import load_vader_ratings

    _, ratings, texts = load_vader_ratings("amazon")
    classes = {
        "negative": np.flatnonzero(ratings <= -1.0),
        "neutral": np.flatnonzero(np.abs(ratings) <= 0.3),
        "positive": np.flatnonzero(ratings >= 1.0),
    }
    rng = np.random.default_rng(0)
    train, heldout = [], []
    for name, idx in classes.items():
        assert len(idx) >= PER_CLASS_TRAIN + PER_CLASS_HELDOUT, (name, len(idx))
        pick = rng.permutation(idx)
        train += [(texts[i], name) for i in pick[:PER_CLASS_TRAIN]]
        heldout += [(texts[i], name) for i in pick[PER_CLASS_TRAIN : PER_CLASS_TRAIN + PER_CLASS_HELDOUT]]
    rng.shuffle(train)
    d = tmp_path_factory.mktemp("three-class")
    _write(d / "reviews.csv", train)
    _write(d / "heldout.csv", heldout)
    return d / "reviews.csv", d / "heldout.csv"


@pytest.mark.slow
def test_defaults_train_prune_and_evaluate_a_new_three_class_csv(three_class_csvs, tmp_path):
    train_csv, heldout_csv = three_class_csvs
    out = tmp_path / "run"
    res = _cli("train", "--data", f"csv:{train_csv}", "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    run = json.loads(res.stdout.strip().splitlines()[-1])
    assert run["label_names"] == ["negative", "neutral", "positive"]
    # it pruned (a rank is learned, not the initial one) and it did not prune the adapter away
    assert 0 < run["total_rank"] < run["initial_total_rank"], run["ranks"]
    # the majority-class rate of a balanced 3-class set is 1/3
    assert run["metrics"]["test_mean"]["accuracy"] > 0.55, run["metrics"]
    res = _cli(
        "evaluate", str(out), "--data", f"csv:{heldout_csv}", "--ood", "--shift", "--samples", "4", "--json"
    )
    assert res.returncode == 0, res.stderr[-4000:]
    ev = json.loads(res.stdout.strip().splitlines()[-1])
    assert (ev["n"], ev["split"]) == (3 * PER_CLASS_HELDOUT, "all")
    assert ev["in_domain"]["accuracy"] > 0.55, ev["in_domain"]
