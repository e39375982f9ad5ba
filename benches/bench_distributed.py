"""Scoring throughput on Dask (``bayeslora.distributed``) with 1 and 2 worker processes, side by side.

Model: the MiniLM-L6 shape (``minilm_shape``; random weights) with BayesLoRA gate adapters of rank 8 on
query/value, exported with a word-level tokenizer over its vocabulary. Inputs: ``--texts`` random
texts of 62 words (64 tokens with [CLS]/[SEP], as ``bench_runtime.py``), the same for every case.
Cases, each at every ``--samples``: one process with ``Scorer(num_threads=1)`` and ``(num_threads=2)``
(no Dask), then a ``LocalCluster`` of 1 and of 2 worker processes with 1 Dask thread and 1 runtime
thread each (``num_threads=1``), scored by ``bl.distributed.score``. Throughput is texts per second
over the whole list, best of ``--rounds`` rounds; each cluster is started and the bundle opened on
its workers (a warm-up call) before the clock starts, and the rounds of the cases are interleaved.

As a script (``python benches/bench_distributed.py [--out benches/RESULTS_distributed.md]``) it prints
and writes a markdown table. Under pytest (``--benchmark-disable`` in CI) a tiny model runs through
the same code on an in-process cluster and the results are checked against one Scorer; timings are
never pass/fail.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import bayeslora as bl
from bayeslora.runtime import FIELDS, Scorer
from minilm_shape import HIDDEN, LAYERS, VOCAB, minilm_classifier

RANK, WORDS = 8, 62


def word_tokenizer(vocab: int):  # -> tokenizers.Tokenizer
    """Word-level tokenizer: "w4" … "w{vocab-1}" are ids 4.., [CLS] text [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    words.update({f"w{i}": i for i in range(4, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


def build_bundle(out: Path, tiny: bool = False) -> Path:
    """The bench's bundle: the MiniLM shape, or (``tiny``) a 2-layer BERT of width 32 for tests."""
    if tiny:
        import torch
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
        model = BertForSequenceClassification(cfg).eval()
    else:
        model = minilm_classifier().eval()
    config = bl.BayesLoRAConfig(
        rank=RANK,
        target_modules=["query", "value"],
        posterior="gate",
        init_b_std=0.02,
        init_log_alpha=-2.0,
    )
    bl.inject(model, config)
    return bl.export(model, word_tokenizer(VOCAB), out, max_length=WORDS + 2)


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(1000, VOCAB, WORDS)) for _ in range(n)]


def start_cluster(workers: int, processes: bool = True):  # -> (LocalCluster, Client)
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=processes,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    return cluster, Client(cluster)


def score_on(client, bundle: Path, texts: list[str], samples: int) -> dict[str, np.ndarray]:
    """One case's work: every text on the cluster, one runtime thread per worker."""
    return bl.distributed.score(bundle, texts, samples=samples, seed=0, client=client, num_threads=1)


def test_bench_distributed_matches_one_scorer(tmp_path):
    pytest.importorskip("distributed")
    bundle = build_bundle(tmp_path / "tiny", tiny=True)
    texts = make_texts(24)
    want = Scorer(bundle, num_threads=1).score(texts, samples=4, seed=0)
    for workers in (1, 2):
        cluster, client = start_cluster(workers, processes=False)
        try:
            got = score_on(client, bundle, texts, 4)
        finally:
            client.close()
            cluster.close()
        for k in FIELDS:
            np.testing.assert_array_equal(got[k], want[k])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256, help="texts per case")
    parser.add_argument("--samples", type=int, nargs="+", default=[0, 4], help="S values")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case (best is kept)")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.ERROR)  # closing a cluster restores INFO
    texts = make_texts(args.texts)
    load_before = os.getloadavg()[0]
    walls: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_bundle(Path(tmp) / "minilm-shape")
        scorers = {t: Scorer(bundle, num_threads=t) for t in (1, 2)}
        clusters = {w: start_cluster(w) for w in (1, 2)}
        try:
            cases = {
                "1 process, 1 thread (no Dask)": lambda s: scorers[1].score(texts, samples=s),
                "1 process, 2 threads (no Dask)": lambda s: scorers[2].score(texts, samples=s),
                "Dask, 1 worker × 1 thread": lambda s: score_on(clusters[1][1], bundle, texts, s),
                "Dask, 2 workers × 1 thread": lambda s: score_on(clusters[2][1], bundle, texts, s),
            }
            for w in (1, 2):  # open the bundle on every worker before the clock starts
                score_on(clusters[w][1], bundle, texts[: 2 * w], 0)
            want = {s: scorers[1].score(texts, samples=s) for s in args.samples}
            for _ in range(args.rounds):
                for s in args.samples:
                    for name, run in cases.items():
                        t0 = time.perf_counter()
                        got = run(s)
                        walls.setdefault((name, s), []).append(time.perf_counter() - t0)
                        np.testing.assert_array_equal(got["probs"], want[s]["probs"])
                        print(f"S={s:2d} {name}: {len(texts) / walls[name, s][-1]:8.2f} texts/s", flush=True)
        finally:
            for cluster, client in clusters.values():
                client.close()
                cluster.close()
    load_after = os.getloadavg()[0]
    lines = [
        "| case | S | texts/s | vs 1 process × 1 thread |",
        "|---|---:|---:|---:|",
    ]
    for s in args.samples:
        base = len(texts) / min(walls["1 process, 1 thread (no Dask)", s])
        for name in cases:
            rate = len(texts) / min(walls[name, s])
            lines.append(f"| {name} | {s} | {rate:.2f} | {rate / base:.2f}× |")
    text = "\n".join(
        [
            "# Scoring on Dask: 1 and 2 worker processes (MiniLM-L6 shape)",
            "",
            f"Measured by `python benches/bench_distributed.py --texts {args.texts} --samples "
            f"{' '.join(map(str, args.samples))} --rounds {args.rounds}` on "
            f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs), Python "
            f"{sys.version.split()[0]}. BERT hidden {HIDDEN}, {LAYERS} layers, random weights, gate "
            f"adapters rank {RANK} on query/value; {args.texts} texts of {WORDS + 2} tokens; best of "
            f"{args.rounds} interleaved rounds; 1-minute load average {load_before:.1f} before and "
            f"{load_after:.1f} after the run on {os.cpu_count()} CPUs (other jobs shared the machine: "
            "the figures are noisy).",
            "",
            *lines,
            "",
            "Every case's probabilities equal the single-process ones exactly (checked each round). The "
            "Dask figures include the per-call cost of submitting the chunks and gathering the results "
            "(cluster start-up and opening the bundle on the workers are not timed).",
        ]
    )
    print()
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
