"""Find the target layers of a model and wrap them in :class:`BayesLoRALayer` (PEFT-style targets)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

from torch import nn

from ..config import BayesLoRAConfig
from ..errors import TargetNotFoundError
from ..files import OUTPUT_HEADS
from .layer import BayesLoRALayer, dtensor_class, is_adaptable


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP / accelerate wrappers (they keep it in ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` (or the model inside its wrappers) is a 🤗 causal language model: its class is
    named ``*ForCausalLM`` / ``*LMHeadModel`` (GPT-2's) or is one of transformers' causal-LM classes."""
    name = type(unwrap(model)).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency of the torch side
        return False
    return any(
        name == v or (isinstance(v, (tuple, list)) and name in v)
        for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    )


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a sharded ``DTensor`` (the model went through FSDP2's
    ``fully_shard``, e.g. under ``accelerate launch`` with ``fsdp_version: 2``)."""
    cls = dtensor_class()
    return cls is not None and any(isinstance(p, cls) for p in model.parameters())


def matches_any(name: str, patterns: list[str]) -> bool:
    """Whether module ``name`` is one of ``patterns`` or ends in ``.pattern`` (PEFT's rule)."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_head(name: str) -> bool:
    return any(part in OUTPUT_HEADS for part in name.split("."))


def is_target(name: str, module: nn.Module, config: BayesLoRAConfig) -> bool:
    """Whether the module called ``name`` is adapted under ``config``."""
    if not is_adaptable(module) or isinstance(module, BayesLoRALayer):
        return False
    if matches_any(name, config.exclude_modules) or matches_any(name, config.modules_to_save):
        return False
    if "base_layer" in name.split("."):
        return False
    targets = config.target_modules
    if isinstance(targets, str):
        if targets == "all-linear":
            return not _is_head(name)
        return re.fullmatch(targets, name) is not None
    return matches_any(name, targets)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, BayesLoRALayer]]:
    """``(name, layer)`` of every adapted layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, BayesLoRALayer):
            yield name, module


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _no_match_error(model: nn.Module, config: BayesLoRAConfig) -> TargetNotFoundError:
    linear_names = [n for n, m in model.named_modules() if is_adaptable(m)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
    wanted = config.target_modules if isinstance(config.target_modules, list) else [config.target_modules]
    close = sorted({c for w in wanted for c in difflib.get_close_matches(w.rsplit(".", 1)[-1], leaves, n=3)})
    hint = f" Close matches: {close}." if close else ""
    return TargetNotFoundError(
        f"no module matches target_modules={config.target_modules!r}.{hint} "
        f"Adaptable layer names end in: {leaves[:20]}"
    )


def inject(model: nn.Module, config: BayesLoRAConfig) -> nn.Module:
    """Replace the matching ``nn.Linear`` / HF ``Conv1D`` layers of ``model`` in place.

    Freezes every parameter except the adapters (factors and rank parameters) and the parameters
    of ``config.modules_to_save``. Returns ``model``. Raises :class:`TargetNotFoundError` naming
    close matches when nothing matches.
    """
    names = [name for name, module in model.named_modules() if is_target(name, module, config)]
    if not names:
        raise _no_match_error(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        _set_submodule(model, name, BayesLoRALayer(base, config))
    saved = 0
    for name, module in model.named_modules():
        if config.modules_to_save and matches_any(name, config.modules_to_save):
            for p in module.parameters():
                p.requires_grad_(True)
            saved += 1
    if config.modules_to_save and saved == 0:
        raise TargetNotFoundError(f"no module matches modules_to_save={config.modules_to_save!r}")
    for _, layer in adapted_layers(model):
        for p in layer.parameters(recurse=False):
            p.requires_grad_(True)
    from .deberta import per_sequence_positions

    per_sequence_positions(model)  # DeBERTa-v2's shared-key position rows: each sequence's sample
    model.bayeslora_config = config  # type: ignore[assignment]
    return model


def get_config(model: nn.Module) -> BayesLoRAConfig:
    """The config ``inject`` attached to ``model``."""
    config = getattr(model, "bayeslora_config", None)
    if not isinstance(config, BayesLoRAConfig):
        raise TargetNotFoundError("model has no BayesLoRA adapters: call bl.inject(model, config) first")
    return config
