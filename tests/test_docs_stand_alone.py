"""A clone of the repository stands alone: its documentation is inside it, and every citation resolves.

Docstrings, comments, the README and the benches cite the method by section ("docs/method.md §6") and
the formats and layout by page (``docs/formats.md``, ``docs/architecture.md``). This test fails on
any reference to notes that live outside the repository (a ``shared`` folder beside the clone, the
old design and specification notes, or their section citations), on a ``docs/<name>.md`` that does
not exist, on a cited section of ``docs/method.md`` that is not one of its headings, and on a file
named (``bayeslora/train/pipeline.py``, `` `nn/layer.py` ``) that is not in the repository. Needs no
torch and no built extension.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from repo_files import text_files

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCANNED = ("README.md", "pyproject.toml", "Cargo.toml", "python", "tests", "benches", "docs", "rust")
TEXT_SUFFIXES = {".py", ".pyi", ".rs", ".md", ".toml"}

# Put together at run time, so that this file does not contain what it looks for.
OUTSIDE = ("../" + "shared", "SPEC" + ".md", "DESIGN" + ".md", "SPEC" + " §")
METHOD = "docs/" + "method.md"

_DOC_PAGE = re.compile(r"(?<![\w/.-])docs/([A-Za-z0-9_-]+)\.md\b")
# "docs/method.md §4", "… §2b", "… §2, §3", "… §2–§5"
_CITATION = re.compile(re.escape(METHOD) + r" (§[0-9]+[a-z]?(?:\s*(?:,|–|-|and)\s*§[0-9]+[a-z]?)*)")
_SECTION = re.compile(r"§([0-9]+[a-z]?)")
# "## 4. Objective and schedule", "### 2b. `additive`: ..."
_HEADING = re.compile(r"^#{1,6}\s+([0-9]+[a-z]?)\.\s", re.MULTILINE)
# relative links between the pages of docs/: "[formats.md](formats.md)"
_RELATIVE_LINK = re.compile(r"\]\(([A-Za-z0-9_-]+\.md)(?:#[^)]*)?\)")


def scanned_files() -> list[Path]:
    return text_files(SCANNED, TEXT_SUFFIXES)


def outside_references(text: str) -> list[tuple[int, str]]:
    """(line number, what) for every reference to notes outside the repository."""
    return [
        (number, needle)
        for number, line in enumerate(text.splitlines(), 1)
        for needle in OUTSIDE
        if needle in line
    ]


def doc_pages(text: str) -> list[tuple[int, str]]:
    """(line number, page name) of every ``docs/<name>.md`` in ``text``."""
    return [
        (number, m.group(1))
        for number, line in enumerate(text.splitlines(), 1)
        for m in _DOC_PAGE.finditer(line)
    ]


def method_citations(text: str) -> list[tuple[int, str]]:
    """(line number, section) of every section of docs/method.md cited in ``text``."""
    return [
        (number, section)
        for number, line in enumerate(text.splitlines(), 1)
        for m in _CITATION.finditer(line)
        for section in _SECTION.findall(m.group(1))
    ]


def method_sections() -> set[str]:
    """The numbered headings of docs/method.md ("1", "2", "2a", ...)."""
    return set(_HEADING.findall((DOCS / "method.md").read_text("utf-8")))


def _texts() -> list[tuple[Path, str]]:
    return [(p, p.read_text("utf-8", errors="replace")) for p in scanned_files()]


def test_scanners_find_what_they_should():
    old_spec = "SPEC" + " §6"
    text = (
        f"see {METHOD} §4: the loss; {METHOD} §2b's trap\n"
        f"(config: {METHOD} §2–§5), stubs ({METHOD} §2, §3), and §9 on its own\n"
        f"the format (docs/formats.md), not mydocs/x.md; {old_spec} fields\n"
        "weights under ../" + "shared/models and a DESIGN" + ".md note\n"
    )
    assert method_citations(text) == [(1, "4"), (1, "2b"), (2, "2"), (2, "5"), (2, "2"), (2, "3")]
    assert doc_pages(text) == [(1, "method"), (1, "method"), (2, "method"), (2, "method"), (3, "formats")]
    assert outside_references(text) == [(3, "SPEC" + " §"), (4, "../" + "shared"), (4, "DESIGN" + ".md")]
    assert _HEADING.findall("## 1. The idea\n### 2b. `additive`\n#### Not 3 a section\n") == ["1", "2b"]


def test_method_has_sections_1_to_10():
    sections = method_sections()
    missing = [str(n) for n in range(1, 11) if str(n) not in sections]
    assert not missing, f"docs/method.md lacks the numbered sections {missing}"


def test_no_reference_outside_the_repository():
    files = _texts()
    assert any(p.name == "README.md" for p, _ in files) and any(p.suffix == ".rs" for p, _ in files)
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {needle!r}"
        for path, text in files
        for number, needle in outside_references(text)
    ]
    assert not offenders, (
        "references to notes outside the repository (cite docs/method.md §N, docs/formats.md or "
        "docs/architecture.md instead):\n  " + "\n  ".join(offenders)
    )


def test_every_cited_doc_page_exists():
    missing = [
        f"{path.relative_to(ROOT)}:{number}: docs/{name}.md"
        for path, text in _texts()
        for number, name in doc_pages(text)
        if not (DOCS / f"{name}.md").is_file()
    ]
    missing += [
        f"{page.relative_to(ROOT)}: ({link})"
        for page in sorted(DOCS.glob("*.md"))
        for link in _RELATIVE_LINK.findall(page.read_text("utf-8"))
        if not (DOCS / link).is_file()
    ]
    assert not missing, "pages cited but not in docs/:\n  " + "\n  ".join(missing)


def test_every_cited_method_section_exists():
    sections = method_sections()
    missing = [
        f"{path.relative_to(ROOT)}:{number}: §{section}"
        for path, text in _texts()
        for number, section in method_citations(text)
        if section not in sections
    ]
    assert not missing, (
        f"sections of docs/method.md cited but not among its headings {sorted(sections)}:\n  "
        + "\n  ".join(missing)
    )


# ---- files the text names ----------------------------------------------------------------------------
PACKAGE = ROOT / "python" / "bayeslora"
# "bayeslora/train/pipeline.py", "python/bayeslora/files.py"
_PACKAGE_PATH = re.compile(r"(?<![\w/.-])(?:python/)?bayeslora/([\w/]+\.pyi?)\b")
# `nn/layer.py`, `runtime.py`, `tests/test_layout.py` in the pages: backticked relative file names
_BACKTICKED = re.compile(r"`([\w./-]+\.(?:py|pyi|rs|toml))`")
# files of other projects the pages name: the authors' GLUE harness, an sdist's setup script
ELSEWHERE = {"run_glue_bench.py", "glue_helpers.py", "setup.py"}


def named_files(text: str, backticked: bool) -> list[tuple[int, str]]:
    """(line number, name) of the package paths in ``text``, and of backticked file names too."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        found += [(number, "bayeslora/" + m.group(1)) for m in _PACKAGE_PATH.finditer(line)]
        if backticked:
            found += [
                (number, m.group(1)) for m in _BACKTICKED.finditer(line) if "bayeslora/" not in m.group(1)
            ]
    return found


