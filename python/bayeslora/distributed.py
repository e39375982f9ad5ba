"""Score many texts on a Dask cluster (``dask.distributed``), with the same numbers as one process.

Torch-free: this module imports numpy, the standard library and :mod:`bayeslora.runtime`; Dask is
imported inside the functions (``pip install 'bayeslora[dask]'``), so ``import
bayeslora.distributed`` works without it.

The texts are cut into chunks (a list) or taken partition by partition (a Dask bag or dataframe
column); each chunk is one Dask task that scores it on a worker with that worker process's
:func:`bayeslora.runtime.shared_scorer` (the bundle is opened once per process, not per task),
and the results are put back together in input order. An input's scores depend only on the
bundle, the input, the seed and S (the noise streams are keyed by the input's token ids, not by
its position or its batch-mates; ``rust/bayeslora-core/src/mc.rs``), so the split cannot change
a number: :func:`score` returns exactly what ``Scorer(bundle).score(texts, samples, seed)``
returns.

Workers read the bundle by path: the path (made absolute on the client) must name the same
bundle on every worker (a shared file system, or the same copy at the same path). A worker that
dies mid-run (killed, out of memory) costs nothing but time: the scheduler reruns its tasks
elsewhere (up to ``distributed.scheduler.allowed-failures`` deaths per task, default 3, then
``distributed.scheduler.KilledWorker`` is raised), and a task whose code raises is retried
``retries`` times. Every chunk's result is taken exactly once, in order.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError, InvalidValueError, MissingDependencyError, ShapeError
from .runtime import FIELDS, MAX_SAMPLES, MAX_SEED, MAX_THREADS, Scorer, check_int, check_texts, shared_scorer

if TYPE_CHECKING:
    from distributed import Client, Future

DEFAULT_CHUNK = 1024  # texts per task from a list: seconds of work per task at MiniLM size
MAX_RETRIES = 100


def _require_distributed() -> Any:
    try:
        import distributed
    except ImportError as e:
        raise MissingDependencyError(
            f"scoring on Dask needs dask.distributed ({e}): install bayeslora[dask]"
        ) from None
    return distributed


def _client(client: Client | None) -> Client:
    if client is not None:
        return client
    distributed = _require_distributed()
    try:
        return distributed.default_client()
    except ValueError:
        raise ConfigError(
            "no Dask client: pass client=, or start one first (distributed.Client(address) or "
            "distributed.Client(distributed.LocalCluster(...)))"
        ) from None


def _worker_threads() -> int | None:
    """Threads of the Dask worker running this task (None outside a worker: all cores)."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return None


def _score_part(
    bundle_dir: str, num_threads: int | None, texts: Any, samples: int, seed: int, where: str
) -> dict[str, np.ndarray]:
    """The task run on a worker: score one chunk or partition with this process's Scorer."""
    scorer = shared_scorer(bundle_dir, num_threads if num_threads is not None else _worker_threads())
    try:
        items = check_texts(list(texts))
    except InvalidValueError as e:
        raise InvalidValueError(f"{where}: {e}") from None
    return scorer.score(items, samples=samples, seed=seed)


def _is_collection(texts: Any) -> bool:
    return hasattr(texts, "__dask_graph__")


def _partitions(texts: Any) -> list[Any]:
    """The delayed partitions of a Dask bag or dataframe column, in order."""
    import dask.bag

    if isinstance(texts, dask.bag.Bag):
        return list(texts.to_delayed())
    try:
        import dask.dataframe as dd
    except ImportError:  # no dask.dataframe (pandas): texts cannot be a dataframe column
        dd = None
    if dd is not None and isinstance(texts, dd.Series):
        return list(texts.to_delayed())
    if dd is not None and isinstance(texts, dd.DataFrame):
        raise InvalidValueError("texts is a Dask dataframe: pass the column of texts, e.g. df['text']")
    raise InvalidValueError(
        f"texts must be a list of texts, a Dask bag or a Dask dataframe column, not {type(texts).__name__}"
    )


