"""Rank analysis (docs/method.md §8): speed of the Rust route, and the alignment claim against its controls.

(a) Speed: analyse every adapter of a MiniLM-shaped model (6 layers, hidden 384, rank 8; q/v
    targets → 12 modules, and all-linear → 36 modules) with ``_core.analyze_modules`` vs the
    numpy/scipy route on the dense ΔW (``np.linalg.svd`` of the d_out×d_in matrix, then
    ``scipy.linalg.subspace_angles`` for every j, both orders, both sides). Thread counts fixed.
(b) Alignment: a small teacher/student task with a planted low-rank ΔW, trained with the same data,
    steps and Adam as BayesLoRA (gate; also additive), plain LoRA, LoRA + weight decay, and
    BayesLoRA started from a randomly rotated initialisation ``(B R, Rᵀ A)`` — plus the null of a
    random factorisation of BayesLoRA's ΔW.

Script: ``python benches/bench_analysis.py [--steps N] [--seeds S]`` prints both tables.
pytest (CI, ``--benchmark-disable``): runs each part once, at a small size.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

from bayeslora import _core
from bayeslora import analysis as bla
from minilm_shape import HIDDEN, INTER, LAYERS

RANK = 8


# ---- (a) speed ----------------------------------------------------------------------------------


def minilm_modules(targets: str, seed: int = 0) -> list[tuple]:
    """Random trained-looking adapters of MiniLM's shapes: (A, B, ez, relevance, scale)."""
    rng = np.random.default_rng(seed)
    shapes = {"query": (HIDDEN, HIDDEN), "value": (HIDDEN, HIDDEN)}
    if targets == "all-linear":
        shapes.update({"key": (HIDDEN, HIDDEN), "attention.output": (HIDDEN, HIDDEN)})
        shapes.update({"intermediate": (HIDDEN, INTER), "output": (INTER, HIDDEN)})
    mods = []
    for _ in range(LAYERS):
        for d_in, d_out in shapes.values():
            a = rng.standard_normal((RANK, d_in)) / math.sqrt(d_in)
            b = rng.standard_normal((d_out, RANK)) * np.logspace(0, -2, RANK) * 0.05
            mods.append((a, b, np.ones(RANK), rng.normal(-2, 2, RANK), 16.0 / RANK))
    return mods


