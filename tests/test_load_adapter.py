"""bl.load_adapter checks a saved adapter against the model before changing anything."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import bayeslora as bl
from bayeslora.errors import BundleError
from bayeslora.nn.model import adapted_layers
from runtime_models import adapt, batch, build, torch_logits

Q0 = "bert.encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = adapt(build("bert", seed=51), ["query", "value"], rank=4, seed=51, modules_to_save=["classifier"])
    return bl.save_adapter(model, tmp_path_factory.mktemp("adapter") / "a"), model


def _tensors(edit):
    def damage(d):
        state = load_file(str(d / "adapter.safetensors"))
        edit(state)
        save_file(state, str(d / "adapter.safetensors"))

    return damage


def _meta(edit):
    def damage(d):
        meta = json.loads((d / "bayeslora_adapter.json").read_text())
        edit(meta)
        (d / "bayeslora_adapter.json").write_text(json.dumps(meta))

    return damage


def _set(key, value):
    return _tensors(lambda s: s.__setitem__(key, value))


def _nan_at(key, index=0):
    def edit(s):
        s[key] = s[key].clone()
        s[key].view(-1)[index] = math.nan

    return _tensors(edit)


CASES = {
    "lora_A shape": (
        _set(f"{Q0}.lora_A", torch.zeros(4, 17)),
        f"{Q0}.lora_A is [4, 17] but the model needs [4, 16]",
    ),
    "lora_B shape": (_set(f"{Q0}.lora_B", torch.zeros(16, 3)), f"{Q0}.lora_B is [16, 3]"),
    "lora_A not a matrix": (_set(f"{Q0}.lora_A", torch.zeros(4)), "lora_A must be [r, 16]"),
    "NaN factor": (_nan_at(f"{Q0}.lora_B", 5), f"{Q0}.lora_B has NaN or infinite values"),
    "inf log_alpha": (_set(f"{Q0}.log_alpha", torch.tensor([0.0, math.inf, 0.0, 0.0])), "log_alpha has NaN"),
    "integer factor": (_set(f"{Q0}.lora_A", torch.zeros(4, 16, dtype=torch.int64)), "must be floating point"),
    "missing tensor": (_tensors(lambda s: s.pop(f"{Q0}.lora_B")), f"missing tensor '{Q0}.lora_B'"),
    "rank_index out of range": (
        _set(f"{Q0}.rank_index", torch.tensor([0, 1, 2, 7])),
        "distinct ranks in 0..3",
    ),
    "rank_index repeated": (_set(f"{Q0}.rank_index", torch.tensor([0, 1, 1, 2])), "distinct ranks"),
    "rank_index floats": (_set(f"{Q0}.rank_index", torch.zeros(4)), "rank_index must be integers"),
    "rank_mask not 0/1": (_set(f"{Q0}.rank_mask", torch.full((4,), 0.5)), "only 0 and 1"),
    "unknown tensor": (_set("bert.nope.weight", torch.zeros(2)), "fit no module: ['bert.nope.weight']"),
    "head shape": (
        _set("classifier.weight", torch.zeros(5, 16)),
        "classifier.weight is torch.float32 [5, 16]",
    ),
    "NaN head": (_nan_at("classifier.bias"), "classifier.bias has NaN"),
    "NaN scale": (_meta(lambda m: m["modules"][Q0].update(scale=math.nan)), "scale nan"),
    "string scale": (_meta(lambda m: m["modules"][Q0].update(scale="2")), "scale '2'"),
    "rank disagrees": (_meta(lambda m: m["modules"][Q0].update(rank=3)), "says 3"),
    "d_in disagrees": (_meta(lambda m: m["modules"][Q0].update(d_in=32)), "d_in 32"),
    "unknown module": (
        _meta(lambda m: m["modules"].update({"bert.nope": m["modules"].pop(Q0)})),
        "missing modules ['bert.nope']",
    ),
    "not an object": (lambda d: (d / "bayeslora_adapter.json").write_text("[1]"), "expected a JSON object"),
    "no config": (_meta(lambda m: m.pop("config")), "'config' must be an object"),
    "bad config": (_meta(lambda m: m["config"].update(rank=-1)), "invalid config"),
    "unknown config field": (_meta(lambda m: m["config"].update(colour="red")), "invalid config"),
    "modules not objects": (_meta(lambda m: m.update(modules={Q0: 4})), "'modules' must map"),
    "not UTF-8": (lambda d: (d / "bayeslora_adapter.json").write_bytes(b'{"\xff": 1}'), "cannot read"),
    "no head module": (
        _meta(lambda m: m["config"].update(modules_to_save=["nohead"])),
        "no module matches ['nohead']",
    ),
}


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_adapter_raises_bundle_error_and_leaves_the_model_alone(case, saved, tmp_path):
    src, _ = saved
    d = tmp_path / "bad"
    shutil.copytree(src, d)
    damage, message = CASES[case]
    damage(d)
    fresh = build("bert", seed=51)
    before = _snapshot(fresh)
    with pytest.raises(BundleError, match=re.escape(message)):
        bl.load_adapter(fresh, d)
    assert _same(fresh, before) and getattr(fresh, "bayeslora_config", None) is None
    assert not list(adapted_layers(fresh))
    if case == "no head module":
        return  # an adapted model keeps its own config
    injected = adapt(
        build("bert", seed=52), ["query", "value"], rank=4, seed=52, modules_to_save=["classifier"]
    )
    before = _snapshot(injected)
    scales = [layer.scale for _, layer in adapted_layers(injected)]
    with pytest.raises(BundleError):
        bl.load_adapter(injected, d)
    assert _same(injected, before) and [layer.scale for _, layer in adapted_layers(injected)] == scales


def test_an_adapter_of_another_rank_does_not_load_into_an_adapted_model(saved):
    src, _ = saved
    other = adapt(build("bert", seed=53), ["query", "value"], rank=2, seed=53, modules_to_save=["classifier"])
    before = _snapshot(other)
    with pytest.raises(BundleError, match=r"must be 4 distinct ranks in 0\.\.1"):
        bl.load_adapter(other, src)
    assert _same(other, before)


def test_a_good_adapter_still_loads_exactly(saved):
    src, model = saved
    x = batch(3, 7, seed=54)
    for target in (build("bert", seed=51), adapt(build("bert", seed=51), ["query", "value"], rank=4, seed=9)):
        bl.load_adapter(target, src)
        assert torch.equal(torch.as_tensor(torch_logits(target, x)), torch.as_tensor(torch_logits(model, x)))
