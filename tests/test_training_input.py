"""Training input: long CSV fields, datasets too small for the splits, no empty --out left behind."""

from __future__ import annotations

import csv

import pytest

from bayeslora.data import read_csv_dataset
from bayeslora.errors import DataError
from bayeslora.train.pipeline import TrainSettings, train


def test_csv_fields_longer_than_the_csv_modules_limit_are_read(tmp_path):
    limit = csv.field_size_limit()
    long_text = "good " * 60_000  # 300,000 characters, over the default 131,072
    path = tmp_path / "long.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([[long_text, "pos"], ["bad film", "neg"]])
    texts, labels, names = read_csv_dataset(path)
    assert texts == [long_text.strip(), "bad film"] and names == ("neg", "pos")
    assert list(labels) == [1, 0]
    assert csv.field_size_limit() == limit  # the module-wide limit is restored


def test_a_malformed_csv_is_still_refused(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('text,label\n"unterminated,pos\n')
    limit = csv.field_size_limit()
    with pytest.raises(DataError):
        read_csv_dataset(path)
    assert csv.field_size_limit() == limit


@pytest.mark.parametrize("rows", [2, 3, 8])
def test_a_dataset_too_small_for_the_splits_is_refused_up_front(tmp_path, rows):
    path = tmp_path / "small.csv"
    path.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(rows)))
    settings = TrainSettings(model=str(tmp_path / "no-model"), data=f"csv:{path}")
    with pytest.raises(DataError, match=r"0 validation, 0 test .* give some class 5 or more examples"):
        train(settings, tmp_path / "new" / "out", progress=False)
    assert not (tmp_path / "new").exists()  # the directories it created are gone
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError):
        train(settings, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine").is_dir()  # not created by the run: kept


def test_max_eval_zero_is_refused(tmp_path, sentiment_csv):
    settings = TrainSettings(model=str(tmp_path / "no-model"), data=f"csv:{sentiment_csv}", max_eval=0)
    with pytest.raises(DataError, match="max_eval must be >= 1"):
        train(settings, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
