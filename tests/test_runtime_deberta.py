"""DeBERTa-v2 (the architecture of DeBERTa-v3) in export and the Rust runtime, against
transformers' own ``DebertaV2ForSequenceClassification`` (+ bl.inject): mean-mode parity on random
configs (relative attention, buckets, c2p/p2c subsets, shared keys, padding masks), exact parity
with explicit gates, MC statistics, batch/thread independence, and the options export refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import bayeslora as bl
from bayeslora.errors import BundleError, ConfigError
from bayeslora.nn.model import adapted_layers
from bayeslora.runtime import FIELDS, Scorer
from runtime_models import (
    DEBERTA_TARGETS,
    adapt,
    batch,
    build_deberta,
    mask_some_ranks,
    np_inputs,
    softmax,
    torch_logits,
)

TOL = 1e-4
# DeBERTa-v3's attention: relative, log buckets, both terms, shared keys, no absolute positions
V3 = {
    "relative_attention": True,
    "position_buckets": 8,
    "max_relative_positions": -1,
    "pos_att_type": ["p2c", "c2p"],
    "share_att_key": True,
    "position_biased_input": False,
    "norm_rel_ebd": "layer_norm",
}


def holes(inputs, seed):
    """Mask a few tokens inside the rows (never token 0): relative positions keep the padded index."""
    g = torch.Generator().manual_seed(seed)
    mask = inputs["attention_mask"].clone()
    n, t = mask.shape
    if t > 2:
        for i in range(n):
            j = int(torch.randint(1, t, (1,), generator=g))
            mask[i, j] = 0
    return {"input_ids": inputs["input_ids"], "attention_mask": mask}


@st.composite
def deberta_cases(draw):
    heads = draw(st.integers(1, 3))
    kinds = draw(st.lists(st.sampled_from(["c2p", "p2c"]), unique=True, max_size=2))
    buckets = draw(st.sampled_from([-1, 2, 3, 4, 8, 16]))
    max_rel = draw(st.sampled_from([-1, 2, 3, 6, 20, 64]))
    assume(not (buckets > 0 and (64 if max_rel < 1 else max_rel) - 1 == buckets // 2))
    share = draw(st.booleans())
    options = {
        "relative_attention": draw(st.booleans()),
        "position_buckets": buckets,
        "max_relative_positions": max_rel,
        "pos_att_type": draw(st.sampled_from([kinds, "|".join(kinds) or None])),
        "share_att_key": share,
        "position_biased_input": draw(st.booleans()),
        "norm_rel_ebd": draw(st.sampled_from(["none", "layer_norm"])),
        "type_vocab_size": draw(st.sampled_from([0, 2])),
        "hidden_act": draw(st.sampled_from(["gelu", "gelu_new", "relu"])),
        "pooler_hidden_act": draw(st.sampled_from(["gelu", "tanh"])),
    }
    own = [] if share else ["pos_key_proj", "pos_query_proj"]
    return {
        "options": options,
        "heads": heads,
        "hidden": heads * draw(st.integers(1, 8)),
        "layers": draw(st.integers(1, 3)),
        "inter": draw(st.integers(1, 32)),
        "labels": draw(st.integers(2, 4)),
        "rank": draw(st.integers(1, 5)),
        # one always-present target, maybe a position projection of the layer's own
        "targets": draw(st.lists(st.sampled_from(DEBERTA_TARGETS), min_size=1, max_size=4, unique=True))
        + (draw(st.lists(st.sampled_from(own), max_size=1)) if own else []),
        "n": draw(st.integers(1, 4)),
        "t": draw(st.integers(1, 24)),
        "pad": draw(st.booleans()),
        "holes": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=25, deadline=None)
@given(case=deberta_cases())
def test_mean_mode_matches_transformers_on_random_deberta_configs(case, tmp_path_factory):
    model = build_deberta(
        case["hidden"],
        case["heads"],
        case["layers"],
        case["inter"],
        case["labels"],
        seed=case["seed"],
        **case["options"],
    )
    adapt(model, case["targets"], rank=case["rank"], seed=case["seed"])
    mask_some_ranks(model, case["seed"])
    inputs = batch(case["n"], case["t"], seed=case["seed"], pad=case["pad"])
    if case["holes"]:
        inputs = holes(inputs, case["seed"])
    want = torch_logits(model, inputs)
    out = bl.export(model, None, tmp_path_factory.mktemp("b") / "bundle")
    scorer = Scorer(out, num_threads=1)
    np.testing.assert_allclose(scorer.logits(*np_inputs(inputs)), want, atol=TOL, rtol=0)
    np.testing.assert_allclose(scorer.score(np_inputs(inputs), samples=0)["probs"], softmax(want), atol=TOL)


def test_v3_xsmall_like_config_with_long_inputs_matches_transformers(tmp_path):
    # buckets 256 as DeBERTa-v3 (span 256, 512 relative rows), inputs longer than half a bucket
    v3 = {**V3, "position_buckets": 256, "max_position_embeddings": 512}
    model = build_deberta(48, 6, 2, 64, 3, seed=3, **v3)
    adapt(model, ["query_proj", "key_proj", "value_proj", "attention.output.dense"], rank=4, seed=3)
    inputs = batch(3, 300, seed=4)
    want = torch_logits(model, inputs)
    out = bl.export(model, None, tmp_path / "b")
    np.testing.assert_allclose(Scorer(out, num_threads=2).logits(*np_inputs(inputs)), want, atol=TOL, rtol=0)


def per_sequence_logits(model, inputs, gates):
    """transformers' logits of each input alone, its gates (one row) set on every layer: the
    query/key adapters then apply the same gate to the content and the position projections."""
    layers = dict(adapted_layers(model))
    rows = []
    for i in range(inputs["input_ids"].shape[0]):
        for name, layer in layers.items():
            layer.fixed_gates = gates[name][i : i + 1]
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        rows.append(torch_logits(model, one)[0])
    for layer in layers.values():
        layer.fixed_gates = None
    return np.stack(rows)


@pytest.mark.parametrize(
    "options,targets",
    [
        (V3, ["query_proj", "key_proj", "value_proj", "classifier"]),
        ({**V3, "share_att_key": False}, ["query_proj", "pos_key_proj", "pos_query_proj", "output.dense"]),
        ({**V3, "pos_att_type": ["c2p"], "position_buckets": -1}, ["key_proj", "intermediate.dense"]),
    ],
)
@pytest.mark.parametrize(
    "method,posterior", [("bayeslora", "gate"), ("mcdropout", "gate"), ("bayeslora", "additive")]
)
def test_explicit_gates_match_transformers_fixed_gates(options, targets, method, posterior, tmp_path):
    model = build_deberta(16, 2, 2, 24, 3, seed=4, **options)
    adapt(model, targets, rank=4, method=method, posterior=posterior, seed=4)
    layers = dict(adapted_layers(model))
    with torch.no_grad():
        next(iter(layers.values())).rank_mask[1] = 0.0  # a pruned rank: the bundle drops its column
    inputs = holes(batch(5, 12, seed=5), 5)
    g = torch.Generator().manual_seed(6)
    gates_torch = {name: 1.0 + torch.randn(5, layer.rank, generator=g) for name, layer in layers.items()}
    gates_rust = {name: z[:, layers[name].rank_mask > 0].numpy() for name, z in gates_torch.items()}
    scorer = Scorer(bl.export(model, None, tmp_path / "b"), num_threads=2)
    mean = scorer.logits(*np_inputs(inputs))
    got = scorer.logits(*np_inputs(inputs), gates=gates_rust)
    np.testing.assert_allclose(got, per_sequence_logits(model, inputs, gates_torch), atol=TOL, rtol=0)
    assert np.abs(got - mean).max() > 100 * TOL  # the gates matter


@pytest.mark.parametrize(
    "method,posterior", [("bayeslora", "gate"), ("mcdropout", "gate"), ("bayeslora", "additive")]
)
def test_shared_key_position_rows_take_each_sequences_gate_row_in_a_batch(method, posterior, tmp_path):
    # with share_att_key, query_proj/key_proj also project the relative embeddings, which
    # transformers passes as one batch of one: a batch of 4 with fixed_gates [4, r] must equal each
    # sequence run alone with its row (content and position rows through the same gated weights)
    model = build_deberta(16, 2, 2, 24, 3, seed=21, **V3)
    adapt(
        model, ["query_proj", "key_proj", "value_proj"], rank=4, method=method, posterior=posterior, seed=21
    )
    assert (
        type(model.deberta.encoder.layer[0].attention.self).__name__ == "PerSequenceDisentangledSelfAttention"
    )
    layers = dict(adapted_layers(model))
    inputs = holes(batch(4, 11, seed=22), 23)
    g = torch.Generator().manual_seed(24)
    gates = {name: 1.0 + torch.randn(4, layer.rank, generator=g) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.fixed_gates = gates[name]
    try:
        batched = torch_logits(model, inputs)
    finally:
        for layer in layers.values():
            layer.fixed_gates = None
    alone = per_sequence_logits(model, inputs, gates)
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=0)
    scorer = Scorer(bl.export(model, None, tmp_path / "b", prune=False), num_threads=1)
    got = scorer.logits(*np_inputs(inputs), gates={k: v.numpy() for k, v in gates.items()})
    np.testing.assert_allclose(got, batched, atol=TOL, rtol=0)
    assert np.abs(got - scorer.logits(*np_inputs(inputs))).max() > 100 * TOL  # the gates matter


@pytest.mark.parametrize(
    "method,posterior", [("bayeslora", "gate"), ("mcdropout", "gate"), ("bayeslora", "additive")]
)
def test_shared_key_samples_from_per_sequence_streams_do_not_depend_on_batch_mates(method, posterior):
    # with one noise stream per sequence (layer.generators, as bl.lm uses them), a sequence's
    # sample — position rows included — is the same alone and in a batch (transformers' shared
    # call on the position rows had one row for N streams and raised)
    model = build_deberta(16, 2, 2, 24, 3, seed=25, **V3)
    adapt(
        model,
        ["query_proj", "key_proj"],
        rank=4,
        method=method,
        posterior=posterior,
        seed=25,
        log_alpha=(-1.0, 0.5),
    )
    layers = [layer for _, layer in adapted_layers(model)]
    inputs = batch(3, 9, seed=26)

    def sampled(rows):
        for index, layer in enumerate(layers):
            layer.generators = [torch.Generator().manual_seed(1000 * index + r) for r in rows]
        try:
            with bl.sampling(model, True):
                return torch_logits(model, {k: v[rows] for k, v in inputs.items()})
        finally:
            for layer in layers:
                layer.generators = None

    both = sampled([0, 1, 2])
    for r in range(3):
        np.testing.assert_allclose(both[r], sampled([r])[0], atol=1e-5, rtol=0)
    assert np.abs(both - torch_logits(model, inputs)).max() > 1e-3  # the noise matters


@pytest.mark.parametrize(
    "options,targets",
    [
        # DeBERTa-v3's own layout: shared keys, noisy query/key adapters on the position rows too
        (V3, ["query_proj", "key_proj", "value_proj"]),
        # the position projections are pos_*_proj without adapters
        ({**V3, "share_att_key": False}, ["query_proj", "key_proj", "value_proj", "classifier"]),
    ],
)
def test_mc_mean_matches_transformers_mc_predict_within_sampling_error(options, targets, tmp_path):
    # torch's mc_predict and the runtime sample the same model
    model = build_deberta(16, 2, 2, 24, 3, seed=7, **options)
    adapt(model, targets, rank=4, seed=7, log_alpha=(-1.0, 0.5))
    inputs = batch(3, 10, seed=8)
    s = 400
    torch_p = bl.mc_predict(model, inputs, samples=s, seed=11, return_samples=True)["sample_probs"]
    torch_p = torch_p.double().numpy()
    scorer = Scorer(bl.export(model, None, tmp_path / "b", prune=False), num_threads=2)
    rust_p = softmax(scorer.sample_logits(*np_inputs(inputs), samples=s, seed=11).astype(np.float64))
    se = np.sqrt(torch_p.var(1) / s + rust_p.var(1) / s)
    assert (rust_p.std(1) > 1e-3).any(), "the posterior noise must matter in this test"
    assert np.all(np.abs(torch_p.mean(1) - rust_p.mean(1)) <= 5 * se + 1e-6)
    assert 0.7 < rust_p.var(1).sum() / torch_p.var(1).sum() < 1.4


@pytest.mark.parametrize(
    "options,targets",
    [(V3, ["query_proj", "key_proj"]), ({**V3, "share_att_key": False}, ["pos_key_proj", "pos_query_proj"])],
)
def test_position_projection_samples_match_per_sequence_gate_draws(options, targets, tmp_path):
    # noisy adapters on the projections of the relative embeddings: a sample's gate is one per
    # sequence, applied to its content and position rows alike (with pos_*_proj alone, the content
    # rows are shared and the samples differ from the position scores on); the reference draws
    # z ~ N(1, α) per sequence and runs each sequence alone with it
    model = build_deberta(16, 2, 2, 24, 3, seed=9, **options)
    adapt(model, targets, rank=4, seed=9, log_alpha=(-1.0, 0.5))
    layers = dict(adapted_layers(model))
    inputs = batch(2, 9, seed=10)
    s = 300
    g = torch.Generator().manual_seed(12)
    torch_p = []
    for _ in range(s):
        gates = {}
        for name, layer in layers.items():
            std = torch.exp(0.5 * layer.log_alpha.detach().clamp(-10.0, 10.0))
            gates[name] = 1.0 + std * torch.randn(2, layer.rank, generator=g)
        torch_p.append(softmax(per_sequence_logits(model, inputs, gates)))
    torch_p = np.stack(torch_p, 1)
    scorer = Scorer(bl.export(model, None, tmp_path / "b", prune=False), num_threads=2)
    rust_p = softmax(scorer.sample_logits(*np_inputs(inputs), samples=s, seed=3).astype(np.float64))
    se = np.sqrt(torch_p.var(1) / s + rust_p.var(1) / s)
    assert (rust_p.std(1) > 1e-3).any(), "the posterior noise must matter in this test"
    assert np.all(np.abs(torch_p.mean(1) - rust_p.mean(1)) <= 5 * se + 1e-6)
    assert 0.7 < rust_p.var(1).sum() / torch_p.var(1).sum() < 1.4


def test_scores_do_not_depend_on_batch_mates_padding_or_threads(tmp_path):
    model = build_deberta(16, 2, 2, 24, 3, seed=13, **{**V3, "position_buckets": 4})
    adapt(model, ["query_proj", "key_proj", "value_proj"], rank=4, seed=13, log_alpha=(-1.0, 0.5))
    out = bl.export(model, None, tmp_path / "b")
    one, two = Scorer(out, num_threads=1), Scorer(out, num_threads=2)
    x = np.array([[2, 17, 33, 5, 9, 40, 41, 3]])
    others = batch(6, 13, seed=14)
    ids = others["input_ids"].numpy().copy()
    mask = others["attention_mask"].numpy().copy()
    ids[4], mask[4] = 0, 0
    ids[4, :8], mask[4, :8] = x[0], 1  # x as input 4, padded to 13
    for samples in (0, 8):
        alone = one.score((x, np.ones_like(x)), samples=samples, seed=3)
        for scorer in (one, two):
            mixed = scorer.score((ids, mask), samples=samples, seed=3)
            for k in FIELDS:
                assert np.array_equal(mixed[k][4], alone[k][0]), (k, samples, scorer.num_threads)
    s1 = one.sample_logits(x, samples=4, seed=3)
    assert np.abs(s1[0, 0] - s1[0, 1]).max() > 0
    assert np.array_equal(two.sample_logits(x, samples=2, seed=3), s1[:, :2])


@pytest.mark.parametrize(
    "options,match",
    [
        ({"conv_kernel_size": 3}, "conv_kernel_size"),
        ({"embedding_size": 8}, "embedding_size"),
        ({"attention_head_size": 4}, "attention_head_size"),
        ({"pooler_hidden_size": 8}, "pooler_hidden_size"),
        ({"relative_attention": True, "pos_att_type": ["c2p", "p2p"]}, "p2p"),
        ({"relative_attention": True, "position_buckets": 1}, "position_buckets"),
        ({"relative_attention": True, "position_buckets": 8, "max_relative_positions": 5}, "divide"),
        ({"hidden_act": "silu"}, "silu"),
    ],
)
def test_export_refuses_options_the_runtime_does_not_implement(options, match, tmp_path):
    try:
        model = build_deberta(16, 2, 1, 24, 2, seed=0, **options)
    except Exception as e:  # transformers itself cannot build it: nothing to export
        pytest.skip(f"transformers refuses {options}: {e}")
    adapt(model, ["query_proj", "value_proj"], rank=2)
    with pytest.raises(ConfigError, match=match) as info:
        bl.export(model, None, tmp_path / "b")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("conv_kernel_size", 3, "conv_kernel_size"),
        ("pos_att_type", ["c2p", "p2p"], "p2p"),
        ("embedding_size", 8, "embedding_size"),
        ("position_buckets", 1, "position_buckets"),
    ],
)
def test_runtime_refuses_a_bundle_config_it_does_not_implement(key, value, match, tmp_path):
    model = build_deberta(16, 2, 1, 24, 2, seed=0, **{**V3, "share_att_key": True})
    adapt(model, ["query_proj", "value_proj"], rank=2)
    out = bl.export(model, None, tmp_path / "b")
    cfg = json.loads((out / "config.json").read_text())
    cfg[key] = value
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=match) as info:
        Scorer(out)
    assert "\n" not in str(info.value)
