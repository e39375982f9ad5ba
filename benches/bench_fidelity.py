"""Does BayesLoRA earn its place? Named configurations × training-set sizes × seeds, resumable.

Issue #19's benchmark. Every run trains one configuration (``CONFIGS``: ``TrainSettings`` of a
recipe plus overrides) on VADER movies, exports its bundle, and scores the validation and test
splits, the three shifted VADER domains and 500 BBC articles with the Rust runtime, in MC mode
(``--samples``) where the model has a posterior and in mean mode. Each run's raw result is one JSON
file, ``benches/results/fidelity/<config>__n<N>__s<seed>.json``: a run whose file exists is skipped,
so an interrupted sweep resumes where it stopped and a sweep can be spread over sessions.

    python benches/bench_fidelity.py --configs lora gate --seeds 0 1 2      # run (skips finished runs)
    python benches/bench_fidelity.py --report                              # tables from the JSON

The rule, written before the runs (choose on validation, report on test): configurations are
compared on the validation split (accuracy, NLL); rows report the test split, mean ± std over the
seeds present. ``--report --candidate NAME`` states issue #19's acceptance points for one
configuration (its MC row) against LoRA and temperature-scaled LoRA at the same N:
1. accuracy ≥ LoRA's − 0.01 or within two standard errors of the difference; total rank ≤ 50 % of
   the initial; std of the total rank over seeds ≤ 20 % of its mean;
2. ECE and NLL ≤ temperature-scaled LoRA's on the test split and on the shifted domains (mean);
3. the best of its OOD AUROCs (entropy, mutual information, 1 − confidence) ≥ LoRA's entropy AUROC,
   and its mutual-information AUROC > 0.5.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench_methods import FIDELITY_BEGIN, FIDELITY_END, write_marked  # the section bench_methods keeps

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "fidelity"
sys.path.insert(0, str(HERE))

# name -> (recipe, overrides of TrainSettings); the hypothesis each one tests in the comment.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("vi", {"method": "lora"}),
    "mcdropout": ("vi", {"method": "mcdropout"}),
    # the defaults as they were when issue #19 was filed (schedule in absolute steps)
    "gate": ("vi", {}),
    "additive": ("vi", {"posterior": "additive"}),
    # H2 select, then refit: variational until half-way, settle the ranks, train the survivors
    "gate-refit": ("vi", {"refit_start": 0.5}),
    # H2 + H6: the cut chosen on validation NLL (within 0.02 nats) at the refit point
    "gate-refit-val": ("vi", {"refit_start": 0.5, "rank_select": "validation"}),
    "additive-refit-val": (
        "vi",
        {"posterior": "additive", "refit_start": 0.5, "rank_select": "validation"},
    ),
    # H2 with noise kept on at the frozen α while refitting
    "gate-refit-val-noisy": (
        "vi",
        {"refit_start": 0.5, "rank_select": "validation", "refit_sampling": True},
    ),
    # H1: one KL per gate (kl_group unit) at the full per-example weight
    "gate-unit": ("vi", {"kl_group": "unit", "kl_scale": 1.0}),
    "gate-unit-refit-val": (
        "vi",
        {"kl_group": "unit", "kl_scale": 1.0, "refit_start": 0.5, "rank_select": "validation"},
    ),
    # H3: local reparameterisation of the gates in training (per-token output noise)
    "gate-lrt": ("vi", {"gate_lrt": True}),
    "gate-lrt-refit-val": ("vi", {"gate_lrt": True, "refit_start": 0.5, "rank_select": "validation"}),
    # H1, the ELBO as written: one KL per gate (a rank gate is one random variable), kl_scale 1
    "gate-unit-refit-val-fit": (
        "vi",
        {
            "kl_group": "unit",
            "kl_scale": 1.0,
            "refit_start": 0.5,
            "rank_select": "validation",
            "noise_scale": "fit",
        },
    ),
    # the authors' GLUE harness (docs/method.md §10)
    "paper": ("paper", {}),
    # its baseline: plain LoRA with the same targets, optimiser groups, clip and schedule
    "lora-paper": ("paper", {"method": "lora"}),
    # the authors' noise-free training, the ranks settled by the validation cut half-way, then refit
    "paper-val": ("paper", {"refit_start": 0.5, "rank_select": "validation", "prune_start": 0.5}),
    # H6: a rank-budget controller steering the KL weight to half the initial total rank by the
    # refit point (floored τ passes), then refit — on the vi recipe (SGD-like rank optimiser, where
    # the KL's weight is a lever) and on the default recipe (plain Adam on log σ², where it is not)
    "gate-budget": ("vi", {"rank_budget": 0.5, "refit_start": 0.5}),
    "paper-budget": ("paper", {"rank_budget": 0.5, "refit_start": 0.5, "prune_start": 0.5}),
}
# What each configuration tests (the hypothesis table of benches/RESULTS_fidelity.md).
TESTS = {
    "lora": "baseline",
    "lora-paper": "baseline with the paper recipe's targets and optimiser",
    "mcdropout": "baseline: MC dropout on the rank units",
    "gate": "the default when issue #19 was filed",
    "additive": "the additive posterior with the same schedule",
    "gate-refit": "H2 select, then refit (τ pass at 0.5)",
    "gate-refit-val": "H2 + H6: validation cut at 0.5, refit",
    "additive-refit-val": "H2 + H6 on the additive posterior",
    "gate-refit-val-noisy": "H2: refit with the noise on at the frozen α",
    "gate-unit": "H1: one KL per gate, kl_scale 1",
    "gate-unit-refit-val": "H1 + H2 + H6",
    "gate-unit-refit-val-fit": "H1 + H2 + H6 + tempering",
    "gate-lrt": "H3: gates by local reparameterisation in training",
    "gate-lrt-refit-val": "H3 + H2 + H6",
    "gate-fit": "H5: the gate posterior tempered on validation",
    "gate-refit-val-fit": "H2 + H6 + tempering",
    "additive-refit-val-fit": "H2 + H6 + tempering, additive",
    "gate-late-val-fit": "pre-training without the KL (KL from 0.5), cut at 0.8, refit, tempering",
    "paper": "the authors' GLUE harness (recipe paper)",
    "paper-val": "the paper recipe with the validation cut at 0.5 and refit",
    "gate-budget": "H6: a rank-budget controller on the KL weight (half the ranks at 0.5), refit",
    "paper-budget": "H6: the same controller on the default recipe's training",
}


def run_one(name: str, n_train: int, seed: int, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    from bayeslora.bundle import export
    from bayeslora.pipeline import SELECT_EXAMPLES, TrainSettings, train
    from bench_methods import _metrics, _score_bundle, _temperature_row, eval_sets

    recipe, overrides = CONFIGS[name]
    settings = TrainSettings.for_recipe(
        recipe,
        **{
            **overrides,
            "seed": seed,
            "max_train": n_train,
            "epochs": args.epochs,
            "max_length": args.max_length,
            "samples": 0,  # evaluated below, by the runtime
            "max_eval": 64,  # train()'s own report; the evaluation is below
            "select_examples": SELECT_EXAMPLES,  # ... and not the rank cut's validation examples
            "save_steps": 10**6,
        },
    )
    _, sets = eval_sets(seed, args.max_eval)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        run = train(settings, out, progress=False, log=log)
        bundle = out / "bundle"
        export(run["model"], run["tokenizer"], bundle, max_length=args.max_length)
        t0 = time.perf_counter()
        rows: dict[str, Any] = {}
        saved: dict[str, dict] = {}
        mean_outs = _score_bundle(bundle, sets, 0, seed, args.threads)
        saved["mean"] = mean_outs
        rows["mean"] = _metrics(mean_outs, sets)
        rows["mean"]["validation"] = _val(mean_outs, sets)
        if settings.method != "lora":
            mc_outs = _score_bundle(bundle, sets, args.samples, seed, args.threads)
            rows["mc"] = _metrics(mc_outs, sets)
            rows["mc"]["validation"] = _val(mc_outs, sets)
            # the same post-hoc step LoRA gets: one temperature on the MC predictive's log-probabilities,
            # fitted on the validation NLL (its entropy is recomputed; MI has no tempered analogue)
            rows["mc_temperature"] = _temperature_row(mc_outs, sets, {})["lora + temperature"]
            saved["mc"] = mc_outs
        else:
            rows["temperature"] = _temperature_row(mean_outs, sets, {})["lora + temperature"]
        eval_seconds = time.perf_counter() - t0
    return {
        "config": name,
        "recipe": recipe,
        "overrides": overrides,
        "n_train": run["num_train"],
        "seed": seed,
        "steps": run["log_history"][-1].get("step") if run["log_history"] else None,
        "settings": run["settings"],
        "total_rank": run["total_rank"],
        "initial_total_rank": run["initial_total_rank"],
        "ranks": run["ranks"],
        "adapter_parameters": run["adapter_parameters"],
        "train_seconds": run["train_seconds"],
        "train_cpu_seconds": run["train_cpu_seconds"],
        "eval_seconds": eval_seconds,
        "prune_history": run["prune_history"],
        "rank_selection": run["rank_selection"],
        "noise_fit": run.get("noise_fit"),
        "rank_parameters": _rank_parameter_stats(run["model"]),
        "rows": rows,
        "_outputs": saved,
    }


def _rank_parameter_stats(model: Any) -> dict[str, float] | None:
    """min / mean / max of the surviving ranks' log σ² (additive) or log α (gate) after training:
    how far the posterior's variance moved from its initial value."""
    from bayeslora.nn.model import adapted_layers

    values = [
        p.detach().float().flatten()
        for _, layer in adapted_layers(model)
        if (p := layer.rank_parameter()) is not None and p.numel()
    ]
    if not values:
        return None
    import torch

    v = torch.cat(values)
    return {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max()), "count": int(v.numel())}


