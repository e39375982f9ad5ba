"""Training recipes (issue #19): schedules as fractions of the run, the authors' ``paper`` recipe,
"select, then refit", and the rank cut chosen on validation data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bayeslora as bl
from bayeslora.cli import _settings, build_parser
from bayeslora.config import BayesLoRAConfig
from bayeslora.errors import ConfigError
from bayeslora.nn.model import adapted_layers
from bayeslora.train.pipeline import TrainSettings, choose_cut, train, validation_rank_cut


# ---- schedules: steps or fractions ------------------------------------------------------------------
def test_fractional_schedule_resolves_against_the_run_length():
    cfg = BayesLoRAConfig(kl_freeze=0.1, kl_warmup=0.2, sample_start=0.1, prune_start=0.3, prune_every=0.05)
    assert cfg.has_fractions
    for total in (45, 5000):
        r = cfg.resolved(total)
        assert not r.has_fractions
        assert (r.kl_freeze, r.kl_warmup, r.prune_start) == (
            round(0.1 * total),
            round(0.2 * total),
            round(0.3 * total),
        )
        assert r.prune_every == max(1, round(0.05 * total))
        assert r.kl_beta(r.kl_freeze - 1) == 0.0 and r.kl_beta(r.kl_freeze + r.kl_warmup) == 1.0
    # ints are steps and stay what they are
    assert BayesLoRAConfig(prune_start=60).resolved(10).prune_start == 60


def test_unresolved_fraction_is_a_clear_error_and_bad_values_are_refused():
    with pytest.raises(ConfigError, match="resolved"):
        BayesLoRAConfig(kl_freeze=0.5).kl_beta(3)
    with pytest.raises(ConfigError, match=r"fraction of the run's steps, in \[0, 1\]"):
        BayesLoRAConfig(prune_start=1.5)
    with pytest.raises(ConfigError, match="prune_every"):
        BayesLoRAConfig(prune_every=0)
    with pytest.raises(ConfigError, match="kl_freeze"):
        BayesLoRAConfig(kl_freeze=-1)
    with pytest.raises(ConfigError, match="step count"):
        BayesLoRAConfig(prune_start="10")  # type: ignore[arg-type]


def test_elbo_loss_resolves_fractions_and_can_drop_the_one_over_n(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    bl.inject(
        model, BayesLoRAConfig(rank=2, kl_freeze=0.5, kl_scale=0.3, kl_per_example=False, refit_start=None)
    )
    nll = torch.tensor(0.7)
    kl = float(bl.kl_divergence(model).detach())
    loss, parts = bl.elbo_loss(nll, model, num_train=100, step=4, total_steps=10)  # β = 0 before 5
    assert float(loss.detach()) == pytest.approx(0.7) and parts["beta"] == 0.0
    loss, parts = bl.elbo_loss(nll, model, num_train=100, step=5, total_steps=10)
    assert float(loss.detach()) == pytest.approx(0.7 + 0.3 * kl, rel=1e-5)  # no 1/N
    with pytest.raises(ConfigError, match="resolved"):
        bl.elbo_loss(nll, model, num_train=100, step=5)


# ---- recipes and the CLI -----------------------------------------------------------------------------
def test_paper_recipe_is_the_authors_harness_and_explicit_options_win():
    s = TrainSettings.for_recipe("paper")
    assert s.recipe == "paper" and s.posterior == "additive" and s.sample_start is None
    assert (s.kl_scale, s.kl_per_example, s.kl_freeze, s.kl_warmup) == (1e-6, False, 0, 0)
    assert (s.lr, s.rank_lr, s.rank_optimizer, s.head_lr, s.head_weight_decay) == (
        1e-3,
        1e-4,
        "adamw",
        1e-2,
        1e-2,
    )
    assert (s.max_grad_norm, s.prune_threshold, s.prune_start, s.rank, s.alpha) == (0.1, 4.0, 0.06, 8, 16.0)
    cfg = s.bayes_config("classifier")
    assert cfg.sample_start is None and not cfg.sampling_at(10**6)
    assert TrainSettings.for_recipe("paper", lr=5e-4).lr == 5e-4
    with pytest.raises(ConfigError, match="recipe"):
        TrainSettings.for_recipe("nope")

    parse = build_parser().parse_args
    from_cli = _settings(parse(["train", "--out", "x", "--recipe", "paper", "--lr", "5e-4"]))
    assert from_cli == TrainSettings.for_recipe("paper", lr=5e-4)
    assert _settings(parse(["train", "--out", "x"])) == TrainSettings()
    fr = _settings(parse(["train", "--out", "x", "--prune-start", "0.25", "--prune-every", "7"]))
    assert fr.prune_start == 0.25 and isinstance(fr.prune_start, float) and fr.prune_every == 7
    with pytest.raises(SystemExit):
        parse(["train", "--out", "x", "--prune-start", "1.5"])


def _tiny_settings(model_dir, csv, **kw) -> TrainSettings:
    base = {
        "model": str(model_dir),
        "data": f"csv:{csv}",
        "rank": 4,
        "epochs": 4.0,
        "batch_size": 16,
        "max_length": 16,
        "samples": 0,
        "save_steps": 10**6,
    }
    recipe = kw.pop("recipe", "vi")
    if recipe == "vi":
        base["lr"] = 5e-3
    return TrainSettings.for_recipe(recipe, **{**base, **kw})


def test_paper_recipe_trains_noise_free_with_its_optimizer(tiny_model_dir, sentiment_csv, tmp_path):
    from bayeslora.train.trainer import BayesLoRATrainer

    seen: dict = {}
    original = BayesLoRATrainer.compute_loss

    def spy(self, model, inputs, *a, **k):
        out = original(self, model, inputs, *a, **k)
        layers = [layer for _, layer in adapted_layers(model)]
        seen.setdefault("sampling", set()).update(layer.sampling for layer in layers)
        seen["groups"] = [(g["lr"], g["weight_decay"], g["eps"]) for g in self.optimizer.param_groups]
        seen["clip"] = self.args.max_grad_norm
        return out

    BayesLoRATrainer.compute_loss = spy
    try:
        run = train(
            _tiny_settings(tiny_model_dir, sentiment_csv, recipe="paper", targets=["query", "value"]),
            tmp_path / "paper",
            progress=False,
            log=lambda *a: None,
        )
    finally:
        BayesLoRATrainer.compute_loss = original
    assert seen["sampling"] == {False}  # the training forward never samples
    assert seen["clip"] == 0.1
    # factors at 1e-3 (scheduled), head weights 1e-2 with decay 1e-2, head bias 1e-2 without, log σ²
    # with plain AdamW (eps 1e-8): learning rates are the scheduler's, so compare their ratios
    (f_lr, f_wd, f_eps), (h_lr, h_wd, _), (b_lr, b_wd, _), (r_lr, r_wd, r_eps) = seen["groups"]
    assert (f_wd, h_wd, b_wd, r_wd, f_eps, r_eps) == (0.0, 1e-2, 0.0, 0.0, 1e-8, 1e-8)
    assert h_lr / f_lr == pytest.approx(10.0) and b_lr / f_lr == pytest.approx(10.0)
    assert r_lr / f_lr == pytest.approx(0.1)
    assert run["settings"]["recipe"] == "paper"


def test_refit_freezes_ranks_and_rank_parameters(tiny_model_dir, sentiment_csv, tmp_path):
    from bayeslora.train.trainer import PruneCallback

    snapshots: dict = {}
    original = PruneCallback.start_refit

    def spy(self, step):
        original(self, step)
        layers = list(adapted_layers(self.model))
        snapshots["at_refit"] = {n: layer.log_alpha.detach().clone() for n, layer in layers}
        snapshots["masks"] = {n: layer.rank_mask.clone() for n, layer in layers}
        snapshots["step"] = step

    PruneCallback.start_refit = spy
    try:
        run = train(
            _tiny_settings(
                tiny_model_dir,
                sentiment_csv,
                kl_scale=1.0,
                kl_freeze=0,
                sample_start=0,
                prune_start=2,
                prune_every=2,
                refit_start=0.5,
                rank_lr=0.5,
            ),
            tmp_path / "refit",
            progress=False,
            log=lambda *a: None,
        )
    finally:
        PruneCallback.start_refit = original
    model = run["model"]
    total = run["log_history"][-1]["step"]
    assert snapshots["step"] == round(0.5 * total)
    assert run["prune_history"][-1]["refit"] is True
    for name, layer in adapted_layers(model):
        keep = snapshots["masks"][name] > 0
        assert int(keep.sum()) == layer.rank  # no rank pruned after the refit point (and shrunk)
        torch.testing.assert_close(layer.log_alpha.detach(), snapshots["at_refit"][name][keep])
    # the KL is off in the refit phase: β logged as 0 after it
    betas = [(h["step"], h["beta"]) for h in run["log_history"] if "beta" in h]
    assert betas and all(b == 0.0 for s, b in betas if s > snapshots["step"])
    assert any(b == 1.0 for s, b in betas if s <= snapshots["step"])


def test_validation_rank_cut_removes_the_noisiest_ranks_within_tolerance(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bl.inject(model, BayesLoRAConfig.recipe("vi", rank=4, init_b_std=0.5))
    layers = [layer for _, layer in adapted_layers(model)]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.log_alpha.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]) + 0.1 * i)
    texts = ["good film", "awful plot", "the actor was great", "boring story", "nice", "bad"]
    labels = np.array([1, 0, 1, 0, 1, 0])
    # an unbounded tolerance cuts everything; a zero tolerance cuts only what costs nothing
    everything = validation_rank_cut(
        model,
        tok,
        texts,
        labels,
        tolerance=1e9,
        max_length=16,
        min_benefit=float("-inf"),
        fraction=float("inf"),
        significance=float("-inf"),
    )
    assert everything["total_rank"] == 0 and sum(bl.ranks(model).values()) == 0
    for layer in layers:
        layer.rank_mask.fill_(1.0)
    cut = validation_rank_cut(
        model,
        tok,
        texts,
        labels,
        tolerance=0.0,
        max_length=16,
        cuts=5,
        min_benefit=float("-inf"),
        significance=float("-inf"),
    )
    curve = dict(cut["curve"])
    assert cut["nll_best"] == min(curve.values()) and cut["nll_uncut"] == curve[max(curve)]
    assert cut["nll"] <= cut["nll_best"] + 1e-9
    assert all(nll > cut["nll_best"] for r, nll in curve.items() if r < cut["total_rank"])
    assert sum(bl.ranks(model).values()) == cut["total_rank"]
    # the ranks kept are the least noisy: every kept score is below every removed score
    kept = [
        float(s)
        for layer in layers
        for s, m in zip(layer.rank_scores(), layer.rank_mask, strict=True)
        if m > 0
    ]
    gone = [
        float(s)
        for layer in layers
        for s, m in zip(layer.rank_scores(), layer.rank_mask, strict=True)
        if m == 0
    ]
    assert not kept or not gone or max(kept) <= min(gone)


def test_rank_select_validation_needs_a_refit_point():
    with pytest.raises(ConfigError, match="refit_start"):
        TrainSettings(rank_select="validation", refit_start=None)


def test_evaluate_scores_every_row_of_a_csv_unless_told_the_test_split(
    tiny_model_dir, sentiment_csv, tmp_path
):
    from bayeslora.data import load_dataset
    from bayeslora.evaluation import evaluate

    ckpt = tmp_path / "lora"
    train(
        _tiny_settings(tiny_model_dir, sentiment_csv, method="lora", epochs=1.0),
        ckpt,
        progress=False,
        log=lambda *a: None,
    )
    rows = len(sentiment_csv.read_text().strip().splitlines()) - 1
    kw = {"data": f"csv:{sentiment_csv}", "ood": [], "shift": [], "samples": 0}
    whole = evaluate(ckpt, **kw)
    assert (whole["n"], whole["split"]) == (rows, "all")
    test = evaluate(ckpt, **kw, split="test")
    assert (test["n"], test["split"]) == (len(load_dataset(f"csv:{sentiment_csv}").test), "test")
    assert test["n"] < rows


def test_gate_local_reparameterisation_matches_per_sequence_gates_in_distribution():
    """One token per sequence: the per-token LRT draw and the per-sequence gate draw have the same
    distribution, so their sample means and variances agree within sampling error."""
    from torch import nn

    from bayeslora.nn.layer import BayesLoRALayer

    torch.manual_seed(0)
    layers = {}
    for lrt in (False, True):
        layer = BayesLoRALayer(
            nn.Linear(6, 5), BayesLoRAConfig.recipe("vi", rank=3, init_b_std=0.7, gate_lrt=lrt)
        )
        layers[lrt] = layer
    layers[True].load_state_dict(layers[False].state_dict())
    with torch.no_grad():
        layers[False].log_alpha.copy_(torch.tensor([-1.0, 0.0, 0.5]))
        layers[True].log_alpha.copy_(torch.tensor([-1.0, 0.0, 0.5]))
    n = 40_000
    x = torch.randn(1, 1, 6).expand(n, 1, 6)
    outs = {}
    for lrt, layer in layers.items():
        layer.train()
        layer.sampling = True
        layer.generator = torch.Generator().manual_seed(1 + lrt)
        with torch.no_grad():
            outs[lrt] = layer.delta(x)[:, 0, :].double()
    m0, m1 = outs[False].mean(0), outs[True].mean(0)
    v0, v1 = outs[False].var(0), outs[True].var(0)
    se_mean = torch.sqrt((v0 + v1) / n)
    assert torch.all((m0 - m1).abs() < 5 * se_mean), (m0, m1)
    # the variance of a sample variance is about 2σ⁴/(n−1) for a Gaussian (the gate draw is one)
    assert torch.all((v0 - v1).abs() < 5 * torch.sqrt(2 * (v0**2 + v1**2) / (n - 1))), (v0, v1)
    assert v0.min() > 1e-3  # the noise is really there


def test_noise_scale_tempers_the_posterior_and_fit_picks_the_best_validation_nll(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bayeslora.train.pipeline import fit_noise_scale, scale_noise

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bl.inject(model, BayesLoRAConfig.recipe("vi", rank=4, init_b_std=2.0, init_log_alpha=1.0))
    layers = [layer for _, layer in adapted_layers(model)]
    before = [layer.log_alpha.detach().clone() for layer in layers]
    scale_noise(model, 0.25)
    for layer, b in zip(layers, before, strict=True):
        torch.testing.assert_close(layer.log_alpha.detach(), b + float(np.log(0.25)))
    scale_noise(model, 4.0)
    with pytest.raises(ConfigError, match="> 0"):
        scale_noise(model, 0.0)

    texts = ["good film", "awful plot", "the actor was great", "boring story", "nice", "bad"] * 2
    labels = np.array([1, 0, 1, 0, 1, 0] * 2)
    fit = fit_noise_scale(model, tok, texts, labels, samples=4, max_length=16, scales=(1.0, 0.1, 0.01))
    assert [c for c, _ in fit["curve"]] == [1.0, 0.1, 0.01]
    assert fit["nll"] == min(nll for _, nll in fit["curve"])
    for layer, b in zip(layers, before, strict=True):
        torch.testing.assert_close(layer.log_alpha.detach(), b + float(np.log(fit["scale"])))
    # the NLL it reports is the one the tempered model has
    from bayeslora.train.pipeline import predict

    probs = predict(model, tok, texts, 4, 0, 16).mean(1)
    assert -np.mean(np.log(probs[np.arange(len(labels)), labels])) == pytest.approx(fit["nll"], rel=1e-5)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        fit_noise_scale(model, tok, texts, labels, scales=(2.0,))
    with pytest.raises(ConfigError, match="noise_scale"):
        TrainSettings(noise_scale="auto")


def test_library_default_kl_scale_is_the_recipes_not_one():
    from bayeslora.config import KL_SCALE_ABSOLUTE, KL_SCALE_DEFAULTS

    # the default: the KL without 1/N at the authors' 1e-6, library and command line alike
    assert BayesLoRAConfig().kl_scale == KL_SCALE_ABSOLUTE == TrainSettings().kl_scale == 1e-6
    assert not BayesLoRAConfig().kl_per_example and not TrainSettings().kl_per_example
    # per-example KL (recipe vi): the posterior's own tempering
    assert (
        BayesLoRAConfig.recipe("vi").kl_scale
        == KL_SCALE_DEFAULTS["gate"]
        == TrainSettings.for_recipe("vi").kl_scale
    )
    assert (
        BayesLoRAConfig(posterior="additive", kl_per_example=True).kl_scale == KL_SCALE_DEFAULTS["additive"]
    )
    assert BayesLoRAConfig(kl_scale=0.5).kl_scale == 0.5
    with pytest.raises(ConfigError, match="kl_scale"):
        BayesLoRAConfig(kl_scale=float("nan"))


def test_validation_rank_cut_cuts_nothing_before_the_adapter_is_worth_anything(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bl.inject(model, BayesLoRAConfig.recipe("vi", rank=4))  # B = 0: the adapter changes nothing yet
    texts, labels = ["good film", "awful plot", "nice", "bad"], np.array([1, 0, 1, 0])
    cut = validation_rank_cut(model, tok, texts, labels, tolerance=1e9, max_length=16)
    assert cut["benefit"] == pytest.approx(0.0, abs=1e-9)
    assert cut["total_rank"] == sum(bl.ranks(model).values()) == 4 * 4  # 2 layers × query/value


def _curve(means, n=400, noise=0.05, seed=0):
    """Per-example NLLs whose means are exactly ``means`` (a shared per-example offset, as real cuts
    have, plus independent noise)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 0.3, n)
    out = []
    for m in means:
        v = base + rng.normal(0.0, noise, n)
        out.append(m + v - v.mean())
    return out


