"""Property tests of the BayesLoRA layer on tiny BERT, DistilBERT, GPT-2 (Conv1D) and Llama models."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model

import bayeslora as bl
from bayeslora.nn import prediction
from bayeslora.nn.layer import BayesLoRALayer, kl_molchanov
from bayeslora.nn.model import adapted_layers
from tiny_models import FAMILIES, HEADS, QV_TARGETS, batch, build, logits

VARIANTS = [("bayeslora", "gate"), ("bayeslora", "additive"), ("mcdropout", "gate"), ("lora", "gate")]

model_shape = st.fixed_dictionaries(
    {
        "family": st.sampled_from(FAMILIES),
        "heads": st.sampled_from([1, 2, 4]),
        "head_dim": st.sampled_from([4, 8]),
        "layers": st.integers(1, 2),
        "inter": st.sampled_from([8, 24]),
        "rank": st.integers(1, 6),
        "seed": st.integers(0, 2**16),
    }
)


def _build(shape: dict) -> torch.nn.Module:
    return build(
        shape["family"],
        hidden=shape["heads"] * shape["head_dim"],
        heads=shape["heads"],
        layers=shape["layers"],
        inter=shape["inter"],
        seed=shape["seed"],
    )


def _inject(shape: dict, method: str = "bayeslora", posterior: str = "gate", **kw) -> torch.nn.Module:
    fam = shape["family"]
    model = _build(shape)
    cfg = bl.BayesLoRAConfig(
        rank=shape["rank"],
        alpha=2.0 * shape["rank"],
        target_modules=QV_TARGETS[fam],
        method=method,
        posterior=posterior,
        init_b_std=0.2,
        init_log_alpha=-1.0,
        init_log_sigma2=-3.0,
        **kw,
    )
    return bl.inject(model, cfg)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every adapter non-trivial factors and rank parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.5)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
            p = layer.rank_parameter()
            if p is not None:
                p.copy_(torch.empty(p.shape).uniform_(-3.0, 0.0, generator=g))


def _mc(model: torch.nn.Module, inputs: dict, seed: int = 3, samples: int = 4) -> torch.Tensor:
    return bl.mc_predict(model, inputs, samples=samples, seed=seed, return_samples=True)["sample_probs"]


# ---- mean mode is plain LoRA (reference: PEFT's own LoRA with the same factors) ---------------
@given(shape=model_shape, variant=st.sampled_from(VARIANTS))
def test_mean_mode_equals_peft_lora(shape, variant):
    method, posterior = variant
    ours = _inject(shape, method, posterior)
    _randomize(ours, shape["seed"])
    fam = shape["family"]
    base = _build(shape)
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=shape["rank"],
            lora_alpha=2.0 * shape["rank"],
            target_modules=QV_TARGETS[fam],
            lora_dropout=0.0,
            fan_in_fan_out=(fam == "gpt2"),
        ),
    ).eval()
    with torch.no_grad():
        for name, layer in adapted_layers(ours):
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
    inputs = batch(3, 7, seed=shape["seed"])
    assert torch.allclose(logits(ours, inputs), logits(peft_model, inputs), atol=1e-5, rtol=1e-4)


def test_mean_mode_differs_from_base():
    shape = {"family": "bert", "heads": 2, "head_dim": 8, "layers": 1, "inter": 8, "rank": 4, "seed": 1}
    ours = _inject(shape)
    _randomize(ours, 1)
    base = build("bert", hidden=16, heads=2, layers=1, inter=8, seed=1)
    inputs = batch()
    assert not torch.allclose(logits(ours, inputs), logits(base, inputs), atol=1e-3)


# ---- gauge invariances -------------------------------------------------------------------------
@given(shape=model_shape, log_c=st.lists(st.floats(-2.0, 2.0), min_size=6, max_size=6))
def test_gate_invariant_to_per_rank_rescaling(shape, log_c):
    model = _inject(shape)
    _randomize(model, shape["seed"])
    inputs = batch(3, 6, seed=shape["seed"])
    before_mean, before_mc, before_kl = logits(model, inputs), _mc(model, inputs), bl.kl_divergence(model)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            c = torch.exp(torch.tensor(log_c[: layer.rank]))
            layer.lora_A.mul_(c[:, None])
            layer.lora_B.div_(c[None, :])
    assert torch.allclose(logits(model, inputs), before_mean, atol=1e-4, rtol=1e-4)
    assert torch.allclose(_mc(model, inputs), before_mc, atol=1e-4)
    assert torch.allclose(bl.kl_divergence(model), before_kl)


@given(shape=model_shape.filter(lambda s: s["rank"] >= 2), posterior=st.sampled_from(["gate", "additive"]))
def test_rotation_keeps_mean_but_changes_posterior(shape, posterior):
    model = _inject(shape, posterior=posterior)
    _randomize(model, shape["seed"])
    inputs = batch(3, 6, seed=shape["seed"])
    before_mean, before_mc, before_kl = logits(model, inputs), _mc(model, inputs), bl.kl_divergence(model)
    g = torch.Generator().manual_seed(shape["seed"])
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            q, _ = torch.linalg.qr(torch.randn(layer.rank, layer.rank, generator=g, dtype=torch.float64))
            q = q.float()
            layer.lora_B.copy_(layer.lora_B @ q)
            layer.lora_A.copy_(q.T @ layer.lora_A)
    assert torch.allclose(logits(model, inputs), before_mean, atol=1e-4, rtol=1e-4)
    mc_changed = not torch.allclose(_mc(model, inputs), before_mc, atol=1e-5)
    kl_changed = not torch.allclose(bl.kl_divergence(model), before_kl, rtol=1e-6)
    assert mc_changed or kl_changed


# ---- KL ---------------------------------------------------------------------------------------
@given(st.floats(-12, 12), st.floats(0.0, 5.0))
def test_kl_nonnegative_and_decreasing(la, d):
    lo = kl_molchanov(torch.tensor(la, dtype=torch.float64))
    hi = kl_molchanov(torch.tensor(la + d, dtype=torch.float64))
    assert lo >= 0 and hi <= lo + 1e-12


def test_kl_vanishes_for_large_alpha_and_module_kl_decreases():
    assert kl_molchanov(torch.tensor(10.0)) < 1e-3
    shape = {"family": "bert", "heads": 2, "head_dim": 4, "layers": 1, "inter": 8, "rank": 3, "seed": 0}
    for posterior in ("gate", "additive"):
        model = _inject(shape, posterior=posterior)
        kls = []
        for v in (-6.0, -3.0, 0.0, 3.0):
            with torch.no_grad():
                for _, layer in adapted_layers(model):
                    layer.rank_parameter().fill_(v)
            kls.append(float(bl.kl_divergence(model).detach()))
        assert all(a > b for a, b in itertools.pairwise(kls)), kls
        assert min(kls) >= 0


# ---- additive LRT variance matches Monte-Carlo over weight samples -------------------------------
@given(d_in=st.integers(2, 12), d_out=st.integers(1, 6), rank=st.integers(1, 5), seed=st.integers(0, 1000))
def test_additive_lrt_variance_matches_monte_carlo(d_in, d_out, rank, seed):
    torch.manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out)
    layer = BayesLoRALayer(base, bl.BayesLoRAConfig(rank=rank, alpha=rank, posterior="additive"))
    with torch.no_grad():
        layer.lora_A.normal_(0, 0.5)
        layer.lora_B.normal_(0, 0.5)
        layer.log_sigma2.uniform_(-3, -0.5)
    x = torch.randn(1, 1, d_in)
    n = 20000
    layer.sampling = True
    layer.eval()  # weight-sampling mode: true posterior samples of (A, B)
    with torch.no_grad():
        samples = layer.delta(x.expand(n, 1, d_in)).reshape(n, d_out).double()
        layer.train()  # LRT mode: its mean and variance are closed-form
        lrt = layer.delta(x.expand(n, 1, d_in)).reshape(n, d_out).double()
    centered = samples - samples.mean(0)
    var_mc = centered.pow(2).mean(0)
    se = torch.sqrt((centered.pow(4).mean(0) - var_mc.pow(2)).clamp_min(0) / n)
    var_lrt = lrt.var(0)
    # the LRT draws are Gaussian: its sample variance has SE var*sqrt(2/n)
    se_total = torch.sqrt(se.pow(2) + (var_lrt * math.sqrt(2 / n)).pow(2))
    assert torch.all((var_mc - var_lrt).abs() <= 6 * se_total + 1e-9), (var_mc, var_lrt, se_total)
    mean_se = torch.sqrt(var_mc / n) + torch.sqrt(var_lrt / n)
    assert torch.all((samples.mean(0) - lrt.mean(0)).abs() <= 6 * mean_se + 1e-9)


# ---- pruning -----------------------------------------------------------------------------------
@given(
    shape=model_shape.filter(lambda s: s["rank"] >= 2), variant=st.sampled_from(VARIANTS[:3]), data=st.data()
)
def test_removing_zero_contribution_rank_changes_nothing(shape, variant, data):
    model = _inject(shape, *variant)
    _randomize(model, shape["seed"])
    inputs = batch(3, 6, seed=shape["seed"])
    dead = {}
    with torch.no_grad():
        for name, layer in adapted_layers(model):
            k = data.draw(st.integers(0, layer.rank - 1), label=f"dead rank of {name}")
            layer.lora_B[:, k] = 0.0
            dead[name] = k
    before_mean = logits(model, inputs)
    before_mc = _mc(model, inputs)
    with torch.no_grad():
        for name, layer in adapted_layers(model):
            layer.rank_mask[dead[name]] = 0.0
    # An additive rank with zero mean still carries posterior noise (B ~ N(0, σ²)), so only its
    # mean-mode contribution is zero; gate and dropout ranks with b_k = 0 contribute nothing at all.
    exact_mc = variant[1] != "additive"
    assert torch.equal(logits(model, inputs), before_mean)
    if exact_mc:
        assert torch.allclose(_mc(model, inputs), before_mc, atol=1e-6)
    bl.shrink(model)
    assert all(layer.rank == shape["rank"] - 1 for _, layer in adapted_layers(model))
    assert torch.allclose(logits(model, inputs), before_mean, atol=1e-6)
    if exact_mc:
        assert torch.allclose(_mc(model, inputs), before_mc, atol=1e-6)


@given(shape=model_shape, variant=st.sampled_from(VARIANTS[:3]), tau=st.floats(-3.0, 0.0))
def test_masked_and_shrunk_modules_agree(shape, variant, tau):
    model = _inject(shape, *variant)
    _randomize(model, shape["seed"])
    inputs = batch(4, 5, seed=shape["seed"])
    report = bl.prune(model, threshold=tau)
    assert all(after <= before for before, after in report.values())
    masked_mean, masked_mc = logits(model, inputs), _mc(model, inputs)
    bl.shrink(model)
    assert bl.ranks(model) == {k: v[1] for k, v in report.items()}
    assert torch.allclose(logits(model, inputs), masked_mean, atol=1e-6)
    assert torch.allclose(_mc(model, inputs), masked_mc, atol=1e-6)


def test_prune_respects_min_rank_and_keeps_least_noisy():
    shape = {"family": "bert", "heads": 2, "head_dim": 4, "layers": 1, "inter": 8, "rank": 4, "seed": 0}
    model = _inject(shape, min_rank=2)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.log_alpha.copy_(torch.tensor([5.0, 4.0, 6.0, 7.0]))
    report = bl.prune(model, threshold=3.0)
    assert set(report.values()) == {(4, 2)}
    for _, layer in adapted_layers(model):
        assert layer.rank_mask.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_prune_can_remove_a_whole_module_which_then_returns_base_output():
    shape = {"family": "bert", "heads": 2, "head_dim": 4, "layers": 1, "inter": 8, "rank": 3, "seed": 0}
    model = _inject(shape)
    _randomize(model, 0)
    base = build("bert", hidden=8, heads=2, layers=1, inter=8, seed=0)
    bl.prune(model, threshold=-100.0)
    bl.shrink(model)
    assert set(bl.ranks(model).values()) == {0}
    inputs = batch()
    assert torch.allclose(logits(model, inputs), logits(base, inputs), atol=1e-6)


def test_shrink_slices_optimizer_state():
    shape = {"family": "bert", "heads": 2, "head_dim": 4, "layers": 1, "inter": 8, "rank": 4, "seed": 0}
    model = _inject(shape)
    _randomize(model, 0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch()
    with bl.sampling(model, True):
        model.train()
        model(**inputs).logits.sum().backward()
    opt.step()
    _name, layer = next(adapted_layers(model))
    exp_avg_before = opt.state[layer.lora_A]["exp_avg"].clone()
    with torch.no_grad():
        layer.rank_mask[1] = 0
    bl.shrink(model, opt)
    assert layer.lora_A.shape[0] == 3
    assert any(p is layer.lora_A for g in opt.param_groups for p in g["params"])
    assert torch.equal(opt.state[layer.lora_A]["exp_avg"], exp_avg_before[[0, 2, 3]])
    opt.zero_grad()
    model(**inputs).logits.sum().backward()
    opt.step()  # optimizer still consistent with the new shapes


# ---- the training signal reaches the rank parameters (the authors' GLUE-harness bug) -----------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("posterior", ["gate", "additive"])
def test_nll_gradient_reaches_rank_parameters(family, posterior):
    shape = {"family": family, "heads": 2, "head_dim": 8, "layers": 1, "inter": 16, "rank": 4, "seed": 0}
    model = _inject(shape, posterior=posterior)
    inputs = batch(4, 6)
    labels = torch.tensor([0, 1, 2, 0])
    model.train()

    def rank_grads() -> list[torch.Tensor]:
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels)
        loss.backward()
        return [layer.rank_parameter().grad for _, layer in adapted_layers(model)]

    with bl.sampling(model, True):
        grads = rank_grads()
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    with bl.sampling(model, False):  # the check can fail: no noise, no signal
        grads = rank_grads()
    assert all(g is None or g.abs().sum() == 0 for g in grads)


# ---- switches, injection, errors --------------------------------------------------------------
def test_sampling_is_independent_of_train_eval_and_restores():
    shape = {"family": "bert", "heads": 2, "head_dim": 4, "layers": 1, "inter": 8, "rank": 2, "seed": 0}
    model = _inject(shape)
    layers = [layer for _, layer in adapted_layers(model)]
    assert not any(layer.sampling for layer in layers)
    model.train()
    assert not any(layer.sampling for layer in layers)
    with bl.sampling(model, True):
        model.eval()
        assert all(layer.sampling for layer in layers)
    assert not any(layer.sampling for layer in layers)
    bl.sampling(model, True)  # plain setter
    model.train()
    model.eval()
    assert all(layer.sampling for layer in layers)


def test_inject_freezes_base_and_trains_adapters_and_head():
    model = build("bert")
    bl.inject(model, bl.BayesLoRAConfig(rank=2, modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(
        ("lora_" in n or "log_alpha" in n or "log_sigma2" in n or n.startswith("classifier."))
        for n in trainable
    )
    assert "classifier.weight" in trainable
    assert not any(n.endswith("base_layer.weight") for n in trainable)


def test_target_selection_regex_and_all_linear():
    model = bl.inject(build("bert"), bl.BayesLoRAConfig(rank=2, target_modules=r".*layer\.0\..*(query|key)"))
    assert sorted(bl.ranks(model)) == [
        "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.0.attention.self.query",
    ]
    model = bl.inject(build("gpt2"), bl.BayesLoRAConfig(rank=2, target_modules="all-linear"))
    names = list(bl.ranks(model))
    assert "score" not in names and len(names) == 8  # c_attn, c_proj, c_fc, mlp.c_proj × 2 layers


def test_unknown_target_names_close_matches():
    with pytest.raises(bl.errors.TargetNotFoundError, match=r"query"):
        bl.inject(build("bert"), bl.BayesLoRAConfig(target_modules=["querry"]))
    with pytest.raises(ValueError):  # also a ValueError for callers who don't know our classes
        bl.inject(build("bert"), bl.BayesLoRAConfig(target_modules=["nope"]))


@pytest.mark.parametrize(
    "bad",
    [
        {"rank": 0},
        {"posterior": "laplace"},
        {"method": "x"},
        {"dropout": 1.0},
        {"min_rank": 9, "rank": 8},
        {"target_modules": []},
        {"prune_every": 0},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(bl.errors.ConfigError):
        bl.BayesLoRAConfig(**bad)


def test_config_beta_schedule_and_json_round_trip(tmp_path):
    cfg = bl.BayesLoRAConfig(kl_freeze=10, kl_warmup=20, refit_start=None)  # β is 0 in a refit phase
    assert [cfg.kl_beta(t) for t in (0, 9, 10, 19, 29, 100)] == [0.0, 0.0, 1 / 20, 0.5, 1.0, 1.0]
    cfg.save(tmp_path / "c.json")
    assert bl.BayesLoRAConfig.load(tmp_path / "c.json") == cfg


# ---- prediction ---------------------------------------------------------------------------------
def test_mc_predict_fields_and_mean_mode():
    shape = {"family": "distilbert", "heads": 2, "head_dim": 4, "layers": 1, "inter": 8, "rank": 3, "seed": 2}
    model = _inject(shape)
    _randomize(model, 2)
    inputs = batch(5, 6)
    mean = bl.mc_predict(model, inputs, samples=0)
    assert torch.allclose(mean["probs"], torch.softmax(logits(model, inputs), -1), atol=1e-6)
    assert torch.all(mean["mutual_info"].abs() < 1e-6) and torch.all(mean["variance"] == 0)
    out = bl.mc_predict(model, inputs, samples=32, seed=5, return_samples=True)
    assert set(prediction.FIELDS) <= set(out)
    sp = out["sample_probs"].double()
    assert out["sample_probs"].shape == (5, 32, 3)
    # probabilities are averaged, not logits
    assert torch.allclose(out["probs"].double(), sp.mean(1), atol=1e-6)
    assert torch.all(out["mutual_info"] > 0)
    again = bl.mc_predict(model, inputs, samples=32, seed=5)
    assert torch.equal(again["probs"], out["probs"])
    other = bl.mc_predict(model, inputs, samples=32, seed=6)
    assert not torch.equal(other["probs"], out["probs"])
    small = bl.mc_predict(model, inputs, samples=32, seed=5, max_batch=32)  # one input per forward
    assert small["probs"].shape == out["probs"].shape


def test_mc_predict_on_a_model_without_adapters():
    # a deterministic model (plain transformers, or PEFT's) is scored in mean mode like any other
    model = build("bert", hidden=8, heads=2, layers=1, inter=8, seed=3)
    inputs = batch(4, 5)
    out = bl.mc_predict(model, inputs, samples=0)
    assert torch.allclose(out["probs"], torch.softmax(logits(model, inputs), -1), atol=1e-6)
    with pytest.raises(ValueError, match="no BayesLoRA adapters"):
        bl.mc_predict(model, inputs, samples=4)


def test_summarize_against_direct_computation():
    torch.manual_seed(0)
    sp = torch.softmax(torch.randn(4, 7, 3, dtype=torch.float64), -1)
    out = prediction.summarize(sp)
    pbar = sp.mean(1)
    h = -(pbar * pbar.log()).sum(-1)
    eh = (-(sp * sp.log()).sum(-1)).mean(1)
    lab = pbar.argmax(-1)
    var = torch.stack([sp[i, :, lab[i]].var(unbiased=False) for i in range(4)])
    assert torch.allclose(out["entropy"].double(), h, atol=1e-6)
    assert torch.allclose(out["expected_entropy"].double(), eh, atol=1e-6)
    assert torch.allclose(out["mutual_info"].double(), h - eh, atol=1e-6)
    assert torch.allclose(out["variance"].double(), var, atol=1e-7)


def test_explicit_gates_replace_sampling():
    shape = {"family": "bert", "heads": 2, "head_dim": 4, "layers": 1, "inter": 8, "rank": 3, "seed": 0}
    model = _inject(shape)
    _randomize(model, 0)
    inputs = batch(2, 5)
    ref = logits(model, inputs)
    for _, layer in adapted_layers(model):
        layer.fixed_gates = torch.ones(2, 3)
    assert torch.allclose(logits(model, inputs), ref, atol=1e-6)
    for _, layer in adapted_layers(model):
        layer.fixed_gates = torch.zeros(2, 3)
    base = build("bert", hidden=8, heads=2, layers=1, inter=8, seed=0)
    assert torch.allclose(logits(model, inputs), logits(base, inputs), atol=1e-6)


# ---- save / load ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_round_trip_is_exact(tmp_path, variant):
    shape = {"family": "gpt2", "heads": 2, "head_dim": 4, "layers": 2, "inter": 8, "rank": 4, "seed": 0}
    model = _inject(shape, *variant, modules_to_save=[HEADS["gpt2"]])
    _randomize(model, 0)
    with torch.no_grad():
        model.score.weight.add_(1.0)
    bl.prune(model, threshold=-1.5)
    bl.shrink(model)
    inputs = batch(3, 6)
    bl.save_adapter(model, tmp_path / "adapter")
    fresh = build("gpt2", hidden=8, heads=2, layers=2, inter=8, seed=0)
    bl.load_adapter(fresh, tmp_path / "adapter")
    assert bl.ranks(fresh) == bl.ranks(model)
    assert torch.equal(logits(fresh, inputs), logits(model, inputs))
    assert torch.equal(_mc(fresh, inputs), _mc(model, inputs))
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_load_adapter_errors(tmp_path):
    with pytest.raises(bl.errors.BundleError, match="not a bayeslora adapter"):
        bl.load_adapter(build("bert"), tmp_path)
    model = bl.inject(build("bert"), bl.BayesLoRAConfig(rank=2))
    bl.save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "adapter.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(bl.errors.BundleError):
        bl.load_adapter(build("bert"), tmp_path / "a")


# ---- dtype and device --------------------------------------------------------------------------
def test_bf16_autocast_and_bf16_base():
    shape = {"family": "llama", "heads": 2, "head_dim": 8, "layers": 1, "inter": 16, "rank": 4, "seed": 0}
    model = _inject(shape, posterior="additive")
    _randomize(model, 0)
    inputs = batch(2, 5)
    ref = logits(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bl.mc_predict(model, inputs, samples=0)["probs"]
    assert torch.allclose(out, torch.softmax(ref, -1), atol=3e-2)
    model.to(torch.bfloat16)
    for _, layer in adapted_layers(model):
        # .to() casts the base; the adapter's own tensors stay fp32 (issue #14); the forward casts
        assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    model.train()
    with bl.sampling(model, True):
        loss = model(**inputs).logits.float().sum()
    loss.backward()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("posterior", ["gate", "additive"])
def test_cuda_matches_cpu(posterior):
    shape = {"family": "bert", "heads": 2, "head_dim": 8, "layers": 2, "inter": 16, "rank": 4, "seed": 0}
    model = _inject(shape, posterior=posterior)
    _randomize(model, 0)
    inputs = batch(3, 6)
    ref = logits(model, inputs)
    model.cuda()
    out = logits(model, {k: v.cuda() for k, v in inputs.items()}).cpu()
    assert torch.allclose(out, ref, atol=1e-4)
    mc = bl.mc_predict(model, {k: v.cuda() for k, v in inputs.items()}, samples=8)
    assert mc["probs"].shape == (3, 3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.train()
        with bl.sampling(model, True):
            loss = model(**{k: v.cuda() for k, v in inputs.items()}).logits.float().sum()
    loss.backward()


def test_lrt_sample_backward_matches_numerical_gradient():
    """The hand-written backward of the additive LRT against torch.autograd.gradcheck (finite differences)."""
    from bayeslora.nn.layer import LRTSample

    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    sq_norm = (torch.rand(2, 3, 1, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    c = (torch.rand(5, dtype=torch.float64, generator=g) + 0.1).requires_grad_()
    t = (torch.rand(2, 3, 1, dtype=torch.float64, generator=g) + 0.1).requires_grad_()
    eps = torch.randn(2, 3, 5, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(LRTSample.apply, (mean, sq_norm, c, t, eps))
    ref = mean + torch.sqrt(sq_norm * c + t) * eps
    assert torch.allclose(LRTSample.apply(mean, sq_norm, c, t, eps), ref)


# ---- trainer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rank_lr", [0.0, 50.0])
def test_trainer_rank_lr_zero_freezes_rank_parameters(tmp_path, rank_lr):
    from transformers import TrainingArguments

    from bayeslora.train.trainer import BayesLoRATrainer

    model = build("bert", hidden=8, heads=2, layers=1, inter=8, labels=2, seed=4)
    bl.inject(
        model,
        bl.BayesLoRAConfig.recipe(
            "vi", rank=3, target_modules=QV_TARGETS["bert"], sample_start=0, kl_freeze=0
        ),
    )
    before = {n: layer.log_alpha.detach().clone() for n, layer in adapted_layers(model)}
    inputs = batch(8, 6, seed=1)
    data = [
        {"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i], "labels": i % 2}
        for i in range(8)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-2,
    )
    BayesLoRATrainer(model=model, args=args, train_dataset=data, rank_lr=rank_lr).train()
    moved = [not torch.equal(before[n], layer.log_alpha.detach()) for n, layer in adapted_layers(model)]
    assert (not any(moved)) if rank_lr == 0.0 else all(moved)
    with pytest.raises(ValueError, match="rank_lr"):
        BayesLoRATrainer(model=model, args=args, train_dataset=data, rank_lr=-1.0)
