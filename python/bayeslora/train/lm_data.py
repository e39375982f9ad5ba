"""Training rows for causal LMs (issue #14): documents cut into blocks of tokens, prompt/response pairs
with response-only labels, and the dynamic-padding collator that batches them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, DataError
from ..lm import IGNORE_INDEX, _pad_id, encode_pairs

Row = dict[str, list[int]]  # input_ids [T] and labels [T]; T varies from row to row


def block_rows(tokenizer: Any, documents: Sequence[str], block_size: int) -> list[Row]:
    """Cut ``documents`` into blocks of ``block_size`` tokens (labels = the ids).

    Each document is tokenised with the tokenizer's special tokens (e.g. BOS) and followed by its
    EOS token (if it has one); the documents are joined in order and cut into consecutive blocks,
    so a block may span the end of one document and the start of the next, as in the usual
    language-modelling setup. The last block is kept if it holds at least 2 tokens (one predicted).
    """
    if block_size < 2:
        raise ConfigError(f"a block holds at least 2 tokens, got block size {block_size}")
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for doc in documents:
        stream += list(tokenizer(doc, add_special_tokens=True)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) >= 2]


def pair_rows(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int) -> list[Row]:
    """One row per (prompt, response): labels -100 on the prompt (``bl.lm.encode_pairs``), truncated
    to ``max_length`` tokens; a row whose response was cut away entirely is dropped."""
    if not pairs:
        return []
    enc = encode_pairs(tokenizer, [p for p, _ in pairs], [r for _, r in pairs], max_length=max_length)
    rows = []
    for ids, mask, labels in zip(enc["input_ids"], enc["attention_mask"], enc["labels"], strict=True):
        n = int(mask.sum())
        row = {"input_ids": ids[:n].tolist(), "labels": labels[:n].tolist()}
        if any(y != IGNORE_INDEX for y in row["labels"][1:]):
            rows.append(row)
    return rows


def source_rows(tokenizer: Any, source: Any, part: str, max_length: int) -> list[Row]:
    """The rows of one part (``"train"``, ``"validation"``, ``"test"`` or ``"all"``) of a
    ``bayeslora.data.text.TextSource``: blocks of documents, or prompt/response rows."""
    parts = ("train", "validation", "test") if part == "all" else (part,)
    if source.is_pairs:
        return pair_rows(tokenizer, [p for name in parts for p in source.pairs[name]], max_length)
    return block_rows(tokenizer, [d for name in parts for d in source.documents[name]], max_length)


def predicted_per_row(rows: Sequence[Row]) -> float:
    """T̄: the mean number of predicted tokens (positions t ≥ 1 whose label is not -100) per row."""
    if not rows:
        raise DataError("no rows")
    return sum(sum(y != IGNORE_INDEX for y in r["labels"][1:]) for r in rows) / len(rows)


@dataclass
class CausalLMCollator:
    """Pads a list of rows (``input_ids`` and optional ``labels``, any lengths) to the longest in the
    batch, on the right: ids with ``pad_id``, ``attention_mask`` 0, ``labels`` -100 there. Rows
    without labels get the ids as labels. ``pad_to_multiple_of`` rounds the length up.

    Returns ``input_ids``, ``attention_mask``, ``labels``: ``[B, T]`` int64 tensors.
    """

    pad_id: int
    pad_to_multiple_of: int | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None) -> CausalLMCollator:
        """Pad with the tokenizer's pad id (else its EOS id, else 0), as ``bl.lm.encode_texts``."""
        return cls(_pad_id(tokenizer), pad_to_multiple_of)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DataError("an empty batch")
        ids = [list(map(int, f["input_ids"])) for f in features]
        labels = [list(map(int, f.get("labels", f["input_ids"]))) for f in features]
        for i, (a, b) in enumerate(zip(ids, labels, strict=True)):
            if len(a) != len(b):
                raise DataError(f"row {i}: {len(a)} input ids but {len(b)} labels")
        t = max(1, max(len(a) for a in ids))
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            t = -(-t // m) * m
        out_ids = torch.full((len(ids), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), t), dtype=torch.long)
        out_labels = torch.full((len(ids), t), IGNORE_INDEX, dtype=torch.long)
        for i, (a, b) in enumerate(zip(ids, labels, strict=True)):
            out_ids[i, : len(a)] = torch.tensor(a, dtype=torch.long)
            mask[i, : len(a)] = 1
            out_labels[i, : len(b)] = torch.tensor(b, dtype=torch.long)
        return {"input_ids": out_ids, "attention_mask": mask, "labels": out_labels}
