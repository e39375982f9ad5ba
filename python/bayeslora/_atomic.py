"""Write a directory so that readers see the old one or the complete new one, never a half."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_dir_atomically(out: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh directory beside ``out``, then rename it into place.

    An existing ``out`` is replaced only after ``write`` succeeded; on any failure (an exception,
    ``KeyboardInterrupt``) the temporary directory is removed and ``out`` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