def _exists(name: str, here: Path = ROOT) -> bool:
    """Whether ``name`` is a file of the repository: a package path, or a name relative to the
    repository, the package or the naming file's folder."""
    if name in ELSEWHERE:
        return True
    if name.startswith("bayeslora/"):
        return (PACKAGE.parent / name).is_file()
    if any((base / name).exists() for base in (ROOT, PACKAGE, here)):
        return True
    return "/" not in name and name in _basenames()  # "a `tests.rs` beside them"


@functools.cache
def _basenames() -> frozenset[str]:
    return frozenset(p.name for p in text_files(SCANNED, TEXT_SUFFIXES | {".pyi"}))


def test_file_scanner_finds_package_paths():
    text = (
        "see `bayeslora/train/pipeline.py`, python/bayeslora/files.py and `nn/layer.py`\nnot mybayeslora/x.py"
    )
    assert named_files(text, backticked=True) == [
        (1, "bayeslora/train/pipeline.py"),
        (1, "bayeslora/files.py"),
        (1, "nn/layer.py"),
    ]
    assert _exists("bayeslora/files.py") and _exists("nn/layer.py") and not _exists("layers.py")


def test_every_named_file_exists():
    missing = [
        f"{path.relative_to(ROOT)}:{number}: {name}"
        for path, text in _texts()
        for number, name in named_files(text, backticked=True)
        if not _exists(name, path.parent)
    ]
    assert not missing, "files named but not in the repository:\n  " + "\n  ".join(missing)
