"""``bayeslora.analysis``: readers (adapter checkpoint, runtime bundle), the report, the CLI, plots.

References: the torch layers' own weights and rank scores (``layer.rank_scores()`` uses
``torch.quantile``), ``numpy.linalg.svd`` / ``scipy.linalg.subspace_angles`` of the dense ΔW.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.numpy import save_file
from torch import nn

import bayeslora as bl
from bayeslora import analysis
from bayeslora.cli import main as cli_main
from bayeslora.errors import BundleError
from bayeslora.nn.model import adapted_layers
from subprocesses import blocking_shim, run_python

ROOT = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.query = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.up = nn.Linear(d, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.query(x) + self.value(x))


def tiny_model(posterior: str = "gate", method: str = "bayeslora", rank: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(Block(12, 20), Block(20, 9))
    cfg = bl.BayesLoRAConfig(
        rank=rank,
        alpha=12.0,
        target_modules=["query", "value", "up"],
        posterior=posterior,
        method=method,
        init_b_std=0.3,
    )
    bl.inject(model, cfg)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.lora_A.normal_()
            layer.lora_B.normal_()
            if layer.uses_gate:
                layer.log_alpha.copy_(torch.randn(layer.rank) * 3)
            if layer.uses_additive:
                layer.log_sigma2.copy_(torch.randn(layer.rank) - 6)
            layer.rank_mask[1] = 0.0  # one pruned rank per module
    return model


def dense_delta(layer: nn.Module) -> np.ndarray:
    keep = layer.rank_mask.numpy() > 0.5
    a = layer.lora_A.detach().double().numpy()[keep]
    b = layer.lora_B.detach().double().numpy()[:, keep]
    return layer.scale * b @ a, a, b


@pytest.mark.parametrize("posterior", ["gate", "additive"])
def test_adapter_checkpoint_matches_torch_layers(tmp_path, posterior):
    model = tiny_model(posterior)
    bl.save_adapter(model, tmp_path / "ckpt")
    report = analysis.analyze(tmp_path / "ckpt", num_threads=1)
    layers = dict(adapted_layers(model))
    assert sorted(m.name for m in report.modules) == sorted(layers)
    assert report.kind == "adapter" and report.posterior == posterior
    for m in report.modules:
        layer = layers[m.name]
        keep = layer.rank_mask.numpy() > 0.5
        assert m.initial_rank == 6 and m.active_rank == int(keep.sum()) == 5
        np.testing.assert_array_equal(m.rank_index, np.flatnonzero(keep))
        assert m.scale == pytest.approx(12.0 / 6)
        # relevance: the torch layer's own scores (log α, or ℓ with torch.quantile medians)
        ref = layer.rank_scores().double().numpy()[keep]
        np.testing.assert_allclose(m.relevance, ref, rtol=1e-5, atol=1e-5)
        w, a, b = dense_delta(layer)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        p = min(5, *w.shape)
        np.testing.assert_allclose(m.singular_values, s[:p], atol=1e-9 * s[0])
        order = np.argsort(m.relevance, kind="stable")
        for j in range(1, m.r_eff + 1):
            if s[j - 1] - s[j] < 1e-4 * s[0]:
                continue
            np.testing.assert_allclose(
                m.angles_v[j - 1], scipy.linalg.subspace_angles(a[order[:j]].T, vt[:j].T), atol=1e-6
            )
            np.testing.assert_allclose(
                m.angles_u[j - 1], scipy.linalg.subspace_angles(b[:, order[:j]], u[:, :j]), atol=1e-6
            )


def test_training_run_directory(tmp_path):
    # `bayeslora train --out RUN` keeps the adapter under RUN/adapter
    bl.save_adapter(tiny_model("gate"), tmp_path / "run" / "adapter")
    report = analysis.analyze(tmp_path / "run")
    assert report.kind == "adapter" and report.source == str(tmp_path / "run" / "adapter")
    assert report.totals["active_rank"] == 30


def test_in_memory_model_equals_checkpoint(tmp_path):
    model = tiny_model("gate")
    bl.save_adapter(model, tmp_path / "ckpt")
    on_disk = analysis.analyze(tmp_path / "ckpt").to_dict()
    in_memory = analysis.analyze_model(model).to_dict()
    for x, y in zip(on_disk["modules"], in_memory["modules"], strict=True):
        assert x["name"] == y["name"]
        # f32 weights read either way: identical numbers
        np.testing.assert_allclose(x["singular_values"], y["singular_values"], rtol=1e-12)
        assert x["summary"] == pytest.approx(y["summary"], nan_ok=True)


def test_plain_lora_has_no_relevance(tmp_path):
    model = tiny_model(method="lora")
    bl.save_adapter(model, tmp_path / "ckpt")
    report = analysis.analyze(tmp_path / "ckpt")
    for m in report.modules:
        assert m.relevance is None and m.family is None and np.isnan(m.spearman)
        np.testing.assert_array_equal(m.order, np.argsort(-m.magnitudes, kind="stable"))
        assert m.active_rank == 5  # the mask is honoured even without a posterior
    assert report.totals["mean_spearman"] is None


def write_bundle(path: Path, dtype: str = "f32") -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A bundle written by hand: base weights we must ignore, two gate adapters (one already shrunk,
    one with a pruned rank left in its mask) and one module pruned away entirely."""
    rng = np.random.default_rng(7)
    path.mkdir()
    tensors: dict[str, np.ndarray] = {"embeddings.word_embeddings.weight": rng.standard_normal((50, 16))}
    modules = {}
    truth = {}
    for name, r, d_in, d_out in (("l0.query", 4, 16, 16), ("l0.value", 3, 16, 16), ("l1.up", 0, 16, 24)):
        a, b, la = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r)), rng.normal(-2, 2, r)
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], tensors[f"{name}.log_alpha"] = a, b, la
        mask = np.ones(r)
        if name == "l0.value":
            mask[2] = 0.0
            tensors[f"{name}.rank_mask"] = mask
        keep = mask > 0.5
        truth[name] = (a[keep], b[:, keep], la[keep])
        modules[name] = {"rank": r, "initial_rank": 8, "scale": 0.5, "d_in": d_in, "d_out": d_out}
    cast = {"f32": np.float32, "f64": np.float64}[dtype]
    save_file({k: v.astype(cast) for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "bayeslora.json").write_text(
        json.dumps({"format_version": 1, "posterior": "gate", "threshold": 3.0, "modules": modules})
    )
    return truth


def test_bundle_reader(tmp_path):
    truth = write_bundle(tmp_path / "bundle", "f64")
    report = analysis.analyze(tmp_path / "bundle")
    assert report.kind == "bundle" and [m.name for m in report.modules] == list(truth)
    by_name = {m.name: m for m in report.modules}
    for name, (a, b, la) in truth.items():
        m = by_name[name]
        assert m.initial_rank == 8 and m.active_rank == a.shape[0] and m.scale == 0.5
        np.testing.assert_array_equal(m.relevance, la)
        if a.shape[0] == 0:
            assert m.r_eff == 0 and m.singular_values.size == 0 and m.angles_v == []
            continue
        s = np.linalg.svd(0.5 * b @ a, compute_uv=False)[: a.shape[0]]
        np.testing.assert_allclose(m.singular_values, s, atol=1e-12 * s[0])
    t = report.totals
    assert t["initial_rank"] == 24 and t["active_rank"] == 4 + 2 + 0
    json.dumps(report.to_dict())  # NaN-free, JSON-serialisable


def test_bf16_bundle(tmp_path):
    truth = write_bundle(tmp_path / "bundle", "f64")
    # rewrite the same tensors as bf16 with safetensors.torch (numpy has no bfloat16)
    from safetensors.numpy import load_file
    from safetensors.torch import save_file as save_torch

    state = load_file(str(tmp_path / "bundle" / "model.safetensors"))
    save_torch(
        {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()},
        str(tmp_path / "bundle" / "model.safetensors"),
    )
    report = analysis.analyze(tmp_path / "bundle")
    m = next(m for m in report.modules if m.name == "l0.query")
    a, b, _ = truth["l0.query"]
    a16 = torch.from_numpy(a).to(torch.bfloat16).double().numpy()
    b16 = torch.from_numpy(b).to(torch.bfloat16).double().numpy()
    s = np.linalg.svd(0.5 * b16 @ a16, compute_uv=False)[:4]
    np.testing.assert_allclose(m.singular_values, s, atol=1e-12 * s[0])


def test_bad_inputs(tmp_path):
    with pytest.raises(BundleError, match="neither"):
        analysis.analyze(tmp_path)
    write_bundle(tmp_path / "b", "f32")
    raw = (tmp_path / "b" / "model.safetensors").read_bytes()
    (tmp_path / "b" / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BundleError, match="past the end"):
        analysis.analyze(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(BundleError, match="header length"):
        analysis.analyze(tmp_path / "b")
    write_bundle(tmp_path / "c", "f32")
    meta = json.loads((tmp_path / "c" / "bayeslora.json").read_text())
    meta["modules"]["l0.query"]["d_in"] = 99
    (tmp_path / "c" / "bayeslora.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="d_in"):
        analysis.analyze(tmp_path / "c")


def test_analysis_never_imports_torch(tmp_path):
    write_bundle(tmp_path / "bundle", "f32")
    code = """
        import sys
        import bayeslora.analysis as a
        from bayeslora.analysis.plots import write_plots
        r = a.analyze(sys.argv[1])
        write_plots(r, sys.argv[2])
        print(r.totals['active_rank'])
    """
    shim = blocking_shim(tmp_path / "shim")
    out = run_python(code, str(tmp_path / "bundle"), str(tmp_path / "plots"), shim=shim)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "6"


def test_cli_analyze(tmp_path, capsys):
    model = tiny_model("gate")
    bl.save_adapter(model, tmp_path / "ckpt")
    assert cli_main(["analyze", str(tmp_path / "ckpt"), "--json", "--plots", str(tmp_path / "plots")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "adapter" and len(out["modules"]) == 6
    assert out["totals"]["active_rank"] == 30
    for p in out["plots"]:
        assert Path(p).stat().st_size > 10_000
    assert cli_main(["analyze", str(tmp_path / "ckpt")]) == 0
    table = capsys.readouterr().out
    assert "0.query" in table and "rank 30/36" in table
    assert cli_main(["analyze", str(tmp_path / "nothing")]) == 1
    with pytest.raises(SystemExit) as exc:
        cli_main(["analyze", "--help"])
    assert exc.value.code == 0 and "--plots" in capsys.readouterr().out