def test_choose_cut_measures_the_tolerance_from_the_best_cut_not_the_uncut_adapter():
    # paper-val seed 0's curve (288 → 0 ranks in 9 cuts): cutting first helps (0.422 → 0.403)
    means = [0.422, 0.420, 0.424, 0.404, 0.403, 0.406, 0.431, 0.513, 0.672]
    per = _curve(means)
    pick, info = choose_cut(per, tolerance=0.02)
    assert info["nll_best"] == pytest.approx(0.403) and info["threshold"] == pytest.approx(0.423)
    assert pick == 5  # 108 ranks; measured from the uncut adapter (0.442) the rule kept 72 (pick 6)
    assert max(j for j, m in enumerate(means) if m <= means[0] + 0.02) == 6


def test_choose_cut_keeps_a_weak_adapter_and_never_cuts_an_unproven_one():
    # the 600-row CSV after 10 epochs: best at 108 ranks; it adds 0.37 nats over rank 0, so a cut may
    # cost min(0.02, 0.037) nats
    means = [0.7807, 0.7613, 0.7580, 0.7406, 0.7251, 0.7200, 0.7530, 0.8739, 1.0921]
    per = _curve(means, n=60, noise=0.05)
    pick, info = choose_cut(per, tolerance=0.02)
    assert info["benefit"] > info["benefit_se"] and info["threshold"] == pytest.approx(0.7400)
    assert pick == 5
    # a weak adapter (0.007 nats): the tolerance alone would cut every rank, a tenth of its worth does not
    means = [1.0715, 1.0718, 1.0712, 1.0710, 1.0712, 1.0714, 1.0720, 1.0747, 1.0778]
    per = _curve(means, noise=0.002)
    pick, info = choose_cut(per, tolerance=0.02, min_benefit=0.0)
    assert info["benefit"] > info["benefit_se"]
    assert info["threshold"] == pytest.approx(1.0710 + 0.1 * (1.0778 - 1.0710))
    assert pick == 5  # 1.0714 is within a tenth of the benefit; 1.0720 is not
    assert choose_cut(per, tolerance=0.02, fraction=float("inf"), min_benefit=0.0)[0] == 8
    assert choose_cut(per, tolerance=0.02)[0] == 0  # below the default 0.01 nats: not yet worth a cut
    # noise larger than the benefit: nothing is cut
    noisy = _curve(means, n=60, noise=0.2)
    pick, info = choose_cut(noisy, tolerance=0.02, min_benefit=0.0)
    assert info["benefit"] < info["benefit_se"] and pick == 0
    # an adapter that changes nothing (B = 0): every candidate equal, nothing is cut
    same = [np.full(50, 0.69)] * 9
    assert choose_cut(same, tolerance=1e9, fraction=float("inf"))[0] == 0


