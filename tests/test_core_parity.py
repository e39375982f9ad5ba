"""The Rust core (bayeslora._core) against the torch layer on KL and rank scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import bayeslora as bl
from bayeslora import _core
from bayeslora.nn.layer import BayesLoRALayer, kl_molchanov

finite = st.floats(-15, 15, allow_nan=False, width=64)


@given(arrays(np.float64, st.integers(1, 40), elements=finite))
def test_kl_rust_matches_torch(log_alpha):
    rust = _core.kl_molchanov(log_alpha)
    ref = kl_molchanov(torch.from_numpy(log_alpha)).numpy()
    np.testing.assert_allclose(rust, ref, rtol=1e-12, atol=1e-12)
    assert np.all(rust >= 0)


def _layer(posterior: str, d_in: int, d_out: int, rank: int, seed: int) -> BayesLoRALayer:
    torch.manual_seed(seed)
    layer = BayesLoRALayer(torch.nn.Linear(d_in, d_out), bl.BayesLoRAConfig(rank=rank, posterior=posterior))
    with torch.no_grad():
        layer.lora_A.normal_(0, 0.3)
        layer.lora_B.normal_(0, 0.3)
        layer.rank_parameter().uniform_(-9, 1)
    return layer.double()


@given(
    d_in=st.integers(1, 20),
    d_out=st.integers(1, 20),
    rank=st.integers(1, 8),
    seed=st.integers(0, 999),
    group=st.sampled_from(["params", "unit"]),
)
def test_module_kl_rust_matches_torch(d_in, d_out, rank, seed, group):
    gate = _layer("gate", d_in, d_out, rank, seed)
    gate.kl_group = group
    g = float(d_in + d_out) if group == "params" else 1.0
    np.testing.assert_allclose(
        _core.kl_gate(gate.log_alpha.detach().numpy(), g), gate.kl().item(), rtol=1e-10
    )
    add = _layer("additive", d_in, d_out, rank, seed)
    rust = _core.kl_additive(
        add.log_sigma2.detach().numpy(), add.lora_A.detach().numpy(), add.lora_B.detach().numpy()
    )
    np.testing.assert_allclose(rust, add.kl().item(), rtol=1e-10)


@given(d_in=st.integers(1, 30), d_out=st.integers(1, 30), rank=st.integers(1, 8), seed=st.integers(0, 999))
def test_rank_scores_rust_matches_torch_and_numpy(d_in, d_out, rank, seed):
    add = _layer("additive", d_in, d_out, rank, seed)
    ls, a, b = (t.detach().numpy() for t in (add.log_sigma2, add.lora_A, add.lora_B))
    rust = _core.rank_scores_additive(ls, a, b)
    ref_numpy = ls - 0.5 * (np.median(np.log(a**2 + 1e-8), axis=1) + np.median(np.log(b**2 + 1e-8), axis=0))
    np.testing.assert_allclose(rust, ref_numpy, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(add.rank_scores().numpy(), ref_numpy, rtol=1e-5, atol=1e-5)
    gate = _layer("gate", d_in, d_out, rank, seed)
    np.testing.assert_array_equal(
        _core.rank_scores_gate(gate.log_alpha.detach().numpy()), gate.log_alpha.detach().numpy()
    )


def test_additive_score_at_default_init_is_above_threshold():
    # docs/method.md §2b's trap: at the default init ℓ_k ≈ 3.6 for d_in = 768, already above τ = 3.
    torch.manual_seed(0)
    layer = BayesLoRALayer(torch.nn.Linear(768, 768), bl.BayesLoRAConfig(rank=8, posterior="additive"))
    scores = layer.rank_scores().numpy()
    assert np.all(scores > 3.0) and np.all(np.abs(scores - 3.6) < 0.5), scores


def test_core_errors_are_bayeslora_errors():
    with pytest.raises(bl.errors.InvalidValueError, match="log_alpha"):
        _core.kl_molchanov(np.array([0.0, np.nan]))
    with pytest.raises(bl.errors.ShapeError):
        _core.kl_additive(np.zeros(2), np.zeros((3, 4)), np.zeros((5, 2)))
    with pytest.raises(ValueError):  # ShapeError is also a ValueError
        _core.rank_scores_additive(np.zeros(2), np.zeros((2, 4)), np.zeros((5, 3)))
    with pytest.raises(bl.errors.InvalidValueError):
        _core.kl_gate(np.zeros(3), -1.0)


def test_fortran_ordered_arrays_are_rejected_not_misread():
    a = np.asfortranarray(np.arange(6.0).reshape(2, 3) + 1)
    b = np.ones((4, 2))
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.rank_scores_additive(np.zeros(2), a, b)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.kl_additive(np.zeros(2), a, b)
