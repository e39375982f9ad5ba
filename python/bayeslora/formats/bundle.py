"""Export a trained model as a bundle the torch-free Rust runtime scores (docs/formats.md).

A bundle is a directory with

- ``model.safetensors``: the base weights under their HF state-dict names (an adapted layer's
  frozen weight as ``<name>.weight``/``<name>.bias``, without ``.base_layer``), plus per adapted
  module with rank r > 0: ``<name>.lora_A [r, d_in]``, ``<name>.lora_B [d_out, r]``,
  ``<name>.log_alpha [r]`` (gate) or ``<name>.log_sigma2 [r]`` (additive), and
  ``<name>.rank_index [r]`` (int64, the ranks' original positions). Pruned ranks are removed; a
  module pruned to rank 0 keeps its ``bayeslora.json`` entry (``"rank": 0``) and has no adapter
  tensors at all.
- ``config.json``: the HF model config.
- ``bayeslora.json``: format version, architecture, method, posterior, labels, per-module
  rank/scale/dims (see :func:`export`).
- ``tokenizer.json`` (when a tokenizer is given).
- ``.bayeslora-output.json``: the marker of every directory bayeslora writes (see ``_atomic``).

The directory is written beside its destination under a temporary name, checked by loading it
with the Rust runtime, then renamed into place: a crash never leaves a half bundle that loads. An
existing bundle is replaced in one step; a directory that is not a bundle is never replaced
without ``force``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .._atomic import check_output_dir, output_sources, write_dir_atomically
from ..errors import BundleError, ConfigError
from ..files import BUNDLE_FORMAT_VERSION as FORMAT_VERSION
from ..files import BUNDLE_HF_CONFIG as HF_CONFIG
from ..files import BUNDLE_META as META
from ..files import BUNDLE_TOKENIZER as TOKENIZER
from ..files import BUNDLE_WEIGHTS as WEIGHTS
from ..nn.layer import BayesLoRALayer
from ..nn.model import adapted_layers, get_config, is_causal_lm, unwrap

# HF model_type -> runtime architecture
ARCHITECTURES = {
    "bert": "bert",
    "distilbert": "distilbert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "deberta-v2": "deberta-v2",  # DeBERTa-v3 too
}
_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@torch.no_grad()
def kept_ranks(layer: BayesLoRALayer, prune: bool, threshold: float, min_rank: int) -> torch.Tensor:
    """Indices (into the layer's current ranks) that the bundle keeps: the active ranks, and with
    ``prune`` only those whose relevance score is at most ``threshold`` (keeping the ``min_rank``
    least noisy). Same rule as :meth:`BayesLoRALayer.prune_`, without touching the layer."""
    active = layer.rank_mask > 0
    keep = active.clone()
    if prune and layer.rank_parameter() is not None:
        scores = layer.rank_scores()
        keep = active & (scores <= threshold)
        need = min(min_rank, int(active.sum())) - int(keep.sum())
        if need > 0:
            candidates = torch.nonzero(active & ~keep).flatten()
            order = torch.argsort(scores[candidates])
            keep[candidates[order[:need]]] = True
    return torch.nonzero(keep).flatten()


def check_deberta(hf_config: Any) -> None:
    """Refuse the DeBERTa-v2 options the runtime does not implement (one line, ``ConfigError``), so
    that an export never scores a different model than transformers does."""
    hidden, heads = int(hf_config.hidden_size), int(hf_config.num_attention_heads)

    def opt(key: str, default: Any) -> Any:
        value = getattr(hf_config, key, default)
        return default if value is None else value

    def refuse(what: str) -> None:
        raise ConfigError(f"cannot export this DeBERTa-v2 model: {what} is not supported by the runtime")

    if int(opt("conv_kernel_size", 0)) > 0:
        refuse(f"conv_kernel_size = {hf_config.conv_kernel_size} (the convolution layer)")
    for key, want in (
        ("embedding_size", hidden),
        ("attention_head_size", hidden // heads),
        ("pooler_hidden_size", hidden),
    ):
        if int(opt(key, want)) != want:
            refuse(f"{key} = {getattr(hf_config, key)} (≠ {want})")
    kinds = opt("pos_att_type", [])
    kinds = [k.strip().lower() for k in (kinds.split("|") if isinstance(kinds, str) else kinds)]
    for kind in kinds:
        if kind not in ("c2p", "p2c"):
            refuse(f"pos_att_type {kind!r}")
    buckets = int(opt("position_buckets", -1))
    max_rel = int(opt("max_relative_positions", -1))
    max_rel = max_rel if max_rel >= 1 else int(hf_config.max_position_embeddings)
    divides_by_zero = buckets // 2 == 0 or max_rel - 1 == buckets // 2
    if opt("relative_attention", False) and buckets > 0 and divides_by_zero:
        refuse(
            f"position_buckets = {buckets} with max_relative_positions = {max_rel} "
            "(log buckets divide by zero)"
        )
    for key in ("hidden_act", "pooler_hidden_act"):
        act = opt(key, "gelu")
        if act not in _ACTIVATIONS and not (key == "pooler_hidden_act" and act == "tanh"):
            refuse(f"{key} {act!r}")


def _tokenizer_json(tokenizer: Any) -> str | None:
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        if path.is_dir():
            path = path / TOKENIZER
        try:
            return path.read_text()
        except OSError as e:
            raise BundleError(f"cannot read tokenizer file {path}: {e}") from e
    backend = getattr(tokenizer, "backend_tokenizer", None)  # transformers' fast tokenizers
    if backend is not None:
        return backend.to_str()
    if hasattr(tokenizer, "to_str"):  # a tokenizers.Tokenizer
        return tokenizer.to_str()
    raise ConfigError(
        f"cannot export a tokenizer of type {type(tokenizer).__name__}: pass a fast (Rust) tokenizer, "
        "a tokenizers.Tokenizer or the path of a tokenizer.json"
    )


def _labels(hf_config: Any, num_labels: int) -> list[str]:
    id2label = getattr(hf_config, "id2label", None) or {}
    labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels)]
    return labels


def _max_length(tokenizer: Any, hf_config: Any, arch: str, max_length: int | None) -> int:
    positions = int(getattr(hf_config, "max_position_embeddings", 512))
    if arch == "roberta":  # positions start after padding_idx
        positions -= int(getattr(hf_config, "pad_token_id", 1) or 0) + 1
    if max_length is not None:
        if not 0 < max_length <= positions:
            raise ConfigError(f"max_length must be in 1..{positions}, got {max_length}")
        return int(max_length)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < positions:
        return model_max
    return positions


@torch.no_grad()
def bundle_tensors(
    model: nn.Module, dtype: str = "float32", prune: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], int]:
    """(tensors, per-module metadata, ranks removed by export-time pruning) of ``model``."""
    base = unwrap(model)
    config = get_config(base)
    store = _DTYPES[dtype]
    layers = dict(adapted_layers(base))
    tensors: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in layers:
            continue  # adapter tensors: written below, sliced
        if module.endswith(".base_layer") and module[: -len(".base_layer")] in layers:
            key = f"{module[: -len('.base_layer')]}.{leaf}"
        v = value.detach().to("cpu")
        tensors[key] = (v.to(store) if v.is_floating_point() else v).contiguous().clone()
    modules: dict[str, dict[str, Any]] = {}
    extra_pruned = 0
    for name, layer in layers.items():
        modules[name], kept = exported_module(layer, prune, config)
        extra_pruned += layer.active_rank - modules[name]["rank"]
        for leaf, t in kept.items():
            tensors[f"{name}.{leaf}"] = (t.to(store) if leaf in ("lora_A", "lora_B") else t).contiguous()
    return tensors, modules, extra_pruned


def warn_extra_pruned(what: str, count: int, threshold: float) -> None:
    """Say (a warning from the exporting call's caller) that an export pruned ``count`` ranks
    training had left unmasked, so that nothing changes silently (docs/method.md §4)."""
    if count > 0:
        warnings.warn(
            f"{what} pruned {count} rank(s) whose relevance exceeds τ = {threshold} and that training "
            "had not masked",
            stacklevel=3,
        )


@torch.no_grad()
def exported_module(
    layer: BayesLoRALayer, prune: bool, config: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What an export writes of one module: its metadata (``rank``, ``initial_rank``, ``scale``,
    ``d_in``, ``d_out``) and its kept ranks' tensors on the CPU: ``lora_A [r, d_in]``, ``lora_B
    [d_out, r]`` (float32), ``log_alpha``/``log_sigma2 [r]`` (float32, when the method has one) and
    ``rank_index [r]`` (int64). No tensors when nothing is kept. Shared by bundles and PEFT exports."""
    keep = kept_ranks(layer, prune, config.prune_threshold, config.min_rank).to(layer.lora_A.device)
    meta = {
        "rank": int(keep.numel()),
        "initial_rank": int(layer.initial_rank),
        "scale": float(layer.scale),
        "d_in": int(layer.d_in),
        "d_out": int(layer.d_out),
    }
    if keep.numel() == 0:
        return meta, {}
    kept = {
        "lora_A": layer.lora_A.detach().index_select(0, keep).to("cpu", torch.float32),
        "lora_B": layer.lora_B.detach().index_select(1, keep).to("cpu", torch.float32),
    }
    param = layer.rank_parameter()
    if param is not None:
        pname = "log_alpha" if layer.uses_gate else "log_sigma2"
        kept[pname] = param.detach().index_select(0, keep).to("cpu", torch.float32)
    kept["rank_index"] = layer.rank_index.index_select(0, keep).to("cpu", torch.int64)
    return meta, kept


def export(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    prune: bool = True,
    max_length: int | None = None,
    validate: bool = True,
    force: bool = False,
) -> Path:
    """Write ``model`` (a BERT/DistilBERT/RoBERTa/DeBERTa-v2 sequence classifier after :func:`bl.inject`) and
    ``tokenizer`` as a bundle at ``out_dir``, atomically. The caller's model is not modified.

    Args:
        tokenizer: a transformers fast tokenizer, a ``tokenizers.Tokenizer``, the path of a
            ``tokenizer.json`` (or of a directory holding one), or None (the bundle then scores
            token ids only).
        dtype: storage dtype of the weights and adapter factors, ``"float32"`` or ``"bfloat16"``
            (rank parameters stay float32); the runtime computes in float32.
        prune: also remove ranks whose relevance score exceeds the config's τ (docs/method.md §4: a loop
            that never pruned still gets pruned here, with a warning saying how many ranks went).
            Masked ranks are always removed.
        max_length: tokens per input the runtime's tokenizer truncates to (default: the
            tokenizer's ``model_max_length`` capped by the position table).
        validate: load the written bundle with the Rust runtime before moving it into place.
        force: replace ``out_dir`` even when it is a non-empty directory that is not a bundle
            bayeslora wrote (an existing bundle is always replaced, atomically).

    Returns:
        The bundle directory.

    Raises:
        OutputError: ``out_dir`` is a file, the current directory, the model's own directory, or
            (without ``force``) a directory bayeslora did not write as a bundle; nothing is written.

    ``bayeslora.json``: ``{"format_version": 1, "architecture", "model_type", "method",
    "posterior", "num_labels", "labels", "prune_threshold", "dropout", "dtype", "max_length",
    "modules": {name: {"rank", "initial_rank", "scale", "d_in", "d_out"}}}``.
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    base = unwrap(model)
    sources = output_sources(base)
    if isinstance(tokenizer, (str, os.PathLike)):
        sources.append(os.fspath(tokenizer))
    check_output_dir(out_dir, kind="bundle", force=force, sources=sources)
    config = get_config(base)
    hf_config = getattr(base, "config", None)
    model_type = getattr(hf_config, "model_type", None)
    if is_causal_lm(base):
        raise ConfigError(
            f"cannot export {type(base).__name__}: the runtime scores sequence classifiers and has no "
            "decoders; export a causal LM's adapter with bl.export_peft (task_type CAUSAL_LM)"
        )
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"cannot export model_type {model_type!r}: the runtime supports {sorted(ARCHITECTURES)} "
            "sequence classifiers"
        )
    arch = ARCHITECTURES[model_type]
    if arch == "deberta-v2":
        check_deberta(hf_config)
    tokenizer_text = _tokenizer_json(tokenizer)
    tensors, modules, extra_pruned = bundle_tensors(base, dtype, prune)
    warn_extra_pruned("export", extra_pruned, config.prune_threshold)
    num_labels = int(hf_config.num_labels)
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": arch,
        "model_type": model_type,
        "method": config.method,
        "posterior": config.posterior,
        "num_labels": num_labels,
        "labels": _labels(hf_config, num_labels),
        "prune_threshold": float(config.prune_threshold),
        "dropout": float(config.dropout),
        "dtype": dtype,
        "max_length": _max_length(tokenizer, hf_config, arch, max_length),
        "modules": modules,
    }
    out = Path(out_dir)

    def write(tmp: Path) -> None:
        weights_meta = {"format": "bayeslora-bundle", "format_version": str(FORMAT_VERSION)}
        save_file(tensors, str(tmp / WEIGHTS), metadata=weights_meta)
        (tmp / HF_CONFIG).write_text(hf_config.to_json_string(use_diff=False))
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if tokenizer_text is not None:
            (tmp / TOKENIZER).write_text(tokenizer_text)
        if validate:
            from .. import _core

            _core.Runtime(str(tmp), 1)

    return write_dir_atomically(out, write, kind="bundle", force=force, sources=sources)


__all__ = ["bundle_tensors", "check_deberta", "export", "kept_ranks"]
