"""``BAYESLORA_ISA``: every kernel path of one build on one machine, and their agreement.

The instruction set is chosen once per process, so each set runs in a subprocess of its own. The
same bundles and texts are scored under each set this CPU has: probabilities agree within 1e-5
in mean mode and in MC mode (same seed); the AVX2 path computes the portable formulas, so those
two agree bit for bit. An unknown set, or one the CPU lacks, is a one-line ``IsaError``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bayeslora as bl
from bayeslora.errors import ConfigError, IsaError
from runtime_models import VOCAB, adapt, build, word_tokenizer

PYTHON_DIR = Path(bl.__file__).resolve().parent.parent
SETS = ("avx512", "avx2", "neon", "portable")
SEED = 11
SAMPLES = 12

# Scores every bundle under the process's set; writes the arrays to OUT.npz and prints one JSON
# line: the set the runtime reports, the set of each Scorer, and the matrix products per set.
WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from bayeslora import _core
    from bayeslora.runtime import Scorer, isa

    out, texts = sys.argv[1], json.loads(sys.argv[2])
    samples, seed, bundles = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
    arrays, scorer_sets = {}, []
    for b, path in enumerate(bundles):
        scorer = Scorer(path, num_threads=2)
        scorer_sets.append(scorer.isa)
        for mode, s in (("mean", 0), ("mc", samples)):
            res = scorer.score(texts, samples=s, seed=seed)
            for k, v in res.items():
                arrays[f"{b}/{mode}/{k}"] = v
        ids, mask = scorer.encode(texts)
        arrays[f"{b}/logits"] = scorer.logits(ids, mask)
        arrays[f"{b}/sample_logits"] = scorer.sample_logits(ids, mask, samples=3, seed=seed)
    np.savez(out, **arrays)
    print(json.dumps({"isa": isa(), "scorers": scorer_sets, "gemm_calls": _core.gemm_calls()}))
    """
)


def _env(isa: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BAYESLORA_ISA"}
    env["PYTHONPATH"] = str(PYTHON_DIR)
    if isa is not None:
        env["BAYESLORA_ISA"] = isa
    return env


def _run(args: list[str], isa: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=_env(isa), timeout=300)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> list[Path]:
    """A gate and an additive bundle, wide enough that every tile kind runs (pairs of 16-column
    panels, single and ragged panels, rows that are not a multiple of any tile height)."""
    root = tmp_path_factory.mktemp("isa")
    out = []
    for i, posterior in enumerate(("gate", "additive")):
        model = build("bert", hidden=48, heads=3, layers=2, inter=72, labels=3, seed=40 + i)
        targets = ["query", "value", "intermediate.dense", "classifier"]
        adapt(model, targets, rank=4, posterior=posterior, seed=40 + i, log_alpha=(-1.5, 0.5))
        out.append(bl.export(model, word_tokenizer(), root / posterior))
    return out


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = np.random.default_rng(5)
    lengths = [1, 2, 5, 7, 13, 16, 17, 30, 33, 45, 3, 60]
    return [" ".join(f"w{w}" for w in rng.integers(4, VOCAB, n)) for n in lengths]


@pytest.fixture(scope="module")
def runs(bundles, texts, tmp_path_factory) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
    """``{set: (report, arrays)}`` for every set this CPU runs, plus ``"auto"`` (unset)."""
    root = tmp_path_factory.mktemp("isa-runs")
    out = {}
    for isa in (*SETS, None):
        name = isa or "auto"
        npz = root / f"{name}.npz"
        args = [sys.executable, "-c", WORKER, str(npz), json.dumps(texts), str(SAMPLES), str(SEED)]
        args += [str(b) for b in bundles]
        res = _run(args, isa)
        if isa is not None and res.returncode != 0 and "but this CPU lacks" in res.stderr:
            # a set this CPU does not have: a clean IsaError naming it, never another set
            last = res.stderr.strip().splitlines()[-1]
            assert last.startswith(f"bayeslora.errors.IsaError: BAYESLORA_ISA={isa} but this CPU lacks ")
            continue
        assert res.returncode == 0, res.stderr
        with np.load(npz) as z:
            out[name] = (json.loads(res.stdout), {k: z[k] for k in z.files})
    assert "portable" in out and "auto" in out
    return out


def test_each_forced_set_is_the_one_that_runs(runs):
    for name, (report, _) in runs.items():
        want = report["isa"] if name == "auto" else name
        assert report["isa"] == want and report["scorers"] == [want, want], (name, report)
        # the matrix products went through that set's kernels, and through no other set's
        calls = report["gemm_calls"]
        assert calls[want] > 0, (name, calls)
        assert all(n == 0 for s, n in calls.items() if s != want), (name, calls)
    # unset: the widest set this CPU has
    widest = next(s for s in SETS if s in runs)
    assert runs["auto"][0]["isa"] == widest


def test_every_set_agrees_within_1e5_in_mean_and_mc_mode(runs):
    _, ref = runs["portable"]
    keys = [k for k in ref if k.split("/")[1] in ("mean", "mc")]
    assert {k.split("/")[1] for k in keys} == {"mean", "mc"} and len(keys) == 2 * 2 * 7
    for name, (_, got) in runs.items():
        assert set(got) == set(ref)
        for k in keys:
            if k.endswith("/label"):
                continue  # argmax of probabilities that agree; ties aside, the same
            np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-5, err_msg=f"{name} {k}")
        for k in ref:
            if k.endswith(("logits", "/probs")):
                np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-4, err_msg=f"{name} {k}")
    # the texts are not degenerate: the MC samples differ from mean mode
    assert np.abs(ref["0/mc/probs"] - ref["0/mean/probs"]).max() > 1e-4


def test_avx2_and_portable_compute_the_same_bits(runs):
    if "avx2" not in runs:
        pytest.skip("this CPU has no AVX2 + FMA")
    _, a = runs["avx2"]
    _, p = runs["portable"]
    for k in p:
        assert a[k].tobytes() == p[k].tobytes(), k


@pytest.mark.parametrize("value", ["bogus", "avx-512", "scalar"])
def test_an_unknown_set_is_a_one_line_error(bundles, value):
    code = (
        "import sys\n"
        "from bayeslora.errors import IsaError\n"
        "from bayeslora.runtime import Scorer\n"
        "try:\n"
        "    Scorer(sys.argv[1])\n"
        "except IsaError as e:\n"
        "    print(type(e).__name__, isinstance(e, ValueError), e)\n"
    )
    res = _run([sys.executable, "-c", code, str(bundles[0])], value)
    assert res.returncode == 0, res.stderr
    want = f'IsaError True BAYESLORA_ISA="{value}" is not one of auto, avx512, avx2, neon, portable'
    assert res.stdout.strip() == want
    # the command line: one line on stderr, exit code 1, nothing scored
    res = _run([sys.executable, "-m", "bayeslora.cli", "score", str(bundles[0]), "--text", "w5"], value)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        f'bayeslora: error: BAYESLORA_ISA="{value}" is not one of auto, avx512, avx2, neon, portable'
    ]
    # --version still answers, and says why the kernels cannot run
    res = _run([sys.executable, "-m", "bayeslora.cli", "--version"], value)
    assert res.returncode == 0 and "kernels: error: BAYESLORA_ISA=" in res.stdout


def test_version_and_isa_name_the_set():
    res = _run([sys.executable, "-m", "bayeslora.cli", "--version"], "portable")
    assert res.returncode == 0 and res.stdout.strip().endswith("(kernels: portable)"), res
    assert bl.runtime.isa() in SETS
    assert issubclass(IsaError, ConfigError) and issubclass(IsaError, ValueError)
