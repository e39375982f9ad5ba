"""The 🤗 sequence classifier a run trains: the model directory, its head, tokenised examples, and
per-sample class probabilities (mean mode or MC) with their in-domain metrics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics
from ..errors import ConfigError
from ..files import SEQ_CLS_HEADS as HEAD_NAMES


def _head_name(model: Any) -> str:
    for name in HEAD_NAMES:
        if hasattr(model, name):
            return name
    raise ConfigError(
        f"cannot find the classification head of {type(model).__name__} (looked for {HEAD_NAMES})"
    )


def sequence_classifier(model_dir: str | os.PathLike, labels: list[str]) -> Any:
    """The 🤗 sequence classifier in ``model_dir`` with a head for ``labels`` (a fresh head when the
    base's has other labels)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )


def resolve_model(model: str) -> Path:
    """``"default"`` → the packaged all-MiniLM-L6-v2; else a local HF model directory."""
    if model == "default":
        from ..data import default_model_path

        return default_model_path()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"--model {model!r}: not a model directory (no config.json); there is no model hub here"
        )
    return path


def encode(
    tokenizer: Any, texts: list[str], text_pairs: list[str] | None, max_length: int, **kwargs: Any
) -> Any:
    """``tokenizer``'s own encoding of single texts or of sentence pairs (``text_pairs`` [N]: the
    second segments): segment ids (``token_type_ids``) for BERT-family models, the separator
    pattern for RoBERTa, truncated ``longest_first`` (🤗's default) to ``max_length`` tokens."""
    pairs = None if text_pairs is None else list(text_pairs)
    if pairs is not None and len(pairs) != len(texts):
        raise ConfigError(f"{len(texts)} texts but {len(pairs)} text pairs")
    return tokenizer(list(texts), pairs, truncation=True, max_length=max_length, **kwargs)


class _Encoded:
    """A list-like torch dataset of tokenised examples (single texts, or pairs with ``text_pairs``)."""

    def __init__(
        self,
        tokenizer: Any,
        texts: list[str],
        labels: np.ndarray | None,
        max_length: int,
        text_pairs: list[str] | None = None,
    ) -> None:
        self.enc = encode(tokenizer, texts, text_pairs, max_length)
        self.labels = None if labels is None else [int(x) for x in labels]

    def __len__(self) -> int:
        return len(self.enc["input_ids"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.enc.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def predict(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    samples: int = 0,
    seed: int = 0,
    max_length: int = 64,
    batch_size: int = 64,
    text_pairs: list[str] | None = None,
) -> np.ndarray:
    """Per-sample class probabilities ``[N, max(S, 1), C]`` (mean mode when ``samples`` = 0) of
    ``texts`` [N], or of the sentence pairs (``texts[i]``, ``text_pairs[i]``)."""
    import torch

    from ..nn.prediction import mc_predict

    out = []
    for start in range(0, len(texts), batch_size):
        stop = start + batch_size
        enc = encode(
            tokenizer,
            list(texts[start:stop]),
            None if text_pairs is None else list(text_pairs[start:stop]),
            max_length,
            padding=True,
            return_tensors="pt",
        )
        inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        res = mc_predict(
            model,
            inputs,
            samples=samples,
            seed=seed + start,
            return_samples=True,
            max_batch=max(256, batch_size),
        )
        out.append(res["sample_probs"].to(torch.float64).numpy())
    return np.concatenate(out, 0)


def evaluate_probs(sample_probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """In-domain metrics of the MC mean probabilities."""
    probs = sample_probs.mean(1)
    return {k: float(v) for k, v in metrics.summary(probs, labels).items()}
