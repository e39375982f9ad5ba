"""Rank learning made visible: mask noisy ranks during training, shrink them away afterwards.

See docs/method.md §5.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .model import adapted_layers, is_sharded, unwrap


def ranks(model: nn.Module) -> dict[str, int]:
    """Active rank of every adapted module."""
    return {name: layer.active_rank for name, layer in adapted_layers(unwrap(model))}


def rank_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Relevance score ``[r]`` of every adapted module (larger = less relevant)."""
    return {name: layer.rank_scores() for name, layer in adapted_layers(unwrap(model))}


def prune(
    model: nn.Module, threshold: float | None = None, min_rank: int | None = None
) -> dict[str, tuple[int, int]]:
    """Mask every rank whose relevance score exceeds ``threshold`` (default: the config's τ).

    Shapes stay (optimizer state and DDP buckets remain valid). ``min_rank`` overrides the config's.
    Returns ``{module name: (active rank before, after)}``.
    """
    model = unwrap(model)
    config = getattr(model, "bayeslora_config", None)
    tau = threshold if threshold is not None else (config.prune_threshold if config else 3.0)
    return {name: layer.prune_(tau, min_rank) for name, layer in adapted_layers(model)}


def prune_to_floor(
    model: nn.Module, floor: int, threshold: float | None = None
) -> dict[str, tuple[int, int]]:
    """Mask ranks whose relevance score exceeds ``threshold`` (default: the config's τ), noisiest
    first over all modules together, as long as at least ``floor`` ranks stay active in total (and
    every module keeps its ``min_rank``). Returns ``{module name: (active rank before, after)}``."""
    model = unwrap(model)
    config = getattr(model, "bayeslora_config", None)
    tau = threshold if threshold is not None else (config.prune_threshold if config else 3.0)
    layers = [(name, layer) for name, layer in adapted_layers(model) if layer.rank_parameter() is not None]
    before = {name: layer.active_rank for name, layer in adapted_layers(model)}
    entries = sorted(  # (score, module index, rank index) of every active rank above τ, noisiest first
        (
            (float(score), i, k)
            for i, (_, layer) in enumerate(layers)
            for k, score in enumerate(layer.rank_scores().tolist())
            if layer.rank_mask[k] > 0 and score > tau
        ),
        key=lambda e: -e[0],
    )
    allowed = sum(before.values()) - max(0, int(floor))
    with torch.no_grad():
        for _, i, k in entries:
            if allowed <= 0:
                break
            layer = layers[i][1]
            if layer.active_rank <= layer.min_rank:
                continue
            layer.rank_mask[k] = 0.0
            allowed -= 1
    return {name: (before[name], layer.active_rank) for name, layer in adapted_layers(model)}


def shrink(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, tuple[int, int]]:
    """Physically remove masked ranks from every module (and from ``optimizer``'s state).

    The scale ``alpha / r0`` is unchanged, so the mean-mode output is unchanged. Returns
    ``{module name: (rank before, after)}``.

    Raises:
        ConfigError: ``model`` is sharded by FSDP2 (shrinking would replace parameters FSDP manages):
            save it with ``save_adapter`` on every process and shrink an unsharded model that loads it.
    """
    model = unwrap(model)
    if is_sharded(model):
        raise ConfigError(
            "cannot shrink a model sharded by FSDP2: call bl.save_adapter on every process, then "
            "bl.load_adapter into an unsharded model and shrink that"
        )
    report = {}
    for name, layer in adapted_layers(model):
        before = layer.rank
        replaced = layer.shrink_()
        if optimizer is not None:
            for old, new, dim, keep in replaced:
                _replace_in_optimizer(optimizer, old, new, dim, keep)
        report[name] = (before, layer.rank)
    return report


def _replace_in_optimizer(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, dim: int, keep: torch.Tensor
) -> None:
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            state[key] = value.index_select(dim, keep.to(value.device)).clone()
    optimizer.state[new] = state


def adapter_parameter_count(model: nn.Module) -> int:
    """Number of active adapter parameters (factors of active ranks + their rank parameters)."""
    total = 0
    for _, layer in adapted_layers(unwrap(model)):
        r = layer.active_rank
        total += r * (layer.d_in + layer.d_out) + (r if layer.rank_parameter() is not None else 0)
    return total
