"""bayeslora: Bayesian LoRA — learned adapter rank, calibrated uncertainty, a torch-free runtime.

``import bayeslora`` does not import torch: the training-side names load on first use, so that
``bayeslora.runtime`` and ``bayeslora.analysis`` work on a box without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors
from .config import BayesLoRAConfig

try:
    from ._core import __version__
except ImportError:  # pragma: no cover - source tree without a built extension
    __version__ = "0.0.0+unbuilt"

# public name -> module that defines it (torch-side, imported lazily)
_LAZY = {
    "inject": "injection",
    "kl_divergence": "objective",
    "elbo_loss": "objective",
    "sampling": "prediction",
    "mc_predict": "prediction",
    "prune": "pruning",
    "shrink": "pruning",
    "ranks": "pruning",
    "rank_scores": "pruning",
    "adapter_parameter_count": "pruning",
    "save_adapter": "io",
    "load_adapter": "io",
    "BayesLoRALayer": "layers",
    "export": "bundle",
    "export_peft": "peft_io",
    "import_peft": "peft_io",
}
_SUBMODULES = ("metrics", "calibration", "plots", "analysis", "runtime", "distributed", "training", "data")

if TYPE_CHECKING:
    from .bundle import export
    from .injection import inject
    from .io import load_adapter, save_adapter
    from .layers import BayesLoRALayer
    from .objective import elbo_loss, kl_divergence
    from .peft_io import export_peft, import_peft
    from .prediction import mc_predict, sampling
    from .pruning import adapter_parameter_count, prune, rank_scores, ranks, shrink


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
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
