"""PEFT's own rules, as both directions of ``peft.py`` / ``peft_import.py`` read them: the state-dict
prefix, which pattern key of ``rank_pattern`` / ``alpha_pattern`` a module gets, what ``target_modules``
selects, which modules ``modules_to_save`` claims, and the task type of a model class. One place, so
that export and import change together when PEFT does."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..nn.model import is_causal_lm

PREFIX = "base_model.model."


def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """The key of ``patterns`` that PEFT's ``get_pattern_key`` picks for module ``name`` (first
    key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``), or None."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        except re.error as e:
            raise ConfigError(f"invalid pattern {key!r} in rank_pattern/alpha_pattern: {e}") from e
    return None


def peft_targets(target_modules: Any, name: str) -> bool:
    """Whether PEFT's ``target_modules`` (list: exact name or ``.``-suffix; str: full regex match)
    selects ``name``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules or [])


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for the class of ``model`` (by its 🤗 class name suffix; any causal LM,
    GPT-2's ``LMHeadModel`` included, is ``CAUSAL_LM``), or None."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if is_causal_lm(model):
        return "CAUSAL_LM"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def peft_claims(name: str, modules_to_save: list[str]) -> bool:
    """Whether PEFT's ``modules_to_save`` handling touches module ``name``: it wraps every module
    whose name ends with an entry (plain ``endswith``) and never adapts one inside such an entry."""
    return any(
        name.endswith(m) or re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save
    )


def wrapped_modules(model: nn.Module, modules_to_save: list[str]) -> list[str]:
    """Names of the modules PEFT wraps for ``modules_to_save`` (outermost only, in module order)."""
    out: list[str] = []
    for name, _ in model.named_modules():
        if name and any(name.endswith(m) for m in modules_to_save):
            if not any(name.startswith(p + ".") for p in out):
                out.append(name)
    return out
