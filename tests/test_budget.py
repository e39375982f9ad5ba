"""The rank-budget controller (issue #19, H6): a budget-floored τ pass and a KL weight that steers
the number of ranks below τ towards a target total rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bayeslora as bl
from bayeslora.config import BayesLoRAConfig
from bayeslora.errors import ConfigError
from bayeslora.nn.model import adapted_layers
from bayeslora.nn.pruning import prune_to_floor
from bayeslora.train.pipeline import TrainSettings, train
from tiny_models import QV_TARGETS, build


def _gated(seed: int = 0, min_rank: int = 0):
    model = build("bert", hidden=8, heads=2, layers=2, inter=8, labels=2, seed=seed)
    bl.inject(
        model, BayesLoRAConfig.recipe("vi", rank=4, target_modules=QV_TARGETS["bert"], min_rank=min_rank)
    )
    layers = [layer for _, layer in adapted_layers(model)]
    rng = np.random.default_rng(seed)
    scores = rng.normal(3.0, 2.0, size=(len(layers), 4))
    with torch.no_grad():
        for layer, s in zip(layers, scores, strict=True):
            layer.log_alpha.copy_(torch.tensor(s, dtype=layer.log_alpha.dtype))
    return model, layers, scores


@pytest.mark.parametrize("floor", [0, 5, 9, 12, 16])
def test_prune_to_floor_masks_the_noisiest_ranks_above_tau_over_all_modules(floor):
    model, layers, scores = _gated()
    tau = 3.0
    report = prune_to_floor(model, floor, threshold=tau)
    total = scores.size
    above = np.sort(scores[scores > tau])[::-1]
    n_off = min(len(above), max(0, total - floor))
    # reference: the n_off largest scores above τ are masked, every other rank stays
    expect_off = scores >= above[n_off - 1] if n_off else np.zeros_like(scores, bool)
    masks = np.array([layer.rank_mask.numpy() for layer in layers])
    np.testing.assert_array_equal(masks == 0, expect_off)
    assert sum(after for _, after in report.values()) == total - n_off
    assert sum(after for _, after in report.values()) >= min(floor, total)


def test_prune_to_floor_keeps_each_modules_min_rank():
    model, layers, _ = _gated(min_rank=2)
    with torch.no_grad():
        for layer in layers:
            layer.log_alpha.fill_(10.0)  # every rank far above τ
    prune_to_floor(model, 0, threshold=3.0)
    assert [layer.active_rank for layer in layers] == [2] * len(layers)


def test_rank_budget_is_validated():
    for bad in (-1, 0.0, 1.5, True, "half"):
        with pytest.raises(ConfigError, match="rank_budget"):
            BayesLoRAConfig(rank_budget=bad)
    assert BayesLoRAConfig(rank_budget=0.5).rank_budget == 0.5
    assert TrainSettings(rank_budget=12).bayes_config("classifier").rank_budget == 12


def _run(model_dir, csv, out, **kw):
    settings = TrainSettings.for_recipe(
        "vi",
        model=str(model_dir),
        data=f"csv:{csv}",
        rank=4,
        epochs=6.0,
        batch_size=8,
        max_length=16,
        lr=5e-3,
        samples=0,
        save_steps=10**6,
        prune_start=0.1,
        prune_every=0.1,
        refit_start=0.6,
        kl_freeze=0,
        kl_warmup=0,
        sample_start=0,
        **kw,
    )
    return train(settings, out, progress=False, log=lambda *a: None)


def test_the_controller_reaches_the_budget_where_a_fixed_tau_does_not(
    tiny_model_dir, sentiment_csv, tmp_path
):
    # a KL far too weak to push any rank across τ on its own: τ passes prune nothing...
    plain = _run(tiny_model_dir, sentiment_csv, tmp_path / "plain", kl_scale=1e-4)
    initial = plain["initial_total_rank"]
    assert plain["total_rank"] == initial
    # ...while the controller raises the KL weight until the ranks cross, and stops at the budget
    run = _run(tiny_model_dir, sentiment_csv, tmp_path / "budget", kl_scale=1e-4, rank_budget=0.5)
    assert run["total_rank"] == round(0.5 * initial)
    factors = [h["kl_factor"] for h in run["log_history"] if "kl_factor" in h]
    assert factors and max(factors) > 10.0  # it had to push
    # the masks at the refit point are frozen afterwards, as without a budget
    assert run["prune_history"][-1]["refit"] is True
    assert sum(run["prune_history"][-1]["ranks"].values()) == round(0.5 * initial)
