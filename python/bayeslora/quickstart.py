"""``bayeslora quickstart``: the whole idea in one command on the default model and data.

Trains BayesLoRA and plain LoRA with the same budget and seed on VADER movie-review snippets with
all-MiniLM-L6-v2, compares learned ranks, accuracy and calibration on the held-out test split,
measures out-of-domain detection (BBC News articles and NYT editorial snippets as OOD), exports the
BayesLoRA bundle, scores in- and out-of-domain sentences with the torch-free Rust runtime, and
writes ``report.md`` with PNG plots to ``--out``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .train.pipeline import TrainSettings, predict, train

# The quickstart's budget: a few minutes per run on 2 CPU cores. Tuned on the validation split only.
QUICK = {"max_train": 2000, "epochs": 3.0, "max_length": 48, "samples": 8}
OOD_SETS = ("bbc", "vader-nyt")
OOD_PER_SET = 250
SHOWCASE_IN = [
    "A warm, funny and beautifully acted film.",
    "The plot is a mess and the jokes fall flat.",
    "An uneven but ultimately rewarding drama.",
]
SHOWCASE_OUT = [
    "The central bank raised interest rates by a quarter point on Thursday.",
    "The striker scored twice as the home side won the league title.",
    "Parliament will vote on the new budget proposal next week.",
]


def _scores(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from . import metrics

    return metrics.uncertainty_scores(fields)


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def run_quickstart(
    out: str | Path,
    seed: int = 0,
    max_train: int | None = None,
    epochs: float | None = None,
    quiet: bool = False,
    max_eval: int | None = None,
) -> dict[str, Any]:
    """Run the quickstart; returns a JSON-able summary (also written to ``out/quickstart.json``)."""
    from . import metrics, plots
    from .data import load_dataset
    from .train.pipeline import _check_writable

    def say(*a: Any) -> None:
        if not quiet:
            print(*a, flush=True)

    out = Path(out)
    _check_writable(out)
    t_start = time.perf_counter()
    budget = dict(QUICK)
    if max_train is not None:
        budget["max_train"] = max_train
    if epochs is not None:
        budget["epochs"] = epochs
    runs: dict[str, dict[str, Any]] = {}
    for name, method in (("bayeslora", "bayeslora"), ("lora", "lora")):
        say(f"\n== training {name} ({budget['max_train']} examples, {budget['epochs']} epochs, seed {seed})")
        train_budget = {**budget, "samples": 0}  # MC evaluation happens once, below
        settings = TrainSettings(method=method, seed=seed, max_eval=max_eval, **train_budget)
        runs[name] = train(settings, out / name, progress=not quiet, log=say)
    data = runs["bayeslora"]["data"]
    test_texts, test_labels = data.test.texts[:max_eval], data.test.labels[:max_eval]
    per_ood = OOD_PER_SET if max_eval is None else min(OOD_PER_SET, max_eval)

    say("\n== exporting the BayesLoRA bundle (the Rust runtime scores it, without torch)")
    from .formats.bundle import export
    from .runtime import Scorer

    bundle = out / "bundle"
    export(
        runs["bayeslora"]["model"], runs["bayeslora"]["tokenizer"], bundle, max_length=budget["max_length"]
    )
    scorer = Scorer(bundle, num_threads=2)

    say(
        f"\n== evaluating on the test split and on out-of-domain text (BayesLoRA: {budget['samples']} "
        "posterior samples in the Rust runtime; LoRA: one pass in torch)"
    )
    ood_texts: list[str] = []
    for ood_name in OOD_SETS:
        ood = load_dataset(ood_name, seed=seed)
        ood_texts += list(ood.train.texts[:per_ood])  # shuffled, all topics
    results: dict[str, Any] = {}
    # docs/method.md §6 fields (probs [N, C] averaged over samples, entropy, mutual_info, ...) per run,
    # (test split, out-of-domain)
    fields: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
    for name, run in runs.items():
        if name == "bayeslora":
            f_in = scorer.score(test_texts, samples=budget["samples"], seed=seed)
            f_out = scorer.score(ood_texts, samples=budget["samples"], seed=seed)
        else:
            f_in, f_out = (
                metrics.uncertainty(
                    predict(run["model"], run["tokenizer"], texts, 0, seed, budget["max_length"])
                )
                for texts in (test_texts, ood_texts)
            )
        fields[name] = (f_in, f_out)
        s_in, s_out = _scores(f_in), _scores(f_out)
        results[name] = {
            **{k: float(v) for k, v in metrics.summary(f_in["probs"], test_labels).items()},
            "total_rank": run["total_rank"],
            "initial_total_rank": run["initial_total_rank"],
            "adapter_parameters": run["adapter_parameters"],
            "train_seconds": run["train_seconds"],
            "ood_auroc": {k: metrics.auroc(s_in[k], s_out[k]) for k in s_in},
            "ood_fpr95": {k: metrics.fpr_at_95_tpr(s_in[k], s_out[k]) for k in s_in},
        }

    say("\n== scoring example sentences with the Rust runtime")
    showcase = SHOWCASE_IN + SHOWCASE_OUT
    scored = scorer.score(showcase, samples=32, seed=seed)
    names = list(data.label_names)
    showcase_rows = [
        {
            "text": text,
            "domain": "in" if i < len(SHOWCASE_IN) else "out",
            "label": names[int(scored["label"][i])],
            "confidence": float(scored["confidence"][i]),
            "entropy": float(scored["entropy"][i]),
            "mutual_info": float(scored["mutual_info"][i]),
        }
        for i, text in enumerate(showcase)
    ]

    say("\n== writing the report")
    figs = out / "figures"
    plots.reliability_diagram(
        figs / "reliability_bayeslora.png",
        fields["bayeslora"][0]["probs"],
        test_labels,
        title="BayesLoRA (MC mean) — test split",
    )
    plots.reliability_diagram(
        figs / "reliability_lora.png", fields["lora"][0]["probs"], test_labels, title="LoRA — test split"
    )
    plots.rank_bars(figs / "ranks.png", runs["bayeslora"]["initial_ranks"], runs["bayeslora"]["ranks"])
    for name, key in (("bayeslora", "mutual_info"), ("bayeslora", "entropy"), ("lora", "entropy")):
        f_in, f_out = fields[name]
        plots.score_histograms(
            figs / f"hist_{name}_{key}.png",
            _scores(f_in)[key],
            _scores(f_out)[key],
            name=f"{name}: {key}",
            labels=("movie reviews (test)", "BBC + NYT (OOD)"),
        )
    summary = {
        "seed": seed,
        "budget": budget,
        "results": results,
        "ranks": {"initial": runs["bayeslora"]["initial_ranks"], "learned": runs["bayeslora"]["ranks"]},
        "settings": {k: runs["bayeslora"]["settings"][k] for k in ("recipe", "posterior", "rank", "targets")},
        "showcase": showcase_rows,
        "bundle": str(bundle),
        "seconds": time.perf_counter() - t_start,
    }
    report = out / "report.md"
    report.write_text(_report(summary))
    summary["report"] = str(report)
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2))
    say(_console_table(summary))
    return summary


def _console_table(s: dict[str, Any]) -> str:
    r = s["results"]
    lines = ["", f"{'':28}{'BayesLoRA':>12}{'LoRA':>12}"]
    for key, label in (
        ("accuracy", "test accuracy"),
        ("nll", "test NLL"),
        ("ece", "test ECE"),
        ("brier", "test Brier"),
    ):
        lines.append(f"{label:28}{r['bayeslora'][key]:12.4f}{r['lora'][key]:12.4f}")
    lines.append(
        f"{'OOD AUROC (entropy)':28}{r['bayeslora']['ood_auroc']['entropy']:12.4f}"
        f"{r['lora']['ood_auroc']['entropy']:12.4f}"
    )
    lines.append(f"{'total rank':28}{r['bayeslora']['total_rank']:>12}{r['lora']['total_rank']:>12}")
    lines.append("\nlearned rank per module (BayesLoRA):")
    for name, rank in s["ranks"]["learned"].items():
        lines.append(f"  {name:60} {rank} / {s['ranks']['initial'][name]}")
    lines.append("\nRust runtime, 32 posterior samples:")
    for row in s["showcase"]:
        lines.append(
            f"  [{row['domain']:>3}] {row['label']:>8} conf {row['confidence']:.3f} "
            f"MI {row['mutual_info']:.4f}  {row['text']}"
        )
    return "\n".join(lines)


def _report(s: dict[str, Any]) -> str:
    r = s["results"]
    b, lo = r["bayeslora"], r["lora"]
    rows = [
        ("accuracy", "accuracy"),
        ("NLL", "nll"),
        ("ECE (15 bins)", "ece"),
        ("MCE", "mce"),
        ("Brier", "brier"),
    ]
    table = "\n".join(f"| {label} | {_fmt(b[k])} | {_fmt(lo[k])} |" for label, k in rows)
    ood = "\n".join(
        f"| AUROC, {k} | {_fmt(b['ood_auroc'][k])} | {_fmt(lo['ood_auroc'][k])} |\n"
        f"| FPR@95%TPR, {k} | {_fmt(b['ood_fpr95'][k])} | {_fmt(lo['ood_fpr95'][k])} |"
        for k in ("entropy", "mutual_info", "1-confidence")
    )
    ranks = "\n".join(
        f"| `{n}` | {s['ranks']['initial'][n]} | {v} |" for n, v in s["ranks"]["learned"].items()
    )
    shows = "\n".join(
        f"| {row['domain']} | {row['text']} | {row['label']} | {row['confidence']:.3f} | "
        f"{row['entropy']:.4f} | "
        f"{row['mutual_info']:.5f} |"
        for row in s["showcase"]
    )
    bud = s["budget"]
    st = s["settings"]
    targets = "/".join(st["targets"])
    lo_rank = f"{lo['total_rank']} / {lo['initial_total_rank']}"
    return f"""# bayeslora quickstart report

