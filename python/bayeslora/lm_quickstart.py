"""``bayeslora quickstart --task causal-lm``: BayesLoRA vs LoRA on a causal LM, in minutes on a CPU.

Fine-tunes SmolLM2-135M-Instruct (``data.lm_model``) on blocks of Shakespeare's plays (33 training
plays; held-out plays for validation and test, ``data.text``) with BayesLoRA and with plain LoRA, the
same budget and seed, then reports per method: the held-out plays' perplexity, token accuracy and
token ECE (mean mode, and MC for BayesLoRA), the perplexity of out-of-domain text (FreeBSD fortunes,
cut into blocks alike), whether the per-sequence scores (mean NLL, mutual information) tell the
fortunes from the plays (AUROC), and the learned rank per module. Writes ``quickstart.json`` and
``report.md`` to ``--out``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

# A few minutes per run on 2 CPU cores: short blocks, a few hundred of them, one epoch; the settings
# of benches/bench_lm.py's default runs, so the quickstart's numbers are its seed-0 rows.
QUICK_LM = {"max_train": 384, "max_length": 64, "batch_size": 8, "epochs": 1.0}
QUICK_EVAL = {"samples": 4, "max_eval": 48}
OOD = "fortunes"


def run_lm_quickstart(
    out: str | Path,
    seed: int = 0,
    max_train: int | None = None,
    epochs: float | None = None,
    quiet: bool = False,
    max_eval: int | None = None,
) -> dict[str, Any]:
    """Run the causal-LM quickstart; returns a JSON-able summary (also ``out/quickstart.json``)."""
    from .lm_evaluation import evaluate_lm
    from .train.lm_pipeline import LMSettings, train_lm
    from .train.pipeline import _check_writable

    def say(*a: Any) -> None:
        if not quiet:
            print(*a, flush=True)

    out = Path(out)
    _check_writable(out)
    quick = {**QUICK_LM, "seed": seed, "samples": 0}  # evaluate_lm does the MC evaluation below
    if max_train is not None:
        quick["max_train"] = max_train
    if epochs is not None:
        quick["epochs"] = epochs
    n_eval = QUICK_EVAL["max_eval"] if max_eval is None else max_eval
    samples = QUICK_EVAL["samples"]
    runs: dict[str, Any] = {}
    for method in ("bayeslora", "lora"):
        settings = LMSettings(method=method, max_eval=n_eval, **quick)  # type: ignore[arg-type]
        say(f"[quickstart] training {method} on SmolLM2-135M-Instruct, Shakespeare blocks ...")
        t0 = time.perf_counter()
        summary = train_lm(settings, out / method, progress=not quiet, log=say)
        seconds = time.perf_counter() - t0
        res = evaluate_lm(
            out / method, data="shakespeare", ood=[OOD], samples=samples, seed=seed, max_eval=n_eval
        )
        runs[method] = {
            "train_seconds": summary["train_seconds"],
            "run_seconds": seconds,
            "num_train": summary["num_train"],
            "total_rank": summary["total_rank"],
            "initial_total_rank": summary["initial_total_rank"],
            "ranks": summary["ranks"],
            "kl_scale": summary["kl_scale"],
            "test": res["in_domain"],
            "ood": res["ood"][OOD],
            "test_blocks": res["n"],
        }
    result = {
        "model": "SmolLM2-135M-Instruct",
        "data": "shakespeare",
        "ood": OOD,
        "seed": seed,
        "settings": quick,
        "samples": samples,
        "max_eval": n_eval,
        "runs": runs,
    }
    (out / "quickstart.json").write_text(json.dumps(result, indent=2))
    report = out / "report.md"
    report.write_text(lm_report(result))
    say(lm_report(result))
    result["report"] = str(report)
    return result


def lm_report(r: dict[str, Any]) -> str:
    """The quickstart's markdown report."""
    lines = [
        f"# Causal-LM quickstart: {r['model']} on Shakespeare (seed {r['seed']})",
        "",
        f"{r['settings']['max_train']} training blocks of {r['settings']['max_length']} tokens, "
        f"{r['settings']['epochs']:g} epoch; test: the held-out plays (≤ {r['max_eval']} blocks); OOD: "
        f"{r['ood']} (≤ {r['max_eval']} blocks); MC with S = {r['samples']}.",
        "",
        "| method | total rank | test ppl (mean) | test ppl (MC) | token acc | token ECE | "
        "OOD ppl | AUROC seq. NLL | AUROC seq. MI |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, run in r["runs"].items():
        mean, mc = run["test"]["mean"], run["test"].get("mc")
        best = mc or mean
        ood = run["ood"]
        mi = f"{ood['auroc_sequence_mutual_info']:.3f}" if mc else "—"
        mc_ppl = f"{mc['perplexity']:.2f}" if mc else "—"
        lines.append(
            f"| {method} | {run['total_rank']}/{run['initial_total_rank']} | {mean['perplexity']:.2f} | "
            f"{mc_ppl} | {best['token_accuracy']:.4f} | {best['ece']:.4f} | {ood['perplexity']:.2f} | "
            f"{ood['auroc_sequence_nll']:.3f} | {mi} |"
        )
    bayes = r["runs"].get("bayeslora")
    if bayes:
        lines += ["", "Learned rank per module (BayesLoRA):", ""]
        by_rank: dict[int, list[str]] = {}
        for name, k in bayes["ranks"].items():
            by_rank.setdefault(int(k), []).append(name)
        for k in sorted(by_rank, reverse=True):
            names = by_rank[k]
            lines.append(
                f"- rank {k}: {len(names)} modules ({', '.join(names[:4])}{' …' if len(names) > 4 else ''})"
            )
    lines.append("")
    return "\n".join(lines)
