"""Issue #19 acceptance 6: a new CSV dataset of a few hundred rows trains, prunes and evaluates
sensibly with the defaults — the real MiniLM, three classes of Amazon review sentences (VADER's
ratings: negative ≤ −1, neutral within ±0.4, positive ≥ 1.5), 600 rows to train on (480 train,
60 validation, 60 test) and 150 other rows handed to ``evaluate`` as a test file. Measured here:
150 steps (10 epochs), the cut keeps 108 of 288 ranks, test accuracy 0.80 in MC mode, 0.79 on the
held-out file, ECE 0.09; the bounds (0.65 against a majority rate of 1/3) leave room for other CPUs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

CLASSES = ("negative", "neutral", "positive")


def _write_csvs(train_path, heldout_path, per_class=200, heldout_per_class=50, seed=0) -> None:
    from bayeslora.data import load_vader_ratings

    _, ratings, texts = load_vader_ratings("amazon")
    cls = np.full(len(ratings), -1)
    cls[ratings <= -1.0] = 0
    cls[np.abs(ratings) <= 0.4] = 1
    cls[ratings >= 1.5] = 2
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for k, name in enumerate(CLASSES):
        idx = rng.permutation(np.flatnonzero(cls == k))
        train += [(texts[i], name) for i in idx[:per_class]]
        heldout += [(texts[i], name) for i in idx[per_class : per_class + heldout_per_class]]
    for path, rows in ((train_path, train), (heldout_path, heldout)):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in rng.permutation(len(rows)):
                w.writerow(rows[i])


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bayeslora.cli", *args], capture_output=True, text=True, timeout=2400, env=env
    )


@pytest.mark.slow
def test_a_new_three_class_csv_trains_prunes_and_evaluates_with_the_defaults(tmp_path):
    train_csv, heldout_csv, out = tmp_path / "reviews.csv", tmp_path / "heldout.csv", tmp_path / "run"
    _write_csvs(train_csv, heldout_csv)
    res = _cli("train", "--data", f"csv:{train_csv}", "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    run = json.loads(res.stdout.strip().splitlines()[-1])
    assert run["label_names"] == list(CLASSES) and run["num_train"] == 480
    assert run["settings"]["recipe"] == "select" and run["epochs"] == 10  # 150 steps at least
    # it prunes: the half-way validation cut removed ranks, and not all of them
    (cut,) = run["rank_selection"]
    assert cut["benefit"] > cut["benefit_se"], cut
    assert 0 < run["total_rank"] < run["initial_total_rank"], run["ranks"]
    # it learned: well above the majority rate (1/3) on its own test split, in MC mode
    assert run["metrics"]["test_mc"]["accuracy"] >= 0.65, run["metrics"]
    # a file handed to evaluate is a test set: every row scored, through the checkpoint
    res = _cli("evaluate", str(out), "--data", f"csv:{heldout_csv}", "--ood", "--samples", "8", "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    ev = json.loads(res.stdout.strip().splitlines()[-1])
    assert ev["n"] == 150 and ev["split"] == "all"
    m = ev["in_domain"]
    assert m["accuracy"] >= 0.65 and 0 <= m["ece"] <= 0.25 and np.isfinite(m["nll"]), m