Model all-MiniLM-L6-v2, data VADER movie-review snippets (binarised at |rating| ≥ 0.5), seed {s["seed"]};
{bud["max_train"]} training examples, {bud["epochs"]} epochs, max length {bud["max_length"]};
rank {st["rank"]} on {targets} of all 6 layers, recipe `{st["recipe"]}` ({st["posterior"]} posterior;
LoRA trained with the same recipe's optimiser, targets and budget). BayesLoRA is evaluated from its
exported bundle by the Rust runtime with {bud["samples"]} posterior samples (probabilities averaged),
LoRA in torch in its single deterministic pass.
Total time {s["seconds"]:.0f} s.

## Test split (held out)

| metric | BayesLoRA | LoRA |
|---|---:|---:|
{table}
| total active rank | {b["total_rank"]} / {b["initial_total_rank"]} | {lo_rank} |
| adapter parameters | {b["adapter_parameters"]:,} | {lo["adapter_parameters"]:,} |
| training time (s) | {b["train_seconds"]:.0f} | {lo["train_seconds"]:.0f} |

![reliability BayesLoRA](figures/reliability_bayeslora.png) ![reliability LoRA](figures/reliability_lora.png)

## Out-of-domain detection (test split vs BBC News + NYT editorial snippets)

Higher uncertainty should mean out-of-domain. For LoRA, mutual information is 0 (one deterministic pass).

| score | BayesLoRA | LoRA |
|---|---:|---:|
{ood}

![MI histogram](figures/hist_bayeslora_mutual_info.png)
![entropy BayesLoRA](figures/hist_bayeslora_entropy.png)
![entropy LoRA](figures/hist_lora_entropy.png)

## Learned rank per module

| module | initial | learned |
|---|---:|---:|
{ranks}

![ranks](figures/ranks.png)

## Scored by the Rust runtime from `bundle/` (32 posterior samples, no torch)

| domain | text | label | confidence | entropy | mutual info |
|---|---|---|---:|---:|---:|
{shows}
"""
