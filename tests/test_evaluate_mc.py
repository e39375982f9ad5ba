"""`bayeslora evaluate` in MC mode: a checkpoint (torch) and its bundle (Rust runtime) agree within
sampling error on the real MiniLM.

The two engines draw their posterior noise from different generators, so their MC estimates can only
agree statistically. For each input i, with S samples per engine, the difference of the two MC means
of p(positive) over its standard error, z_i = (p̄_torch − p̄_rust) / √((v_torch + v_rust) / (S − 1))
(v: the per-input population variance over samples that both engines report), is approximately
standard normal when both engines sample the same posterior. The test asserts that (mean z² near 1,
no |z| beyond 5) and that the two engines see the same spread (mean variances within 25 %), then
that `evaluate`'s accuracy differs by no more than the inputs whose label sampling error can flip.
The checkpoint is trained with large, fixed gate noise (log α = −0.5, rank_lr 0, no pruning) so
that the sampling spread is far above float32 rounding.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from subprocesses import run_cli

S = 48
N_EVAL = 40


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(args, env_extra={"HF_HUB_OFFLINE": "1"}, timeout=1200)


@pytest.fixture(scope="module")
def noisy_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc-eval")
    ckpt, bundle = root / "ckpt", root / "bundle"
    res = _cli(
        "train",
        "--recipe",
        "vi",  # the gate posterior with its noise on from step 0, as this test's noise levels assume
        "--data",
        "vader-movies",
        "--max-train",
        "128",
        "--epochs",
        "2",
        "--lr",
        "5e-3",
        "--init-log-alpha",
        "-0.5",
        "--rank-lr",
        "0",
        "--sample-start",
        "0",
        "--kl-freeze",
        "0",
        "--prune-start",
        "100000",
        "--samples",
        "0",
        "--max-length",
        "48",
        "--out",
        str(ckpt),
    )
    assert res.returncode == 0, res.stderr[-4000:]
    res = _cli("export", str(ckpt), "--out", str(bundle))
    assert res.returncode == 0, res.stderr[-4000:]
    return ckpt, bundle


@pytest.mark.slow
def test_mc_mode_torch_and_runtime_agree_within_sampling_error(noisy_checkpoint):
    from bayeslora.data import load_dataset
    from bayeslora.evaluation import evaluate, load_predictor

    ckpt, bundle = noisy_checkpoint
    texts = list(load_dataset("vader-movies", seed=0).test.texts[:N_EVAL])
    texts += list(load_dataset("bbc", seed=0).test.texts[: N_EVAL // 2])  # OOD inputs: wider spread
    torch_predict, t_info = load_predictor(ckpt, S, seed=0)
    rust_predict, r_info = load_predictor(bundle, S, seed=0, num_threads=2)
    assert (t_info["engine"], r_info["engine"]) == ("torch", "rust")
    t, r = torch_predict(texts), rust_predict(texts)

    vt, vr = t["variance"], r["variance"]
    assert vt.mean() > 1e-5 and vr.mean() > 1e-5, "the noise must be visible for the test to mean anything"
    assert 0.8 < vt.mean() / vr.mean() < 1.25, (vt.mean(), vr.mean())
    z = (t["probs"][:, 1] - r["probs"][:, 1]) / np.sqrt((vt + vr) / (S - 1))
    assert np.abs(z).max() < 5.0, np.abs(z).max()
    assert 0.5 < np.mean(z**2) < 1.8, np.mean(z**2)
    # evaluate end to end: metrics of both engines in MC mode
    kw = {"data": "vader-movies", "ood": ["bbc"], "shift": [], "samples": S, "seed": 0, "max_eval": N_EVAL}
    te, re_ = evaluate(ckpt, **kw), evaluate(bundle, **kw, num_threads=2)
    assert (te["engine"], re_["engine"]) == ("torch", "rust")
    # accuracy can only differ on inputs whose label sampling error could flip (|p − ½| < 4 SE)
    p_in, se_in = t["probs"][:N_EVAL, 1], np.sqrt((vt + vr)[:N_EVAL] / (S - 1))
    flippable = int(np.sum(np.abs(p_in - 0.5) < 4 * se_in))
    assert abs(te["in_domain"]["accuracy"] - re_["in_domain"]["accuracy"]) * N_EVAL <= flippable + 1e-9
    # NLL: |Δ mean log p_y| ≤ mean of 4 SE / min(p) per input (first-order bound)
    labels = load_dataset("vader-movies", seed=0).test.labels[:N_EVAL]
    p_y = np.where(labels == 1, p_in, 1.0 - p_in)
    bound = float(np.mean(4 * se_in / np.clip(p_y - 4 * se_in, 1e-3, None)))
    assert abs(te["in_domain"]["nll"] - re_["in_domain"]["nll"]) <= bound, bound