def _val(outs: dict, sets: dict) -> dict[str, float]:
    from bayeslora import metrics

    return {
        k: float(v) for k, v in metrics.summary(outs["validation"]["probs"], sets["validation"][1]).items()
    }


def result_path(results: Path, name: str, n_train: int, seed: int) -> Path:
    return results / f"{name}__n{n_train}__s{seed}.json"


def save_outputs(path: Path, outputs: dict[str, dict]) -> None:
    """Per-example probabilities (and uncertainty fields) of every scored set, beside the run's JSON
    as ``<run>.npz`` with keys ``MODE/SET/FIELD``, so later post-hoc analyses need no retraining."""
    import numpy as np

    arrays = {
        f"{mode}/{name}/{field}": np.asarray(v)
        for mode, outs in outputs.items()
        for name, o in outs.items()
        for field, v in o.items()
    }
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path.with_suffix(".npz"))


# ---- report ----------------------------------------------------------------------------------------
COLUMNS = (
    ("accuracy", "acc", 3),
    ("nll", "NLL", 3),
    ("ece", "ECE", 3),
    ("shift_ece", "shift ECE", 3),
    ("auroc_entropy", "AUROC H", 3),
    ("auroc_mutual_info", "AUROC MI", 3),
)


def load_results(results: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def _ms(vals: list[float], digits: int = 3, bare_single: bool = False) -> str:
    """mean ± std (ddof 1) of ``vals``; one value alone as ``v ± 0`` or, with ``bare_single``, ``v``."""
    a = np.array(vals, np.float64)
    if a.size == 0 or not np.all(np.isfinite(a)):
        return "—"
    if a.size == 1 and bare_single:
        return f"{a[0]:.{digits}f}"
    std = a.std(ddof=1) if a.size > 1 else 0.0
    return f"{a.mean():.{digits}f} ± {std:.{digits}f}"


def report(results: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for r in results:
        for mode, row in r["rows"].items():
            groups.setdefault((r["config"], r["n_train"], mode), []).append({**r, "row": row})
    head = (
        "| config | N | mode | seeds | val acc | val NLL | "
        + " | ".join(label for _, label, _ in COLUMNS)
        + " | total rank | rank std/mean |"
    )
    lines = [head, "|---|---:|---|---:|" + "---:|" * (len(COLUMNS) + 4)]
    for (name, n, mode), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        ranks = np.array([r["total_rank"] for r in runs], np.float64)
        rel = ranks.std(ddof=1) / ranks.mean() if ranks.size > 1 and ranks.mean() > 0 else float("nan")
        cells = [
            name,
            str(n),
            mode,
            str(len(runs)),
            _ms([r["row"]["validation"]["accuracy"] for r in runs if "validation" in r["row"]]),
            _ms([r["row"]["validation"]["nll"] for r in runs if "validation" in r["row"]]),
        ]
        for key, _, _ in COLUMNS:
            if key == "auroc_mutual_info" and mode != "mc":
                cells.append("—")
            else:
                cells.append(_ms([r["row"][key] for r in runs]))
        cells.append(f"{ranks.mean():.1f} ± {ranks.std(ddof=1) if ranks.size > 1 else 0.0:.1f}")
        cells.append("—" if math.isnan(rel) else f"{rel:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seeds_row(results: list[dict], name: str, n: int, mode: str) -> list[dict]:
    return [r["rows"][mode] | {"_run": r} for r in _runs(results, name, n) if mode in r["rows"]]


def _shift_nll(row: dict) -> float:
    return float(np.mean([v["nll"] for v in row["shift"].values()]))


def verdicts(results: list[dict], candidate: str, n: int) -> list[str]:
    """Issue #19's acceptance points 1–3 for ``candidate`` (MC rows) at training size ``n``, against
    the LoRA of the same recipe (``lora-paper`` for the paper recipe's configurations, when run)."""
    from bayeslora import metrics

    base = "lora"
    if candidate.startswith("paper") and _seeds_row(results, "lora-paper", n, "mean"):
        base = "lora-paper"
    cand = _seeds_row(results, candidate, n, "mc") or _seeds_row(results, candidate, n, "mean")
    lora = _seeds_row(results, base, n, "mean")
    temp = _seeds_row(results, base, n, "temperature")
    if not cand or not lora or not temp:
        return [f"no verdict: {candidate} or {base} missing at N = {n}"]
    k = min(len(cand), len(lora))

    def ms(rows: list[dict], f: Any) -> tuple[float, float]:
        a = np.array([f(r) for r in rows], np.float64)
        return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0

    acc, acc_l = ms(cand, lambda r: r["accuracy"]), ms(lora, lambda r: r["accuracy"])
    noise = 2.0 * math.sqrt((acc[1] ** 2 + acc_l[1] ** 2) / max(k, 1))
    ranks = np.array([r["_run"]["total_rank"] for r in cand], np.float64)
    init = cand[0]["_run"]["initial_total_rank"]
    rel = float(ranks.std(ddof=1) / ranks.mean()) if ranks.size > 1 and ranks.mean() > 0 else float("nan")
    ok1 = (acc[0] >= acc_l[0] - 0.01 or abs(acc[0] - acc_l[0]) <= noise) and ranks.mean() <= 0.5 * init
    ok1 = ok1 and ranks.size > 1 and rel <= 0.2
    out = [
        f"(baseline: `{base}`)",
        f"1. accuracy {acc[0]:.3f} vs LoRA {acc_l[0]:.3f} (2 SE of the difference {noise:.3f}), total rank "
        f"{ranks.mean():.1f} of {init} ({100 * ranks.mean() / init:.0f} %), rank std/mean "
        f"{'—' if math.isnan(rel) else f'{rel:.2f}'} over {ranks.size} seed(s): "
        f"**{'held' if ok1 else 'not held'}**",
    ]

    def calibration(a: list[dict], b: list[dict]) -> dict[str, tuple[tuple[float, float], ...]]:
        cols = {
            "ECE": lambda r: r["ece"],
            "NLL": lambda r: r["nll"],
            "shift ECE": lambda r: r["shift_ece"],
            "shift NLL": _shift_nll,
        }
        return {k: (ms(a, f), ms(b, f)) for k, f in cols.items()}

    pairs = calibration(cand, temp)
    ok2 = all(c[0] <= t[0] for c, t in pairs.values())
    cells = ", ".join(f"{k} {c[0]:.3f} vs {t[0]:.3f}" for k, (c, t) in pairs.items())
    out.append(f"2. against temperature-scaled LoRA: {cells}: **{'held' if ok2 else 'not held'}**")
    tempered = _seeds_row(results, candidate, n, "mc_temperature")
    if tempered:  # the same post-hoc step on BayesLoRA's MC predictive (runs that saved it)
        seeds = {r["_run"]["seed"] for r in tempered}
        temp_same = [r for r in temp if r["_run"]["seed"] in seeds]
        both = calibration(tempered, temp_same)
        ok2b = bool(temp_same) and all(c[0] <= t[0] for c, t in both.values())
        cells_b = ", ".join(f"{k} {c[0]:.3f} vs {t[0]:.3f}" for k, (c, t) in both.items())
        out.append(
            f"   - with a temperature on BayesLoRA's MC predictive too (fitted on the validation NLL, "
            f"seeds {sorted(seeds)}): {cells_b}: {'≤ on every column' if ok2b else 'not ≤ on every column'}"
        )
    scores = {key: ms(cand, lambda r, key=key: r[f"auroc_{key}"]) for key in metrics.UNCERTAINTY_SCORES}
    best = max(scores, key=lambda key: scores[key][0])
    lora_h = ms(lora, lambda r: r["auroc_entropy"])
    ok3 = scores[best][0] >= lora_h[0] and scores["mutual_info"][0] > 0.5
    out.append(
        f"3. best OOD AUROC ({best}) {scores[best][0]:.3f} vs LoRA's entropy {lora_h[0]:.3f}; MI AUROC "
        f"{scores['mutual_info'][0]:.3f}: **{'held' if ok3 else 'not held'}**"
    )
    return out


# ---- the section of RESULTS_methods.md (issue #19 acceptance 5) ---------------------------------
DEFAULT_CONFIG, LORA_CONFIG = "paper-val", "lora-paper"  # the default recipe (select) and its LoRA
# (hypothesis, what changes, config, control): each row is compared with its control at N = 2,000
HYPOTHESES = (
    ("H1", "KL strength: 1e-6·ΣKL without 1/N (paper) instead of 0.02·KL/N (vi)", "paper", "gate"),
    (
        "H1",
        "KL strength: 0.01·KL/N on the additive posterior instead of 1e-6·ΣKL (both select-then-refit)",
        "additive-refit-val (old cut)",
        "paper-val (old cut)",
    ),
    ("H2", "select (validation cut at 0.5), then refit — gate", "gate-refit-val (old cut)", "gate"),
    ("H2", "select (validation cut at 0.5), then refit — paper training", "paper-val", "paper"),
    ("H3", "gate by local reparameterisation in training", "gate-lrt", "gate"),
    ("H4", "rank stability: the cut measured from the best cut", "paper-val", "paper-val (old cut)"),
    (
        "H5",
        "MI per family: additive (σ²‖x‖² term) instead of gate",
        "additive-refit-val (old cut)",
        "gate-refit-val (old cut)",
    ),
    ("H6", "validation cut instead of a fixed τ = 4", "paper-val", "paper"),
    ("H6", "rank-budget controller on β (50 % by 0.5), then refit — gate", "gate-budget", "gate"),
    ("H6", "rank-budget controller on β — default training", "paper-budget", "paper-val"),
)


def load_all(results: Path) -> list[dict[str, Any]]:
    """This folder's runs and, renamed "<config> (old cut)", those of its ``-superseded`` sibling."""
    runs = load_results(results)
    old = results.with_name(results.name + "-superseded")
    if old.is_dir():
        for r in load_results(old):
            runs.append({**r, "config": f"{r['config']} (old cut)"})
    return runs


def _runs(results: list[dict], name: str, n: int) -> list[dict]:
    return [r for r in results if r["config"] == name and r["n_train"] == n]


def _best_auroc(row: dict) -> float:
    from bayeslora import metrics

    return max(row[f"auroc_{k}"] for k in metrics.UNCERTAINTY_SCORES if f"auroc_{k}" in row)


MODE_LABELS = {"mc_temperature": "mc + temperature"}


def _mode(r: dict) -> str:
    return "mc" if "mc" in r["rows"] else "mean"


def _cell(vals: list[float], digits: int = 3) -> str:
    return _ms(vals, digits, bare_single=True)


def methods_section(results: list[dict]) -> str:
    """N-curve, full-scale comparison and hypothesis table, in markdown."""
    ns = sorted({r["n_train"] for r in results if r["config"] in (DEFAULT_CONFIG, LORA_CONFIG)})
    full = max(ns) if ns else None
    out = [
        FIDELITY_BEGIN,
        "## Issue #19: the default recipe (`select`) against LoRA, and the hypotheses",
        "",
        "Generated by `python benches/bench_fidelity.py --report --methods benches/RESULTS_methods.md` "
        "from the raw runs in `benches/results/fidelity/` (`-superseded/`: the first cut rule). "
        f"`{DEFAULT_CONFIG}` is the default recipe of `bayeslora train` (`--recipe select`); "
        f"`{LORA_CONFIG}` is LoRA with the same targets, optimiser and budget. Test split; "
        "BayesLoRA scored with 8 posterior samples by the Rust runtime (mc) and at the posterior "
        "mean; LoRA's temperature fitted on the validation NLL. mean ± std over seeds.",
    ]
    if full is not None:
        out += ["", f"### At N = {full:,}", ""]
        out.append(
            "| run | seeds | steps | accuracy | NLL | ECE | shift ECE | shift NLL | OOD AUROC H | "
            "OOD AUROC MI | best OOD AUROC | total rank |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, modes in (
            (DEFAULT_CONFIG, ("mc", "mc_temperature", "mean")),
            (LORA_CONFIG, ("mean", "temperature")),
        ):
            runs = _runs(results, name, full)
            for mode in modes:
                rows = [r["rows"][mode] for r in runs if mode in r["rows"]]
                if not rows:
                    continue
                out.append(
                    "| "
                    + " | ".join(
                        [
                            f"{name} ({MODE_LABELS.get(mode, mode)})",
                            str(len(rows)),
                            str(runs[0]["steps"]),
                            _cell([x["accuracy"] for x in rows]),
                            _cell([x["nll"] for x in rows]),
                            _cell([x["ece"] for x in rows]),
                            _cell([x["shift_ece"] for x in rows]),
                            _cell([_shift_nll(x) for x in rows]),
                            _cell([x["auroc_entropy"] for x in rows]),
                            _cell([x["auroc_mutual_info"] for x in rows]) if mode == "mc" else "—",
                            _cell([_best_auroc(x) for x in rows]),
                            _cell([r["total_rank"] for r in runs], 1),
                        ]
                    )
                    + " |"
                )
        out += ["", f"Acceptance points for `{DEFAULT_CONFIG}` at N = {full:,}:", ""]
        out += verdicts(results, DEFAULT_CONFIG, full)
    out += ["", "### N-curve", ""]
    out.append(
        "| N | steps | seeds | LoRA accuracy | BayesLoRA accuracy (mc) | Δ accuracy | LoRA + T NLL | "
        "BayesLoRA NLL | BayesLoRA total rank |"
    )
    out.append("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in ns:
        lo, bl = _runs(results, LORA_CONFIG, n), _runs(results, DEFAULT_CONFIG, n)
        if not lo or not bl:
            continue
        la = [r["rows"]["mean"]["accuracy"] for r in lo]
        ba = [r["rows"][_mode(r)]["accuracy"] for r in bl]
        out.append(
            f"| {n:,} | {bl[0]['steps']} | {len(lo)} / {len(bl)} | {_cell(la)} | {_cell(ba)} | "
            f"{np.mean(ba) - np.mean(la):+.3f} | "
            f"{_cell([r['rows']['temperature']['nll'] for r in lo])} | "
            f"{_cell([r['rows'][_mode(r)]['nll'] for r in bl])} | "
            f"{_cell([r['total_rank'] for r in bl], 1)} / {bl[0]['initial_total_rank']} |"
        )
    n = 2000
    out += ["", f"### Hypotheses (N = {n:,}, 3 epochs; val = validation split; Δ = row − control)", ""]
    out.append(
        "| H | change | config (control) | seeds | val accuracy | Δ val acc | total rank | Δ rank | "
        "rank std/mean | ECE (mc) | Δ ECE | OOD AUROC H | OOD AUROC MI |"
    )
    out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for h, what, name, control in HYPOTHESES:
        runs, ctrl = _runs(results, name, n), _runs(results, control, n)
        if not runs:
            out.append(f"| {h} | {what} | `{name}` (`{control}`) | 0 | not run | | | | | | | | |")
            continue

        def m(rs: list[dict], f: Any) -> float:
            return float(np.mean([f(r) for r in rs])) if rs else float("nan")

        va = lambda r: r["rows"][_mode(r)]["validation"]["accuracy"]  # noqa: E731
        ece = lambda r: r["rows"][_mode(r)]["ece"]  # noqa: E731
        rk = np.array([r["total_rank"] for r in runs], np.float64)
        rel = f"{rk.std(ddof=1) / rk.mean():.2f}" if rk.size > 1 and rk.mean() > 0 else "—"
        out.append(
            f"| {h} | {what} | `{name}` (`{control}`) | {len(runs)} | {_cell([va(r) for r in runs])} | "
            f"{m(runs, va) - m(ctrl, va):+.3f} | {_cell(list(rk), 1)} / {runs[0]['initial_total_rank']} | "
            f"{m(runs, lambda r: r['total_rank']) - m(ctrl, lambda r: r['total_rank']):+.1f} | {rel} | "
            f"{_cell([ece(r) for r in runs])} | {m(runs, ece) - m(ctrl, ece):+.3f} | "
            f"{_cell([r['rows'][_mode(r)]['auroc_entropy'] for r in runs])} | "
            + (_cell([r["rows"]["mc"]["auroc_mutual_info"] for r in runs if "mc" in r["rows"]]))
            + " |"
        )
    out.append(FIDELITY_END)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["lora", "gate"], choices=sorted(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--n-train", nargs="+", type=int, default=[2000], help="training-set sizes")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--results", default=str(RESULTS), help="folder of the per-run JSON files")
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-eval", type=int, default=None, help="cap every evaluation set (smoke runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="print the table of what is in results/")
    ap.add_argument(
        "--candidate", nargs="*", default=[], help="with --report: acceptance verdicts for these configs"
    )
    ap.add_argument("--write", default=None, help="with --report: also write the report to this .md file")
    ap.add_argument(
        "--methods",
        default=None,
        help="with --report: write the N-curve and hypothesis section into this .md (between markers)",
    )
    args = ap.parse_args(argv)
    if args.report:
        results = load_results(Path(args.results))
        text = [
            "# BayesLoRA fidelity (issue #19): configurations × N × seeds",
            "",
            "Generated by `python benches/bench_fidelity.py --report --candidate ... --write "
            "benches/RESULTS_fidelity.md` from the raw per-run JSON in `benches/results/fidelity/`. "
            "Test split unless the column says val; mc = averaged over the posterior samples the run "
            "used (Rust runtime), mean = one pass at the posterior mean; lora's temperature row is "
            "fitted on the validation NLL.",
            "",
            "## What each configuration tests",
            "",
            "| config | tests |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in TESTS.items() if any(r["config"] == k for r in results)),
            "",
            "## Results",
            "",
            report(results),
        ]
        for cand in args.candidate:
            for n in sorted({r["n_train"] for r in results if r["config"] == cand}):
                text += ["", f"## Acceptance points for `{cand}`, N = {n}", ""]
                text += verdicts(results, cand, n)
        out = "\n".join(text) + "\n"
        print(out)
        if args.write:
            Path(args.write).write_text(out)
        if args.methods:
            section = methods_section(load_all(Path(args.results)))
            write_marked(Path(args.methods), FIDELITY_BEGIN, FIDELITY_END, section)
            print(section)
        return 0

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()

    def log(*a: Any) -> None:
        print(*a, file=sys.stderr, flush=True)

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for n in args.n_train:
            for name in args.configs:
                path = result_path(results, name, n, seed)
                if path.exists():
                    continue
                t0 = time.perf_counter()
                res = run_one(name, n, seed, args, log)
                res["wall_seconds"] = time.perf_counter() - t0
                res["command"] = " ".join(["python benches/bench_fidelity.py", *sys.argv[1:]])
                save_outputs(path, res.pop("_outputs"))
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(res, indent=1, default=str))
                tmp.replace(path)
                row = res["rows"].get("mc", res["rows"]["mean"])
                log(
                    f"{name:24} N={n} seed {seed}: acc {row['accuracy']:.3f} NLL {row['nll']:.3f} "
                    f"ECE {row['ece']:.3f} AUROC(H) {row['auroc_entropy']:.3f} "
                    f"AUROC(MI) {row.get('auroc_mutual_info', float('nan')):.3f} rank {res['total_rank']} "
                    f"({res['wall_seconds']:.0f} s)"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
