"""DeBERTa-v2/v3 with shared attention keys: each sequence's posterior sample on its position rows too.

With ``share_att_key`` DeBERTa-v2 projects the relative position embeddings ``[2k, H]`` with the
attention's own ``query_proj`` / ``key_proj`` — once, as a batch of one, then repeats the result for
every sequence (transformers' ``DisentangledSelfAttention.disentangled_attention_bias``). With
adapters on those projections a posterior sample is one draw per sequence (a gate row ``z_n``,
dropout mask, or factor sample), and the sequence's position rows must go through the same sampled
weights as its content rows — as the Rust runtime computes them. Transformers' one shared call
would draw a separate sample for the position rows (or refuse explicit ``fixed_gates`` rows).

:func:`per_sequence_positions` turns such attention modules into
:class:`PerSequenceDisentangledSelfAttention`, which holds the samples its content projections drew
and, when they drew one sample per sequence, computes the relative-position bias sequence by sequence
with that sequence's sample (transformers' own function on a one-sequence slice, so every other
detail stays transformers'). Without per-sequence draws or explicit gates the bias is transformers'
call unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention

from .layer import BayesLoRALayer


def _shared_key_layers(module: nn.Module) -> list[BayesLoRALayer]:
    return [m for m in (module.query_proj, module.key_proj) if isinstance(m, BayesLoRALayer)]


@contextlib.contextmanager
def _holding(layers: list[BayesLoRALayer]) -> Iterator[None]:
    for layer in layers:
        layer._held = {}
    try:
        yield
    finally:
        for layer in layers:
            layer._held, layer._row = None, None


@contextlib.contextmanager
def _row(layers: list[BayesLoRALayer], i: int) -> Iterator[None]:
    for layer in layers:
        layer._row = i
    try:
        yield
    finally:
        for layer in layers:
            layer._row = None


class PerSequenceDisentangledSelfAttention(DisentangledSelfAttention):
    """transformers' DeBERTa-v2 attention whose shared-key position rows take each sequence's own
    posterior sample (see the module docstring); the weights and config are unchanged."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _holding(_shared_key_layers(self)):
            return super().forward(*args, **kwargs)

    def disentangled_attention_bias(
        self,
        query_layer: torch.Tensor,
        key_layer: torch.Tensor,
        relative_pos: torch.Tensor | None,
        rel_embeddings: torch.Tensor,
        scale_factor: int,
    ) -> torch.Tensor:
        """``[N·heads, Tq, Tk]``; when the content rows drew one sample per sequence (or explicit
        gate rows are set), sequence n's bias is transformers' bias of its slice ``[heads, T, d]``
        with its projections' row n."""
        layers = [m for m in _shared_key_layers(self) if m._held or m.fixed_gates is not None]
        if not layers:  # mean mode, LoRA, per-token noise: transformers' shared call is right
            return super().disentangled_attention_bias(
                query_layer, key_layer, relative_pos, rel_embeddings, scale_factor
            )
        heads = self.num_attention_heads
        n = query_layer.size(0) // heads
        out = []
        for i in range(n):
            rows = slice(i * heads, (i + 1) * heads)
            pos = relative_pos
            if pos is not None and pos.dim() >= 3 and pos.size(0) == n:  # per-sequence positions
                pos = pos[i : i + 1]
            with _row(layers, i):
                out.append(
                    super().disentangled_attention_bias(
                        query_layer[rows], key_layer[rows], pos, rel_embeddings, scale_factor
                    )
                )
        return torch.cat(out, 0)


def per_sequence_positions(model: nn.Module) -> int:
    """Make every DeBERTa-v2 attention of ``model`` whose shared-key ``query_proj`` / ``key_proj``
    carry BayesLoRA layers apply each sequence's sample to its position rows (in place; the class
    becomes :class:`PerSequenceDisentangledSelfAttention`, a subclass). Returns how many changed."""
    changed = 0
    for module in model.modules():
        if (
            type(module) is DisentangledSelfAttention
            and getattr(module, "share_att_key", False)
            and getattr(module, "relative_attention", False)
            and _shared_key_layers(module)
        ):
            module.__class__ = PerSequenceDisentangledSelfAttention
            changed += 1
    return changed
