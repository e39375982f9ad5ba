"""Write an output directory so that readers see the old one or the complete new one, never a half,
and never destroy what bayeslora did not write.

Every directory written here (bundles, adapter directories, PEFT exports, checkpoints) holds a
marker file, ``.bayeslora-output.json``: ``{"format": "bayeslora-output", "kind", "files"}`` with
the top-level names it wrote. An existing destination is replaced only when it is empty or is an
output of the same kind that holds nothing but its own files (outputs of older versions, which
have no marker, are recognised by their manifest); anything else needs ``force``. A destination
that is a file, the current directory (or contains it), or an input of the write is always
refused.

Replacement is one ``renameat2(RENAME_EXCHANGE)`` on Linux, so that a reader finds the old or the
new directory at every instant and an interrupt leaves the old one; elsewhere (or on a file system
without it) two renames, undone if the second fails. The new directory is first written under a
temporary name beside the destination, ``.<name>.bayeslora-tmp-<host>-<pid>-<random>``; such
directories left by a killed process (its pid is gone, or it is over an hour old) are removed by
the next write into the same parent. Directories and files follow the process umask.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import files as F
from .errors import OutputError

MARKER = F.OUTPUT_MARKER
MARKER_FORMAT = F.OUTPUT_MARKER_FORMAT
STALE_AFTER_S = 3600.0  # a temporary directory this old is stale even if its pid looks alive


@dataclass(frozen=True)
class _Kind:
    description: str
    manifest: str  # the file that identifies an output of this kind written before markers
    names: frozenset[str]  # every top-level name such an output may hold


# The names the writers use (formats/bundle.py, nn/checkpoint.py, formats/peft.py, train/pipeline.py).
KINDS: dict[str, _Kind] = {
    "bundle": _Kind("runtime bundle", F.BUNDLE_META, frozenset(F.BUNDLE_FILES)),
    "adapter": _Kind("adapter directory", F.ADAPTER_CONFIG, frozenset(F.ADAPTER_FILES)),
    "peft": _Kind("PEFT export", F.POSTERIOR_META, frozenset(F.PEFT_FILES)),
    "checkpoint": _Kind(
        "checkpoint",
        F.RUN_FILE,
        frozenset(
            {
                F.CHECKPOINT_ADAPTER,
                F.CHECKPOINT_TOKENIZER,
                F.RUN_FILE,
                f".{F.RUN_FILE}.tmp",
                F.CHECKPOINT_TRAINER,
                ".write-test",
            }
        ),
    ),
}

_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]
_TEMP = re.compile(
    r"^\.(?P<name>.+)\.bayeslora-(?P<role>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[a-z0-9_]{8}$"
)
_LEGACY_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}$")  # tempfile.mkdtemp(prefix=".<name>.")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


# ---- what is at the destination ----------------------------------------------------------------
def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _marker(path: Path) -> dict | None:
    data = _read_json(path / MARKER)
    if isinstance(data, dict) and data.get("format") == MARKER_FORMAT and isinstance(data.get("kind"), str):
        return data
    return None


def _legacy_kind(path: Path, entries: set[str]) -> str | None:
    """The kind of an output an older version wrote (no marker), recognised by its manifest."""
    for kind, spec in KINDS.items():
        if spec.manifest not in entries or not entries <= spec.names:
            continue
        meta = _read_json(path / spec.manifest)
        if not isinstance(meta, dict):
            continue
        if kind == "bundle" and {"format_version", "architecture", "modules"} <= meta.keys():
            return kind
        if kind == "adapter" and {"format_version", "config", "modules"} <= meta.keys():
            return kind
        if kind == "peft" and meta.get("format") == "bayeslora-peft-posterior":
            return kind
        if kind == "checkpoint" and {"settings", "base_model"} <= meta.keys():
            return kind
    return None


def _refusal(path: Path, entries: set[str], kind: str) -> str | None:
    """Why the non-empty directory ``path`` may not be replaced by an output of ``kind`` without
    force, or None when it is such an output already."""
    want = KINDS[kind].description
    marker = _marker(path)
    if marker is not None:
        theirs = marker["kind"]
        if theirs != kind:
            return (
                f"holds a bayeslora {KINDS[theirs].description if theirs in KINDS else theirs}, not a {want}"
            )
        files = marker.get("files")
        ours = {str(f) for f in (files if isinstance(files, list) else [])} | KINDS[kind].names
        foreign = sorted(entries - {MARKER} - ours)
        if foreign:
            return f"holds files bayeslora did not write ({', '.join(foreign[:3])})"
        return None
    legacy = _legacy_kind(path, entries)
    if legacy == kind:
        return None
    if legacy is not None:
        return f"holds a bayeslora {KINDS[legacy].description}, not a {want}"
    sample = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
    return f"is a directory bayeslora did not write ({len(entries)} entries: {sample})"


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(
    out: str | os.PathLike, *, kind: str, force: bool = False, sources: Iterable[str | os.PathLike] = ()
) -> None:
    """Raise :class:`OutputError` unless an output of ``kind`` may be written at ``out``.

    Refused always: ``out`` is an existing non-directory, the current directory or one that
    contains it, or equal to or containing one of ``sources`` (the inputs of the write). Refused
    unless ``force``: a non-empty directory that is not a ``kind`` output of bayeslora holding
    only its own files.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    shown = os.fspath(out)
    real = Path(out).resolve()
    if _within(Path.cwd().resolve(), real):
        what = (
            "the current directory"
            if real == Path.cwd().resolve()
            else "a directory that holds the current directory"
        )
        raise OutputError(f"{shown} is {what}; write the output to a new directory")
    for source in sources:
        src = Path(source).resolve()
        if _within(src, real):
            what = "is" if src == real else "contains"
            raise OutputError(f"{shown} {what} the input {os.fspath(source)}; write the output elsewhere")
    if not os.path.lexists(real):
        return
    if not real.is_dir():
        raise OutputError(f"{shown} exists and is not a directory; remove it or choose another output path")
    try:
        entries = set(os.listdir(real))
    except OSError as e:
        raise OutputError(f"cannot read {shown}: {e.strerror or e}") from e
    if entries and not force:
        reason = _refusal(real, entries, kind)
        if reason is not None:
            raise OutputError(f"{shown} {reason}; refusing to replace it (--force / force=True replaces it)")


