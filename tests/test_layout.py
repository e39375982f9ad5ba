"""The package layout's promises (docs/architecture.md, "Layout"): the old flat module paths are the
same module objects as their new homes, the on-disk names in ``bayeslora.files`` agree with the
Rust bundle reader's, and no source file grows long without a reason written at its top."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import bayeslora as bl
from bayeslora import files

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old, new", sorted(bl._MOVED.items()))
def test_old_module_paths_are_their_new_homes(old, new):
    module = importlib.import_module(f"bayeslora.{new}")
    assert importlib.import_module(f"bayeslora.{old}") is module
    assert getattr(bl, old) is module
    assert module.__spec__.name == f"bayeslora.{new}"  # not the alias's, for relative imports


def test_from_old_paths_imports_names_public_and_private():
    from bayeslora.injection import inject
    from bayeslora.pipeline import RUN_FILE, _Encoded, validation_rank_cut  # _Encoded: benches
    from bayeslora.training import BayesLoRATrainer

    assert inject is bl.inject and validation_rank_cut.__module__ == "bayeslora.train.cut"
    assert BayesLoRATrainer.__module__ == "bayeslora.train.trainer"
    assert _Encoded.__module__ == "bayeslora.train.classifier" and RUN_FILE == files.RUN_FILE


def test_a_subpackage_import_does_not_shadow_a_function():
    importlib.import_module("bayeslora.formats.peft")
    assert callable(bl.export) and callable(bl.export_peft)


def _rust_consts(path: Path) -> dict[str, str]:
    text = path.read_text("utf-8")
    consts = dict(re.findall(r'pub const (\w+): &str = "([^"]*)";', text))
    consts.update(re.findall(r"pub const (\w+): u32 = (\d+);", text))
    return consts


def test_bundle_names_agree_with_the_rust_reader():
    rust = _rust_consts(ROOT / "rust" / "bayeslora-core" / "src" / "bundle" / "mod.rs")
    assert rust["META_FILE"] == files.BUNDLE_META
    assert rust["CONFIG_FILE"] == files.BUNDLE_HF_CONFIG
    assert rust["WEIGHTS_FILE"] == files.BUNDLE_WEIGHTS
    assert int(rust["FORMAT_VERSION"]) == files.BUNDLE_FORMAT_VERSION


# One concept per file (docs/architecture.md, "Layout"): a Python module of the package over
# MAX_PY_LINES lines, or a Rust file over MAX_RS_LINES, says why in a line holding LONG_FILE_MARKER
# within its first REASON_WITHIN lines (a comment or the module docstring).
MAX_PY_LINES, MAX_RS_LINES = 500, 800
LONG_FILE_MARKER = "Long file:"
REASON_WITHIN = 15


def long_files_without_reason(root: Path, pattern: str, limit: int) -> list[str]:
    """``path: N lines`` of every file under ``root`` matching ``pattern`` that has more than ``limit``
    lines and no ``LONG_FILE_MARKER`` in its first ``REASON_WITHIN`` lines (build output skipped)."""
    found = []
    for path in sorted(root.rglob(pattern)):
        if "target" in path.relative_to(root).parts:
            continue
        lines = path.read_text("utf-8").splitlines()
        if len(lines) > limit and not any(LONG_FILE_MARKER in line for line in lines[:REASON_WITHIN]):
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            found.append(f"{shown}: {len(lines)} lines")
    return found


def test_no_long_file_without_a_reason_at_its_top():
    python = long_files_without_reason(ROOT / "python" / "bayeslora", "*.py", MAX_PY_LINES)
    rust = long_files_without_reason(ROOT / "rust", "*.rs", MAX_RS_LINES)
    assert list((ROOT / "python" / "bayeslora").rglob("*.py")) and list((ROOT / "rust").rglob("*.rs"))
    assert python + rust == [], (
        f"split these by concern, or write why they stay long in a line with {LONG_FILE_MARKER!r} "
        f"within their first {REASON_WITHIN} lines: {python + rust}"
    )


def test_the_long_file_check_sees_length_and_reason(tmp_path):
    body = ["x = 1"] * (MAX_PY_LINES + 1)
    (tmp_path / "short.py").write_text("\n".join(body[:MAX_PY_LINES]))
    (tmp_path / "long.py").write_text("\n".join(body))
    reason = ['"""A module.', "", f"{LONG_FILE_MARKER} one table that changes as a whole.", '"""']
    (tmp_path / "reasoned.py").write_text("\n".join(reason + body))
    late = [*body[:REASON_WITHIN], f"# {LONG_FILE_MARKER} too far down", *body]
    (tmp_path / "late.py").write_text("\n".join(late))
    found = long_files_without_reason(tmp_path, "*.py", MAX_PY_LINES)
    assert [f.split(":")[0] for f in found] == [str(tmp_path / "late.py"), str(tmp_path / "long.py")]
