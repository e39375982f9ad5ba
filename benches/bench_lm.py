"""BayesLoRA vs LoRA on a causal LM (issue #14): SmolLM2-135M-Instruct on Shakespeare, resumable.

Every run fine-tunes SmolLM2-135M-Instruct (``bayeslora.data.lm_model``) on blocks of the training
plays with one configuration (``CONFIGS``: overrides of ``LMSettings``), then scores the validation
plays, the test plays and the out-of-domain fortunes (cut into blocks alike) in mean mode and, for
BayesLoRA, under the posterior predictive with ``--samples`` samples (``bl.lm.evaluate``). Each
run's raw result is one JSON file, ``benches/results/lm/<config>__s<seed>.json`` (per-sequence
scores included); a run whose file exists is skipped, so an interrupted sweep resumes.

    python benches/bench_lm.py --configs lora bayes-t0.1 --seeds 0      # run (skips finished runs)
    python benches/bench_lm.py --report                                 # tables from the JSON

The rule, written before the runs (choose on validation, report on test): the KL tempering
(``kl_temper``: kl_scale = kl_temper / T̄, T̄ the predicted tokens per training block) is chosen as
the one with the lowest validation NLL of the posterior predictive (MC); rows report the test
plays, mean ± std over the seeds present.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "lm"

# name -> overrides of LMSettings
CONFIGS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "bayes-t1": {"kl_temper": 1.0},  # the per-sequence ELBO's KL, untempered
    "bayes-t0.3": {"kl_temper": 0.3},
    "bayes-t0.1": {"kl_temper": 0.1},
    "bayes-t0.01": {"kl_temper": 0.01},
    "bayes-t0": {"kl_temper": 0.0},  # no KL: the posterior's variance is fitted by the likelihood alone
}
OOD = "fortunes"


def result_path(results: Path, name: str, seed: int) -> Path:
    return results / f"{name}__s{seed}.json"


def run_one(name: str, seed: int, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """Train configuration ``name`` with ``seed`` and score validation, test and OOD blocks."""
    import tempfile

    from transformers import AutoTokenizer

    from bayeslora import metrics
    from bayeslora.data.text import load_text_source
    from bayeslora.lm_evaluation import SEQUENCE_SCORES
    from bayeslora.train.lm_data import source_rows
    from bayeslora.train.lm_pipeline import LMSettings, lm_metrics, scalar_metrics, train_lm

    settings = LMSettings(
        seed=seed,
        max_train=args.n_train,
        max_length=args.max_length,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_eval=args.max_eval,
        samples=0,  # the MC passes are below, once each
        **CONFIGS[name],
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = train_lm(settings, Path(tmp) / "run", progress=False, log=log)
        train_wall = time.perf_counter() - t0
    model = summary["model"]
    tokenizer = AutoTokenizer.from_pretrained(summary["base_model"])
    plays, ood = load_text_source("shakespeare", seed), load_text_source(OOD, seed)
    rows = {
        "validation": source_rows(tokenizer, plays, "validation", args.max_length),
        "test": source_rows(tokenizer, plays, "test", args.max_length),
        "ood": source_rows(tokenizer, ood, "test", args.max_length),
    }
    bayes = settings.method != "lora"
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    for part, r in rows.items():
        r = r[: args.max_eval]
        out[part] = {"mean": lm_metrics(model, r, 0, seed)}
        if bayes:
            out[part]["mc"] = lm_metrics(model, r, args.samples, seed)
    eval_wall = time.perf_counter() - t0
    mode = "mc" if bayes else "mean"
    auroc = {
        k: metrics.auroc(out["test"][mode][k], out["ood"][mode][k])
        for k in SEQUENCE_SCORES
        if not (k == "sequence_mutual_info" and not bayes)
    }
    return {
        "config": name,
        "seed": seed,
        "settings": summary["settings"],
        "kl_scale": summary["kl_scale"],
        "tokens_per_sequence": summary["tokens_per_sequence"],
        "num_train": summary["num_train"],
        "train_seconds": summary["train_seconds"],
        "train_cpu_seconds": summary["train_cpu_seconds"],
        "train_wall_seconds": train_wall,
        "eval_wall_seconds": eval_wall,
        "samples": args.samples if bayes else 0,
        "threads": args.threads,
        "ranks": summary["ranks"],
        "total_rank": summary["total_rank"],
        "initial_total_rank": summary["initial_total_rank"],
        "adapter_parameters": summary["adapter_parameters"],
        "prune_history": summary["prune_history"],
        "auroc_ood": auroc,
        **out,
        "scalars": {part: {m: scalar_metrics(v) for m, v in res.items()} for part, res in out.items()},
    }


def load_results(results: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def _ms(vals: list[float], digits: int = 3) -> str:
    if not vals:
        return "—"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _best(r: dict) -> str:
    return "mc" if "mc" in r["scalars"]["test"] else "mean"


def chosen(results: list[dict[str, Any]]) -> str | None:
    """The BayesLoRA configuration with the lowest validation MC NLL, compared on the seeds every
    BayesLoRA configuration has run (mean over those seeds)."""
    by: dict[str, dict[int, float]] = {}
    for r in results:
        if r["config"] != "lora":
            by.setdefault(r["config"], {})[r["seed"]] = r["scalars"]["validation"]["mc"]["nll"]
    if not by:
        return None
    common = set.intersection(*(set(v) for v in by.values()))
    if not common:
        return None
    return min(by, key=lambda k: sum(by[k][s] for s in common) / len(common))


def report(results: list[dict[str, Any]]) -> str:
    """Markdown tables: the validation sweep, then the test rows (mean ± std over seeds)."""
    if not results:
        return "no results yet"
    r0 = results[0]
    s = r0["settings"]
    names = [n for n in CONFIGS if any(r["config"] == n for r in results)]
    lines = [
        f"SmolLM2-135M-Instruct, rank {s['rank']} on {s['targets'] or 'q_proj, v_proj'} of 30 layers; "
        f"{r0['num_train']} training blocks of {s['max_length']} tokens from 33 plays, "
        f"{s['epochs']:g} epoch(s), batch {s['batch_size']}; evaluation ≤ {s['max_eval']} blocks per set; "
        f"MC with S = {r0.get('samples') or '—'} (BayesLoRA). `python benches/bench_lm.py --report`.",
        "",
        "Validation (Twelfth Night, Julius Caesar): the choice of the KL tempering.",
        "",
        "| config | seeds | kl_scale | total rank | val NLL (mean) | val NLL (MC) | val ppl (MC or mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        rs = [r for r in results if r["config"] == n]
        v = [r["scalars"]["validation"] for r in rs]
        lines.append(
            f"| {n} | {len(rs)} | {'—' if n == 'lora' else format(rs[0]['kl_scale'], '.3g')} | "
            f"{_ms([r['total_rank'] for r in rs], 0)}/{rs[0]['initial_total_rank']} | "
            f"{_ms([x['mean']['nll'] for x in v], 4)} | "
            f"{_ms([x['mc']['nll'] for x in v if 'mc' in x], 4)} | "
            f"{_ms([x[_best(r)]['perplexity'] for x, r in zip(v, rs, strict=True)], 2)} |"
        )
    pick = chosen(results)
    lines += [
        "",
        f"Chosen on validation MC NLL (on the seeds all BayesLoRA rows share): **{pick}**." if pick else "",
        "",
        "Test (Macbeth, The Tempest, Richard II) and out-of-domain text (FreeBSD fortunes); BayesLoRA "
        "rows under the posterior predictive (MC), LoRA in mean mode; AUROC: the per-sequence score "
        "separating fortunes (positive) from test plays.",
        "",
        "| config | seeds | test ppl | token acc | token ECE | test ppl (mean mode) | OOD ppl | "
        "AUROC seq. NLL | AUROC seq. entropy | AUROC seq. MI |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        rs = [r for r in results if r["config"] == n]
        t = [r["scalars"]["test"][_best(r)] for r in rs]
        o = [r["scalars"]["ood"][_best(r)] for r in rs]
        au = [r["auroc_ood"] for r in rs]
        mi = [a["sequence_mutual_info"] for a in au if "sequence_mutual_info" in a]
        lines.append(
            f"| {n} | {len(rs)} | {_ms([x['perplexity'] for x in t], 2)} | "
            f"{_ms([x['token_accuracy'] for x in t], 4)} | {_ms([x['ece'] for x in t], 4)} | "
            f"{_ms([r['scalars']['test']['mean']['perplexity'] for r in rs], 2)} | "
            f"{_ms([x['perplexity'] for x in o], 1)} | {_ms([a['sequence_nll'] for a in au])} | "
            f"{_ms([a['sequence_entropy'] for a in au])} | {_ms(mi) if mi else '—'} |"
        )
    if pick:
        lines += ["", f"Learned rank per module ({pick}, per seed):", ""]
        for r in results:
            if r["config"] == pick:
                kept = sorted(set(r["ranks"].values()))
                lines.append(
                    f"- seed {r['seed']}: total {r['total_rank']}/{r['initial_total_rank']}; "
                    f"ranks per module in {kept}"
                )
    lines += [
        "",
        "Time per run (train wall / CPU seconds): "
        + ", ".join(
            f"{r['config']} s{r['seed']} {r['train_wall_seconds']:.0f}/{r['train_cpu_seconds']:.0f}"
            for r in results
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["lora", "bayes-t0.1"], choices=sorted(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--n-train", type=int, default=384, help="training blocks")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per block")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-eval", type=int, default=48, help="blocks per evaluation set")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--report", action="store_true", help="print the tables of what is in --results")
    ap.add_argument("--write", default=None, help="with --report: also write the report to this file")
    args = ap.parse_args(argv)
    results = Path(args.results)
    if args.report:
        text = report(load_results(results))
        print(text)
        if args.write:
            Path(args.write).write_text(text)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    results.mkdir(parents=True, exist_ok=True)

    def log(*a: Any) -> None:
        print(*a, flush=True)

    for seed in args.seeds:
        for name in args.configs:
            path = result_path(results, name, seed)
            if path.exists():
                log(f"[bench_lm] {path.name} exists: skipped")
                continue
            log(f"[bench_lm] {name} seed {seed} ...")
            res = run_one(name, seed, args, log)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1, default=float))
            tmp.replace(path)
            t = res["scalars"]["validation"]
            log(
                f"[bench_lm] {name} s{seed}: val nll mean {t['mean']['nll']:.4f}"
                + (f" mc {t['mc']['nll']:.4f}" if "mc" in t else "")
                + f", rank {res['total_rank']}/{res['initial_total_rank']}, "
                f"train {res['train_wall_seconds']:.0f}s eval {res['eval_wall_seconds']:.0f}s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