# ---- temporary directories -----------------------------------------------------------------------
def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the racy way
    os.umask(mask)
    return mask


def _make_temp(parent: Path, name: str, role: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.bayeslora-{role}-{_HOST}-{os.getpid()}-", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700 whatever the umask
    return tmp


def _apply_umask(root: Path) -> None:
    """Give every directory and file under ``root`` the mode a plain ``mkdir``/``open`` would
    (some writers, e.g. safetensors, create 0600 files whatever the umask)."""
    mask = _umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in filenames:
            path = os.path.join(dirpath, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def sweep_stale(parent: Path) -> list[Path]:
    """Remove the temporary directories in ``parent`` that killed writes left (their process is
    gone, or they are over an hour old); a killed two-rename replacement's saved old directory is
    renamed back when its destination is missing. Returns the paths removed or restored."""
    done: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return done
    now = time.time()
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        m = _TEMP.match(entry.name)
        if m is None and _LEGACY_TEMP.match(entry.name) is None:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if m is not None:
            pid, same_host = int(m["pid"]), m["host"] == _HOST
            if same_host and pid == os.getpid():
                continue  # this process's own write in flight (another thread)
            if age < STALE_AFTER_S and (not same_host or _pid_alive(pid)):
                continue
            path = Path(entry.path)
            dest = parent / m["name"]
            if m["role"] == "old" and not os.path.lexists(dest):
                try:
                    os.rename(path, dest)  # the replacement died between its two renames
                    done.append(dest)
                except OSError:
                    pass
                continue
            shutil.rmtree(path, ignore_errors=True)
            done.append(path)
            continue
        m = _LEGACY_TEMP.match(entry.name)
        if m is not None and age >= STALE_AFTER_S:
            # an older version's temporary directory: only if it holds nothing but output files
            try:
                names = set(os.listdir(entry.path))
            except OSError:
                continue
            if names and names <= frozenset().union(*(k.names for k in KINDS.values())):
                shutil.rmtree(entry.path, ignore_errors=True)
                done.append(Path(entry.path))
    return done


# ---- renames -------------------------------------------------------------------------------------
def _libc_renameat2() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2_fn = _libc_renameat2()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the platform, kernel or file system lacks it."""
    if _renameat2_fn is None:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def _install(tmp: Path, dest: Path) -> None:
    """Move the finished directory ``tmp`` to ``dest``, replacing what is there at once."""
    if not os.path.lexists(dest):
        if not _renameat2(tmp, dest, _RENAME_NOREPLACE):
            os.rename(tmp, dest)
        return
    if not any(os.scandir(dest)):
        os.rename(tmp, dest)  # rename(2) replaces an empty directory atomically
        return
    if _renameat2(tmp, dest, _RENAME_EXCHANGE):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
        return
    old = _make_temp(dest.parent, dest.name, "old")
    try:
        os.rename(dest, old)  # replaces the empty placeholder
        os.rename(tmp, dest)
    except BaseException:
        if not os.path.lexists(dest) and os.path.lexists(old):
            os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_marker(tmp: Path, kind: str) -> None:
    try:
        from . import __version__ as version
    except ImportError:  # pragma: no cover - the extension is always built
        version = "unknown"
    files = sorted(os.listdir(tmp))
    meta = {"format": MARKER_FORMAT, "kind": kind, "files": files, "writer": f"bayeslora {version}"}
    (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def write_dir_atomically(
    out: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    kind: str,
    force: bool = False,
    sources: Iterable[str | os.PathLike] = (),
) -> Path:
    """Call ``write(tmp)`` on a fresh directory beside ``out``, then move it into place.

    ``out`` is checked first (see :func:`check_output_dir`: ``kind`` is what is written, ``force``
    allows replacing a directory bayeslora did not write, ``sources`` are the inputs it must not
    replace) and again just before the move. An existing ``out`` is replaced only after ``write``
    succeeded, in one step where the platform allows it; on any failure (an exception,
    ``KeyboardInterrupt``) the temporary directory is removed and ``out`` is left as it was. A
    symbolic link at ``out`` is followed: its target is written. Returns ``Path(out)``.

    Raises:
        OutputError: ``out`` is refused, or its parent cannot be created or written.
    """
    sources = list(sources)
    check_output_dir(out, kind=kind, force=force, sources=sources)
    dest = Path(out).resolve()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(dest.parent)
        tmp = _make_temp(dest.parent, dest.name, "tmp")
    except OSError as e:
        raise OutputError(f"cannot write {os.fspath(out)}: {e.strerror or e}") from e
    try:
        write(tmp)
        _write_marker(tmp, kind)
        _apply_umask(tmp)
        check_output_dir(out, kind=kind, force=force, sources=sources)  # it may have changed meanwhile
        _install(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out)


def output_sources(model: object) -> list[str]:
    """The local directory a model was loaded from (``config._name_or_path``), if it is one: an
    export must not replace it."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if isinstance(path, str) and path and os.path.isdir(path):
        return [path]
    return []


__all__ = ["MARKER", "check_output_dir", "output_sources", "sweep_stale", "write_dir_atomically"]
