"""A user's labelled examples from a file: ``csv:PATH`` and ``jsonl:PATH`` (numpy and the standard
library only).

- CSV: UTF-8, a header line naming ``text`` and ``label`` (and ``text_pair`` for sentence pairs);
  other columns are ignored.
- JSON lines: one object per line with ``"text"``, ``"label"`` (a string or an integer) and, for
  sentence pairs, ``"text_pair"``; either every line has ``text_pair`` or none.

Labels are the sorted distinct label strings (numerically when every one is an integer) mapped to
0..K−1. A user's file is only read, never written.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

FILE_KINDS: tuple[str, ...] = ("csv", "jsonl")


@dataclass(frozen=True)
class Rows:
    """Every example of a file in file order: ``texts`` [N], ``text_pairs`` [N] or None, ``labels``
    int64 [N] in 0..K−1, ``label_names`` [K]."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: np.ndarray
    label_names: tuple[str, ...]


def is_file_spec(name: str) -> bool:
    """Whether ``name`` names a user's file (``csv:PATH`` or ``jsonl:PATH``), not a packaged dataset."""
    return name.partition(":")[0] in FILE_KINDS and ":" in name


def read_rows(spec: str) -> Rows:
    """The examples of ``csv:PATH`` or ``jsonl:PATH``."""
    kind, _, path = spec.partition(":")
    if kind == "csv":
        return read_csv_rows(path)
    if kind == "jsonl":
        return read_jsonl_rows(path)
    raise DataError(f"{spec!r}: expected csv:PATH or jsonl:PATH")


def _label_order(values: set[str]) -> list[str]:
    """Sorted label strings; numerically when every label is an integer ("2" before "10")."""
    try:
        return sorted(values, key=lambda v: (int(v), v))
    except ValueError:
        return sorted(values)


def _read_text(path: Path, what: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"{what} file {path} does not exist") from err
    except IsADirectoryError as err:
        raise DataError(f"{path} is a directory, not a {what} file") from err
    except OSError as err:
        raise DataError(f"cannot read {what} file {path}: {err}") from err
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8 (byte {err.start}, line {line}): save it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 in.{what.lower()} > out.{what.lower()}`"
        ) from err


def _rows(path: Path, texts: list[str], pairs: list[str] | None, label_strs: list[str], header: str) -> Rows:
    if not texts:
        raise DataError(f"{path} has no examples: it needs {header} and rows")
    names = _label_order(set(label_strs))
    if len(names) < 2:
        raise DataError(f"{path}: every row has label {names[0]!r}; a classifier needs at least 2 classes")
    index = {name: i for i, name in enumerate(names)}
    labels = np.asarray([index[s] for s in label_strs], dtype=np.int64)
    return Rows(texts, pairs, labels, tuple(names))


def read_csv_rows(path: str | Path) -> Rows:
    """Read a UTF-8 CSV whose header names ``text`` and ``label`` (and ``text_pair`` for pairs).

    Raises :class:`DataError` for an unreadable or non-UTF-8 file, a missing column, an empty file,
    an empty field, or one class.
    """
    path = Path(path).expanduser()
    content = _read_text(path, "CSV")
    if not content.strip():
        raise DataError(f"CSV file {path} is empty: it needs a header `text,label` and rows")
    reader = csv.reader(io.StringIO(content, newline=""))
    field_limit = csv.field_size_limit()  # 131,072 characters: long texts are fine, up to the file
    csv.field_size_limit(max(field_limit, min(len(content), 2**31 - 1)))
    try:
        header = next(reader)
        columns = [h.strip().lower() for h in header]
        missing = [c for c in ("text", "label") if c not in columns]
        if missing:
            raise DataError(
                f"{path}: the header {header} lacks column(s) {', '.join(missing)}; "
                f"expected a header line `text,label` (or `text,text_pair,label` for pairs)"
            )
        wanted = ["text", "text_pair", "label"] if "text_pair" in columns else ["text", "label"]
        where_col = [columns.index(c) for c in wanted]
        texts: list[str] = []
        pairs: list[str] | None = [] if "text_pair" in columns else None
        label_strs: list[str] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) <= max(where_col):
                raise DataError(f"{where}: {len(row)} fields, the header has {len(header)}")
            cells = {c: row[i].strip() for c, i in zip(wanted, where_col, strict=True)}
            for c in wanted:
                if not cells[c]:
                    raise DataError(f"{where}: empty {c.replace('_', ' ')}")
            texts.append(cells["text"])
            label_strs.append(cells["label"])
            if pairs is not None:
                pairs.append(cells["text_pair"])
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from err
    finally:
        csv.field_size_limit(field_limit)
    if not texts:
        raise DataError(f"CSV file {path} has a header but no rows")
    return _rows(path, texts, pairs, label_strs, "a header `text,label`")


def read_jsonl_rows(path: str | Path) -> Rows:
    """Read UTF-8 JSON lines, one object per line with ``text``, ``label`` and optionally
    ``text_pair`` (every line or none). Raises :class:`DataError` naming the line of a problem."""
    path = Path(path).expanduser()
    content = _read_text(path, "JSONL")
    texts: list[str] = []
    pairs: list[str] = []
    label_strs: list[str] = []
    has_pair: bool | None = None
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected an object with text and label, got {type(obj).__name__}")
        missing = [k for k in ("text", "label") if k not in obj]
        if missing:
            raise DataError(f"{where}: lacks {', '.join(missing)}")
        if has_pair is None:
            has_pair = "text_pair" in obj
        elif has_pair != ("text_pair" in obj):
            raise DataError(f"{where}: text_pair on some lines but not on others")
        label = obj["label"]
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise DataError(f"{where}: label must be a string or an integer, got {label!r}")
        fields = ("text", "text_pair") if has_pair else ("text",)
        for key in fields:
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise DataError(f"{where}: {key} must be a non-empty string")
        if not str(label).strip():
            raise DataError(f"{where}: empty label")
        texts.append(obj["text"].strip())
        label_strs.append(str(label).strip())
        if has_pair:
            pairs.append(obj["text_pair"].strip())
    return _rows(path, texts, pairs if has_pair else None, label_strs, 'lines {"text": ..., "label": ...}')