def dense_route(mods: list[tuple]) -> list[list[np.ndarray]]:
    """What one would write with numpy/scipy: dense ΔW, full SVD, subspace_angles per j."""
    out = []
    for a, b, ez, rel, s in mods:
        w = s * (b * ez) @ a
        u, sig, vt = np.linalg.svd(w, full_matrices=False)
        r_eff = int(np.sum(sig > sig[0] * np.finfo(float).eps * max(w.shape)))
        mags = s * np.linalg.norm(b, axis=0) * np.linalg.norm(a, axis=1)
        angles = []
        for order in (np.argsort(rel, kind="stable"), np.argsort(-mags, kind="stable")):
            for j in range(1, r_eff + 1):
                angles.append(scipy.linalg.subspace_angles(a[order[:j]].T, vt[:j].T))
                angles.append(scipy.linalg.subspace_angles(b[:, order[:j]], u[:, :j]))
        out.append(angles)
    return out


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def speed_table(repeat: int = 20) -> list[dict]:
    rows = []
    with threadpool_limits(1):
        for targets in ("qv", "all-linear"):
            mods = minilm_modules(targets)
            t1 = best_of(lambda m=mods: _core.analyze_modules(m, num_threads=1), repeat)
            t2 = best_of(lambda m=mods: _core.analyze_modules(m, num_threads=2), repeat)
            td = best_of(lambda m=mods: dense_route(m), max(2, repeat // 5))
            rows.append(
                {
                    "targets": targets,
                    "modules": len(mods),
                    "rust_1t_ms": t1 * 1e3,
                    "rust_2t_ms": t2 * 1e3,
                    "numpy_scipy_1t_ms": td * 1e3,
                    "ratio_1t": td / t1,
                }
            )
    return rows


# ---- (b) alignment controls -------------------------------------------------------------------------

D_IN, D_HID, D_OUT, R0 = 48, 64, 32, 8
PLANTED = np.array([3.0, 2.0, 1.2, 0.6])  # singular values of each planted ΔW (rank 4)
NOISE = 0.1  # observation noise of the teacher (and the likelihood's)
LR = 3e-3
WEIGHT_DECAY = 0.5  # the lora_wd control: L2 on the factors shrinks ΔW but keeps the rotation symmetry
LR_RANK = 3e-2  # log α only (LoRA has none); the factors use LR in all three runs


def _teacher(seed: int):  # returns (student base model, teacher model, data)
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(D_IN, D_HID)
            self.fc2 = nn.Linear(D_HID, D_OUT)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.tanh(self.fc1(x)))

    torch.manual_seed(seed)
    base = MLP()
    teacher = MLP()
    teacher.load_state_dict(base.state_dict())
    with torch.no_grad():
        for lin in (teacher.fc1, teacher.fc2):
            d_out, d_in = lin.weight.shape
            u = torch.linalg.qr(torch.randn(d_out, 4, generator=g, dtype=torch.float64))[0]
            v = torch.linalg.qr(torch.randn(d_in, 4, generator=g, dtype=torch.float64))[0]
            delta = u @ torch.diag(torch.tensor(PLANTED, dtype=torch.float64)) @ v.T / math.sqrt(d_in)
            lin.weight += delta.float()
    x = torch.randn(2048, D_IN, generator=g)
    with torch.no_grad():
        y = teacher(x) + NOISE * torch.randn(2048, D_OUT, generator=g)
    return base, x, y


def train(kind: str, seed: int, steps: int):
    """kind: "bayeslora" (gate), "additive", "lora", "lora_wd" (LoRA + AdamW weight decay) or
    "rotated" (gate BayesLoRA from (B R, Rᵀ A))."""
    import copy

    import torch

    import bayeslora as bl
    from bayeslora.nn.model import adapted_layers

    torch.set_num_threads(1)
    base, x, y = _teacher(seed)
    cfg = bl.BayesLoRAConfig.recipe(
        "vi",  # the variational recipe this control was measured with (RESULTS_analysis.md)
        rank=R0,
        alpha=R0,
        target_modules=["fc1", "fc2"],
        method="lora" if kind.startswith("lora") else "bayeslora",
        posterior="additive" if kind == "additive" else "gate",
        init_b_std=0.02,
        init_log_alpha=-3.0,
    )
    model = copy.deepcopy(base)
    torch.manual_seed(seed + 1)  # same factor initialisation for all three kinds
    bl.inject(model, cfg)
    if kind == "rotated":
        gen = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            for _, layer in adapted_layers(model):
                rot = torch.linalg.qr(torch.randn(R0, R0, generator=gen))[0]
                layer.lora_B.copy_(layer.lora_B @ rot)
                layer.lora_A.copy_(rot.T @ layer.lora_A)
    is_rank = ("log_alpha", "log_sigma2")
    rank_params = [p for n_, p in model.named_parameters() if n_.endswith(is_rank)]
    factors = [p for n_, p in model.named_parameters() if p.requires_grad and not n_.endswith(is_rank)]
    groups = [{"params": factors, "lr": LR}]
    if rank_params:
        groups.append({"params": rank_params, "lr": LR_RANK})
    if kind == "lora_wd":
        opt = torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY)
    else:
        opt = torch.optim.Adam(groups)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed + 3)
    noise_var = NOISE**2
    bl.sampling(model, not kind.startswith("lora"))
    for step in range(steps):
        idx = torch.randint(0, n, (128,), generator=gen)
        pred = model(x[idx])
        nll = 0.5 * ((pred - y[idx]) ** 2).sum(dim=1).mean() / noise_var
        loss, _ = bl.elbo_loss(nll, model, n, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bl.sampling(model, False)
    if not kind.startswith("lora"):
        bl.prune(model)
    return model


def random_factorisation(report: bla.AnalysisReport, model, seed: int) -> bla.AnalysisReport:
    """Null: the same ΔW written as (B R, Rᵀ A) with a Haar-random R; components by magnitude."""
    from bayeslora.nn.model import adapted_layers

    rng = np.random.default_rng(seed)
    mods = []
    for name, layer in adapted_layers(model):
        keep = layer.rank_mask.numpy() > 0.5
        a = layer.lora_A.detach().double().numpy()[keep]
        b = layer.lora_B.detach().double().numpy()[:, keep]
        q, r = np.linalg.qr(rng.standard_normal((a.shape[0], a.shape[0])))
        rot = q * np.sign(np.diag(r))
        mods.append(
            bla._Module(
                name,
                None,
                R0,
                layer.scale,
                rot.T @ a,
                b @ rot,
                None,
                np.ones(len(a), bool),
                np.arange(len(a)),
            )
        )
    return bla.analyze_factors(mods, kind="null")


STATS = (
    ("active_rank", "active rank after pruning at τ = 3 (total of 2 modules, r0 = 8 each)"),
    ("mean_effective_rank", "effective rank exp(H(σ/Σσ)) (mean)"),
    ("energy4", "energy in the top 4 σ, E_4 (mean)"),
    ("mean_spearman", "Spearman(relevance, magnitude)"),
    ("v1", "A vs V: cos θ_max, j = 1"),
    ("v2", "A vs V: cos θ_max, j = 2"),
    ("v3", "A vs V: cos θ_max, j = 3"),
    ("v4", "A vs V: cos θ_max, j = 4"),
    ("u13", "B vs U: cos θ_max, mean of j = 1..3"),
    ("gap_weighted_cos_v", "A vs V: gap-weighted mean over j (report's cosw)"),
    ("m13", "A vs V, magnitude order: mean of j = 1..3"),
    ("mean_best_cos_a", "mean best abs cos, a_k vs V (all k)"),
    ("top4_best_cos_a", "mean best abs cos, a_k vs V (4 most relevant k)"),
)
KINDS = ("bayeslora", "additive", "lora", "lora_wd", "rotated", "null")
NAMES = {
    "bayeslora": "BayesLoRA (gate)",
    "additive": "BayesLoRA (additive)",
    "lora": "plain LoRA",
    "lora_wd": "LoRA + weight decay",
    "rotated": "BayesLoRA, rotated init",
    "null": "random factorisation of BayesLoRA's ΔW",
}


def stats(report: bla.AnalysisReport) -> dict[str, float]:
    t = report.totals
    out = {k: (math.nan if t.get(k) is None else float(t[k])) for k, _ in STATS if k in t}

    def mean_over_modules(f) -> float:
        vals = [f(m) for m in report.modules]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        return float(np.mean(vals)) if vals else math.nan

    for j in range(1, 5):
        out[f"v{j}"] = mean_over_modules(lambda m, j=j: m.alignment_v[j - 1] if m.r_eff >= j else None)
    out["u13"] = mean_over_modules(lambda m: float(np.mean(m.alignment_u[:3])) if m.r_eff >= 3 else None)
    out["m13"] = mean_over_modules(
        lambda m: (
            float(np.mean([math.cos(float(t.max())) for t in m.magnitude_angles_v[:3]]))
            if m.r_eff >= 3
            else None
        )
    )
    out["energy4"] = mean_over_modules(lambda m: m.energy[3] if m.r_eff >= 4 else None)
    out["top4_best_cos_a"] = mean_over_modules(lambda m: float(np.nanmean(m.cos_a[m.order[:4]])))
    return out


def alignment_table(
    steps: int, seeds: int, kinds: tuple[str, ...] = KINDS
) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    for seed in range(seeds):
        for kind in kinds:
            if kind == "null":
                continue
            model = train(kind, seed, steps)
            rep = bla.analyze_model(model, num_threads=1)
            runs = [(kind, rep)]
            if kind == "bayeslora" and "null" in kinds:
                runs.append(("null", random_factorisation(rep, model, seed)))
            for name, r in runs:
                for key, value in stats(r).items():
                    results.setdefault(name, {}).setdefault(key, []).append(value)
    return results


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def format_alignment(results: dict) -> str:
    cols = [c for c in KINDS if c in results]
    lines = ["| statistic | " + " | ".join(NAMES[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, label in STATS:
        lines.append(f"| {label} | " + " | ".join(_ms(results[c].get(key, [])) for c in cols) + " |")
    return "\n".join(lines)


# ---- pytest entry points (CI runs them once with --benchmark-disable) ------------------------------


def test_bench_analysis_speed(benchmark):
    mods = minilm_modules("qv")
    out = benchmark(lambda: _core.analyze_modules(mods, num_threads=1))
    assert len(out) == 12
    ref = dense_route(mods[:2])
    for m, angles in zip(out[:2], ref, strict=True):
        j = m["r_eff"]
        # same angles as the numpy/scipy route (first entries: relevance order, V side, j = 1)
        np.testing.assert_allclose(m["angles_v"][0], angles[0], atol=1e-6)
        np.testing.assert_allclose(m["angles_u"][j - 1], angles[2 * j - 1], atol=1e-6)


def test_alignment_controls_smoke():
    results = alignment_table(steps=60, seeds=1)
    for kind in KINDS:
        assert results[kind]["active_rank"][0] > 0
    assert "BayesLoRA" in format_alignment(results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--skip-training", action="store_true")
    args = p.parse_args()
    print("## (a) speed: analyse every adapter (MiniLM shape, rank 8); best of", args.repeat)
    print("| targets | modules | Rust 1 thread (ms) | Rust 2 threads (ms) | numpy/scipy dense (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    for r in speed_table(args.repeat):
        print(
            f"| {r['targets']} | {r['modules']} | {r['rust_1t_ms']:.2f} | {r['rust_2t_ms']:.2f} | "
            f"{r['numpy_scipy_1t_ms']:.1f} | {r['ratio_1t']:.0f}× |"
        )
    if args.skip_training:
        return
    t0 = time.perf_counter()
    res = alignment_table(args.steps, args.seeds)
    took = time.perf_counter() - t0
    print(f"\n## (b) alignment controls: {args.seeds} seeds × {args.steps} steps ({took:.0f} s)")
    print(format_alignment(res))


if __name__ == "__main__":
    main()
