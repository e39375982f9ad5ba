"""Scoring on Dask (``bayeslora.distributed``): Scorers pickled by reference, the same numbers as one
process whatever the split, order kept, a worker killed mid-run, ``bayeslora score --workers``.

One LocalCluster of 2 worker processes (1 thread each) serves the module; the CLI test starts its
own through ``--workers 2``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")

import bayeslora as bl
from bayeslora import distributed as bl_distributed
from bayeslora.errors import BundleError, InvalidValueError, MissingDependencyError
from bayeslora.runtime import FIELDS, Scorer, shared_scorer
from runtime_models import adapt, build, word_tokenizer
from subprocesses import TORCH_MODULES, blocking_shim, run_cli, run_python

SAMPLES, SEED = 8, 3


def make_bundle(path: Path, seed: int) -> Path:
    model = build("bert", 16, 2, 2, 24, 3, seed=seed)
    adapt(model, ["query", "value", "classifier"], rank=4, seed=seed, log_alpha=(-1.0, 0.5))
    return bl.export(model, word_tokenizer(), path, force=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("dask") / "bundle", seed=21)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """61 distinct texts of 1..24 words (different lengths: chunks pad differently)."""
    rng = np.random.default_rng(5)
    out = [
        " ".join(f"w{i}" for i in rng.integers(4, 64, rng.integers(1, 25))) + f" w{4 + k}" for k in range(60)
    ]
    return [*out, ""]


@pytest.fixture(scope="module")
def want(bundle, texts) -> dict[str, np.ndarray]:
    return Scorer(bundle).score(texts, samples=SAMPLES, seed=SEED)


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.CRITICAL,
    )
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(FIELDS)
    for k in FIELDS:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ---- a Scorer travels by reference ------------------------------------------------------------------
def test_scorer_pickles_by_reference_and_reopens_once_per_process(bundle, texts, tmp_path, monkeypatch):
    monkeypatch.chdir(bundle.parent)
    scorer = Scorer(bundle.name, num_threads=2)  # a relative path: the pickle holds it absolute
    data = pickle.dumps(scorer)
    assert len(data) < 300 and str(bundle).encode() in data and b"safetensors" not in data
    back = pickle.loads(data)
    assert isinstance(back, Scorer) and back is not scorer and back.num_threads == 2
    assert back.bundle_dir == bundle and pickle.loads(data) is back  # one Scorer per process
    assert_same(back.score(texts, samples=4, seed=1), scorer.score(texts, samples=4, seed=1))
    # None (all cores) stays None: the process that unpickles decides
    assert pickle.loads(pickle.dumps(Scorer(bundle))) is shared_scorer(bundle, None)
    # a bundle replaced at the same path (export swaps the directory) is reopened
    path = make_bundle(tmp_path / "b", seed=1)
    first = shared_scorer(path, 1)
    assert shared_scorer(path, 1) is first
    make_bundle(tmp_path / "b", seed=2)
    second = shared_scorer(path, 1)
    assert second is not first
    assert not np.array_equal(second.score(texts[:3])["probs"], first.score(texts[:3])["probs"])


def test_a_pickled_scorer_needs_its_bundle_where_it_is_loaded(bundle, tmp_path):
    import shutil

    copy = shutil.copytree(bundle, tmp_path / "copy")
    data = pickle.dumps(Scorer(copy, num_threads=1))
    shutil.rmtree(copy)
    with pytest.raises(BundleError):
        pickle.loads(data)


# ---- the same numbers, in order, whatever the split ---------------------------------------------------
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_a_list_scores_exactly_as_one_scorer(client, bundle, texts, want, chunk_size):
    got = bl_distributed.score(
        bundle, texts, samples=SAMPLES, seed=SEED, client=client, chunk_size=chunk_size
    )
    assert_same(got, want)


def test_pieces_come_in_input_order_and_each_worker_opens_the_bundle_once(client, bundle, texts, want):
    pieces = list(
        bl_distributed.iter_score(
            Scorer(bundle, num_threads=1), texts, SAMPLES, SEED, client, chunk_size=5, max_in_flight=3
        )
    )
    assert [len(p["label"]) for p in pieces] == [5] * 12 + [1]
    assert_same({k: np.concatenate([p[k] for p in pieces]) for k in FIELDS}, want)

    def opened() -> list:
        from bayeslora import runtime

        return sorted(runtime._SHARED)

    per_worker = client.run(opened)
    assert len(per_worker) == 2
    for keys in per_worker.values():  # one Scorer per process, whatever ran there before
        assert keys == [(str(bundle), 1)], keys


def test_mean_mode_and_a_single_text(client, bundle, texts):
    ref = Scorer(bundle)
    assert_same(bl_distributed.score(bundle, texts, client=client), ref.score(texts))
    assert_same(bl_distributed.score(bundle, texts[3], 4, 9, client), ref.score(texts[3], 4, 9))
    assert_same(bl_distributed.score(bundle, [], SAMPLES, SEED, client), ref.score([], SAMPLES, SEED))


def test_a_dask_bag_scores_exactly_as_one_scorer(client, bundle, texts, want):
    import dask.bag as db

    bag = db.from_sequence(texts, npartitions=4)
    assert_same(bl_distributed.score(bundle, bag, samples=SAMPLES, seed=SEED, client=client), want)


def test_a_dask_dataframe_column_scores_exactly_as_one_scorer(client, bundle, texts, want):
    dd = pytest.importorskip("dask.dataframe")
    import pandas as pd

    frame = dd.from_pandas(pd.DataFrame({"text": texts, "n": range(len(texts))}), npartitions=3)
    assert_same(bl_distributed.score(bundle, frame["text"], samples=SAMPLES, seed=SEED, client=client), want)
    with pytest.raises(InvalidValueError, match="pass the column"):
        bl_distributed.score(bundle, frame, client=client)


def test_bad_inputs_fail_on_the_client_or_name_their_partition(client, bundle, tmp_path):
    import dask.bag as db

    with pytest.raises(InvalidValueError, match="item 2 is a int"):
        bl_distributed.score(bundle, ["w4", "w5", 3], client=client)
    with pytest.raises(BundleError):
        bl_distributed.score(tmp_path, ["w4"], client=client)
    with pytest.raises(InvalidValueError, match="samples must be in"):
        bl_distributed.score(bundle, ["w4"], samples=-1, client=client)
    with pytest.raises(InvalidValueError, match=r"partition 1: .*item 0 is a int"):
        bl_distributed.score(bundle, db.from_sequence(["w4", 5], npartitions=2), client=client, retries=0)


def test_client_none_means_the_default_client(client, bundle, texts, want):
    from distributed import default_client

    assert default_client() is client  # Client(cluster) made itself the default
    assert_same(bl_distributed.score(bundle, texts, samples=SAMPLES, seed=SEED), want)


# ---- a worker killed mid-run ------------------------------------------------------------------------
def test_a_worker_killed_mid_run_loses_and_duplicates_no_row(client, bundle, texts, want, tmp_path):
    marker = str(tmp_path / "killed")

    def install_killer(marker: str) -> int:
        """In this worker process: on the 2nd chunk, the first worker to get there SIGKILLs itself
        (the marker file, created exclusively, makes it one kill in the whole cluster)."""
        import os
        import signal

        from bayeslora import distributed, runtime

        calls = [0]

        def killer(*args, **kwargs):
            calls[0] += 1
            if calls[0] >= 2:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)
            return runtime.shared_scorer(*args, **kwargs)

        distributed.shared_scorer = killer
        return os.getpid()

    def uninstall() -> int:
        from bayeslora import distributed, runtime

        distributed.shared_scorer = runtime.shared_scorer
        return os.getpid()

    before = set(client.run(install_killer, marker).values())
    try:
        got = bl_distributed.score(bundle, texts, samples=SAMPLES, seed=SEED, client=client, chunk_size=3)
    finally:
        client.wait_for_workers(2, timeout=60)
        after = set(client.run(uninstall).values())
    assert os.path.exists(marker)  # a worker did kill itself mid-run
    assert len(after) == 2 and len(before & after) == 1  # the nanny restarted it as a new process
    assert_same(got, want)  # every row exactly once, in order, same numbers


# ---- torch-free, dask optional ------------------------------------------------------------------------
def test_scoring_on_dask_never_imports_torch(bundle, texts, want, tmp_path):
    shim = blocking_shim(tmp_path / "shim")
    res = run_python(
        f"""
        import json, sys
        from distributed import Client
        from bayeslora import distributed
        from bayeslora.errors import ConfigError
        try:
            distributed.score({str(bundle)!r}, ["w4"])
        except ConfigError as e:
            assert "no Dask client" in str(e), e
        else:
            raise AssertionError("no ConfigError without a client")
        with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as c:
            out = distributed.score({str(bundle)!r}, {texts!r}, {SAMPLES}, {SEED}, c, chunk_size=9)
        bad = [m for m in {TORCH_MODULES!r} if m in sys.modules]
        assert not bad, bad
        print(json.dumps(out["probs"].tolist()))
        """,
        shim=shim,
    )
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.array(json.loads(res.stdout), dtype=np.float32), want["probs"])


def test_without_dask_one_clear_error(bundle, tmp_path):
    shim = blocking_shim(tmp_path / "shim", ("dask", "distributed"))
    res = run_python(
        f"""
        from bayeslora import distributed
        from bayeslora.errors import MissingDependencyError
        try:
            distributed.score({str(bundle)!r}, ["w4"])
        except MissingDependencyError as e:
            assert isinstance(e, ImportError)
            print(e)
        """,
        shim=shim,
    )
    assert res.returncode == 0, res.stderr
    assert "install bayeslora[dask]" in res.stdout
    assert issubclass(MissingDependencyError, ImportError)
    cli = run_cli(["score", str(bundle), "--text", "w4", "--workers", "2"], shim)
    assert cli.returncode == 1 and cli.stdout == ""
    assert cli.stderr.startswith("bayeslora: error: ") and cli.stderr.count("\n") == 1, cli.stderr
    assert "install bayeslora[dask]" in cli.stderr


# ---- the command line -------------------------------------------------------------------------------
def test_cli_workers_prints_what_one_process_prints(bundle, texts, want, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)) + "\n")
    common = ["score", str(bundle), "--file", str(path), "--samples", str(SAMPLES), "--seed", str(SEED)]
    local = run_cli([*common, "--threads", "1"])
    assert local.returncode == 0, local.stderr
    res = run_cli([*common, "--workers", "2", "--threads", "1", "--batch-size", "4"])
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "INFO" not in res.stderr, res.stderr  # no cluster logs
    assert res.stdout == local.stdout  # same rows, same order, same digits
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["text"] for r in rows] == texts
    np.testing.assert_array_equal(np.array([r["probs"] for r in rows], dtype=np.float32), want["probs"])


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--workers", "0"], 2, "--workers must be in 1..1024"),
        (["--batch-size", "0", "--workers", "1"], 2, "--batch-size must be >= 1"),
        (["--scheduler", "tcp://127.0.0.1:9"], 1, "cannot connect to the Dask scheduler tcp://127.0.0.1:9"),
        (
            ["--file", "BAD.jsonl", "--workers", "1"],
            1,
            'BAD.jsonl line 2: not a JSON object with a string "text"',
        ),
        (["--file", "NOTJSON.jsonl"], 1, "NOTJSON.jsonl line 1: not JSON"),
    ],
)
def test_cli_dask_errors_are_one_line(bundle, tmp_path, args, code, message):
    (tmp_path / "BAD.jsonl").write_text('{"text": "w4"}\n{"txt": "w5"}\n')
    (tmp_path / "NOTJSON.jsonl").write_text("w4 w5\n")
    args = [str(tmp_path / a) if a.endswith(".jsonl") else a for a in args]
    if "--file" not in args:
        args = ["--text", "w5", *args]
    res = run_cli(
        ["score", str(bundle), *args], env_extra={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    )
    assert res.returncode == code, res.stderr
    assert res.stderr.startswith("bayeslora: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert message in res.stderr and res.stdout == ""
