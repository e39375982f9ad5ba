"""Reading adapter directories and runtime bundles as numpy factors for the rank analysis (torch-free).

The tensors are read by a small safetensors reader of our own: ``safetensors``' numpy reader refuses
BF16 tensors (numpy has no bfloat16), and the Rust bundle reader reads bundles only, not adapter
directories.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BundleError
from ..files import (
    ADAPTER_CONFIG,
    ADAPTER_FORMAT_VERSION,
    ADAPTER_WEIGHTS,
    BUNDLE_WEIGHTS,
    CHECKPOINT_ADAPTER,
)
from ..files import BUNDLE_META as BUNDLE_CONFIG


@dataclass
class _Module:
    name: str
    family: str | None
    initial_rank: int
    scale: float
    a: np.ndarray  # [r, d_in] (all physical ranks)
    b: np.ndarray  # [d_out, r]
    rank_param: np.ndarray | None  # log_alpha or log_sigma2 [r]
    mask: np.ndarray  # [r] bool
    rank_index: np.ndarray  # [r]


def _natural_key(name: str) -> list:
    """``layer.2`` before ``layer.10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _family(method: str | None, posterior: str | None) -> str | None:
    if method not in (None, "bayeslora"):
        return None
    return posterior if posterior in ("gate", "additive") else None


# ---- safetensors (numpy; bf16 decoded by hand since numpy has no bfloat16) -----------------------

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A failed read of ``path`` (missing, unreadable, malformed) as a BundleError naming it."""
    try:
        yield
    except FileNotFoundError as e:
        raise BundleError(f"{path} not found") from e
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read {path}: {e}") from e


class _Tensors:
    """Reads selected tensors of a safetensors file as float64 (or int64) numpy arrays."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with _reading(path):
            size = path.stat().st_size
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise BundleError(f"{path}: not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8 or n > 100_000_000:
                    raise BundleError(f"{path}: header length {n} exceeds the file")
                header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise BundleError(f"{path}: malformed header")
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self.data_start = 8 + n
        self.size = size

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def get(self, name: str) -> np.ndarray:
        info = self.header.get(name)
        if not isinstance(info, dict):
            raise BundleError(f"{self.path}: missing tensor {name!r}")
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{self.path}: malformed entry for {name!r}") from e
        if dtype not in _DTYPES and dtype != "BF16":
            raise BundleError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
        item = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
        count = math.prod(int(s) for s in shape)
        if any(int(s) < 0 for s in shape) or end - begin != count * item or begin < 0:
            raise BundleError(f"{self.path}: tensor {name!r} has inconsistent offsets")
        if self.data_start + end > self.size:
            raise BundleError(f"{self.path}: tensor {name!r} extends past the end of the file")
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            buf = f.read(end - begin)
        if dtype == "BF16":
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(buf, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
        arr = arr.reshape(shape)
        return arr.astype(np.int64 if dtype.startswith("I") else np.float64)


def _read_json(path: Path) -> dict:
    with _reading(path):
        meta = json.loads(path.read_text())
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return meta


def _modules_from(
    names: Iterable[str],
    tensors: _Tensors,
    info: dict[str, dict],
    family: str | None,
    default_scale: float | None,
    default_r0: int | None,
) -> list[_Module]:
    out = []
    param_name = {"gate": "log_alpha", "additive": "log_sigma2"}.get(family or "")
    for name in names:
        meta = info.get(name) or {}
        a = tensors.get(f"{name}.lora_A")
        b = tensors.get(f"{name}.lora_B")
        r = a.shape[0] if a.ndim == 2 else -1
        mask = (
            tensors.get(f"{name}.rank_mask") > 0.5
            if f"{name}.rank_mask" in tensors
            else np.ones(max(r, 0), dtype=bool)
        )
        index = (
            tensors.get(f"{name}.rank_index")
            if f"{name}.rank_index" in tensors
            else np.arange(max(r, 0), dtype=np.int64)
        )
        param = None
        if param_name is not None:
            key = f"{name}.{param_name}"
            if key not in tensors:
                raise BundleError(f"{tensors.path}: missing tensor {key!r} of a {family} adapter")
            param = tensors.get(key)
        scale = meta.get("scale", default_scale)
        r0 = meta.get("initial_rank", default_r0 if default_r0 is not None else r)
        if scale is None:
            raise BundleError(f"{name}: no scale in the metadata")
        if "d_in" in meta and a.ndim == 2 and a.shape[1] != meta["d_in"]:
            raise BundleError(f"{name}: lora_A is {a.shape} but d_in is {meta['d_in']}")
        if "d_out" in meta and b.ndim == 2 and b.shape[0] != meta["d_out"]:
            raise BundleError(f"{name}: lora_B is {b.shape} but d_out is {meta['d_out']}")
        out.append(_Module(name, family, int(r0), float(scale), a, b, param, mask, index))
    return out


def read_modules(path: str | os.PathLike) -> tuple[Path, str, str | None, str | None, list[_Module]]:
    """(directory read, kind ``adapter`` | ``bundle``, method, posterior, modules) of an adapter
    directory, a training run directory holding one under ``adapter/``, or a runtime bundle."""
    root = Path(path)
    if not (root / ADAPTER_CONFIG).exists() and (root / CHECKPOINT_ADAPTER / ADAPTER_CONFIG).exists():
        root = root / CHECKPOINT_ADAPTER  # a training run directory (`bayeslora train --out DIR`)
    if (root / ADAPTER_CONFIG).exists():
        meta = _read_json(root / ADAPTER_CONFIG)
        if meta.get("format_version") != ADAPTER_FORMAT_VERSION:
            raise BundleError(f"{root / ADAPTER_CONFIG}: unsupported format_version")
        config = meta.get("config") or {}
        info = meta.get("modules") or {}
        method, posterior = config.get("method"), config.get("posterior")
        try:
            scale = float(config["alpha"]) / int(config["rank"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise BundleError(f"{root / ADAPTER_CONFIG}: config lacks alpha/rank") from e
        tensors = _Tensors(root / ADAPTER_WEIGHTS)
        mods = _modules_from(
            sorted(info, key=_natural_key),
            tensors,
            info,
            _family(method, posterior),
            scale,
            int(config["rank"]),
        )
        kind = "adapter"
    elif (root / BUNDLE_CONFIG).exists():
        meta = _read_json(root / BUNDLE_CONFIG)
        info = meta.get("modules") or {}
        if not isinstance(info, dict):
            raise BundleError(f"{root / BUNDLE_CONFIG}: 'modules' must be an object")
        method = meta.get("method", "bayeslora")
        posterior = meta.get("posterior")
        tensors = _Tensors(root / BUNDLE_WEIGHTS)
        mods = _modules_from(
            sorted(info, key=_natural_key), tensors, info, _family(method, posterior), None, None
        )
        kind = "bundle"
    else:
        raise BundleError(
            f"{root}: neither an adapter checkpoint ({ADAPTER_CONFIG}) nor a bundle ({BUNDLE_CONFIG})"
        )
    return root, kind, method, posterior, mods
