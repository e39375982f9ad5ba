"""The package layout's promises (docs/architecture.md, "Layout"): the old flat module paths are the
same module objects as their new homes, and the on-disk names in ``bayeslora.files`` agree with the
Rust bundle reader's."""

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
