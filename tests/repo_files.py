"""The repository's own text files, for the tests that scan them (host names, doc references)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_PARTS = frozenset({"__pycache__", "target", ".venv", ".git"})


def text_files(names: Iterable[str], suffixes: set[str]) -> list[Path]:
    """Every file named in ``names`` (files or folders below the repository root, recursively) whose
    suffix is in ``suffixes``, skipping build and cache folders."""
    files = []
    for name in names:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix in suffixes and not SKIPPED_PARTS & set(p.parts)
            ]
    return files
