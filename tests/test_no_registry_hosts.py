"""The repository names no package-registry host: where packages come from is the user's pip setup.

A user's machine, a company mirror or an air-gapped proxy decides which index serves packages, and
pip already knows it (see ``bayeslora._fetch``). So every URL in the package code, the tests, the
benches, the CI script and the docs uses a reserved name (RFC 2606 / RFC 6761: ``.invalid``,
``.example``, ``.test``, ``localhost``, loopback addresses), and so does every bare host name
(``name.tld`` without a scheme). Documents may cite papers and repositories on the hosts listed in
``CITATION_HOSTS`` (none so far); never add a package index or its file host there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from repo_files import text_files

ROOT = Path(__file__).resolve().parents[1]
SCANNED = (
    "python",
    "tests",
    "benches",
    "docs",
    ".ci",
    "rust",
    "README.md",
    "pyproject.toml",
    "Cargo.toml",
)
TEXT_SUFFIXES = {".py", ".pyi", ".md", ".rst", ".txt", ".toml", ".json", ".cfg", ".ini", ".yml", ".yaml"}
TEXT_SUFFIXES |= {".sh", ".rs", ""}  # "" : scripts such as .ci/run
RESERVED_SUFFIXES = (".invalid", ".example", ".test", ".localhost")
RESERVED_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0"}
# Hosts of papers and source repositories that documentation cites (add them one by one, with care).
CITATION_HOSTS: frozenset[str] = frozenset()

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://([^\s/?#'\"<>()\[\]`\\]*)")
_BARE_HOST = re.compile(
    r"(?<![\w.@/-])((?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+"
    r"(?:org|com|net|io|dev|ai|co|app|cloud|sh|edu|gov|info|uk|de|fr|cn|jp|me|xyz|site))\b",
    re.IGNORECASE,
)
# Dotted Python names that look like host names (module paths of this package).
_NOT_HOSTS = re.compile(r"^bayeslora(\.\w+)+$")


def _allowed(host: str) -> bool:
    host = host.lower().rstrip(".")
    return (
        host in RESERVED_HOSTS
        or host.endswith(RESERVED_SUFFIXES)
        or host.lstrip(".") in {s.lstrip(".") for s in RESERVED_SUFFIXES}
        or host in CITATION_HOSTS
        or bool(_NOT_HOSTS.match(host))
    )


def _hosts(line: str) -> list[str]:
    """The literal host names written in one line of text (URLs and bare ``name.tld``)."""
    found = []
    for match in _URL.finditer(line):
        netloc = match.group(1).rpartition("@")[2]
        if not netloc or netloc.startswith("{"):  # a host filled in at run time (f-string)
            continue
        host = netloc if netloc.startswith("[") else netloc.split(":", 1)[0]
        found.append(host)
    stripped = _URL.sub(" ", line)
    found += [m.group(1) for m in _BARE_HOST.finditer(stripped)]
    return found


def offending_hosts(text: str) -> list[tuple[int, str]]:
    """(line number, host) for every host name in ``text`` that is not reserved or cited."""
    return [
        (number, host)
        for number, line in enumerate(text.splitlines(), 1)
        for host in _hosts(line)
        if not _allowed(host)
    ]


def _scanned_files() -> list[Path]:
    return text_files(SCANNED, TEXT_SUFFIXES)


def test_scanner_finds_hosts_and_spares_reserved_names():
    # the offending samples are put together at run time, so that this file names no host itself
    org, net, com, sep = "org", "net", "com", "://"
    text = (
        f'INDEX = "https{sep}packages.somewhere.{org}/simple"\n'
        f"see mirror.somewhere.{net} for files\n"
        f"git+ssh{sep}user@code.somewhere.{com}:22/repo\n"
        'ok = ["https://index.invalid/simple", "http://127.0.0.1:8000/x", "https://files.example/a"]\n'
        'f"http://localhost:{port}/", f"https://{host}/simple", "user:pw@mirror.test"\n'
        "bayeslora.io and bayeslora.data are modules, model.safetensors a file\n"
    )
    assert offending_hosts(text) == [
        (1, f"packages.somewhere.{org}"),
        (2, f"mirror.somewhere.{net}"),
        (3, f"code.somewhere.{com}"),
    ]


def test_repository_names_no_registry_host():
    files = _scanned_files()
    assert any(p.name == "_fetch.py" for p in files) and any(p.name == "README.md" for p in files)
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {host}"
        for path in files
        for number, host in offending_hosts(path.read_text("utf-8", errors="replace"))
    ]
    if offenders:
        pytest.fail(
            "host names in the repository (use a reserved name such as index.invalid or localhost; "
            "the index comes from pip's configuration):\n  " + "\n  ".join(offenders)
        )
