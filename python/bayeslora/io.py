"""Save and load the adapter state: ``adapter.safetensors`` + ``bayeslora_adapter.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._atomic import output_sources, write_dir_atomically
from .config import BayesLoRAConfig
from .errors import BundleError
from .injection import _matches_list, adapted_layers, get_config, inject
from .objective import _unwrap

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "bayeslora_adapter.json"
FORMAT_VERSION = 1
_LAYER_TENSORS = ("lora_A", "lora_B", "log_alpha", "log_sigma2", "rank_mask", "rank_index")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that defines the adapter: per adapted layer its factors, rank parameters, mask
    and rank index, plus the full state of ``modules_to_save``."""
    model = _unwrap(model)
    config = get_config(model)
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model):
        for t in _LAYER_TENSORS:
            value = getattr(layer, t, None)
            if torch.is_tensor(value):
                state[f"{name}.{t}"] = value.detach()
    for name, module in model.named_modules():
        if config.modules_to_save and _matches_list(name, config.modules_to_save):
            for key, value in module.state_dict().items():
                state[f"{name}.{key}"] = value.detach()
    return state


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the adapter of ``model`` to ``out_dir`` atomically (a crash leaves no half directory).

    An adapter directory already at ``out_dir`` is replaced; anything else there (a non-empty
    directory bayeslora did not write as an adapter) raises :class:`~bayeslora.errors.OutputError`
    unless ``force``. A file, the current directory and the model's own directory are refused.
    """
    model = _unwrap(model)
    config = get_config(model)
    out = Path(out_dir)

    def write(tmp: Path) -> None:
        tensors = {k: v.to("cpu").contiguous().clone() for k, v in adapter_state(model).items()}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "bayeslora-adapter"})
        meta = {
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "modules": {
                name: {
                    "rank": layer.rank,
                    "initial_rank": layer.initial_rank,
                    "d_in": layer.d_in,
                    "d_out": layer.d_out,
                    "scale": float(layer.scale),
                }
                for name, layer in adapted_layers(model)
            },
        }
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))

    return write_dir_atomically(out, write, kind="adapter", force=force, sources=output_sources(model))


def read_adapter_config(path: str | os.PathLike) -> tuple[BayesLoRAConfig, dict]:
    """(config, per-module metadata) of a saved adapter directory."""
    cfg_path = Path(path) / ADAPTER_CONFIG
    try:
        meta = json.loads(cfg_path.read_text())
    except FileNotFoundError as e:
        raise BundleError(f"{cfg_path} not found: not a bayeslora adapter directory") from e
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {cfg_path}: {e}") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{cfg_path}: unsupported format_version {meta.get('format_version')!r}")
    return BayesLoRAConfig.from_dict(meta["config"]), meta["modules"]


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a saved adapter into ``model`` (injecting it first if needed); exact round trip."""
    config, modules = read_adapter_config(path)
    weights = Path(path) / ADAPTER_WEIGHTS
    if not weights.exists():
        raise BundleError(f"{weights} not found")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise BundleError(f"cannot read {weights}: {e}") from e
    base = _unwrap(model)
    if getattr(base, "bayeslora_config", None) is None:
        inject(base, config)
    layers = dict(adapted_layers(base))
    if set(layers) != set(modules):
        missing, extra = sorted(set(modules) - set(layers)), sorted(set(layers) - set(modules))
        raise BundleError(f"adapter does not fit the model: missing modules {missing}, unexpected {extra}")
    for name, layer in layers.items():
        device = layer.lora_A.device
        if "scale" in modules[name]:  # per module: imported PEFT adapters may differ from alpha / r0
            layer.scale = float(modules[name]["scale"])
        for t in _LAYER_TENSORS:
            key = f"{name}.{t}"
            current = getattr(layer, t, None)
            if current is None:
                continue
            if key not in state:
                raise BundleError(f"{weights}: missing tensor {key!r}")
            value = state.pop(key).to(device)
            if isinstance(current, nn.Parameter):
                setattr(layer, t, nn.Parameter(value, requires_grad=current.requires_grad))
            else:
                setattr(layer, t, value)
    rest = {k: v for k, v in state.items()}
    if rest:
        missing, unexpected = base.load_state_dict(rest, strict=False)
        if unexpected:
            raise BundleError(f"{weights}: tensors that fit no module: {unexpected[:5]}")
    return model
