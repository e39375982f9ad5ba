"""Plots of the rank analysis (matplotlib, Agg backend; no torch)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .report import AnalysisReport


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4) if n <= 12 else 6
    return max(1, math.ceil(n / cols)), max(cols, 1)


def _short(name: str) -> str:
    parts = name.split(".")
    return ".".join(p for p in parts if p not in ("encoder", "layer", "attention", "self", "bert", "model"))[
        -28:
    ]


def _figure(n: int):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows, cols = _grid(n)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(3.3 * cols, 6.5), 2.7 * rows + 0.9), squeeze=False, layout="constrained"
    )
    return plt, fig, axes


def plot_spectrum(report: AnalysisReport, path: str | os.PathLike) -> Path:
    """Per module: singular values σ_i/σ_1 (bars) and, at position i, the magnitude c_k/σ_1 of the
    i-th most relevant component (dots coloured by relevance). If the posterior kept the singular
    directions in order, the dots sit on the bars."""
    mods = report.modules
    plt, fig, axes = _figure(len(mods))
    for ax in axes.flat[len(mods) :]:
        ax.axis("off")
    sc = None
    for ax, m in zip(axes.flat, mods, strict=False):
        ax.set_title(f"{_short(m.name)}  r={m.active_rank}/{m.initial_rank}", fontsize=8)
        if m.singular_values.size == 0 or m.singular_values[0] == 0:
            ax.text(0.5, 0.5, "no adapter left", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        s1 = m.singular_values[0]
        x = np.arange(1, m.singular_values.size + 1)
        ax.bar(x, m.singular_values / s1, color="0.8", label="σ_i / σ_1")
        k = np.arange(1, m.order.size + 1)
        mags = m.magnitudes[m.order] / s1
        if m.relevance is not None:
            sc = ax.scatter(k, mags, c=m.relevance[m.order], cmap="viridis", s=18, zorder=3)
            ax.text(
                0.97, 0.92, f"ρ={m.spearman:.2f}", ha="right", va="top", fontsize=7, transform=ax.transAxes
            )
        else:
            ax.scatter(k, mags, color="C1", s=18, zorder=3)
        ax.set_xticks(k if k.size <= 16 else k[:: max(1, k.size // 8)])
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, max(1.05, float(np.max(mags, initial=0)) * 1.05))
    fig.suptitle(
        "Spectrum vs relevance\nbars: σ_i/σ_1 of ΔW;  dots: c_k/σ_1 of the i-th most relevant component",
        fontsize=9,
    )
    for ax in axes[-1]:
        ax.set_xlabel("i (singular index) / rank by relevance", fontsize=7)
    if sc is not None:
        fig.colorbar(sc, ax=axes.ravel().tolist(), shrink=0.6, label="relevance (lower = more relevant)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_alignment(report: AnalysisReport, path: str | os.PathLike) -> Path:
    """Per module, for j = 1..r_eff: cos of the largest principal angle between the j most relevant
    components and the top-j singular subspace (V side solid, U side dashed), the same with the
    components ordered by magnitude (grey), and the energy captured E_j (dotted)."""
    mods = report.modules
    plt, fig, axes = _figure(len(mods))
    for ax in axes.flat[len(mods) :]:
        ax.axis("off")
    for ax, m in zip(axes.flat, mods, strict=False):
        ax.set_title(f"{_short(m.name)}  r_eff={m.r_eff}", fontsize=8)
        if m.r_eff == 0:
            ax.text(0.5, 0.5, "ΔW = 0", ha="center", va="center", transform=ax.transAxes)
            continue
        j = np.arange(1, m.r_eff + 1)
        label = "relevance" if m.relevance is not None else "magnitude"
        ax.plot(j, m.alignment_v, "o-", color="C0", ms=3, label=f"A vs V ({label})")
        ax.plot(j, m.alignment_u, "s--", color="C3", ms=3, label=f"B vs U ({label})")
        if m.relevance is not None:
            mag_v = np.array([math.cos(float(t.max())) for t in m.magnitude_angles_v])
            ax.plot(j, mag_v, "-", color="0.6", lw=1, label="A vs V (magnitude)")
        ax.plot(j, m.energy, ":", color="k", lw=1, label="energy E_j")
        ax.set_ylim(-0.02, 1.05)
        ax.set_xticks(j if j.size <= 16 else j[:: max(1, j.size // 8)])
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("j", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("cos θ_max", fontsize=7)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle(
        "Alignment: cos of the largest principal angle between\nthe top-j components and the top-j "
        "singular subspace",
        fontsize=9,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_plots(report: AnalysisReport, out_dir: str | os.PathLike) -> list[Path]:
    """``spectrum.png`` and ``alignment.png`` in ``out_dir``."""
    out = Path(out_dir)
    return [plot_spectrum(report, out / "spectrum.png"), plot_alignment(report, out / "alignment.png")]
