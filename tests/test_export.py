"""bl.export: the bundle contract (names, shapes, pruning, metadata), atomic writes, no mutation."""

from __future__ import annotations

import copy
import importlib
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

import bayeslora as bl
from bayeslora.errors import ConfigError
from bayeslora.nn.model import adapted_layers
from bayeslora.runtime import Scorer
from runtime_models import adapt, batch, build, torch_logits, word_tokenizer


def read_bundle(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    return tensors, json.loads((path / "bayeslora.json").read_text()), metadata


def test_bundle_follows_the_contract(tmp_path):
    model = build("bert", 16, 2, 2, 24, 3, seed=31)
    adapt(model, ["query", "value"], rank=4, seed=31)
    layers = dict(adapted_layers(model))
    q0 = "bert.encoder.layer.0.attention.self.query"
    v1 = "bert.encoder.layer.1.attention.self.value"
    with torch.no_grad():
        layers[q0].rank_mask[torch.tensor([0, 2])] = 0.0
        layers[v1].rank_mask.zero_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok = word_tokenizer()
    out = bl.export(model, tok, tmp_path / "b")
    tensors, meta, metadata = read_bundle(out)
    assert sorted(p.name for p in out.iterdir()) == [
        ".bayeslora-output.json",
        "bayeslora.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert metadata["format"] == "bayeslora-bundle"
    assert (out / "tokenizer.json").read_text() == tok.to_str()
    assert not any("base_layer" in k or k.endswith("rank_mask") for k in tensors)
    base = {
        k.replace(".base_layer", ""): v
        for k, v in before.items()
        if not k.rsplit(".", 1)[-1].startswith(("lora_", "log_", "rank_"))
    }
    for k, v in base.items():
        assert torch.equal(tensors[k], v), k
    assert torch.equal(tensors[f"{q0}.rank_index"], torch.tensor([1, 3]))
    assert torch.equal(tensors[f"{q0}.lora_A"], layers[q0].lora_A[[1, 3]])
    assert torch.equal(tensors[f"{q0}.lora_B"], layers[q0].lora_B[:, [1, 3]])
    assert torch.equal(tensors[f"{q0}.log_alpha"], layers[q0].log_alpha[[1, 3]])
    assert not any(k.startswith(v1 + ".") and not k.endswith(("weight", "bias")) for k in tensors)
    assert meta["modules"][v1] == {"rank": 0, "initial_rank": 4, "scale": 4.0, "d_in": 16, "d_out": 16}
    assert meta["modules"][q0]["rank"] == 2
    assert meta["labels"] == ["class_0", "class_1", "class_2"] and meta["num_labels"] == 3
    assert (meta["format_version"], meta["architecture"], meta["model_type"]) == (1, "bert", "bert")
    assert (meta["method"], meta["posterior"], meta["dtype"]) == ("bayeslora", "gate", "float32")
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 16
    # the caller's model is untouched
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_export_prunes_noisy_ranks_and_matches_torch_after_prune(tmp_path):
    model = build("roberta", 16, 2, 2, 24, 2, seed=32)
    adapt(model, ["query", "value"], rank=4, seed=32)
    with torch.no_grad():
        for _, layer in list(adapted_layers(model))[:2]:
            layer.log_alpha[:2] = 5.0  # above τ = 3
    with pytest.warns(UserWarning, match="pruned 4 rank"):
        out = bl.export(model, None, tmp_path / "b")
    pruned = copy.deepcopy(model)
    bl.prune(pruned)
    x = batch(3, 8, seed=33, family="roberta")
    got = Scorer(out).logits(x["input_ids"].numpy(), x["attention_mask"].numpy())
    np.testing.assert_allclose(got, torch_logits(pruned, x), atol=1e-4)
    assert sum(Scorer(out).module_ranks.values()) == 4 * 4 - 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = bl.export(model, None, tmp_path / "c", prune=False)
    np.testing.assert_allclose(
        Scorer(out2).logits(x["input_ids"].numpy(), x["attention_mask"].numpy()),
        torch_logits(model, x),
        atol=1e-4,
    )


def test_export_of_a_shrunk_model_keeps_original_rank_positions(tmp_path):
    model = build("distilbert", 16, 2, 1, 24, 2, seed=34)
    adapt(model, ["q_lin"], rank=5, seed=34)
    name, layer = next(iter(adapted_layers(model)))
    with torch.no_grad():
        layer.rank_mask[torch.tensor([0, 3])] = 0.0
    bl.shrink(model)
    out = bl.export(model, None, tmp_path / "b")
    tensors, meta, _ = read_bundle(out)
    assert torch.equal(tensors[f"{name}.rank_index"], torch.tensor([1, 2, 4]))
    assert meta["modules"][name]["rank"] == 3 and meta["modules"][name]["initial_rank"] == 5


@pytest.mark.parametrize("posterior", ["gate", "additive"])
def test_export_of_a_module_shrunk_to_rank_zero(tmp_path, posterior):
    # a module that training switched off entirely (bench_methods met this with `additive`)
    model = build("bert", 16, 2, 2, 24, 2, seed=36)
    adapt(model, ["query", "value"], rank=3, posterior=posterior, seed=36)
    name, layer = next(iter(adapted_layers(model)))
    with torch.no_grad():
        layer.rank_mask.zero_()
    bl.shrink(model)
    assert bl.ranks(model)[name] == 0 and layer.rank_scores().shape == (0,)
    out = bl.export(model, None, tmp_path / "b")
    _, meta, _ = read_bundle(out)
    assert meta["modules"].get(name, {"rank": 0})["rank"] == 0
    inputs = batch(3, 6, seed=36)
    got = Scorer(out, num_threads=1).logits(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy())
    np.testing.assert_allclose(got, torch_logits(model, inputs), atol=1e-4)


def test_export_is_atomic(tmp_path, monkeypatch):
    export_module = importlib.import_module("bayeslora.formats.bundle")  # the module that defines bl.export
    model = build("bert", 16, 2, 1, 24, 2, seed=35)
    adapt(model, ["query"], rank=2, seed=35)
    out = bl.export(model, None, tmp_path / "b")
    first = (out / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_file", broken)
    with torch.no_grad():
        next(iter(adapted_layers(model)))[1].lora_B.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        bl.export(model, None, tmp_path / "b")
    with pytest.raises(OSError, match="disk full"):
        bl.export(model, None, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp dirs, no half bundle
    assert (out / "model.safetensors").read_bytes() == first
    Scorer(out)
    monkeypatch.undo()
    bl.export(model, None, tmp_path / "b")  # replacing an existing bundle
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_bfloat16_bundle_is_smaller_and_close(tmp_path):
    model = build("bert", 32, 2, 2, 48, 3, seed=36)
    adapt(model, ["query", "value"], rank=4, seed=36)
    f32 = bl.export(model, None, tmp_path / "f32")
    bf16 = bl.export(model, None, tmp_path / "bf16", dtype="bfloat16")
    assert (bf16 / "model.safetensors").stat().st_size < 0.6 * (f32 / "model.safetensors").stat().st_size
    x = batch(3, 8, seed=37)
    a = Scorer(f32).score((x["input_ids"].numpy(), x["attention_mask"].numpy()))["probs"]
    b = Scorer(bf16).score((x["input_ids"].numpy(), x["attention_mask"].numpy()))["probs"]
    assert np.abs(a - b).max() < 0.05


def test_export_refuses_unsupported_models_and_dtypes(tmp_path):
    import transformers as tf

    gpt2 = tf.GPT2ForSequenceClassification(
        tf.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16, pad_token_id=0)
    )
    bl.inject(gpt2, bl.BayesLoRAConfig(rank=2, target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match="gpt2"):
        bl.export(gpt2, None, tmp_path / "g")
    model = adapt(build("bert", 16, 2, 1, 24, 2), ["query"], rank=2)
    with pytest.raises(ConfigError, match="dtype"):
        bl.export(model, None, tmp_path / "x", dtype="float16")
    assert not (tmp_path / "g").exists() and not (tmp_path / "x").exists()


def test_bl_export_stays_callable_after_the_module_is_imported(tmp_path):
    import bayeslora.formats.bundle  # noqa: F401  (a submodule import must not shadow the function)

    model = adapt(build("bert", 16, 2, 1, 24, 2, seed=38), ["query"], rank=2)
    assert (bl.export(model, None, tmp_path / "b") / "bayeslora.json").exists()
