"""Rank analysis (docs/method.md §8): which rank directions did the posterior keep, and do they line up with
the singular directions of ``ΔW = s · B diag(E z) A``?

Torch-free: reads an adapter checkpoint (``bl.save_adapter``) or a runtime bundle with numpy and
safetensors, and does the linear algebra in Rust (``bayeslora._core.analyze_modules``: thin SVD from
the factors through QR, principal angles as ``scipy.linalg.subspace_angles``), all modules in
parallel with the GIL released.

Conventions. Component k of a module is the pair ``(a_k, b_k)`` (row k of ``lora_A``, column k of
``lora_B``); only surviving ranks (``rank_mask == 1``) count. Relevance: ``log α_k`` (gate) or
``ℓ_k`` (additive); *lower is more relevant*. Modules without a posterior (plain LoRA, MC dropout)
have no relevance; their components are ordered by magnitude ``c_k = s ‖b_k‖ ‖a_k‖``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _core
from ..errors import BundleError
from .read import _Module, _natural_key, read_modules

__all__ = ["AnalysisReport", "ModuleReport", "analyze", "analyze_factors", "analyze_model"]


@dataclass
class ModuleReport:
    """Rank analysis of one adapted module. ``k`` indexes surviving components (``active_rank``),
    ``i`` singular directions (``p = min(active_rank, d_in, d_out)``), ``j = 1..r_eff`` subspace
    sizes; ``r_eff`` is the numerical rank of ΔW (as ``numpy.linalg.matrix_rank``)."""

    name: str
    family: str | None  # "gate", "additive", or None (no posterior)
    initial_rank: int
    active_rank: int
    d_in: int
    d_out: int
    scale: float
    rank_index: np.ndarray  # [k] original rank positions of the surviving components
    relevance: np.ndarray | None  # [k] log α_k or ℓ_k (lower = more relevant)
    magnitudes: np.ndarray  # [k] c_k = s |E z_k| ‖b_k‖ ‖a_k‖
    singular_values: np.ndarray  # [p] σ_i of ΔW, descending
    r_eff: int
    cos_a: np.ndarray  # [k] best |cos| of a_k/‖a_k‖ against V[:, :r_eff] (NaN: a_k = 0)
    match_a: np.ndarray  # [k] which column of V (-1: none)
    cos_b: np.ndarray  # [k] best |cos| of b_k/‖b_k‖ against U[:, :r_eff]
    match_b: np.ndarray  # [k]
    order: np.ndarray  # [k] components, most relevant first (by magnitude without relevance)
    magnitude_order: np.ndarray  # [k] components, largest magnitude first
    angles_v: list[np.ndarray]  # [j][min(j, ·)] principal angles span{a_k: top-j} vs span V[:, :j]
    angles_u: list[np.ndarray]  # the same for b_k and U
    magnitude_angles_v: list[np.ndarray]  # with the components ordered by magnitude
    magnitude_angles_u: list[np.ndarray]
    energy: np.ndarray  # [r_eff] E_j = Σ_{i≤j} σ_i² / Σ σ_i²
    effective_rank: float  # exp(entropy of σ/Σσ)
    stable_rank: float  # Σσ² / σ_1²
    spearman: float  # Spearman(relevance, magnitude); NaN without relevance
    u: np.ndarray | None = field(default=None, repr=False)  # [d_out, p]
    v: np.ndarray | None = field(default=None, repr=False)  # [d_in, p]

    @staticmethod
    def _min_cos(angles: list[np.ndarray]) -> np.ndarray:
        return np.array([math.cos(float(t.max())) if t.size else math.nan for t in angles])

    @property
    def alignment_v(self) -> np.ndarray:
        """[r_eff] cos of the largest principal angle between the j most relevant a_k and V[:, :j]
        (1 = the top-j relevant components span exactly the top-j right singular subspace)."""
        return self._min_cos(self.angles_v)

    @property
    def alignment_u(self) -> np.ndarray:
        """[r_eff] the same on the output side (b_k against U)."""
        return self._min_cos(self.angles_u)

    def _informative(self) -> int:
        # When the j most relevant components are all the components, the spans coincide by
        # construction; such j carry no information about the order.
        n_nonzero = int(np.count_nonzero(self.magnitudes > 0))
        return self.r_eff - 1 if self.r_eff >= n_nonzero else self.r_eff

    def summary(self) -> dict[str, float]:
        """Scalar alignment statistics: ``top1_cos_v/u`` (j = 1); ``mean_cos_v/u``, the mean over
        the informative j (all but a trivial last one) of the cos of the largest principal angle;
        ``gap_weighted_cos_v/u``, the same mean weighted by the singular gaps σ_j − σ_{j+1} (j whose
        singular subspace is ill defined count little); the same with magnitude order; and the
        mean best |cos| of the components against the singular vectors."""
        j = self._informative()

        def mean_first(x: np.ndarray) -> float:
            return float(np.mean(x[:j])) if j > 0 else math.nan

        def first(x: np.ndarray) -> float:
            return float(x[0]) if x.size and j > 0 else math.nan

        # Gap weights: the top-j singular subspace is only as well defined as the gap σ_j − σ_{j+1}
        # (Davis–Kahan), so weight each j by it; with σ_{p+1} = 0 the gaps sum to σ_1.
        sig = np.append(self.singular_values[: self.r_eff], 0.0)
        w = (sig[:-1] - sig[1:])[:j] if j > 0 else np.zeros(0)

        def gap_weighted(x: np.ndarray) -> float:
            total = float(w.sum())
            return float(np.dot(w, x[:j]) / total) if j > 0 and total > 0 else math.nan

        mag_v, mag_u = self._min_cos(self.magnitude_angles_v), self._min_cos(self.magnitude_angles_u)
        finite = np.isfinite(self.cos_a)
        return {
            "top1_cos_v": first(self.alignment_v),
            "top1_cos_u": first(self.alignment_u),
            "mean_cos_v": mean_first(self.alignment_v),
            "mean_cos_u": mean_first(self.alignment_u),
            "gap_weighted_cos_v": gap_weighted(self.alignment_v),
            "gap_weighted_cos_u": gap_weighted(self.alignment_u),
            "magnitude_gap_weighted_cos_v": gap_weighted(mag_v),
            "magnitude_mean_cos_v": mean_first(mag_v),
            "magnitude_mean_cos_u": mean_first(mag_u),
            "mean_best_cos_a": float(np.mean(self.cos_a[finite])) if finite.any() else math.nan,
            "mean_best_cos_b": (float(np.nanmean(self.cos_b)) if np.isfinite(self.cos_b).any() else math.nan),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists, NaN → None); U and V are left out."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if key in ("u", "v"):
                continue
            out[key] = _jsonable(value)
        out["alignment_v"] = _jsonable(self.alignment_v)
        out["alignment_u"] = _jsonable(self.alignment_u)
        out["summary"] = _jsonable(self.summary())
        return out


@dataclass
class AnalysisReport:
    """Rank analysis of every adapted module of a model, with totals."""

    source: str
    kind: str  # "adapter", "bundle" or "model"
    method: str | None
    posterior: str | None
    modules: list[ModuleReport]

    @property
    def totals(self) -> dict[str, Any]:
        sums = [m.summary() for m in self.modules]

        def nanmean(key: str) -> float | None:
            vals = [s[key] for s in sums if math.isfinite(s[key])]
            return float(np.mean(vals)) if vals else None

        rho = [m.spearman for m in self.modules if math.isfinite(m.spearman)]
        return {
            "modules": len(self.modules),
            "initial_rank": sum(m.initial_rank for m in self.modules),
            "active_rank": sum(m.active_rank for m in self.modules),
            "numerical_rank": sum(m.r_eff for m in self.modules),
            "adapter_parameters": sum(m.active_rank * (m.d_in + m.d_out) for m in self.modules),
            "mean_spearman": float(np.mean(rho)) if rho else None,
            "mean_top1_cos_v": nanmean("top1_cos_v"),
            "mean_top1_cos_u": nanmean("top1_cos_u"),
            "mean_cos_v": nanmean("mean_cos_v"),
            "mean_cos_u": nanmean("mean_cos_u"),
            "gap_weighted_cos_v": nanmean("gap_weighted_cos_v"),
            "gap_weighted_cos_u": nanmean("gap_weighted_cos_u"),
            "magnitude_gap_weighted_cos_v": nanmean("magnitude_gap_weighted_cos_v"),
            "magnitude_mean_cos_v": nanmean("magnitude_mean_cos_v"),
            "magnitude_mean_cos_u": nanmean("magnitude_mean_cos_u"),
            "mean_best_cos_a": nanmean("mean_best_cos_a"),
            "mean_best_cos_b": nanmean("mean_best_cos_b"),
            "mean_effective_rank": (
                float(np.mean([m.effective_rank for m in self.modules])) if self.modules else None
            ),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "method": self.method,
            "posterior": self.posterior,
            "totals": _jsonable(self.totals),
            "modules": [m.to_dict() for m in self.modules],
        }

    def table(self, top: int = 4) -> str:
        """A fixed-width per-module table: ranks, the most relevant scores, the top singular values,
        Spearman and alignment (cos of the largest principal angle: j = 1, and gap-weighted over j)."""
        head = (
            f"{'module':<40} {'r0':>3} {'r':>3} {'reff':>4} "
            f"{'relevance (best first)':<26} {'top σ':<30} {'ρ':>6} {'cos1 V':>6} {'cosw V':>6} "
            f"{'cos1 U':>6} {'cosw U':>6}"
        )
        lines = [head, "-" * len(head)]
        for m in self.modules:
            rel = "-" if m.relevance is None else _fmt(m.relevance[m.order][:top], 5)
            s = m.summary()
            name = m.name if len(m.name) <= 40 else "…" + m.name[-39:]
            lines.append(
                f"{name:<40} {m.initial_rank:>3} {m.active_rank:>3} {m.r_eff:>4} {rel:<26} "
                f"{_fmt(m.singular_values[:top], 6):<30} {_num(m.spearman):>6} "
                f"{_num(s['top1_cos_v']):>6} {_num(s['gap_weighted_cos_v']):>6} "
                f"{_num(s['top1_cos_u']):>6} {_num(s['gap_weighted_cos_u']):>6}"
            )
        t = self.totals
        lines.append("-" * len(head))
        lines.append(
            f"{len(self.modules)} modules, rank {t['active_rank']}/{t['initial_rank']} "
            f"(numerical {t['numerical_rank']}), {t['adapter_parameters']} adapter parameters; "
            f"mean ρ(relevance, magnitude) {_num(t['mean_spearman'])}; "
            f"alignment V: top-1 {_num(t['mean_top1_cos_v'])}, gap-weighted "
            f"{_num(t['gap_weighted_cos_v'])} (magnitude order {_num(t['magnitude_gap_weighted_cos_v'])}), "
            f"mean over j {_num(t['mean_cos_v'])}; U: top-1 {_num(t['mean_top1_cos_u'])}, gap-weighted "
            f"{_num(t['gap_weighted_cos_u'])}"
        )
        lines.append(
            "cos1 = cos θ between the most relevant component and the top singular direction; "
            "cosw = gap-weighted mean over j of cos θ_max(top-j relevant, top-j singular)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _num(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _fmt(xs: np.ndarray, width: int) -> str:
    return " ".join(f"{x:.{max(width - 3, 1)}g}" for x in np.asarray(xs, dtype=float))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _prepare(m: _Module) -> tuple[tuple, np.ndarray, np.ndarray | None]:
    r = m.a.shape[0]
    if m.a.ndim != 2 or m.b.ndim != 2 or m.b.shape[1] != r or m.mask.shape != (r,):
        raise BundleError(
            f"{m.name}: lora_A {m.a.shape}, lora_B {m.b.shape}, rank_mask {m.mask.shape} disagree"
        )
    keep = np.flatnonzero(m.mask)
    a = np.ascontiguousarray(m.a[keep], dtype=np.float64)
    b = np.ascontiguousarray(m.b[:, keep], dtype=np.float64)
    relevance = None
    if m.family is not None and m.rank_param is not None:
        param = np.ascontiguousarray(m.rank_param[keep], dtype=np.float64)
        if m.family == "gate":
            relevance = param
        else:
            relevance = np.asarray(_core.rank_scores_additive(param, a, b), dtype=np.float64)
    ez = np.ones(len(keep))
    return (a, b, ez, relevance, float(m.scale)), m.rank_index[keep], relevance


def analyze_factors(
    modules: Sequence[_Module],
    *,
    source: str = "",
    kind: str = "model",
    method: str | None = None,
    posterior: str | None = None,
    num_threads: int | None = None,
    keep_vectors: bool = False,
) -> AnalysisReport:
    """Analyse prepared modules (internal entry point shared by the readers)."""
    prepared = [_prepare(m) for m in modules]
    raw = _core.analyze_modules([p[0] for p in prepared], num_threads=num_threads)
    reports = []
    for m, (args, rank_index, relevance), d in zip(modules, prepared, raw, strict=True):
        reports.append(
            ModuleReport(
                name=m.name,
                family=m.family if relevance is not None else None,
                initial_rank=int(m.initial_rank),
                active_rank=int(args[0].shape[0]),
                d_in=int(d["d_in"]),
                d_out=int(d["d_out"]),
                scale=float(m.scale),
                rank_index=np.asarray(rank_index, dtype=np.int64),
                relevance=relevance,
                magnitudes=d["magnitudes"],
                singular_values=d["singular_values"],
                r_eff=int(d["r_eff"]),
                cos_a=d["cos_a"],
                match_a=d["match_a"],
                cos_b=d["cos_b"],
                match_b=d["match_b"],
                order=d["order"],
                magnitude_order=d["magnitude_order"],
                angles_v=list(d["angles_v"]),
                angles_u=list(d["angles_u"]),
                magnitude_angles_v=list(d["magnitude_angles_v"]),
                magnitude_angles_u=list(d["magnitude_angles_u"]),
                energy=d["energy"],
                effective_rank=float(d["effective_rank"]),
                stable_rank=float(d["stable_rank"]),
                spearman=float(d["spearman"]),
                u=d["u"] if keep_vectors else None,
                v=d["v"] if keep_vectors else None,
            )
        )
    return AnalysisReport(source=source, kind=kind, method=method, posterior=posterior, modules=reports)


def analyze(
    path: str | os.PathLike, *, num_threads: int | None = None, keep_vectors: bool = False
) -> AnalysisReport:
    """Analyse a saved adapter directory (``adapter.safetensors`` + ``bayeslora_adapter.json``; a
    training run directory with it under ``adapter/`` also works) or a runtime bundle
    (``model.safetensors`` + ``bayeslora.json``). ``num_threads``: size of the Rust thread pool
    (None: all cores). ``keep_vectors``: also keep U [d_out, p] and V [d_in, p]."""
    root, kind, method, posterior, mods = read_modules(path)
    return analyze_factors(
        mods,
        source=str(root),
        kind=kind,
        method=method,
        posterior=posterior,
        num_threads=num_threads,
        keep_vectors=keep_vectors,
    )


def analyze_model(
    model: Any, *, num_threads: int | None = None, keep_vectors: bool = False
) -> AnalysisReport:
    """Analyse the adapters of an in-memory torch model (imports torch only here)."""
    from ..nn.model import adapted_layers, unwrap  # torch-side, imported lazily on purpose

    base = unwrap(model)
    mods = []
    method = posterior = None
    for name, layer in adapted_layers(base):
        method, posterior = layer.method, layer.posterior
        family = "gate" if layer.uses_gate else "additive" if layer.uses_additive else None
        param = layer.rank_parameter()

        def np64(t: Any) -> np.ndarray:
            return t.detach().to("cpu").double().numpy()

        mods.append(
            _Module(
                name=name,
                family=family,
                initial_rank=int(layer.initial_rank),
                scale=float(layer.scale),
                a=np64(layer.lora_A),
                b=np64(layer.lora_B),
                rank_param=None if param is None else np64(param),
                mask=np64(layer.rank_mask) > 0.5,
                rank_index=layer.rank_index.detach().cpu().numpy().astype(np.int64),
            )
        )
    mods.sort(key=lambda m: _natural_key(m.name))
    return analyze_factors(
        mods,
        source=type(base).__name__,
        kind="model",
        method=method,
        posterior=posterior,
        num_threads=num_threads,
        keep_vectors=keep_vectors,
    )
