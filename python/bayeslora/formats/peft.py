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

One module of over 500 lines on purpose: both directions rest on the same reading of PEFT's rules
(``rank_pattern`` / ``alpha_pattern`` keys, which modules ``modules_to_save`` claims, the state-dict
prefix), kept next to each other so that they change together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._atomic import check_output_dir, output_sources, write_dir_atomically
from ..config import BayesLoRAConfig
from ..errors import BundleError, ConfigError
from ..files import (
    CHECKPOINT_ADAPTER,
    CHECKPOINT_TOKENIZER,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    POSTERIOR_FORMAT_VERSION,
    POSTERIOR_META,
    POSTERIOR_WEIGHTS,
    RUN_FILE,
    SEQ_CLS_HEAD_WEIGHTS,
    SEQ_CLS_HEADS,
)
from ..nn.layer import base_dims, is_adaptable, is_conv1d
from ..nn.model import adapted_layers, get_config, inject, is_causal_lm, is_target, unwrap
from .bundle import exported_module, warn_extra_pruned

PEFT_WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."

# LoRA variants PEFT configures with a flag or a sub-config; a truthy value changes the forward
# pass (or what is adapted) in a way a plain LoRA layer does not reproduce.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA bias terms",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_KEY = re.compile(
    r"\.(lora_embedding_[AB]|lora_magnitude_vector|lora_[AB]\.[^.]*\.?bias|lora_[AB]\.bias)"
)


# ---- helpers ----------------------------------------------------------------------------------
def _pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """The key of ``patterns`` that PEFT's ``get_pattern_key`` picks for module ``name`` (first
    key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``), or None."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        except re.error as e:
            raise ConfigError(f"invalid pattern {key!r} in rank_pattern/alpha_pattern: {e}") from e
    return None


def _peft_targets(target_modules: Any, name: str) -> bool:
    """Whether PEFT's ``target_modules`` (list: exact name or ``.``-suffix; str: full regex match)
    selects ``name``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules or [])


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if is_causal_lm(model):
        return "CAUSAL_LM"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def _peft_claims(name: str, modules_to_save: list[str]) -> bool:
    """Whether PEFT's ``modules_to_save`` handling touches module ``name``: it wraps every module
    whose name ends with an entry (plain ``endswith``) and never adapts one inside such an entry."""
    return any(
        name.endswith(m) or re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save
    )


def _wrapped_modules(model: nn.Module, modules_to_save: list[str]) -> list[str]:
    """Names of the modules PEFT wraps for ``modules_to_save`` (outermost only, in module order)."""
    out: list[str] = []
    for name, _ in model.named_modules():
        if name and any(name.endswith(m) for m in modules_to_save):
            if not any(name.startswith(p + ".") for p in out):
                out.append(name)
    return out


# ---- export -----------------------------------------------------------------------------------
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
    clash = [n for n in rank_pattern if _peft_claims(n, ours)]
    if clash:
        raise ConfigError(
            f"PEFT cannot hold LoRA adapters inside modules_to_save {ours}: {clash[:5]} would be replaced "
            "by the saved copy"
        )
    task_type = _task_type(base)
    if task_type == "SEQ_CLS" and any(_peft_claims(n, list(SEQ_CLS_HEADS)) for n in rank_pattern):
        task_type = (
            None  # PEFT's SEQ_CLS model would also claim the adapted head: load it as a plain PeftModel
        )
    claimed = ours + (list(SEQ_CLS_HEADS) if task_type == "SEQ_CLS" else [])
    saved_modules = _wrapped_modules(base, claimed)
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
        if _peft_targets(targets, name) != (name in wanted):
            return False
        if name in wanted and _pattern_key(rank_pattern, name) != name:
            return False
    return True


