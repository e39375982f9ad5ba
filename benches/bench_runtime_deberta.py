"""The Rust runtime against PyTorch eager on a DeBERTa-v3-xsmall-shaped classifier.

Model: DebertaV2Config(hidden 384, 12 layers, 6 heads, intermediate 1536, vocab 128100, relative
attention with position_buckets 256, pos_att_type p2c|c2p, share_att_key, no absolute position
embeddings, LayerNorm on the relative embeddings): DeBERTa-v3-xsmall's configuration, random
weights. BayesLoRA gate adapters of rank 8 on query_proj/value_proj (with shared keys, the query
adapter's noise reaches the position→content scores too). Inputs: batch 1 and 8, sequence 64.
Work: S = 0 (mean mode) and S = 16 posterior samples per input, batched in both (torch via
``bl.mc_predict``). Threads: 1 and 2.

As a script (``python benches/bench_runtime_deberta.py [--out-dir benches/results/deberta]``) it
prints the runtime/torch throughput ratios and writes them as ``RESULTS.md`` and the raw timings as
``raw.json``. Under pytest each case runs once as a test that checks the two implementations agree;
timings are never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import bayeslora as bl
from bayeslora.runtime import Scorer
from bench_runtime import check_against_torch, run_rust, run_torch, timeit

HIDDEN, LAYERS, HEADS, INTER, VOCAB = 384, 12, 6, 1536, 128100
SEQ, RANK = 64, 8
CASES = [(t, b, s) for t in (1, 2) for b in (1, 8) for s in (0, 16)]


def build_model(seed: int = 0) -> torch.nn.Module:
    """``DebertaV2ForSequenceClassification`` of DeBERTa-v3-xsmall's shape, random weights, with
    gate adapters (rank 8) on query_proj/value_proj."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = DebertaV2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTER,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        pos_att_type="p2c|c2p",
        share_att_key=True,
        position_biased_input=False,
        norm_rel_ebd="layer_norm",
        max_relative_positions=-1,
        type_vocab_size=0,
        layer_norm_eps=1e-7,
        num_labels=2,
    )
    model = DebertaV2ForSequenceClassification(cfg).eval()
    bl.inject(
        model,
        bl.BayesLoRAConfig(
            rank=RANK,
            target_modules=["query_proj", "value_proj"],
            posterior="gate",
            init_b_std=0.02,
            init_log_alpha=-2.0,
        ),
    )
    return model


def inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (batch, SEQ), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2  # DeBERTa-v3's [CLS], [SEP]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = build_model()
    out = bl.export(model, None, tmp_path_factory.mktemp("bench") / "deberta-v3-xsmall-shape")
    return model, out


@pytest.mark.parametrize("threads,batch,samples", [(1, 1, 0), (2, 1, 16)])
def test_bench_runtime_deberta(benchmark, setup, threads, batch, samples):
    model, bundle = setup
    check_against_torch(benchmark, model, bundle, inputs(batch), threads, samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=None, help="write RESULTS.md and raw.json here")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=3, help="timed runs per measurement, at least")
    parser.add_argument("--skip", default="", help="cases to leave out, 'batch:S,...' (e.g. 8:16)")
    args = parser.parse_args(argv)
    model = build_model()
    load_before = os.getloadavg()[0]
    raw = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = bl.export(model, None, Path(tmp) / "deberta-v3-xsmall-shape")
        for threads, batch, samples in CASES:
            skipped = f"{batch}:{samples}" in args.skip.split(",")
            if threads not in args.threads or batch not in args.batches or skipped:
                continue
            torch.set_num_threads(threads)
            scorer = Scorer(bundle, num_threads=threads)
            x = inputs(batch)
            xn = {k: v.numpy() for k, v in x.items()}
            # side by side: torch, runtime, torch again (the better torch figure is kept)
            torch_fn = lambda x=x, s=samples: run_torch(model, x, s)  # noqa: E731
            rust_fn = lambda sc=scorer, xn=xn, s=samples: run_rust(sc, xn, s)  # noqa: E731
            t_torch, c_torch = timeit(torch_fn, args.min_time, args.reps)
            t_rust, c_rust = timeit(rust_fn, args.min_time, args.reps)
            t_torch2, c_torch2 = timeit(torch_fn, args.min_time, args.reps)
            row = {
                "threads": threads,
                "batch": batch,
                "samples": samples,
                "torch_wall_s": min(t_torch, t_torch2),
                "runtime_wall_s": t_rust,
                "torch_cpu_s": min(c_torch, c_torch2),
                "runtime_cpu_s": c_rust,
                "load_1min": os.getloadavg()[0],
                "reps_at_least": args.reps,
            }
            raw.append(row)
            print(
                f"threads={threads} batch={batch} S={samples:2d}: torch {batch / row['torch_wall_s']:8.2f} "
                f"inputs/s, runtime {batch / t_rust:8.2f} inputs/s, ratio "
                f"{row['torch_wall_s'] / t_rust:.2f}x, CPU-time ratio {row['torch_cpu_s'] / c_rust:.2f}x",
                flush=True,
            )
    load_after = os.getloadavg()[0]
    lines = [
        "| threads | batch | S | torch inputs/s | runtime inputs/s | runtime / torch (wall) "
        "| CPU-time ratio | 1-min load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in raw:
        lines.append(
            f"| {r['threads']} | {r['batch']} | {r['samples']} | {r['batch'] / r['torch_wall_s']:.2f} "
            f"| {r['batch'] / r['runtime_wall_s']:.2f} | **{r['torch_wall_s'] / r['runtime_wall_s']:.2f}x** "
            f"| {r['torch_cpu_s'] / r['runtime_cpu_s']:.2f}x | {r['load_1min']:.1f} |"
        )
    text = "\n".join(
        [
            "# Runtime vs PyTorch eager (DeBERTa-v3-xsmall shape)",
            "",
            f"Measured by `python benches/bench_runtime_deberta.py --out-dir benches/results/deberta` on "
            f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs), torch "
            f"{torch.__version__}, Python {sys.version.split()[0]}.",
            f"DeBERTa-v2 hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, intermediate {INTER}, vocab "
            f"{VOCAB}, relative attention (position_buckets 256, p2c|c2p, share_att_key, no absolute "
            f"positions), random weights; gate adapters rank {RANK} on query_proj/value_proj; sequence "
            f"{SEQ}, all tokens attended. S = 0: mean mode; S = 16: 16 posterior samples per input, "
            "batched in both (torch via `bl.mc_predict`). Best of repeated runs, torch timed before and "
            "after the runtime (the better kept); the machine is shared (1-minute load average "
            f"{load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs): read the "
            "ratios, measured side by side, rather than the absolute figures.",
            "",
            *lines,
            "",
            "The CPU-time ratio divides best-of-N process CPU times, which other users' load disturbs "
            "least (meaningful for 1 thread).",
        ]
    )
    print()
    print(text)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "RESULTS.md").write_text(text + "\n")
        (out / "raw.json").write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