def test_max_eval_caps_the_validation_examples_of_the_rank_cut(tiny_model_dir, sentiment_csv, tmp_path):
    # the default recipe's cut uses SELECT_EXAMPLES validation examples, or fewer: the split's size,
    # or max_eval (smoke runs)
    from bayeslora.train.cut import SELECT_EXAMPLES

    quiet = {"progress": False, "log": lambda *a: None}
    capped = train(
        _tiny_settings(tiny_model_dir, sentiment_csv, recipe="select", max_eval=5), tmp_path / "a", **quiet
    )
    (cut,) = capped["rank_selection"]
    assert cut["examples"] == 5
    whole = train(_tiny_settings(tiny_model_dir, sentiment_csv, recipe="select"), tmp_path / "b", **quiet)
    (cut,) = whole["rank_selection"]
    assert cut["examples"] == min(len(whole["data"].validation), SELECT_EXAMPLES) > 5
    # select_examples sets the cut's examples whatever max_eval says (benchmarks cap only the report)
    chosen = train(
        _tiny_settings(tiny_model_dir, sentiment_csv, recipe="select", max_eval=5, select_examples=7),
        tmp_path / "c",
        **quiet,
    )
    (cut,) = chosen["rank_selection"]
    assert cut["examples"] == 7
    assert len(chosen["data"].validation) > 7  # so 7 is the setting, not the split's size
    with pytest.raises(ConfigError, match="select_examples"):
        TrainSettings(select_examples=0)


def test_train_on_given_splits_instead_of_loading_settings_data(tiny_model_dir, sentiment_csv, tmp_path):
    # benchmarks that derive their own splits (bench_methods' SNLI with topics held out) hand them
    # to train(): it trains and reports on those, not on what settings.data would load
    import dataclasses

    from bayeslora.data import load_dataset

    whole = load_dataset(f"csv:{sentiment_csv}", seed=0)
    fewer = dataclasses.replace(whole, train=whole.train.take(range(0, len(whole.train), 2)))
    quiet = {"progress": False, "log": lambda *a: None}
    run = train(_tiny_settings(tiny_model_dir, sentiment_csv), tmp_path / "a", data=fewer, **quiet)
    assert run["data"] is fewer
    assert run["num_train"] == len(fewer.train) == (len(whole.train) + 1) // 2