def _local_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, np.ndarray) and texts.ndim != 1:
        raise ShapeError(f"an array of texts must be one-dimensional, got shape {texts.shape}")
    if isinstance(texts, (bytes, Mapping)):
        raise InvalidValueError(
            f"texts must be texts (token ids are not taken here), not {type(texts).__name__}"
        )
    try:
        return check_texts(texts)
    except TypeError:
        raise InvalidValueError(
            "texts must be a text, a list (or 1-D numpy array) of texts, a Dask bag or a Dask "
            f"dataframe column, not {type(texts).__name__}"
        ) from None


def _progress(enabled: bool, total: int, unit: str, desc: str = "scoring") -> Any:
    """A tqdm progress bar of ``total`` ``unit``s on stderr, or None when not ``enabled`` or
    without tqdm (also ``bayeslora bench``'s)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit, desc=desc, leave=False)


def iter_score(
    bundle: str | os.PathLike | Scorer,
    texts: Any,
    samples: int = 0,
    seed: int = 0,
    client: Client | None = None,
    *,
    num_threads: int | None = None,
    chunk_size: int | None = None,
    retries: int = 2,
    max_in_flight: int | None = None,
    progress: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Scores of consecutive pieces of ``texts``, in input order, as the cluster produces them.

    The pieces are chunks of ``chunk_size`` texts (the last one shorter) for a list, or the
    partitions of a Dask bag or dataframe column. A list is submitted a window at a time (at
    most ``max_in_flight`` chunks queued, default 4 per worker thread), so neither
    the scheduler nor this process holds more than the window's texts and results; a
    collection is submitted as one graph (its partitions may share upstream work). Arguments as
    :func:`score`.

    Yields:
        one dict per piece, the fields of ``Scorer.score`` for its ``n`` texts: ``probs
        float32[n, C]``, ``label int64[n]``, float32 ``[n]`` ``confidence``, ``entropy``,
        ``expected_entropy``, ``mutual_info``, ``variance``.
    """
    samples = check_int("samples", samples, 0, MAX_SAMPLES)
    seed = check_int("seed", seed, 0, MAX_SEED)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, 1, 2**31)
    if max_in_flight is not None:
        max_in_flight = check_int("max_in_flight", max_in_flight, 1, 2**31)
    retries = check_int("retries", retries, 0, MAX_RETRIES)
    if num_threads is not None:
        num_threads = check_int("num_threads", num_threads, 1, MAX_THREADS)
    if isinstance(bundle, Scorer):
        bundle_dir = os.path.abspath(bundle.bundle_dir)
        if num_threads is None:
            num_threads = bundle._requested_threads
    else:
        bundle_dir = os.path.abspath(bundle)
        shared_scorer(bundle_dir, 1)  # a bad bundle fails here, in one line, before any task runs
    _require_distributed()
    client = _client(client)
    # eager checks above and here; the generator below only submits and collects
    if _is_collection(texts):
        import dask

        tasks = [
            dask.delayed(_score_part, pure=False)(
                bundle_dir, num_threads, part, samples, seed, f"partition {i}"
            )
            for i, part in enumerate(_partitions(texts))
        ]
        return _collect_partitions(client, tasks, retries, progress)
    local = _local_texts(texts)
    threads = max(1, sum(client.nthreads().values()))
    if chunk_size is None:  # every worker thread busy on a small job, <= DEFAULT_CHUNK per task
        chunk_size = min(DEFAULT_CHUNK, max(1, -(-len(local) // (4 * threads))))
    args = (bundle_dir, num_threads, samples, seed, retries)
    return _collect_chunks(client, local, chunk_size, max_in_flight or 4 * threads, args, progress)


def _collect_chunks(
    client: Client,
    texts: list[str],
    chunk_size: int,
    window: int,
    args: tuple[str, int | None, int, int, int],
    progress: bool,
) -> Iterator[dict[str, np.ndarray]]:
    bundle_dir, num_threads, samples, seed, retries = args

    def submit(start: int) -> tuple[Future, int]:
        chunk = texts[start : start + chunk_size]
        where = f"texts {start}..{start + len(chunk) - 1}"
        future = client.submit(
            _score_part, bundle_dir, num_threads, chunk, samples, seed, where, retries=retries, pure=False
        )
        return future, len(chunk)

    more = (submit(start) for start in range(0, len(texts), chunk_size))
    yield from _in_order(client, deque(), more, window, _progress(progress, len(texts), "text"))


def _collect_partitions(
    client: Client, tasks: list[Any], retries: int, progress: bool
) -> Iterator[dict[str, np.ndarray]]:
    futures = client.compute(tasks, retries=retries)  # one graph: partitions may share upstream work
    submitted = deque((f, 1) for f in futures)
    yield from _in_order(client, submitted, iter(()), 1, _progress(progress, len(tasks), "partition"))


def _in_order(
    client: Client,
    submitted: deque[tuple[Future, int]],
    more: Iterator[tuple[Future, int]],
    window: int,
    bar: Any,
) -> Iterator[dict[str, np.ndarray]]:
    """Top ``submitted`` up from ``more`` (which submits as it is advanced) to ``window`` pieces,
    yield the oldest piece's result and drop its future; until both are empty. Whatever is still
    queued when the caller stops early or a piece fails is cancelled."""
    try:
        while True:
            while len(submitted) < window and (piece := next(more, None)) is not None:
                submitted.append(piece)
            if not submitted:
                return
            future, n = submitted[0]
            result = future.result()  # the task's exception after its retries, or KilledWorker
            submitted.popleft()
            if bar is not None:
                bar.update(n)
            yield result
    finally:
        if submitted:
            client.cancel([f for f, _ in submitted])
        if bar is not None:
            bar.close()


def score(
    bundle: str | os.PathLike | Scorer,
    texts: Any,
    samples: int = 0,
    seed: int = 0,
    client: Client | None = None,
    *,
    num_threads: int | None = None,
    chunk_size: int | None = None,
    retries: int = 2,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """docs/method.md §6 prediction with uncertainty of many texts, on a Dask cluster.

    Returns exactly ``Scorer(bundle).score(texts, samples=samples, seed=seed)`` (same numbers,
    dtypes, shapes and order), computed by the workers of ``client``.

    Args:
        bundle: a bundle directory (opened here once to check it, and by path on every worker:
            it must be readable at the same absolute path there), or a :class:`Scorer` (sent by
            reference, the same way).
        texts: a text, a list (or 1-D numpy array) of N texts, a ``dask.bag.Bag`` of texts, or
            a Dask dataframe column (``dask.dataframe.Series``) of texts.
        samples: S posterior samples per input, 0..2^20; 0 = mean mode.
        seed: seeds the noise streams, 0..2^63-1.
        client: a ``distributed.Client``; None = the current default client.
        num_threads: runtime threads per worker process; None = the worker's Dask thread count
            (``nthreads``; a Scorer's own setting if ``bundle`` is a Scorer opened with one).
        chunk_size: texts per task when ``texts`` is a list (collections keep their partitions);
            None = N / (4 × the cluster's threads), at most ``DEFAULT_CHUNK`` (1024).
        retries: reruns of a task whose code raised (a dead worker's tasks are rerun by the
            scheduler regardless).
        progress: show a tqdm progress bar (if tqdm is installed).

    Returns:
        ``probs float32[N, C]``, ``label int64[N]``, and float32 ``[N]`` ``confidence``,
        ``entropy``, ``expected_entropy``, ``mutual_info``, ``variance``.

    Raises:
        bayeslora.errors.MissingDependencyError: dask.distributed is not installed.
        bayeslora.errors.ConfigError: no client given and no default client.
        bayeslora.errors.BundleError, InvalidValueError, ShapeError: as ``Scorer.score``.
        distributed.scheduler.KilledWorker: a task's workers kept dying.
    """
    parts = list(
        iter_score(
            bundle,
            texts,
            samples,
            seed,
            client,
            num_threads=num_threads,
            chunk_size=chunk_size,
            retries=retries,
            progress=progress,
        )
    )
    if not parts:  # no texts (or no partitions): the empty result with the right shapes
        path = bundle.bundle_dir if isinstance(bundle, Scorer) else bundle
        return shared_scorer(os.path.abspath(path), 1).score([], samples=samples, seed=seed)
    return {k: np.concatenate([p[k] for p in parts]) for k in FIELDS}


__all__ = ["DEFAULT_CHUNK", "iter_score", "score"]
