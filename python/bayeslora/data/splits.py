"""Deterministic stratified train/validation/test splits of a labelled dataset (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class Split:
    """Texts and their integer labels; ``labels`` is int64 of shape [len(texts)].

    ``text_pairs``: for sentence-pair data (NLI, paraphrase), the second segment of every example
    (``[len(texts)]``, tokenised as the tokenizer's pair input); None for single texts.
    """

    texts: list[str]
    labels: np.ndarray
    text_pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> Split:
        """The first ``n`` examples (all when ``n`` is None): texts, pairs and labels alike."""
        pairs = None if self.text_pairs is None else self.text_pairs[:n]
        return Split(self.texts[:n], self.labels[:n], pairs)

    def take(self, idx: Sequence[int] | np.ndarray) -> Split:
        """The examples at positions ``idx`` [M], in that order: texts, pairs and labels alike."""
        return _take(self.texts, self.labels, np.asarray(idx, dtype=np.int64), self.text_pairs)

    def counts(self, num_labels: int) -> np.ndarray:
        """Examples per class, int64 [num_labels]."""
        return np.bincount(self.labels, minlength=num_labels)


@dataclass(frozen=True)
class DatasetSplits:
    """A labelled dataset: ``all`` rows in source order and stratified train/validation/test splits.

    Each split is shuffled (deterministically from the seed), so ``train.texts[:n]`` is a random,
    roughly stratified subset. Label ``i`` means ``label_names[i]``.
    """

    name: str
    label_names: tuple[str, ...]
    train: Split
    validation: Split
    test: Split
    all: Split
    source: str
    seed: int
    notes: tuple[str, ...] = field(default=())

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def summary(self) -> dict[str, object]:
        """Sizes and per-class counts as plain JSON-able values (for ``--json`` output)."""
        k = self.num_labels
        return {
            "name": self.name,
            "labels": list(self.label_names),
            "seed": self.seed,
            "source": self.source,
            "notes": list(self.notes),
            "splits": {
                split_name: {"n": len(split), "counts": split.counts(k).tolist()}
                for split_name, split in self._named_splits()
            },
        }

    def _named_splits(self) -> tuple[tuple[str, Split], ...]:
        return (
            ("train", self.train),
            ("validation", self.validation),
            ("test", self.test),
            ("all", self.all),
        )

    def describe(self) -> str:
        """Sizes and class balance of every split, as a small text table."""
        k = self.num_labels
        width = max(12, *(len(n) + 9 for n in self.label_names))
        lines = [
            f"{self.name}: {len(self.all):,} examples, {k} labels; seed {self.seed}",
            f"source: {self.source}",
            *(f"note: {n}" for n in self.notes),
            f"{'split':<10} {'n':>7}" + "".join(f" {n:>{width}}" for n in self.label_names),
        ]
        for split_name, split in self._named_splits():
            counts = split.counts(k)
            n = max(len(split), 1)
            cells = "".join(f" {f'{c} ({100 * c / n:.1f}%)':>{width}}" for c in counts)
            lines.append(f"{split_name:<10} {len(split):>7}{cells}")
        return "\n".join(lines)


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def stratified_split(
    labels: np.ndarray, seed: int, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified split of row indices into (train, validation, test).

    Per class of size n: ``round(n·val_fraction)`` rows to validation and ``round(n·test_fraction)``
    to test (rounding halves up), the rest to train, so every split holds each class in its overall
    proportion to within one example (a class needs n ≥ 5 to reach every split at 10%). Each
    returned index array is shuffled.
    ``labels``: int [N]. Returns three int64 arrays that partition ``range(N)``.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"bad split fractions: validation {val_fraction}, test {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n = len(idx)
        n_val = _round_half_up(n * val_fraction)
        n_test = _round_half_up(n * test_fraction)
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    train, val, test = (
        rng.permutation(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts
    )
    return train, val, test


def _take(
    texts: Sequence[str], labels: np.ndarray, idx: np.ndarray, pairs: Sequence[str] | None = None
) -> Split:
    return Split(
        [texts[i] for i in idx],
        labels[idx].astype(np.int64),
        None if pairs is None else [pairs[i] for i in idx],
    )


def make_splits(
    name: str,
    texts: Sequence[str],
    labels: np.ndarray,
    label_names: Sequence[str],
    *,
    seed: int,
    source: str,
    notes: Sequence[str] = (),
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    text_pairs: Sequence[str] | None = None,
) -> DatasetSplits:
    """Wrap rows (``texts`` [N], int ``labels`` [N] in 0..len(label_names)-1, optional second
    segments ``text_pairs`` [N]) into stratified splits."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(texts) != len(labels):
        raise DataError(f"{name}: {len(texts)} texts but {len(labels)} labels")
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise DataError(f"{name}: {len(texts)} texts but {len(text_pairs)} text pairs")
    train, val, test = stratified_split(labels, seed, val_fraction, test_fraction)
    return DatasetSplits(
        name=name,
        label_names=tuple(label_names),
        train=_take(texts, labels, train, text_pairs),
        validation=_take(texts, labels, val, text_pairs),
        test=_take(texts, labels, test, text_pairs),
        all=Split(list(texts), labels.copy(), None if text_pairs is None else list(text_pairs)),
        source=source,
        seed=seed,
        notes=tuple(notes),
    )
