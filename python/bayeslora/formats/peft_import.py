"""Import of PEFT LoRA directories (``bl.import_peft``, ``bayeslora import-peft``): the config checked to be
a plain LoRA we reproduce, the weights read from safetensors only, the factors loaded as posterior means
(and the posterior restored from the side files ``bl.export_peft`` writes). See ``peft.py``."""

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
from safetensors.torch import load_file
from torch import nn

from .._atomic import check_output_dir, write_dir_atomically
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
from ..nn.layer import base_dims, is_adaptable
from ..nn.model import adapted_layers, get_config, inject, is_target, unwrap
from .peft_rules import PREFIX, pattern_key, wrapped_modules

PEFT_WEIGHTS_BIN = "adapter_model.bin"

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
        rk = pattern_key(rank_pattern, name)
        r_cfg = int(rank_pattern[rk]) if rk is not None else int(cfg["r"])
        ak = pattern_key(alpha_pattern, name)
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
    saved = [n for n in wrapped_modules(base, peft_saved) if n not in plan]
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
    from ..train.classifier import resolve_model
    from ..train.settings import TrainSettings

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
