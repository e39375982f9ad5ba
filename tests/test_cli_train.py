"""`bayeslora train` end to end through a subprocess and its errors (two-process training under the
launchers: tests/test_launchers.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bayeslora as bl
from bayeslora.train.pipeline import load_checkpoint
from subprocesses import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_cli(args, env_extra={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout=timeout)


def _train_args(model_dir, csv, out, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        f"csv:{csv}",
        "--rank",
        "4",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--max-length",
        "16",
        "--lr",
        "5e-3",
        "--rank-lr",
        "5e-2",
        "--prune-start",
        "4",
        "--prune-every",
        "2",
        "--samples",
        "4",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_cli_train_end_to_end(tiny_model_dir, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    res = _cli(*_train_args(tiny_model_dir, sentiment_csv, out), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    payload = json.loads(res.stdout.strip().splitlines()[-1])
    assert payload["label_names"] == ["neg", "pos"]
    # the default targets: query, key, value, attention output, intermediate, output × 2 layers, rank 4
    assert payload["initial_total_rank"] == 4 * 6 * 2
    assert 0 <= payload["total_rank"] <= payload["initial_total_rank"]
    for key in ("test_mean", "validation_mean", "test_mc"):
        assert 0.0 <= payload["metrics"][key]["accuracy"] <= 1.0
    # the checkpoint reloads into the same model
    model, tok, run = load_checkpoint(out)
    assert bl.ranks(model) == payload["ranks"]
    enc = tok(["good film", "awful plot"], return_tensors="pt", padding=True)
    probs = bl.mc_predict(model, dict(enc), samples=0)["probs"]
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2))
    # the logged training history carries the objective's parts
    logs = [h for h in run["log_history"] if "nll" in h]
    assert logs and all({"kl", "beta", "active_rank"} <= set(h) for h in logs)


def test_cli_help_lists_commands():
    res = _cli("--help")
    assert res.returncode == 0 and "train" in res.stdout and "quickstart" in res.stdout
    res = _cli("train", "--help")
    assert res.returncode == 0 and "--posterior" in res.stdout


@pytest.mark.parametrize(
    "content, message",
    [
        ("text,label\nhello,pos\nworld,pos\nagain,pos\n", "at least 2 classes"),
        ("sentence,target\nhello,pos\n", "text"),
        ("", "empty"),
        ("text,label\ngood film,pos\nbad film,neg\nfine,pos\n", "0 validation, 0 test"),
    ],
)
def test_cli_train_rejects_bad_csv(tiny_model_dir, tmp_path, content, message):
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    res = _cli(*_train_args(tiny_model_dir, csv, tmp_path / "out"))
    assert res.returncode == 1
    assert "bayeslora: error:" in res.stderr and message in res.stderr.lower(), res.stderr[-2000:]
    assert "Traceback" not in res.stderr and res.stderr.count("bayeslora: error:") == 1
    assert not (tmp_path / "out").exists()  # no empty --out left behind


def test_cli_train_rejects_unknown_target_and_unwritable_out(tiny_model_dir, sentiment_csv, tmp_path):
    res = _cli(*_train_args(tiny_model_dir, sentiment_csv, tmp_path / "o"), "--targets", "querry")
    assert res.returncode == 1 and "Close matches: ['query']" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "o").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = _cli(*_train_args(tiny_model_dir, sentiment_csv, blocker / "out"))
    assert res.returncode == 1 and "not writable" in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_interrupted_run_leaves_loadable_checkpoint(tiny_model_dir, sentiment_csv, tmp_path):
    """Ctrl-C right after the first checkpoint (at a known step, not a timer's race): exit code 130,
    one line on stderr, the checkpoint loads, nothing half-written, and no finished run claimed."""
    out = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    # 200 epochs of 5 steps (76 rows, batch 16): the run cannot end before its first checkpoint (step 50)
    args = _train_args(tiny_model_dir, sentiment_csv, out, "--epochs", "200")
    res = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "interrupt_worker.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 130, (res.returncode, res.stderr[-3000:])
    assert "interrupted" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    found = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert [p.name for p in found] == ["checkpoint-50"], found
    ckpt = found[0] / "adapter"
    assert (ckpt / "adapter.safetensors").is_file()
    state = json.loads((found[0] / "bayeslora_training.json").read_text())
    assert state["global_step"] == 50
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp")), list(out.rglob("*tmp*"))
    assert not (out / "run.json").exists()  # the run did not finish: no summary claims it did
    fresh = _tiny(tiny_model_dir)
    bl.load_adapter(fresh, ckpt)
    assert len(bl.ranks(fresh)) == 6 * 2 and sum(bl.ranks(fresh).values()) <= 4 * 6 * 2  # default targets


def _tiny(model_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)


def test_train_from_a_model_whose_head_has_other_labels(tiny_model_dir, sentiment_csv, tmp_path):
    # fine-tuning a classifier trained for 3 classes on a 2-class task: the head is re-initialised
    # (as `ignore_mismatched_sizes` does) and the checkpoint reloads onto that same base
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = tmp_path / "three-way"
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base)
    out = tmp_path / "run"
    res = _cli(*_train_args(base, sentiment_csv, out, "--epochs", "1", "--samples", "0"), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    payload = json.loads(res.stdout.strip().splitlines()[-1])
    loaded, tok, _ = load_checkpoint(out)
    assert loaded.config.num_labels == 2
    enc = tok(["good film", "awful plot"], return_tensors="pt", padding=True)
    assert bl.mc_predict(loaded, dict(enc), samples=0)["probs"].shape == (2, 2)
    assert payload["label_names"] == ["neg", "pos"]


def test_kl_scale_default_follows_the_recipe_and_the_posterior():
    from bayeslora.cli import _settings, build_parser
    from bayeslora.train.pipeline import KL_SCALE_DEFAULTS, TrainSettings

    # the default recipe (select): 1e-6 of the KL without 1/N, whatever the posterior
    assert TrainSettings().kl_scale == TrainSettings(posterior="gate").kl_scale == 1e-6
    assert TrainSettings().bayes_config("classifier").kl_scale == 1e-6
    # recipe vi: the posterior's own tempering of the per-example KL when none is given
    vi = TrainSettings.for_recipe
    assert vi("vi").kl_scale == KL_SCALE_DEFAULTS["gate"] == 0.02
    assert vi("vi", posterior="additive").kl_scale == KL_SCALE_DEFAULTS["additive"] == 0.01
    assert vi("vi", posterior="additive", kl_scale=0.3).kl_scale == 0.3
    assert vi("vi", posterior="additive").bayes_config("classifier").kl_scale == 0.01
    parse = build_parser().parse_args
    assert (
        _settings(parse(["train", "--out", "x", "--recipe", "vi", "--posterior", "additive"])).kl_scale
        == 0.01
    )
    assert _settings(parse(["train", "--out", "x", "--recipe", "vi"])).kl_scale == 0.02
    assert _settings(parse(["train", "--out", "x"])).kl_scale == 1e-6
    explicit = parse(["train", "--out", "x", "--posterior", "additive", "--kl-scale", "0.05"])
    assert _settings(explicit).kl_scale == 0.05
