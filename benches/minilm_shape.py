"""The MiniLM-L6 shape (all-MiniLM-L6-v2's BERT configuration) with random weights, for the benches
that time the encoder rather than score real text."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

HIDDEN, LAYERS, HEADS, INTER, VOCAB = 384, 6, 12, 1536, 30522


def minilm_classifier(num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    """``BertForSequenceClassification`` of the MiniLM-L6 shape, weights drawn with ``seed``
    (torch is imported here, so the shape constants come without it)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTER,
        max_position_embeddings=512,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg)
