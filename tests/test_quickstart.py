"""`bayeslora quickstart` and `bayeslora evaluate` end to end on the real MiniLM with a tiny budget."""

from __future__ import annotations

import json
import subprocess

import pytest

from subprocesses import run_cli


def _cli(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return run_cli(args, env_extra={"HF_HUB_OFFLINE": "1"}, timeout=timeout)


@pytest.mark.slow
def test_quickstart_smoke_and_evaluate_both_engines(tmp_path):
    out = tmp_path / "qs"
    res = _cli(
        "quickstart", "--out", str(out), "--max-train", "64", "--epochs", "1", "--max-eval", "48", "--json"
    )
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    for method in ("bayeslora", "lora"):
        r = summary["results"][method]
        assert 0 <= r["accuracy"] <= 1 and r["nll"] > 0 and 0 <= r["ece"] <= 1
        assert 0 <= r["ood_auroc"]["entropy"] <= 1
    # rank 8 on query, key, value, attention output, intermediate, output of 6 layers
    assert (
        summary["results"]["lora"]["total_rank"]
        == summary["results"]["bayeslora"]["initial_total_rank"]
        == 288
    )
    assert summary["settings"]["recipe"] == "select" and summary["settings"]["posterior"] == "additive"
    assert len(summary["showcase"]) == 6
    report = (out / "report.md").read_text()
    assert "Learned rank per module" in report and "Rust runtime" in report
    for png in (
        "reliability_bayeslora.png",
        "reliability_lora.png",
        "ranks.png",
        "hist_bayeslora_mutual_info.png",
    ):
        assert (out / "figures" / png).stat().st_size > 1000, png

    # evaluate: the checkpoint through torch and its bundle through the Rust runtime agree in mean mode
    common = [
        "--data",
        "vader-movies",
        "--ood",
        "bbc",
        "--shift",
        "vader-tweets",
        "--samples",
        "0",
        "--max-eval",
        "40",
        "--json",
    ]
    torch_res = _cli("evaluate", str(out / "bayeslora"), *common)
    assert torch_res.returncode == 0, torch_res.stderr[-3000:]
    rust_res = _cli("evaluate", str(out / "bundle"), *common, "--plots", str(tmp_path / "plots"))
    assert rust_res.returncode == 0, rust_res.stderr[-3000:]
    t, r = json.loads(torch_res.stdout), json.loads(rust_res.stdout)
    assert t["engine"] == "torch" and r["engine"] == "rust"
    for key in ("accuracy", "nll", "brier", "ece", "mce", "aurc"):
        assert abs(t["in_domain"][key] - r["in_domain"][key]) <= 1e-4, key
        assert abs(t["shift"]["vader-tweets"][key] - r["shift"]["vader-tweets"][key]) <= 1e-4, key
    for key in ("auroc_entropy", "fpr95_entropy"):
        assert abs(t["ood"]["bbc"][key] - r["ood"]["bbc"][key]) <= 1e-3, key
    assert (tmp_path / "plots" / "reliability.png").is_file()
