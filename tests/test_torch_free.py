"""The torch-free promise, by package boundary: with torch and transformers made unimportable, every
module of bayeslora outside the torch packages (``nn``, ``train``, ``formats``) imports, and the
commands that need no torch start (docs/architecture.md, "Dependency direction").

The modules are found by walking the package, so a new module is covered without being listed here.
What the torch-free modules *do* without torch is tested beside them (scoring in
``test_runtime_cli.py`` and ``test_distributed.py``, metrics/calibration/plots in
``test_metrics.py``, analysis in ``test_analysis.py``), through the same helper
(``tests/subprocesses.py``).
"""

from __future__ import annotations

import json
import pkgutil

import bayeslora
from subprocesses import TORCH, TORCH_MODULES, blocking_shim, run_cli, run_python

TORCH_PACKAGES = ("nn", "train", "formats")  # imported by the torch side only
# top-level modules of the torch side, by design: quickstart (orchestration that trains: it imports
# the training pipeline at the top) and lm (bl.lm, causal-LM evaluation and scoring on torch models)
TORCH_ORCHESTRATION = ("quickstart", "lm")


def all_modules() -> list[str]:
    names = ["bayeslora"]
    for info in pkgutil.walk_packages(bayeslora.__path__, "bayeslora."):
        if info.name.rpartition(".")[2] != "__main__":
            names.append(info.name)
    return sorted(names)


def torch_free_modules() -> list[str]:
    side = tuple(f"bayeslora.{p}" for p in (*TORCH_PACKAGES, *TORCH_ORCHESTRATION))
    return [m for m in all_modules() if not m.startswith(side) and m != "bayeslora._core"]


def test_the_walk_finds_both_sides():
    free, everything = set(torch_free_modules()), set(all_modules())
    expected_free = {
        "bayeslora",
        "bayeslora.analysis",
        "bayeslora.analysis.plots",
        "bayeslora.analysis.report",
        "bayeslora.benchmark",
        "bayeslora.calibration",
        "bayeslora.cli",
        "bayeslora.config",
        "bayeslora.data",
        "bayeslora.data._fetch",
        "bayeslora.distributed",
        "bayeslora.errors",
        "bayeslora.evaluation",
        "bayeslora.files",
        "bayeslora.metrics",
        "bayeslora.plots",
        "bayeslora.runtime",
    }
    assert expected_free <= free, expected_free - free
    torch_side = {"bayeslora.nn.layer", "bayeslora.train.trainer", "bayeslora.formats.bundle", "bayeslora.lm"}
    assert torch_side <= everything - free


def test_every_torch_free_module_imports_without_torch(tmp_path):
    modules = torch_free_modules()
    code = f"""
        import importlib, json, sys
        for pkg in {TORCH!r}:
            try:
                importlib.import_module(pkg)
            except ImportError:
                pass
            else:
                raise SystemExit(pkg + " is not blocked")
        for name in {modules!r}:
            importlib.import_module(name)
        import bayeslora as bl
        bl.runtime, bl.metrics, bl.calibration, bl.plots, bl.analysis, bl.distributed, bl.data
        print(json.dumps([m for m in {TORCH_MODULES!r} if m in sys.modules]))
    """
    res = run_python(code, shim=blocking_shim(tmp_path / "shim"))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []


def test_torch_free_commands_start_without_torch(tmp_path):
    shim = blocking_shim(tmp_path / "shim")
    for args in (["--help"], ["score", "--help"], ["analyze", "--help"], ["evaluate", "--help"]):
        res = run_cli(args, shim=shim)
        assert res.returncode == 0, (args, res.stderr)
        assert res.stdout.startswith("usage: bayeslora"), (args, res.stdout)
    res = run_python("import runpy; runpy.run_module('bayeslora.data', run_name='__main__')", shim=shim)
    assert res.returncode == 2 and "usage: python -m bayeslora.data" in res.stderr, res.stderr