# ---- import -----------------------------------------------------------------------------------
def read_peft_config(peft_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT directory, checked to be a plain LoRA we reproduce."""
    path = Path(peft_dir) / PEFT_CONFIG
    if not Path(peft_dir).is_dir():
        raise BundleError(f"{peft_dir}: not a directory (expected a PEFT adapter directory)")
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise BundleError(f"{path} not found: not a PEFT adapter directory") from e
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise BundleError(f"{path}: expected a JSON object")
    peft_type = cfg.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise ConfigError(f"{path}: unsupported PEFT method peft_type={peft_type!r}; only LORA imports")
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if cfg.get(key):
            raise ConfigError(
                f"{path}: {what} ({key}={cfg[key]!r}) is not supported; only plain LoRA imports"
            )
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "eva")):
        warnings.warn(
            f"{path}: init_lora_weights={init!r} changes the base weights at initialisation; the adapter "
            "reproduces PEFT only on the base model it was saved with (convert it to plain LoRA first)",
            stacklevel=3,
        )
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise ConfigError(
            f"{path}: bias={bias!r} is not supported (PEFT trained base biases); need bias='none'"
        )
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{path}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(key) or {}
        if not isinstance(value, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value.values()
        ):
            raise ConfigError(f"{path}: {key} must map module patterns to positive numbers, got {value!r}")
    return cfg


def read_peft_weights(peft_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``.

    Pickled weights (the legacy ``adapter_model.bin``) are never loaded, not even through
    ``torch.load(weights_only=True)``: unpickling a file from elsewhere is a risk this package
    does not take. The error says how to convert them.
    """
    root = Path(peft_dir)
    st, pt = root / PEFT_WEIGHTS, root / PEFT_WEIGHTS_BIN
    if not st.exists():
        if pt.exists():
            raise BundleError(
                f"{pt}: pickled PyTorch weights are not loaded (unpickling can run code); convert "
                "them in a trusted environment: load the adapter with peft.PeftModel.from_pretrained "
                f"and save it with save_pretrained(DIR, safe_serialization=True), which writes {PEFT_WEIGHTS}"
            )
        raise BundleError(f"{root}: {PEFT_WEIGHTS} not found")
    try:
        return load_file(str(st))
    except Exception as e:  # safetensors raises its own types for corrupt files
        raise BundleError(f"cannot read the PEFT weights in {root}: {e}") from e


def _split_weights(
    state: dict[str, torch.Tensor], where: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """({module: {"A": A, "B": B}}, {state-dict name: tensor} of the modules_to_save)."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(PREFIX):
            raise BundleError(f"{where}: tensor {key!r} does not start with {PREFIX!r}; not a PEFT LoRA file")
        name = key[len(PREFIX) :]
        if _UNSUPPORTED_KEY.search("." + name):
            raise ConfigError(f"{where}: tensor {key!r} belongs to a LoRA variant that is not supported")
        m = _LORA_KEY.match(name)
        if m is not None:
            lora.setdefault(m["module"], {})[m["which"]] = value
        elif ".lora_" in name:
            raise ConfigError(f"{where}: unrecognised LoRA tensor {key!r}")
        else:
            # PEFT saves modules_to_save without its wrapper; older files may still carry it.
            rest[re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)] = value
    for module, ab in lora.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise BundleError(f"{where}: module {module!r} has no {missing} tensor")
    return lora, rest


def _read_posterior(
    root: Path, plan: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
) -> tuple[BayesLoRAConfig, dict[str, dict[str, torch.Tensor]]] | None:
    """(config, {module: {"log_alpha"|"log_sigma2"|"rank_index": tensor}}) of the side files that
    :func:`export_peft` writes, checked against the PEFT factors; None when there are none."""
    meta_path, weights_path = root / POSTERIOR_META, root / POSTERIOR_WEIGHTS
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(weights_path))
    except FileNotFoundError as e:
        raise BundleError(f"{root}: {POSTERIOR_META} without {POSTERIOR_WEIGHTS}") from e
    except Exception as e:
        raise BundleError(f"cannot read the BayesLoRA posterior in {root}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format_version") != POSTERIOR_FORMAT_VERSION:
        raise BundleError(f"{meta_path}: unsupported format_version {meta.get('format_version')!r}")
    config = BayesLoRAConfig.from_dict(meta.get("config") or {})
    pname = "log_alpha" if config.method == "bayeslora" and config.posterior == "gate" else "log_sigma2"
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, (A, _, _) in plan.items():
        r = int(A.shape[0])
        index = tensors.get(f"{name}.rank_index")
        if index is None:
            raise BundleError(f"{weights_path}: missing tensor {name + '.rank_index'!r}")
        if (
            tuple(index.shape) != (r,)
            or index.dtype != torch.int64
            or (r and (int(index.min()) < 0 or int(index.max()) >= config.rank))
            or len(set(index.tolist())) != r
        ):
            raise BundleError(
                f"{weights_path}: {name}.rank_index does not fit rank {r} of r0 = {config.rank}"
            )
        out[name] = {"rank_index": index}
        if config.method == "bayeslora":
            param = tensors.get(f"{name}.{pname}")
            if param is None or tuple(param.shape) != (r,):
                raise BundleError(f"{weights_path}: {name}.{pname} is missing or not [{r}]")
            out[name][pname] = param
    return config, out


@torch.no_grad()
def import_peft(
    base_model: nn.Module, peft_dir: str | os.PathLike, config: BayesLoRAConfig | None = None
) -> nn.Module:
    """Load a PEFT LoRA directory into ``base_model`` (modified in place) as BayesLoRA adapters.

    Each adapted module gets ``lora_A [r, d_in]`` / ``lora_B [d_out, r]`` = PEFT's factors as the
    posterior mean, r from PEFT (``rank_pattern``), ``scale`` = PEFT's ``lora_alpha / r`` for that
    module (``alpha_pattern``; ``/ sqrt(r)`` with rsLoRA), and rank parameters at
    ``config.init_log_alpha`` / ``init_log_sigma2``. The ``modules_to_save`` tensors (e.g. a
    trained head) are loaded into the base model. Mean-mode outputs equal PEFT's.

    Args:
        base_model: the un-adapted model the LoRA was trained on (no BayesLoRA adapters yet).
        peft_dir: a directory written by PEFT's ``save_pretrained`` (or by :func:`export_peft`).
        config: posterior family, method, init values, pruning schedule, ... (default: the
            config saved by :func:`export_peft` beside the PEFT files, whose rank parameters and
            rank positions are then restored exactly; else ``BayesLoRAConfig()``). Its ``rank``
            becomes the largest PEFT rank (r0, the width of the noise streams);
            ``target_modules`` and ``modules_to_save`` come from the PEFT directory; ``alpha`` is
            set so that ``config.scale`` is PEFT's default ``lora_alpha / r``.

    Returns:
        ``base_model`` with adapters, in eval mode.

    Raises:
        BundleError: missing/corrupt files, tensors that fit no module, shapes that disagree with
            the model or with ``rank_pattern``.
        ConfigError: a PEFT method other than plain LoRA (DoRA, other ``peft_type``, ``bias`` not
            ``"none"``, ...), a target that is not a linear/Conv1D layer, an already adapted model.
    """
    root = Path(peft_dir)
    cfg = read_peft_config(root)
    weights_path = root / PEFT_WEIGHTS
    lora, rest = _split_weights(read_peft_weights(root), weights_path)
    if not lora:
        raise BundleError(f"{weights_path}: no lora_A/lora_B tensors")
    base = unwrap(base_model)
    if getattr(base, "bayeslora_config", None) is not None:
        raise ConfigError(
            "import_peft needs the un-adapted base model; this one already has BayesLoRA adapters"
        )
    all_modules = dict(base.named_modules())
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora"))
    plan: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name in sorted(lora):
        A, B = lora[name]["A"], lora[name]["B"]
        module = all_modules.get(name)
        if module is None:
            raise BundleError(
                f"{weights_path}: module {name!r} is not in the base model {type(base).__name__} "
                "(wrong base model?)"
            )
        if not is_adaptable(module):
            raise ConfigError(
                f"{weights_path}: module {name!r} is a {type(module).__name__}; "
                "only nn.Linear and HF Conv1D adapters import"
            )
        d_in, d_out = base_dims(module)
        rk = _pattern_key(rank_pattern, name)
        r_cfg = int(rank_pattern[rk]) if rk is not None else int(cfg["r"])
        ak = _pattern_key(alpha_pattern, name)
        alpha = float(alpha_pattern[ak]) if ak is not None else float(cfg["lora_alpha"])
        if (
            A.dim() != 2
            or B.dim() != 2
            or A.shape[1] != d_in
            or B.shape[0] != d_out
            or A.shape[0] != B.shape[1]
        ):
            raise BundleError(
                f"{weights_path}: module {name!r} has lora_A {list(A.shape)} and lora_B {list(B.shape)}; "
                f"the model needs [r, {d_in}] and [{d_out}, r]"
            )
        if int(A.shape[0]) != r_cfg:
            raise BundleError(
                f"{weights_path}: module {name!r} has rank {A.shape[0]} "
                f"but adapter_config.json says r={r_cfg}"
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise BundleError(f"{weights_path}: module {name!r} has non-finite factors")
        scale = alpha / math.sqrt(r_cfg) if rslora else alpha / r_cfg
        plan[name] = (A, B, scale)
    base_state = base.state_dict()
    for key, value in rest.items():
        if key not in base_state:
            raise BundleError(f"{weights_path}: tensor {key!r} fits no parameter of the base model")
        if tuple(base_state[key].shape) != tuple(value.shape):
            raise BundleError(
                f"{weights_path}: {key!r} is {list(value.shape)} "
                f"but the model has {list(base_state[key].shape)}"
            )
    r0 = max(int(a.shape[0]) for a, _, _ in plan.values())
    default_scale = (
        float(cfg["lora_alpha"]) / math.sqrt(float(cfg["r"]))
        if rslora
        else float(cfg["lora_alpha"]) / float(cfg["r"])
    )
    restored = _read_posterior(root, plan) if config is None else None
    user = config if config is not None else (restored[0] if restored else BayesLoRAConfig())
    if restored is not None:
        r0 = max(r0, restored[0].rank)
    # what PEFT trained in full: every module it wraps (by its own endswith rule), named exactly
    peft_saved = [str(m) for m in (cfg.get("modules_to_save") or [])]
    if cfg.get("task_type") == "SEQ_CLS":
        peft_saved += list(SEQ_CLS_HEADS)
    saved = [n for n in _wrapped_modules(base, peft_saved) if n not in plan]
    new_config = dataclasses.replace(
        user,
        rank=r0,
        alpha=default_scale * r0,
        target_modules=sorted(plan),
        modules_to_save=saved,
        min_rank=min(user.min_rank, r0),
        exclude_modules=[],
    )
    if {n for n, m in all_modules.items() if is_target(n, m, new_config)} != set(plan):
        # a module name that is a suffix of another one: name them by an exact regex instead
        regex = "(?:" + "|".join(re.escape(n) for n in sorted(plan)) + ")"
        new_config = dataclasses.replace(new_config, target_modules=regex)
    inject(base, new_config)
    layers = dict(adapted_layers(base))
    if set(layers) != set(plan):
        extra = sorted(set(layers) ^ set(plan))
        raise ConfigError(f"cannot target exactly the PEFT modules: {extra[:5]} differ")
    for name, layer in layers.items():
        A, B, scale = plan[name]
        r = int(A.shape[0])
        device = layer.lora_A.device
        layer.lora_A = nn.Parameter(A.detach().to(device, torch.float32).clone())
        layer.lora_B = nn.Parameter(B.detach().to(device, torch.float32).clone())
        if layer.uses_gate:
            layer.log_alpha = nn.Parameter(torch.full((r,), new_config.init_log_alpha, device=device))
        elif layer.uses_additive:
            layer.log_sigma2 = nn.Parameter(torch.full((r,), new_config.init_log_sigma2, device=device))
        layer.rank_mask = torch.ones(r, device=device)
        layer.rank_index = torch.arange(r, device=device, dtype=torch.long)
        layer.scale = float(scale)
        if restored is not None:
            for key, value in restored[1].get(name, {}).items():
                current = getattr(layer, key, None)
                if isinstance(current, nn.Parameter):
                    setattr(layer, key, nn.Parameter(value.to(device, torch.float32).clone()))
                elif current is not None:
                    setattr(layer, key, value.to(device).clone())
    if rest:
        base.load_state_dict(rest, strict=False)
    return base_model.eval()


def _head_rows(state: dict[str, torch.Tensor]) -> int | None:
    for key, value in state.items():
        if ".lora_" not in key and key.endswith(SEQ_CLS_HEAD_WEIGHTS):
            return int(value.shape[0])
    return None


def import_peft_checkpoint(
    peft_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    config: BayesLoRAConfig | None = None,
    max_length: int = 64,
    force: bool = False,
) -> dict[str, Any]:
    """``bayeslora import-peft``: load a PEFT LoRA sequence classifier onto its base model
    (``model``: an HF model directory or ``"default"``; else the PEFT config's
    ``base_model_name_or_path``) and write a checkpoint like ``bayeslora train`` does
    (``adapter/``, ``tokenizer/``, ``run.json``), atomically. Returns the run metadata.

    A checkpoint already at ``out`` is replaced; a non-empty directory bayeslora did not write as
    a checkpoint needs ``force``; a file, the current directory, the PEFT directory and the base
    model's directory are refused (:class:`~bayeslora.errors.OutputError`, before any loading)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from ..nn.checkpoint import save_adapter
    from ..nn.pruning import adapter_parameter_count, ranks
    from ..train.pipeline import TrainSettings, resolve_model

    peft_cfg = read_peft_config(peft_dir)
    name = model if model is not None else peft_cfg.get("base_model_name_or_path")
    if not name:
        raise ConfigError(f"{peft_dir}: the PEFT config names no base model; pass --model DIR")
    base_dir = resolve_model(str(name))
    sources = [peft_dir, base_dir]
    check_output_dir(out, kind="checkpoint", force=force, sources=sources)
    n = _head_rows(read_peft_weights(peft_dir))
    kwargs: dict[str, Any] = {}
    if n is not None:
        kwargs["num_labels"] = n
        kwargs["ignore_mismatched_sizes"] = int(AutoConfig.from_pretrained(base_dir).num_labels) != n
    hf = AutoModelForSequenceClassification.from_pretrained(base_dir, **kwargs)
    import_peft(hf, peft_dir, config)
    bconf = get_config(hf)
    labels = [str(hf.config.id2label.get(i, f"LABEL_{i}")) for i in range(int(hf.config.num_labels))]
    settings = TrainSettings(
        model=str(base_dir),
        data=f"peft:{peft_dir}",
        method=bconf.method,
        posterior=bconf.posterior,
        rank=bconf.rank,
        alpha=bconf.alpha,
        targets=list(bconf.target_modules),
        max_length=int(max_length),
        init_log_alpha=bconf.init_log_alpha,
        prune_threshold=bconf.prune_threshold,
        min_rank=bconf.min_rank,
    )
    final = ranks(hf)
    run = {
        "settings": dataclasses.asdict(settings),
        "base_model": str(base_dir),
        "label_names": labels,
        "source": {"peft_dir": str(Path(peft_dir).resolve()), "peft_config": peft_cfg},
        "initial_ranks": final,
        "ranks": final,
        "total_rank": sum(final.values()),
        "initial_total_rank": sum(final.values()),
        "adapter_parameters": adapter_parameter_count(hf),
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError):
        tokenizer = None  # a base model without a tokenizer: the checkpoint scores token ids only

    def write(tmp: Path) -> None:
        save_adapter(hf, tmp / CHECKPOINT_ADAPTER)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / CHECKPOINT_TOKENIZER)
        (tmp / RUN_FILE).write_text(json.dumps(run, indent=2, default=str))

    write_dir_atomically(out, write, kind="checkpoint", force=force, sources=sources)
    return run


__all__ = ["export_peft", "import_peft", "import_peft_checkpoint", "read_peft_config", "read_peft_weights"]
