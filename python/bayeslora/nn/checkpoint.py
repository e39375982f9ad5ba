"""Save and load the adapter state: ``adapter.safetensors`` + ``bayeslora_adapter.json``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._atomic import output_sources, write_dir_atomically
from ..config import BayesLoRAConfig
from ..errors import BundleError, OutputError
from ..files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..files import ADAPTER_FORMAT_VERSION as FORMAT_VERSION
from .layer import base_dims, full_tensor
from .model import adapted_layers, get_config, inject, is_sharded, is_target, matches_any, unwrap

_LAYER_TENSORS = ("lora_A", "lora_B", "log_alpha", "log_sigma2", "rank_mask", "rank_index")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that defines the adapter: per adapted layer its factors, rank parameters, mask
    and rank index, plus the full state of ``modules_to_save``.

    Under FSDP2 the shards are gathered into whole tensors (a collective: call it on every process)."""
    model = unwrap(model)
    config = get_config(model)
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model):
        for t in _LAYER_TENSORS:
            value = getattr(layer, t, None)
            if torch.is_tensor(value):
                state[f"{name}.{t}"] = full_tensor(value.detach())
    for name, module in model.named_modules():
        if config.modules_to_save and matches_any(name, config.modules_to_save):
            for key, value in module.state_dict().items():
                state[f"{name}.{key}"] = full_tensor(value.detach())
    return state


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the adapter of ``model`` to ``out_dir`` atomically (a crash leaves no half directory).

    An adapter directory already at ``out_dir`` is replaced; anything else there (a non-empty
    directory bayeslora did not write as an adapter) raises :class:`~bayeslora.errors.OutputError`
    unless ``force``. A file, the current directory and the model's own directory are refused.

    A model sharded by FSDP2 is saved whole: every process calls ``save_adapter`` (the shards are
    gathered), process 0 writes, and every process returns once the directory is there. An
    unsharded model (one process, or DDP) is saved by the process that calls it: under DDP call it
    on one process only (as ``BayesLoRATrainer`` does), since two writers of one directory collide.
    """
    model = unwrap(model)
    config = get_config(model)
    out = Path(out_dir)
    sharded = is_sharded(model)
    gathered = (
        {k: v.to("cpu").contiguous().clone() for k, v in adapter_state(model).items()} if sharded else None
    )
    if sharded and torch.distributed.get_rank() != 0:
        status: list[str | None] = [None]
        torch.distributed.broadcast_object_list(status, src=0)  # process 0 writes and says how it went
        if status[0] is not None:
            raise OutputError(f"process 0 could not save the adapter to {out}: {status[0]}")
        return out

    def write(tmp: Path) -> None:
        tensors = (
            gathered
            if gathered is not None
            else {k: v.to("cpu").contiguous().clone() for k, v in adapter_state(model).items()}
        )
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

    if not sharded:
        return write_dir_atomically(out, write, kind="adapter", force=force, sources=output_sources(model))
    try:
        written = write_dir_atomically(out, write, kind="adapter", force=force, sources=output_sources(model))
    except BaseException as e:
        torch.distributed.broadcast_object_list([f"{type(e).__name__}: {e}"], src=0)
        raise
    torch.distributed.broadcast_object_list([None], src=0)
    return written


def read_adapter_config(path: str | os.PathLike) -> tuple[BayesLoRAConfig, dict]:
    """(config, per-module metadata) of a saved adapter directory.

    Raises :class:`BundleError` for a missing, unreadable or malformed ``bayeslora_adapter.json``.
    """
    cfg_path = Path(path) / ADAPTER_CONFIG
    try:
        meta = json.loads(cfg_path.read_text())
    except FileNotFoundError as e:
        raise BundleError(f"{cfg_path} not found: not a bayeslora adapter directory") from e
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BundleError(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(meta, dict):
        raise BundleError(f"{cfg_path}: expected a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{cfg_path}: unsupported format_version {meta.get('format_version')!r}")
    config, modules = meta.get("config"), meta.get("modules")
    if not isinstance(config, dict):
        raise BundleError(f"{cfg_path}: 'config' must be an object, got {config!r:.80}")
    if not isinstance(modules, dict) or not all(isinstance(m, dict) for m in modules.values()):
        raise BundleError(f"{cfg_path}: 'modules' must map module names to objects")
    try:
        return BayesLoRAConfig.from_dict(config), modules
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise BundleError(f"{cfg_path}: invalid config: {e}") from e


def _layer_tensor_names(config: BayesLoRAConfig) -> tuple[str, ...]:
    """The tensors a :class:`BayesLoRALayer` made under ``config`` holds (see ``_LAYER_TENSORS``)."""
    if config.method != "bayeslora":
        extra: tuple[str, ...] = ()
    else:
        extra = ("log_sigma2",) if config.posterior == "additive" else ("log_alpha",)
    return ("lora_A", "lora_B", *extra, "rank_mask", "rank_index")


def _check_layer(
    where: Path, name: str, meta: dict, d_in: int, d_out: int, r0: int, tensors: dict[str, torch.Tensor]
) -> None:
    """Raise :class:`BundleError` unless one module's saved tensors and metadata fit a layer with
    dims ``d_in``/``d_out`` and initial rank ``r0``."""
    A = tensors["lora_A"]
    if A.dim() != 2:
        raise BundleError(f"{where}: {name}.lora_A must be [r, {d_in}], got {list(A.shape)}")
    r = int(A.shape[0])
    want = {
        "lora_A": (r, d_in),
        "lora_B": (d_out, r),
        "log_alpha": (r,),
        "log_sigma2": (r,),
        "rank_mask": (r,),
        "rank_index": (r,),
    }
    for t, value in tensors.items():
        if tuple(value.shape) != want[t]:
            raise BundleError(
                f"{where}: {name}.{t} is {list(value.shape)} but the model needs {list(want[t])} "
                f"(rank {r}, d_in {d_in}, d_out {d_out})"
            )
        if t == "rank_index":
            if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
                raise BundleError(f"{where}: {name}.rank_index must be integers, got {value.dtype}")
            idx = value.tolist()
            if any(not 0 <= i < r0 for i in idx) or len(set(idx)) != r:
                raise BundleError(f"{where}: {name}.rank_index must be {r} distinct ranks in 0..{r0 - 1}")
            continue
        if not value.dtype.is_floating_point:
            raise BundleError(f"{where}: {name}.{t} must be floating point, got {value.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise BundleError(f"{where}: {name}.{t} has NaN or infinite values")
        if t == "rank_mask" and not bool(((value == 0) | (value == 1)).all()):
            raise BundleError(f"{where}: {name}.rank_mask must hold only 0 and 1")
    if r > r0:
        raise BundleError(f"{where}: {name} has rank {r} above the config's rank {r0}")
    if meta.get("rank", r) != r:
        raise BundleError(f"{where}: {name} has rank {r} but {ADAPTER_CONFIG} says {meta.get('rank')!r}")
    for key, dim in (("d_in", d_in), ("d_out", d_out)):
        if meta.get(key, dim) != dim:
            raise BundleError(f"{where}: {name} has {key} {meta.get(key)!r} but the model's layer has {dim}")
    if "scale" in meta:
        scale = meta["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise BundleError(f"{where}: {name} has scale {scale!r}; it must be a finite number")


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a saved adapter into ``model`` (injecting it first if needed); exact round trip.

    Everything is checked against the model before anything changes: the adapted modules, every
    tensor's presence, shape, dtype and finiteness, the rank indices, each module's scale, and
    that the other tensors (``modules_to_save``) fit the model's parameters. On failure the model
    is left as it was.

    Raises:
        BundleError: a missing, unreadable or malformed adapter, or one that does not fit ``model``.
    """
    config, modules = read_adapter_config(path)
    weights = Path(path) / ADAPTER_WEIGHTS
    if not weights.exists():
        raise BundleError(f"{weights} not found")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise BundleError(f"cannot read {weights}: {e}") from e
    base = unwrap(model)
    injected = getattr(base, "bayeslora_config", None) is not None
    # (d_in, d_out, r0, tensor names) of each adapted layer, as it is or as inject would make it
    plan: dict[str, tuple[int, int, int, tuple[str, ...]]] = {}
    if injected:
        for name, layer in adapted_layers(base):
            names = tuple(t for t in _LAYER_TENSORS if torch.is_tensor(getattr(layer, t, None)))
            plan[name] = (layer.d_in, layer.d_out, int(layer.initial_rank), names)
    else:
        for name, module in base.named_modules():
            if is_target(name, module, config):
                plan[name] = (*base_dims(module), config.rank, _layer_tensor_names(config))
        if config.modules_to_save and not any(
            matches_any(n, config.modules_to_save) for n, _ in base.named_modules()
        ):
            raise BundleError(f"adapter does not fit the model: no module matches {config.modules_to_save}")
    if set(plan) != set(modules) or not plan:
        missing, extra = sorted(set(modules) - set(plan)), sorted(set(plan) - set(modules))
        raise BundleError(f"adapter does not fit the model: missing modules {missing}, unexpected {extra}")
    layer_values: dict[str, dict[str, torch.Tensor]] = {}
    for name, (d_in, d_out, r0, names) in plan.items():
        missing_t = [f"{name}.{t}" for t in names if f"{name}.{t}" not in state]
        if missing_t:
            raise BundleError(f"{weights}: missing tensor {missing_t[0]!r}")
        values = {t: state.pop(f"{name}.{t}") for t in names}
        _check_layer(weights, name, modules[name], d_in, d_out, r0, values)
        layer_values[name] = values
    base_state = base.state_dict()
    unexpected = sorted(k for k in state if k not in base_state)
    if unexpected:
        raise BundleError(f"{weights}: tensors that fit no module: {unexpected[:5]}")
    for key, value in state.items():
        have = base_state[key]
        if (
            tuple(value.shape) != tuple(have.shape)
            or value.dtype.is_floating_point != have.dtype.is_floating_point
        ):
            raise BundleError(
                f"{weights}: {key} is {value.dtype} {list(value.shape)} but the model has "
                f"{have.dtype} {list(have.shape)}"
            )
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            raise BundleError(f"{weights}: {key} has NaN or infinite values")
    # checked: now change the model
    if not injected:
        inject(base, config)
    for name, layer in adapted_layers(base):
        device = layer.lora_A.device
        if "scale" in modules[name]:  # per module: imported PEFT adapters may differ from alpha / r0
            layer.scale = float(modules[name]["scale"])
        for t, value in layer_values[name].items():
            value = value.to(device, torch.long) if t == "rank_index" else value.to(device)
            current = getattr(layer, t)
            if isinstance(current, nn.Parameter):
                setattr(layer, t, nn.Parameter(value, requires_grad=current.requires_grad))
            else:
                setattr(layer, t, value)
    if state:
        base.load_state_dict(state, strict=False)
    return model
