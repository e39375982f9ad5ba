"""Sentence pairs through the training pipeline: examples are tokenised by the tokenizer's own pair
call (segment ids for BERT), ``predict`` on pairs is the model on that encoding, and a run on a
``csv:`` file of pairs trains, saves and evaluates (``bayeslora train`` / ``evaluate``)."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch

import bayeslora as bl
from bayeslora.evaluation import evaluate, load_predictor
from bayeslora.train.classifier import _Encoded, predict
from bayeslora.train.pipeline import TrainSettings, load_checkpoint, train
from conftest import WORDS_NEG, WORDS_NEUTRAL, WORDS_POS
from subprocesses import run_cli


def _sentence(rng: random.Random, positive: bool) -> str:
    words = rng.sample(WORDS_NEUTRAL, 2) + rng.sample(WORDS_POS if positive else WORDS_NEG, 2)
    rng.shuffle(words)
    return " ".join(words)


def write_pairs_csv(path, n: int = 120, seed: int = 0) -> None:
    """Pairs of sentences labelled ``same`` when both are positive or both negative, else ``differ``
    (neither sentence alone tells the label)."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "text_pair", "label"])
        for i in range(n):
            a, b = rng.random() < 0.5, i % 2 == 0
            w.writerow([_sentence(rng, a), _sentence(rng, a == b), "same" if b else "differ"])


def _model(tiny_model_dir):
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_pairs_are_tokenised_as_pairs_and_predicted_as_the_model_does(tiny_model_dir):
    model, tok = _model(tiny_model_dir)
    rng = random.Random(1)
    texts = [_sentence(rng, True) + " the film" * k for k in range(5)]
    pairs = [_sentence(rng, False) for _ in range(5)]
    ds = _Encoded(tok, texts, np.arange(5) % 2, max_length=12, text_pairs=pairs)
    for i in range(5):
        want = tok(texts[i], pairs[i], truncation=True, max_length=12)
        assert {k: ds[i][k] for k in want} == dict(want)
        assert 1 in ds[i]["token_type_ids"] and ds[i]["labels"] == i % 2
    probs = predict(model, tok, texts, 0, 0, max_length=12, batch_size=2, text_pairs=pairs)
    for i in range(5):  # one example at a time, unpadded: the model on the tokenizer's pair encoding
        enc = tok(texts[i], pairs[i], truncation=True, max_length=12, return_tensors="pt")
        with torch.no_grad():
            want = torch.softmax(model(**enc).logits.double(), -1).numpy()[0]
        np.testing.assert_allclose(probs[i, 0], want, atol=1e-6)


def test_train_and_evaluate_on_pairs(tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.csv"
    write_pairs_csv(data)
    settings = TrainSettings(
        model=str(tiny_model_dir),
        data=f"csv:{data}",
        rank=2,
        epochs=2,
        batch_size=16,
        max_length=24,
        lr=5e-3,
        samples=2,
        rank_select="validation",
    )
    run = train(settings, tmp_path / "run", progress=False, log=lambda *a: None)
    assert run["label_names"] == ["differ", "same"] and run["num_train"] == 96
    assert {"test_mean", "validation_mean", "test_mc"} <= set(run["metrics"])
    assert run["rank_selection"] and run["rank_selection"][0]["examples"] == 12
    model, tok, saved = load_checkpoint(tmp_path / "run")
    ds = run["data"]
    probs = predict(model, tok, ds.test.texts, 0, 0, 24, text_pairs=ds.test.text_pairs).mean(1)
    assert saved["metrics"]["test_mean"]["accuracy"] == pytest.approx(
        float(np.mean(probs.argmax(1) == ds.test.labels))
    )
    # evaluate: every row of the file, as pairs
    result = evaluate(tmp_path / "run", data=f"csv:{data}", ood=(), samples=0)
    assert result["n"] == 120 and result["split"] == "all"
    predictor, _ = load_predictor(tmp_path / "run", samples=0, seed=0)
    rows = list(csv.DictReader(open(data, newline="")))
    out = predictor([r["text"] for r in rows], [r["text_pair"] for r in rows])
    labels = np.array([r["label"] == "same" for r in rows], dtype=np.int64)
    assert result["in_domain"]["accuracy"] == pytest.approx(float(np.mean(out["label"] == labels)))
    # the exported bundle, through the Rust runtime, scores the pairs as the checkpoint does
    bundle = bl.export(model, tok, tmp_path / "bundle", max_length=24)
    from_bundle, info = load_predictor(bundle, samples=0, seed=0)
    assert info["engine"] == "rust"
    got = from_bundle([r["text"] for r in rows], [r["text_pair"] for r in rows])
    np.testing.assert_allclose(got["probs"], out["probs"], atol=1e-4, rtol=0)
    on_bundle = evaluate(bundle, data=f"csv:{data}", ood=(), samples=0)
    assert on_bundle["n"] == 120
    assert on_bundle["in_domain"]["nll"] == pytest.approx(result["in_domain"]["nll"], abs=1e-4)
    res = run_cli(
        ["evaluate", str(tmp_path / "run"), "--data", f"csv:{data}", "--ood", "--samples", "0", "--json"]
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["in_domain"] == result["in_domain"]
