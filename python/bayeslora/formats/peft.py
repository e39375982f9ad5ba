"""PEFT interoperability: our adapters as standard PEFT LoRA directories, and back.

:func:`export_peft` writes the mean-mode adapter (z = 1 / the posterior mean; pruned ranks removed)
as a directory ``peft.PeftModel.from_pretrained`` loads:

- ``adapter_config.json``: ``peft_type = "LORA"``, ``target_modules`` = exactly the exported module
  names, per-module ``rank_pattern`` and ``alpha_pattern``, ``fan_in_fan_out`` for HF ``Conv1D``
  (GPT-2), ``modules_to_save`` (e.g. the classifier head).
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight [r, d_in]``,
  ``...lora_B.weight [d_out, r]``, and the ``modules_to_save`` tensors under
  ``base_model.model.<state-dict name>`` (PEFT strips its ``modules_to_save.default`` wrapper).

Our scale ``s = alpha / r0`` is fixed per module while PEFT's is ``lora_alpha / r`` with the
module's current r, so a module shrunk to r' gets ``alpha_pattern = s · r'``. Modules pruned to
rank 0 are left out (PEFT has no rank-0 LoRA). The posterior's rank parameters, the original rank
positions and the BayesLoRA config go to ``bayeslora_posterior.safetensors`` +
``bayeslora_posterior.json`` beside them, which PEFT ignores.

:func:`import_peft` turns a PEFT LoRA directory into a BayesLoRA model: the factors become the
posterior means, the rank parameters start at the config's ``init_log_alpha`` /
``init_log_sigma2``, each module keeps its PEFT rank and scale (``lora_alpha / r`` from the
patterns, ``/ sqrt(r)`` with rsLoRA). The result trains further with the ELBO, saves with
``bl.save_adapter`` and exports to the runtime with ``bl.export``.

The export is here, the import in ``peft_import.py``; the reading of PEFT's rules both rest on
(``rank_pattern`` / ``alpha_pattern`` keys, which modules ``modules_to_save`` claims, the state-dict
prefix) is in ``peft_rules.py``, so that they change together. Every name stays importable from here
(``bayeslora.peft_io``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .._atomic import check_output_dir, output_sources, write_dir_atomically
from ..errors import ConfigError
from ..files import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    POSTERIOR_FORMAT_VERSION,
    POSTERIOR_META,
    POSTERIOR_WEIGHTS,
    SEQ_CLS_HEADS,
)
from ..nn.layer import is_adaptable, is_conv1d
from ..nn.model import adapted_layers, get_config, unwrap
from .bundle import exported_module, warn_extra_pruned
from .peft_import import (
    PEFT_WEIGHTS_BIN,
    import_peft,
    import_peft_checkpoint,
    read_peft_config,
    read_peft_weights,
)
from .peft_rules import PREFIX, pattern_key, peft_claims, peft_targets, peft_task_type, wrapped_modules


@torch.no_grad()
def export_peft(
    model: nn.Module, out_dir: str | os.PathLike, *, prune: bool = True, force: bool = False
) -> Path:
    """Write the mean-mode adapter of ``model`` (after :func:`bl.inject`) as a PEFT LoRA directory.

    The caller's model is not modified. ``peft.PeftModel.from_pretrained(base, out_dir)`` on the
    un-adapted base model then gives the same outputs as ``model`` in mean mode.

    Args:
        model: a model with BayesLoRA adapters (any method/posterior; the mean is exported).
        out_dir: directory to write (a PEFT export of bayeslora already there is replaced
            atomically).
        prune: also drop ranks whose relevance exceeds the config's τ, as :func:`bl.export` does
            (with a warning naming how many); masked ranks are always dropped.
        force: replace ``out_dir`` even when it is a non-empty directory bayeslora did not write
            as a PEFT export (a file, the current directory and the model's own directory are
            always refused: :class:`~bayeslora.errors.OutputError`).

    Returns:
        The directory. Besides PEFT's two files it holds ``bayeslora_posterior.safetensors``
        (``<module>.log_alpha|log_sigma2 [r]``, ``<module>.rank_index [r]`` of the kept ranks) and
        ``bayeslora_posterior.json`` (format version, BayesLoRA config, per-module
        ``rank``/``initial_rank``/``scale``/``d_in``/``d_out``, rank-0 modules included).
    """
    base = unwrap(model)
    config = get_config(base)
    sources = output_sources(base)
    check_output_dir(out_dir, kind="peft", force=force, sources=sources)
    layers = dict(adapted_layers(base))
    lora: dict[str, torch.Tensor] = {}
    posterior: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    any_conv1d = False
    extra_pruned = 0
    for name, layer in layers.items():
        modules[name], kept = exported_module(layer, prune, config)
        r = modules[name]["rank"]
        extra_pruned += layer.active_rank - r
        if r == 0:
            continue
        lora[f"{PREFIX}{name}.lora_A.weight"] = kept.pop("lora_A")
        lora[f"{PREFIX}{name}.lora_B.weight"] = kept.pop("lora_B")
        rank_pattern[name] = r
        alpha_pattern[name] = float(layer.scale) * r
        any_conv1d = any_conv1d or is_conv1d(layer.base_layer)
        posterior.update({f"{name}.{leaf}": t for leaf, t in kept.items()})
    if not rank_pattern:
        raise ConfigError("every adapted module is pruned to rank 0: there is no LoRA to export to PEFT")
    warn_extra_pruned("export_peft", extra_pruned, config.prune_threshold)
    ours = list(config.modules_to_save)
    clash = [n for n in rank_pattern if peft_claims(n, ours)]
    if clash:
        raise ConfigError(
            f"PEFT cannot hold LoRA adapters inside modules_to_save {ours}: {clash[:5]} would be replaced "
            "by the saved copy"
        )
    task_type = peft_task_type(base)
    if task_type == "SEQ_CLS" and any(peft_claims(n, list(SEQ_CLS_HEADS)) for n in rank_pattern):
        task_type = (
            None  # PEFT's SEQ_CLS model would also claim the adapted head: load it as a plain PeftModel
        )
    claimed = ours + (list(SEQ_CLS_HEADS) if task_type == "SEQ_CLS" else [])
    saved_modules = wrapped_modules(base, claimed)
    for name in saved_modules:
        for key, value in base.get_submodule(name).state_dict().items():
            lora[f"{PREFIX}{name}.{key}"] = value.detach().cpu()
    targets: list[str] | str = sorted(rank_pattern)
    patterns_r: dict[str, int] = dict(rank_pattern)
    patterns_a: dict[str, float] = dict(alpha_pattern)
    if not _peft_selects_exactly(base, targets, patterns_r, layers):
        # A module name that is a suffix of another: fall back to anchored, escaped regexes.
        targets = "(?:" + "|".join(re.escape(n) for n in sorted(rank_pattern)) + ")"
        patterns_r = {"^" + re.escape(n): r for n, r in rank_pattern.items()}
        patterns_a = {"^" + re.escape(n): a for n, a in alpha_pattern.items()}
    hf_config = getattr(base, "config", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(hf_config, "_name_or_path", None) or None,
        "r": int(config.rank),
        "lora_alpha": float(config.alpha),
        "target_modules": targets,
        "rank_pattern": patterns_r,
        "alpha_pattern": patterns_a,
        "fan_in_fan_out": any_conv1d,
        "modules_to_save": list(config.modules_to_save) or None,
        "exclude_modules": None,
        "bias": "none",
        "lora_bias": False,
        "lora_dropout": 0.0,
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    meta = {
        "format": "bayeslora-peft-posterior",
        "format_version": POSTERIOR_FORMAT_VERSION,
        "config": config.to_dict(),
        "modules": modules,
        "modules_to_save": saved_modules,
    }

    def write(tmp: Path) -> None:
        save_file(
            {k: v.contiguous().clone() for k, v in lora.items()}, str(tmp / PEFT_WEIGHTS), {"format": "pt"}
        )
        save_file(
            {k: v.contiguous().clone() for k, v in posterior.items()},
            str(tmp / POSTERIOR_WEIGHTS),
            {"format": "bayeslora-peft-posterior"},
        )
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
        (tmp / POSTERIOR_META).write_text(json.dumps(meta, indent=2, sort_keys=True))

    return write_dir_atomically(Path(out_dir), write, kind="peft", force=force, sources=sources)


def _peft_selects_exactly(
    base: nn.Module, targets: list[str], rank_pattern: dict[str, int], layers: dict
) -> bool:
    """Whether PEFT, reading ``targets``/``rank_pattern``, adapts exactly the exported modules and
    resolves each one's pattern to its own entry."""
    wanted = set(rank_pattern)
    for name, module in base.named_modules():
        parts = name.split(".")
        if "base_layer" in parts or not (is_adaptable(module) or name in layers):
            continue
        if peft_targets(targets, name) != (name in wanted):
            return False
        if name in wanted and pattern_key(rank_pattern, name) != name:
            return False
    return True


__all__ = [
    "PEFT_CONFIG",
    "PEFT_WEIGHTS",
    "PEFT_WEIGHTS_BIN",
    "POSTERIOR_META",
    "POSTERIOR_WEIGHTS",
    "PREFIX",
    "export_peft",
    "import_peft",
    "import_peft_checkpoint",
    "read_peft_config",
    "read_peft_weights",
]
