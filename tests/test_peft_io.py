"""PEFT interoperability, checked against PEFT itself: our exports load in ``peft.PeftModel`` with
the same outputs, PEFT LoRAs import into BayesLoRA and score identically in the Rust runtime, and
malformed PEFT directories fail with a typed error that names the problem."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import bayeslora as bl
import runtime_models as rm
import tiny_models as tm
from bayeslora import cli
from bayeslora.errors import BundleError, ConfigError
from bayeslora.formats.peft import PEFT_CONFIG, PEFT_WEIGHTS, POSTERIOR_META, POSTERIOR_WEIGHTS
from bayeslora.nn.model import adapted_layers
from bayeslora.runtime import Scorer

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

ALL_TARGETS = {  # a wider set than q/v: attention output, FFN (GPT-2's c_fc/c_proj are Conv1D)
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def _peft_logits(family: str, peft_dir: Path, inputs: dict, **build: int) -> torch.Tensor:
    pm = PeftModel.from_pretrained(tm.build(family, **build), str(peft_dir)).eval()
    return tm.logits(pm, inputs)


def _our_model(family, method, posterior, rank, alpha, targets, hidden, seed):
    model = tm.build(family, hidden=hidden, seed=seed)
    cfg = bl.BayesLoRAConfig(
        rank=rank,
        alpha=alpha,
        prune_threshold=3.0,
        target_modules=targets,
        method=method,
        posterior=posterior,
        init_b_std=0.3,
        modules_to_save=[tm.HEADS[family]],
    )
    bl.inject(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.lora_B.normal_(0.0, 0.3, generator=g)  # additive starts at ±1e-3: make it matter
        head = getattr(model, tm.HEADS[family])
        head.weight.add_(torch.randn(head.weight.shape, generator=g))  # a "trained" head
    return model.eval()


# ---- acceptance 1: our export loads in PEFT with the same logits --------------------------------
@settings(
    max_examples=14,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    family=st.sampled_from(tm.FAMILIES),
    kind=st.sampled_from(
        [("bayeslora", "gate"), ("bayeslora", "additive"), ("lora", "gate"), ("mcdropout", "gate")]
    ),
    wide=st.booleans(),
    rank=st.integers(1, 5),
    alpha=st.floats(0.5, 32.0),
    hidden=st.sampled_from([16, 24]),
    shrink=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_peft_loads_our_export_with_the_same_logits(
    tmp_path_factory, family, kind, wide, rank, alpha, hidden, shrink, seed, data
):
    method, posterior = kind
    targets = ALL_TARGETS[family] if wide else tm.QV_TARGETS[family]
    model = _our_model(family, method, posterior, rank, alpha, targets, hidden, seed)
    layers = list(adapted_layers(model))
    masks = [data.draw(st.lists(st.booleans(), min_size=rank, max_size=rank)) for _ in layers]
    zeroed = data.draw(st.integers(0, len(layers) - 1))
    kept = (zeroed + 1) % len(layers)
    masks[zeroed] = [False] * rank  # one module pruned to rank 0 ...
    masks[kept][0] = True  # ... and at least one left to export
    with torch.no_grad():
        for (_, layer), mask in zip(layers, masks, strict=True):
            layer.rank_mask.copy_(torch.tensor(mask, dtype=torch.float32))
    if shrink:
        bl.shrink(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = tm.batch(seed=seed)
    ours = tm.logits(model, x)

    out = bl.export_peft(model, tmp_path_factory.mktemp("peft") / "adapter", prune=False)

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller's model untouched
    expected = {name: sum(mask) for (name, _), mask in zip(layers, masks, strict=True) if sum(mask) > 0}
    cfg = json.loads((out / PEFT_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_modules"]) == sorted(expected)
    assert cfg["rank_pattern"] == expected
    assert cfg["fan_in_fan_out"] is (family == "gpt2")
    assert tm.HEADS[family] in cfg["modules_to_save"]
    keys = set(load_file(str(out / PEFT_WEIGHTS)))
    assert layers[zeroed][0] not in {k.split(".lora_")[0].removeprefix("base_model.model.") for k in keys}
    # PEFT builds exactly these modules at these ranks, and the logits agree
    pm = PeftModel.from_pretrained(tm.build(family, hidden=hidden, seed=seed), str(out)).eval()
    peft_ranks = {n: m.r["default"] for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert peft_ranks == expected
    torch.testing.assert_close(tm.logits(pm, x), ours, atol=1e-5, rtol=0)


def test_export_prunes_noisy_ranks_like_bl_export(tmp_path):
    model = _our_model("bert", "bayeslora", "gate", 4, 8.0, ["query", "value"], 16, 1)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.log_alpha.copy_(torch.tensor([-4.0, 5.0, -2.0, 4.0]))  # two ranks above τ = 3
    with pytest.warns(UserWarning, match="pruned 8 rank"):
        out = bl.export_peft(model, tmp_path / "p")
    assert set(bl.ranks(model).values()) == {4}  # not mutated
    bl.prune(model)
    x = tm.batch()
    torch.testing.assert_close(_peft_logits("bert", out, x, seed=1), tm.logits(model, x), atol=1e-5, rtol=0)
    assert set(json.loads((out / PEFT_CONFIG).read_text())["rank_pattern"].values()) == {2}


def test_export_refuses_a_fully_pruned_adapter(tmp_path):
    model = _our_model("bert", "lora", "gate", 2, 4.0, ["query"], 16, 0)
    for _, layer in adapted_layers(model):
        layer.rank_mask.zero_()
    with pytest.raises(ConfigError, match="rank 0"):
        bl.export_peft(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_posterior_side_file_round_trips_exactly(tmp_path):
    model = _our_model("gpt2", "bayeslora", "gate", 4, 12.0, ["c_attn", "c_fc"], 16, 3)
    with torch.no_grad():
        for i, (_, layer) in enumerate(adapted_layers(model)):
            layer.log_alpha.copy_(torch.linspace(-4, 2, 4) + 0.1 * i)
            layer.rank_mask[1] = 0
    bl.shrink(model)
    out = bl.export_peft(model, tmp_path / "p")
    meta = json.loads((out / POSTERIOR_META).read_text())
    assert meta["config"] == bl.BayesLoRAConfig.from_dict(meta["config"]).to_dict()
    assert set(load_file(str(out / POSTERIOR_WEIGHTS))) == {
        f"{n}.{t}" for n, _ in adapted_layers(model) for t in ("log_alpha", "rank_index")
    }
    back = bl.import_peft(tm.build("gpt2", seed=3), out)
    ours, theirs = dict(adapted_layers(model)), dict(adapted_layers(back))
    assert set(ours) == set(theirs)
    for name, layer in ours.items():
        other = theirs[name]
        assert torch.equal(other.log_alpha, layer.log_alpha)
        assert torch.equal(other.rank_index, layer.rank_index)
        assert other.scale == layer.scale and other.initial_rank == layer.initial_rank
        assert torch.equal(other.lora_A, layer.lora_A) and torch.equal(other.lora_B, layer.lora_B)
    x = tm.batch()
    torch.testing.assert_close(tm.logits(back, x), tm.logits(model, x), atol=1e-6, rtol=0)
    # the same MC samples, too (noise keyed by the restored original rank positions)
    with bl.sampling(model, True), bl.sampling(back, True):
        torch.manual_seed(0)
        a = tm.logits(model, x)
        torch.manual_seed(0)
        b = tm.logits(back, x)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---- acceptance 2: a PEFT LoRA, imported and exported, scores like PEFT in the runtime ----------
PEFT_TARGETS = {"bert": ["query", "value", "intermediate.dense"], "distilbert": ["q_lin", "v_lin", "lin1"]}
PEFT_TARGETS["roberta"] = ["query", "value", "intermediate.dense"]


def _peft_model(family: str, rslora: bool = False, seed: int = 0):
    """A PEFT LoRA on a tiny runtime-family classifier: per-module ranks and alphas, random non-zero
    factors and head, as if trained."""
    base = rm.build(family, seed=seed)
    first = {"bert": "layer.0.attention.self.query", "distilbert": "layer.0.attention.q_lin"}.get(
        family, "layer.0.attention.self.query"
    )
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=PEFT_TARGETS[family],
        rank_pattern={first: 2, "intermediate.dense|lin1": 3},
        alpha_pattern={first: 5},
        use_rslora=rslora,
        task_type="SEQ_CLS",
    )
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return pm.eval()


@pytest.mark.parametrize("family", rm.FAMILIES)
@pytest.mark.parametrize("posterior", ["gate", "additive"])
def test_peft_lora_imports_and_scores_in_the_runtime_like_peft(tmp_path, family, posterior):
    pm = _peft_model(family, rslora=posterior == "additive")  # rsLoRA scales alpha / sqrt(r)
    pm.save_pretrained(tmp_path / "peft")
    x = rm.batch(family=family)
    ref = rm.torch_logits(pm, x)

    model = bl.import_peft(rm.build(family), tmp_path / "peft", bl.BayesLoRAConfig(posterior=posterior))
    ranks = bl.ranks(model)
    assert sorted(ranks.values()) == sorted(
        m.r["default"] for m in pm.base_model.model.modules() if hasattr(m, "lora_A")
    )
    np.testing.assert_allclose(rm.torch_logits(model, x), ref, atol=1e-5, rtol=0)
    bundle = bl.export(model, rm.word_tokenizer(), tmp_path / "bundle")
    got = Scorer(bundle).logits(x["input_ids"].numpy(), x["attention_mask"].numpy())
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # the per-module scale survives save_adapter / load_adapter
    bl.save_adapter(model, tmp_path / "adapter")
    again = bl.load_adapter(rm.build(family), tmp_path / "adapter").eval()
    np.testing.assert_allclose(rm.torch_logits(again, x), ref, atol=1e-5, rtol=0)


def test_imported_lora_trains_as_bayeslora(tmp_path):
    pm = _peft_model("bert")
    pm.save_pretrained(tmp_path / "peft")
    model = bl.import_peft(
        rm.build("bert"), tmp_path / "peft", bl.BayesLoRAConfig.recipe("vi", init_log_alpha=-2.0)
    )
    model.train()
    x = rm.batch()
    with bl.sampling(model, True):
        out = model(**x, labels=torch.tensor([0, 1, 2]))
    loss, parts = bl.elbo_loss(out.loss, model, num_train=100, step=0)
    loss.backward()
    assert parts["kl"] > 0
    for _, layer in adapted_layers(model):
        assert layer.log_alpha.grad is not None and layer.log_alpha.grad.abs().sum() > 0
        assert layer.log_alpha.requires_grad and layer.lora_A.requires_grad
    assert model.classifier.weight.requires_grad  # PEFT's modules_to_save stay trainable


def _tiny_base_dir(path: Path, family: str = "bert") -> Path:
    from transformers import PreTrainedTokenizerFast

    rm.build(family).save_pretrained(path)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=rm.word_tokenizer(),
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    tok.save_pretrained(path)
    return path


def test_cli_import_peft_export_and_export_peft(tmp_path, capsys):
    base = _tiny_base_dir(tmp_path / "base")
    pm = _peft_model("bert")
    pm.save_pretrained(tmp_path / "peft")
    x = rm.batch()
    ref = rm.torch_logits(pm, x)

    assert (
        cli.main(
            [
                "import-peft",
                str(tmp_path / "peft"),
                "--model",
                str(base),
                "--out",
                str(tmp_path / "ck"),
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["total_rank"] == 2 + 4 + 3 + 4 + 4 + 3  # q0=2, v0=4, ffn0=3, q1=4, v1=4, ffn1=3
    run = json.loads((tmp_path / "ck" / "run.json").read_text())
    # PEFT's per-module scale (alpha_pattern 5 on the first query at r = 2; else 8 / r) on disk
    scales = {m.name: m.scale for m in bl.analysis.analyze(tmp_path / "ck").modules}
    assert scales["bert.encoder.layer.0.attention.self.query"] == pytest.approx(5 / 2)
    assert scales["bert.encoder.layer.1.intermediate.dense"] == pytest.approx(8 / 3)
    assert scales["bert.encoder.layer.1.attention.self.value"] == pytest.approx(8 / 4)
    assert run["base_model"] == str(base) and run["label_names"] == ["class_0", "class_1", "class_2"]

    assert cli.main(["export", str(tmp_path / "ck"), "--out", str(tmp_path / "bundle")]) == 0
    got = Scorer(tmp_path / "bundle").logits(x["input_ids"].numpy(), x["attention_mask"].numpy())
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)

    assert cli.main(["export-peft", str(tmp_path / "ck"), "--out", str(tmp_path / "peft2"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["total_rank"] == report["total_rank"]
    again = PeftModel.from_pretrained(rm.build("bert"), str(tmp_path / "peft2")).eval()
    np.testing.assert_allclose(rm.torch_logits(again, x), ref, atol=1e-5, rtol=0)


def test_cli_import_peft_reports_errors_without_a_traceback(tmp_path, capsys):
    base = _tiny_base_dir(tmp_path / "base")
    code = cli.main(
        ["import-peft", str(tmp_path / "nowhere"), "--model", str(base), "--out", str(tmp_path / "ck")]
    )
    assert code == 1
    assert "not a directory" in capsys.readouterr().err


# ---- acceptance 3: malformed PEFT directories --------------------------------------------------
@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "peft"
    _peft_model("bert").save_pretrained(out)
    return out


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / PEFT_CONFIG).read_text())
    cfg.update(changes)
    (d / PEFT_CONFIG).write_text(json.dumps(cfg))


def _edit_weights(d: Path, edit) -> None:
    state = load_file(str(d / PEFT_WEIGHTS))
    edit(state)
    save_file(state, str(d / PEFT_WEIGHTS))


Q0 = "base_model.model.bert.encoder.layer.0.attention.self.query"


def _rename(state, old, new):
    state[new] = state.pop(old)


CASES = {
    "missing config": (lambda d: (d / PEFT_CONFIG).unlink(), BundleError, "adapter_config.json not found"),
    "missing weights": (lambda d: (d / PEFT_WEIGHTS).unlink(), BundleError, "adapter_model.safetensors"),
    "corrupt weights": (lambda d: (d / PEFT_WEIGHTS).write_bytes(b"\x00" * 16), BundleError, "cannot read"),
    "corrupt config": (lambda d: (d / PEFT_CONFIG).write_text("{"), BundleError, "cannot read"),
    "dora": (lambda d: _edit_config(d, use_dora=True), ConfigError, "DoRA"),
    "not lora": (lambda d: _edit_config(d, peft_type="IA3"), ConfigError, "peft_type='IA3'"),
    "bias": (lambda d: _edit_config(d, bias="all"), ConfigError, "bias='all'"),
    "lora bias": (lambda d: _edit_config(d, lora_bias=True), ConfigError, "lora_bias"),
    "rank disagrees with config": (lambda d: _edit_config(d, rank_pattern={}), BundleError, "says r=4"),
    "bad alpha": (lambda d: _edit_config(d, lora_alpha=0), ConfigError, "lora_alpha"),
    "shape mismatch": (
        lambda d: _edit_weights(d, lambda s: s.__setitem__(f"{Q0}.lora_A.weight", torch.ones(2, 7))),
        BundleError,
        "lora_A [2, 7]",
    ),
    "unknown module": (
        lambda d: _edit_weights(
            d,
            lambda s: [
                _rename(
                    s, f"{Q0}.lora_{w}.weight", f"base_model.model.bert.encoder.layer.0.nope.lora_{w}.weight"
                )
                for w in "AB"
            ],
        ),
        BundleError,
        "'bert.encoder.layer.0.nope' is not in the base model",
    ),
    "lora_B missing": (
        lambda d: _edit_weights(d, lambda s: s.pop(f"{Q0}.lora_B.weight")),
        BundleError,
        "no lora_B",
    ),
    "not a linear": (
        lambda d: _edit_weights(
            d,
            lambda s: [
                _rename(
                    s,
                    f"{Q0}.lora_{w}.weight",
                    f"base_model.model.bert.encoder.layer.0.attention.output.LayerNorm.lora_{w}.weight",
                )
                for w in "AB"
            ],
        ),
        ConfigError,
        "LayerNorm",
    ),
    "head shape": (
        lambda d: _edit_weights(
            d, lambda s: s.__setitem__("base_model.model.classifier.weight", torch.ones(5, 16))
        ),
        BundleError,
        "classifier.weight",
    ),
    "unprefixed keys": (
        lambda d: _edit_weights(d, lambda s: _rename(s, f"{Q0}.lora_A.weight", "query.lora_A.weight")),
        BundleError,
        "does not start with",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_peft_directory_raises_a_typed_error(case, peft_dir, tmp_path):

    d = tmp_path / "bad"
    shutil.copytree(peft_dir, d)
    damage, error, message = CASES[case]
    damage(d)
    model = rm.build("bert")
    with pytest.raises(error, match=re.escape(message)):
        bl.import_peft(model, d)
    assert not list(adapted_layers(model))  # nothing half-injected


def test_real_dora_and_non_lora_directories_are_refused(tmp_path):
    from peft import IA3Config

    get_peft_model(
        rm.build("bert"), LoraConfig(r=2, target_modules=["query"], use_dora=True)
    ).save_pretrained(tmp_path / "dora")
    with pytest.raises(ConfigError, match="DoRA"):
        bl.import_peft(rm.build("bert"), tmp_path / "dora")
    get_peft_model(
        rm.build("bert"),
        IA3Config(target_modules=["query", "output.dense"], feedforward_modules=["output.dense"]),
    ).save_pretrained(tmp_path / "ia3")
    with pytest.raises(ConfigError, match="only LORA"):
        bl.import_peft(rm.build("bert"), tmp_path / "ia3")


def test_importing_into_an_adapted_model_is_refused(peft_dir):
    model = rm.adapt(rm.build("bert"), ["query"])
    with pytest.raises(ConfigError, match="un-adapted"):
        bl.import_peft(model, peft_dir)


class _Nested(torch.nn.Module):
    """``a`` and ``b.a``: a module name that is a ``.``-suffix of another one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(6, 6)
        self.b = torch.nn.Module()
        self.b.a = torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b.a(torch.tanh(self.a(x)))


