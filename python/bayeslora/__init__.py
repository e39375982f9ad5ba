"""bayeslora: Bayesian LoRA — learned adapter rank, calibrated uncertainty, a torch-free runtime.

``import bayeslora`` does not import torch: the training-side names load on first use, so that
``bayeslora.runtime`` and ``bayeslora.analysis`` work on a box without torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import errors
from .config import BayesLoRAConfig

try:
    from ._core import __version__
except ImportError:  # pragma: no cover - source tree without a built extension
    __version__ = "0.0.0+unbuilt"

# public name -> module that defines it (torch-side, imported lazily)
_LAZY = {
    "inject": "nn.model",
    "kl_divergence": "nn.objective",
    "elbo_loss": "nn.objective",
    "sampling": "nn.prediction",
    "mc_predict": "nn.prediction",
    "prune": "nn.pruning",
    "shrink": "nn.pruning",
    "ranks": "nn.pruning",
    "rank_scores": "nn.pruning",
    "adapter_parameter_count": "nn.pruning",
    "save_adapter": "nn.checkpoint",
    "load_adapter": "nn.checkpoint",
    "BayesLoRALayer": "nn.layer",
    "export": "formats.bundle",
    "export_peft": "formats.peft",
    "import_peft": "formats.peft",
}
# Compatibility aliases: the flat module paths of earlier releases (``bayeslora.pipeline``,
# ``bayeslora.layers``, ...), each the very module object of its new home, so that imports, private
# names and monkeypatching behave as before. A finder resolves them on first import, so an alias needs
# no file of its own (docs/architecture.md, "Layout").
_MOVED = {
    "layers": "nn.layer",
    "injection": "nn.model",
    "objective": "nn.objective",
    "pruning": "nn.pruning",
    "prediction": "nn.prediction",
    "io": "nn.checkpoint",
    "training": "train.trainer",
    "pipeline": "train.pipeline",
    "bundle": "formats.bundle",
    "peft_io": "formats.peft",
}
_SUBMODULES = (
    "metrics",
    "calibration",
    "plots",
    "analysis",
    "runtime",
    "benchmark",
    "distributed",
    "training",
    "data",
    "lm",
)


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``bayeslora.<old>`` as the module ``bayeslora.<new>`` of ``_MOVED``."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.rpartition('.')[2]]}")
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the module is its new home, already executed; the import system has just given it the
        # alias's spec, which relative imports inside its functions would disagree with
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
    sys.meta_path.append(_AliasFinder())

if TYPE_CHECKING:
    from .formats.bundle import export
    from .formats.peft import export_peft, import_peft
    from .nn.checkpoint import load_adapter, save_adapter
    from .nn.layer import BayesLoRALayer
    from .nn.model import inject
    from .nn.objective import elbo_loss, kl_divergence
    from .nn.prediction import mc_predict, sampling
    from .nn.pruning import adapter_parameter_count, prune, rank_scores, ranks, shrink


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES or name in _MOVED:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'bayeslora' has no attribute {name!r}")


__all__ = [
    "BayesLoRAConfig",
    "BayesLoRALayer",
    "__version__",
    "adapter_parameter_count",
    "elbo_loss",
    "errors",
    "export",
    "export_peft",
    "import_peft",
    "inject",
    "kl_divergence",
    "load_adapter",
    "mc_predict",
    "prune",
    "rank_scores",
    "ranks",
    "sampling",
    "save_adapter",
    "shrink",
]
