"""`bayeslora bench` and `bayeslora.benchmark`: timing a bundle's scoring without torch, the FLOP count
against torch's own counter, and one-line refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bayeslora as bl
from bayeslora.benchmark import BenchResult, benchmark, forward_flops, model_shape, table
from bayeslora.errors import BundleError, InvalidValueError
from runtime_models import adapt, build, word_tokenizer
from subprocesses import blocking_shim, child_env, run_cli, run_python

# the tiny model of the bundle fixture: hidden 16, 2 heads, 2 layers, intermediate 24, 3 labels
SHAPE = {"hidden": 16, "heads": 2, "layers": 2, "intermediate": 24, "num_labels": 3}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    model = build("bert", 16, 2, 2, 24, 3, seed=5)
    adapt(model, ["query", "value"], rank=4, seed=5)
    return bl.export(model, word_tokenizer(), tmp_path_factory.mktemp("bench") / "bundle")


def torch_flops(model: torch.nn.Module, tokens: int) -> int:
    """FLOPs of one forward pass of one input as torch's FlopCounterMode counts them."""
    ids = torch.randint(5, 20, (1, tokens), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("tokens", [1, 7, 32])
def test_forward_flops_is_torchs_flop_count_of_the_base_model(family, tokens, tmp_path):
    model = build(family, 16, 2, 2, 24, 3, seed=1)
    want = torch_flops(model, tokens)  # before the adapters: the base model's forward
    adapt(model, ["query", "value"] if family != "distilbert" else ["q_lin", "v_lin"], rank=2, seed=1)
    shape = model_shape(bl.export(model, word_tokenizer(), tmp_path / "b"))
    assert {k: shape[k] for k in SHAPE} == SHAPE
    assert forward_flops(shape, tokens) == want


def test_bench_cli_runs_where_torch_cannot_be_imported(bundle, tmp_path):
    shim = blocking_shim(tmp_path / "shim")
    assert run_python("import torch", shim=shim).returncode != 0
    args = ["bench", str(bundle), "--threads", "1", "2", "--batch", "1", "3", "--samples", "0", "4"]
    res = run_cli([*args, "--seq-len", "8", "--min-time", "0.05", "--json"], shim=shim)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["threads"], r["batch"], r["samples"]) for r in rows] == [
        (k, b, s) for k in (1, 2) for b in (1, 3) for s in (0, 4)
    ]
    flops = forward_flops(model_shape(bundle), 8)
    for r in rows:
        assert r["seq_len"] == 8 and r["calls"] >= 3
        assert 0 < r["best_ms"] <= r["median_ms"]
        assert r["inputs_per_s"] == pytest.approx(r["batch"] / r["median_ms"] * 1e3, rel=1e-9)
        copies = max(r["samples"], 1)
        want = flops * r["batch"] * copies / (r["median_ms"] / 1e3) / 1e9
        assert r["gflops"] == pytest.approx(want, rel=1e-9)
        assert r["peak_gflops"] >= 0


def test_bench_table_of_texts_from_a_file(bundle, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("w5 w6 w7\n\nw40 w41 w42 w43 w44\nw9\n")
    res = run_cli(
        [
            "bench",
            str(bundle),
            "--file",
            str(texts),
            "--threads",
            "1",
            "--batch",
            "2",
            "--samples",
            "0",
            "3",
            "--min-time",
            "0.05",
        ]
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"bayeslora bench {bundle}: kernels ")
    assert "bert: 2 layers, hidden 16, 2 heads, intermediate 24, 3 labels" in lines[0]
    rows = [line for line in lines if line.startswith("| 1 |")]
    assert len(rows) == 2
    # the first two texts, padded to the longer: 5 words between [CLS] and [SEP]
    tokens = bl.runtime.Scorer(bundle).encode(["w5 w6 w7", "w40 w41 w42 w43 w44"])[0].shape[1]
    assert [row.split("|")[3:5] for row in rows] == [[" 0 ", f" {tokens} "], [" 3 ", f" {tokens} "]]
    assert "GFLOP/s counts a full forward pass" in res.stdout


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--threads", "0"], 2, "--threads must be in 1..1024, got 0"),
        (["--batch", "0"], 2, "--batch must be in 1..65536, got 0"),
        (["--samples", "-1"], 2, "--samples must be in"),
        (["--min-time", "0"], 2, "--min-time must be in (0, 3600] seconds, got 0"),
        (["--seq-len", "65"], 1, "seq_len must be in 1..64, got 65"),
        (["--seq-len", "4", "--file", "x.txt"], 2, "not allowed with argument"),
    ],
)
def test_bench_cli_refuses_bad_arguments_in_one_line(bundle, args, code, message):
    res = run_cli(
        ["bench", str(bundle), "--min-time", "0.01", *args]
        if "--min-time" not in args
        else ["bench", str(bundle), *args]
    )
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in res.stderr
    if message != "not allowed with argument":  # argparse's own: its usage lines, then the error line
        assert len(lines) == 1 and lines[0].startswith("bayeslora: error: ")


def test_bench_cli_refuses_a_missing_bundle_and_a_pairs_file(bundle, tmp_path):
    res = run_cli(["bench", str(tmp_path / "nowhere")])
    assert res.returncode == 1 and res.stderr.startswith("bayeslora: error: cannot read")
    assert len(res.stderr.strip().splitlines()) == 1
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"text": "w1", "text_pair": "w2"}\n')
    res = run_cli(["bench", str(bundle), "--file", str(pairs)])
    assert res.returncode == 2 and "sentence pairs are not benchmarked" in res.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    res = run_cli(["bench", str(bundle), "--file", str(empty)])
    assert res.returncode == 1 and "has no texts" in res.stderr


def test_benchmark_api_validates_and_reports(bundle):
    seen: list[BenchResult] = []
    out = benchmark(
        bundle, threads=[1, 1], batches=[2], samples=[0], seq_len=4, min_time=0.01, on_case=seen.append
    )
    assert out == seen and len(out) == 1  # a repeated thread count runs once
    assert out[0].seq_len == 4 and out[0].calls >= 3
    assert "| 1 | 2 | 0 | 4 |" in table(out)
    for kwargs, message in [
        ({"threads": []}, "at least one value"),
        ({"min_time": True}, "min_time must be a number"),
        ({"min_time": 0.0}, "min_time must be a number"),
        ({"texts": []}, "texts is empty"),
        ({"texts": ["w1"], "seq_len": 4}, "seq_len goes with synthetic inputs"),
        ({"batches": [1.5]}, "batch must be an integer"),
    ]:
        with pytest.raises(InvalidValueError, match=message):
            benchmark(bundle, **{"min_time": 0.01, **kwargs})
    with pytest.raises(BundleError):
        model_shape(bundle / "missing")


def test_deberta_has_no_flop_count():
    assert forward_flops({**SHAPE, "architecture": "deberta-v2"}, 8) is None
    assert np.isfinite(forward_flops({**SHAPE, "architecture": "bert"}, 8))


def test_bench_cli_interrupted_says_so_in_one_line(bundle):
    # 64 inputs of 64 tokens a call: its 100,000-call cap is minutes away
    args = ["bench", str(bundle), "--threads", "1", "--batch", "64", "--samples", "0", "--seq-len", "64"]
    args += ["--min-time", "600"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bayeslora.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert proc.stdout.readline().startswith("bayeslora bench ")  # printed before the timing
        time.sleep(1.0)  # into the 600-second case
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err == "bayeslora: interrupted\n" and "|" not in out