def test_names_that_are_suffixes_of_other_names_round_trip_exactly(tmp_path):
    model = _Nested()
    bl.inject(model, bl.BayesLoRAConfig(rank=3, alpha=5.0, target_modules="a", init_b_std=0.5))
    x = torch.randn(4, 6)
    with torch.no_grad():
        ours = model(x)
    out = bl.export_peft(model, tmp_path / "p")
    assert isinstance(json.loads((out / PEFT_CONFIG).read_text())["target_modules"], str)
    pm = PeftModel.from_pretrained(_Nested(), str(out)).eval()
    assert [n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")] == ["a"]
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ours, atol=1e-6, rtol=0)
    back = bl.import_peft(_Nested(), out)
    assert [n for n, _ in adapted_layers(back)] == ["a"]
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize("command", ["export-peft", "import-peft"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text and "--json" in text and "--model" in text


def test_pissa_style_initialisation_is_flagged(peft_dir, tmp_path):
    d = tmp_path / "pissa"
    shutil.copytree(peft_dir, d)
    _edit_config(d, init_lora_weights="pissa")
    with pytest.warns(UserWarning, match="changes the base weights"):
        bl.import_peft(rm.build("bert"), d)


def test_pickled_bin_weights_are_refused_without_unpickling(peft_dir, tmp_path, monkeypatch, capsys):
    d = tmp_path / "legacy"
    shutil.copytree(peft_dir, d)
    torch.save(load_file(str(d / PEFT_WEIGHTS)), d / "adapter_model.bin")
    (d / PEFT_WEIGHTS).unlink()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    model = rm.build("bert")
    with pytest.raises(BundleError, match="pickled PyTorch weights are not loaded") as info:
        bl.import_peft(model, d)
    message = str(info.value)
    assert "safe_serialization=True" in message and "weights_only" not in message
    assert not list(adapted_layers(model))
    base = _tiny_base_dir(tmp_path / "base")
    capsys.readouterr()
    assert cli.main(["import-peft", str(d), "--model", str(base), "--out", str(tmp_path / "ck")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bayeslora: error: ") and "safe_serialization=True" in err
    assert not (tmp_path / "ck").exists()
