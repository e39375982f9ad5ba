"""Running bayeslora in a child Python, optionally with packages made unimportable: the torch-free
promise (``tests/test_torch_free.py``) and the optional dependencies (torch, Dask) are tested there,
where the test process's own imports cannot hide a leak."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"
TORCH = ("torch", "transformers")  # what the torch-free side must run without
# modules whose presence in sys.modules means torch was loaded after all
TORCH_MODULES = ("torch", "transformers", "safetensors.torch")


def blocking_shim(root: Path, packages: Sequence[str] = TORCH) -> Path:
    """A folder that, first on ``PYTHONPATH``, makes each of ``packages`` raise ImportError."""
    for pkg in packages:
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").write_text(f"raise ImportError('{pkg} is blocked in this test')\n")
    return root


def child_env(shim: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    path = [str(PYTHON_DIR)] if shim is None else [str(shim), str(PYTHON_DIR)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **(extra or {})}


def run_python(
    code: str, *args: str, shim: Path | None = None, timeout: int = 120
) -> subprocess.CompletedProcess:
    """``python -c code args...`` (``code`` dedented)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=child_env(shim),
        timeout=timeout,
    )


def run_cli(
    args: Sequence[str], shim: Path | None = None, env_extra: dict[str, str] | None = None, timeout: int = 180
) -> subprocess.CompletedProcess:
    """``python -m bayeslora.cli args...``."""
    return subprocess.run(
        [sys.executable, "-m", "bayeslora.cli", *args],
        capture_output=True,
        text=True,
        env=child_env(shim, env_extra),
        timeout=timeout,
    )
