"""How fast a bundle scores on this machine, without torch (``bayeslora bench``).

The runtime's time per call of :meth:`bayeslora.runtime.Scorer.score` on token ids, for every
combination of thread count, batch size and posterior samples asked for, next to the FMA peak of
as many cores measured around each case (``bayeslora.runtime.fma_peak_gflops``). It answers
what a deployment needs to know on its own CPU — inputs per second at S samples on K threads — on
any machine the wheel runs on, AVX-512, AVX2, ARM64 (NEON) or portable.

Inputs are the same ``batch`` token-id rows in every call: ``seq_len`` random ids of the bundle's
vocabulary (all attended), or the first ``batch`` of ``texts`` (repeated when fewer) through the
bundle's tokenizer. Tokenizing is not timed. A case runs one untimed call, then calls until
``min_time`` seconds have passed (at least three); it reports the best and the median call.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError, InvalidValueError
from .files import BUNDLE_HF_CONFIG
from .runtime import MAX_SAMPLES, MAX_SEED, MAX_THREADS, Scorer, check_int, fma_peak_gflops, isa, read_meta

MAX_BATCH = 65536
MAX_MIN_TIME = 3600.0
MAX_CALLS = 100_000
# seconds of FMA chains per peak measurement (two per case: right before it and right after)
PEAK_SECONDS = 0.2


@dataclass(frozen=True)
class BenchResult:
    """One case of :func:`benchmark`.

    Attributes:
        threads: runtime threads (the Scorer's pool).
        batch: inputs per call.
        samples: posterior samples per input (0 = mean mode).
        seq_len: tokens per input (the longest row when inputs come from texts).
        calls: timed calls.
        best_ms, median_ms: wall-clock milliseconds of the fastest and of the median call.
        inputs_per_s: ``batch`` per median call, in inputs per second.
        gflops: FLOPs of a full forward pass per input and per sample (:func:`forward_flops`; what
            an eager framework computes) per second at the median call: forward-equivalent, since
            the runtime executes less (the last layer for token 0 only; at S > 0 layer 0's
            products once for all samples); None where the bundle's architecture has no count here
            (DeBERTa's relative attention).
        peak_gflops: FMA peak of ``threads`` cores, the larger of two measurements right before
            and right after the case (0.0 on the portable kernels).
    """

    threads: int
    batch: int
    samples: int
    seq_len: int
    calls: int
    best_ms: float
    median_ms: float
    inputs_per_s: float
    gflops: float | None
    peak_gflops: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return asdict(self)


def model_shape(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"architecture", "hidden", "layers", "heads", "intermediate", "vocab", "num_labels",
    "max_length"}`` of a bundle, from its ``bayeslora.json`` and ``config.json`` (BERT, RoBERTa and
    DeBERTa name them ``hidden_size`` …, DistilBERT ``dim`` …)."""
    meta = read_meta(bundle_dir)
    path = Path(bundle_dir) / BUNDLE_HF_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise BundleError(f"{path}: not a JSON object")

    def first(*keys: str) -> int:
        for k in keys:
            v = cfg.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        raise BundleError(f"{path}: no positive integer {' or '.join(keys)}")

    return {
        "architecture": str(meta.get("architecture", cfg.get("model_type", "?"))),
        "hidden": first("hidden_size", "dim"),
        "layers": first("num_hidden_layers", "n_layers"),
        "heads": first("num_attention_heads", "n_heads"),
        "intermediate": first("intermediate_size", "hidden_dim"),
        "vocab": first("vocab_size"),
        "num_labels": int(meta.get("num_labels", 0)),
        "max_length": int(meta.get("max_length", 0)),
    }


def forward_flops(shape: Mapping[str, Any], seq_len: int) -> float | None:
    """FLOPs of one full forward pass of one input of ``seq_len`` tokens (all attended), as an
    eager framework computes it: per layer the Q, K, V and output projections (``4·T·H²``
    multiply-adds), the feed-forward (``2·T·H·I``) and attention's scores and weighted values
    (``2·T²·H``), and the classification head on one token (``H² + H·C``), two FLOPs per
    multiply-add. Element-wise work (softmax, GELU, LayerNorm) and the adapters (rank ≪ H) are not
    counted. None for DeBERTa (its relative attention adds terms this count has not).

    ``shape``: :func:`model_shape`'s dict."""
    if str(shape["architecture"]).startswith("deberta"):
        return None
    h, i, t = int(shape["hidden"]), int(shape["intermediate"]), int(seq_len)
    per_layer = t * (4 * h * h + 2 * h * i + 2 * t * h)
    head = h * h + h * int(shape["num_labels"])
    return 2.0 * (int(shape["layers"]) * per_layer + head)


def cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _inputs(
    scorer: Scorer, shape: Mapping[str, Any], batch: int, seq_len: int, texts: Sequence[str] | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    if texts:
        chosen = [texts[j % len(texts)] for j in range(batch)]
        return scorer.encode(chosen)
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, max(int(shape["vocab"]), 2), size=(batch, seq_len), dtype=np.int64)
    return ids, np.ones_like(ids)


def benchmark(
    bundle_dir: str | os.PathLike,
    *,
    threads: Iterable[int | None] = (1, None),
    batches: Iterable[int] = (1, 8),
    samples: Iterable[int] = (0, 16),
    seq_len: int | None = None,
    texts: Sequence[str] | None = None,
    min_time: float = 1.0,
    seed: int = 0,
    on_case: Callable[[BenchResult], None] | None = None,
) -> list[BenchResult]:
    """Time :meth:`Scorer.score <bayeslora.runtime.Scorer.score>` on ``bundle_dir`` for every
    (threads, batch, samples) combination, in that nesting order; see the module docs.

    Args:
        bundle_dir: directory written by :func:`bayeslora.export`.
        threads: pool sizes, 1..1024; None = every core this process may run on. Repeats are
            measured once.
        batches: inputs per call, 1..65536.
        samples: posterior samples per input, 0 (mean mode) .. 2^20.
        seq_len: tokens per synthetic input, 1..the bundle's ``max_length`` (default: the smaller
            of ``max_length`` and 128); not with ``texts``.
        texts: score these texts (tokenized once, untimed) instead of random token ids; needs the
            bundle's tokenizer.
        min_time: seconds of timed calls per case, > 0 and at most 3600.
        seed: seed of the synthetic ids and of the posterior noise.
        on_case: called with each result as soon as it is measured (progress, streaming output).

    Returns:
        One :class:`BenchResult` per case.

    Raises:
        bayeslora.errors.InvalidValueError: an argument out of its range.
        bayeslora.errors.BundleError: the bundle is missing or malformed (or has no tokenizer for
            ``texts``).
    """
    pools = []
    for k in threads:
        n = cores() if k is None else check_int("threads", k, 1, MAX_THREADS)
        if n not in pools:
            pools.append(n)
    batch_list = [check_int("batch", b, 1, MAX_BATCH) for b in batches]
    sample_list = [check_int("samples", s, 0, MAX_SAMPLES) for s in samples]
    seed = check_int("seed", seed, 0, MAX_SEED)
    if not pools or not batch_list or not sample_list:
        raise InvalidValueError("threads, batches and samples need at least one value each")
    if (
        isinstance(min_time, bool)
        or not isinstance(min_time, (int, float))
        or not 0 < min_time <= MAX_MIN_TIME
    ):
        raise InvalidValueError(
            f"min_time must be a number of seconds in (0, {MAX_MIN_TIME:g}], got {min_time!r}"
        )
    if texts is not None:
        texts = list(texts)
        if not texts:
            raise InvalidValueError("texts is empty")
        if seq_len is not None:
            raise InvalidValueError("seq_len goes with synthetic inputs, not with texts")
    shape = model_shape(bundle_dir)
    if texts is None:
        longest = max(shape["max_length"], 1)
        seq_len = min(longest, 128) if seq_len is None else check_int("seq_len", seq_len, 1, longest)
    results: list[BenchResult] = []
    inputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for n_threads in pools:
        scorer = Scorer(bundle_dir, num_threads=n_threads)
        for batch in batch_list:
            if batch not in inputs:  # the same rows on every pool, made (tokenized) once
                inputs[batch] = _inputs(scorer, shape, batch, seq_len or 0, texts, seed)
            ids, mask = inputs[batch]
            tokens = int(ids.shape[1])
            flops = forward_flops(shape, tokens)
            for s in sample_list:
                peak = fma_peak_gflops(PEAK_SECONDS, n_threads)
                scorer.score((ids, mask), samples=s, seed=seed)  # untimed: pools, buffers, caches
                walls: list[float] = []
                start = time.perf_counter()
                while len(walls) < 3 or (time.perf_counter() - start < min_time and len(walls) < MAX_CALLS):
                    t0 = time.perf_counter()
                    scorer.score((ids, mask), samples=s, seed=seed)
                    walls.append(time.perf_counter() - t0)
                # the larger of two measurements around the case: clocks ramp and neighbours come and go
                peak = max(peak, fma_peak_gflops(PEAK_SECONDS, n_threads))
                median = float(np.median(walls))
                copies = max(s, 1)
                result = BenchResult(
                    threads=n_threads,
                    batch=batch,
                    samples=s,
                    seq_len=tokens,
                    calls=len(walls),
                    best_ms=1e3 * min(walls),
                    median_ms=1e3 * median,
                    inputs_per_s=batch / median,
                    gflops=None if flops is None else flops * batch * copies / median / 1e9,
                    peak_gflops=peak,
                )
                results.append(result)
                if on_case is not None:
                    on_case(result)
    return results


def header(bundle_dir: str | os.PathLike) -> str:
    """One line naming what :func:`benchmark` measures here: the kernels' instruction set, the
    cores, and the bundle's model shape."""
    shape = model_shape(bundle_dir)
    return (
        f"kernels {isa()} · {cores()} cores · {shape['architecture']}: {shape['layers']} layers, "
        f"hidden {shape['hidden']}, {shape['heads']} heads, intermediate {shape['intermediate']}, "
        f"{shape['num_labels']} labels"
    )


def table(results: Sequence[BenchResult]) -> str:
    """``results`` as a Markdown table."""
    lines = [
        "| threads | batch | S | tokens | calls | ms per call, median (best) | inputs/s "
        "| GFLOP/s | FMA peak GFLOP/s | % of peak |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        gf = "n/a" if r.gflops is None else f"{r.gflops:.1f}"
        share = "n/a" if r.gflops is None or r.peak_gflops <= 0 else f"{100 * r.gflops / r.peak_gflops:.0f} %"
        peak = f"{r.peak_gflops:.1f}" if r.peak_gflops > 0 else "n/a"
        lines.append(
            f"| {r.threads} | {r.batch} | {r.samples} | {r.seq_len} | {r.calls} "
            f"| {r.median_ms:.2f} ({r.best_ms:.2f}) | {r.inputs_per_s:.2f} | {gf} | {peak} | {share} |"
        )
    return "\n".join(lines)


__all__ = ["BenchResult", "benchmark", "cores", "forward_flops", "header", "model_shape", "table"]
