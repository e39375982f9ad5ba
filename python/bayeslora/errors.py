"""Exception classes of bayeslora.

Every error the Rust core reports arrives as one of these (the mapping lives in one place,
``rust/bayeslora-py/src/errors.rs``). They also derive from the builtin class a caller would
catch without knowing us (``ValueError`` for bad input, ``OSError`` for files).
"""

from __future__ import annotations


class BayesLoRAError(Exception):
    """Base class of every error raised by bayeslora."""


class ConfigError(BayesLoRAError, ValueError):
    """A configuration value is out of range or inconsistent."""


class TargetNotFoundError(BayesLoRAError, ValueError):
    """No module of the model matches the requested targets."""


class ShapeError(BayesLoRAError, ValueError):
    """Arrays or tensors disagree in shape."""


class InvalidValueError(BayesLoRAError, ValueError):
    """A value is NaN, infinite, or outside its allowed range."""


class BundleError(BayesLoRAError, OSError):
    """A bundle or checkpoint on disk is missing, malformed, or inconsistent."""


class IsaError(ConfigError):
    """``BAYESLORA_ISA`` names an instruction set that is unknown, or that this CPU lacks (the
    runtime never falls back to another set silently)."""


class DataError(BayesLoRAError, ValueError):
    """A dataset is missing, malformed, or unusable (e.g. a single class)."""


class OutputError(BayesLoRAError, OSError):
    """An output path is refused: writing there would destroy something bayeslora did not write
    (a user's directory, a file, the current directory, the input), or it cannot be written."""


class MissingDependencyError(BayesLoRAError, ImportError):
    """An optional dependency a feature needs is not installed; the message names the extra
    that installs it (e.g. ``bayeslora[dask]``)."""


__all__ = [
    "BayesLoRAError",
    "BundleError",
    "ConfigError",
    "DataError",
    "InvalidValueError",
    "IsaError",
    "MissingDependencyError",
    "OutputError",
    "ShapeError",
    "TargetNotFoundError",
]
