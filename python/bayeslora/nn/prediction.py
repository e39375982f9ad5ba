"""Sampling switch and Monte-Carlo prediction with the uncertainty decomposition of docs/method.md §6."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import TracebackType

import torch
from torch import nn

from ..errors import ShapeError
from ..files import UNCERTAINTY_FIELDS
from .model import adapted_layers, is_causal_lm, unwrap

FIELDS = UNCERTAINTY_FIELDS
_NOT_A_CLASSIFIER = (
    "mc_predict needs one class distribution per input ([batch, classes] logits), but the model gives "
    "{what}: for a language model use bl.lm.evaluate (perplexity, token calibration) or "
    "bl.lm.score_choices (multiple-choice scoring)"
)


class sampling:  # lower case on purpose: used like a function, bl.sampling(model, True)
    """Turn posterior noise on or off for every adapted layer of ``model``.

    Works as a plain setter (``bl.sampling(model, True)``) and as a context manager that restores
    the previous state on exit (``with bl.sampling(model, True): ...``). ``model.train()`` and
    ``model.eval()`` never change it.
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self._layers = [layer for _, layer in adapted_layers(unwrap(model))]
        if not self._layers:
            raise ValueError("model has no BayesLoRA adapters: call bl.inject(model, config) first")
        self._previous = [layer.sampling for layer in self._layers]
        for layer in self._layers:
            layer.sampling = bool(enabled)

    def __enter__(self) -> sampling:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for layer, previous in zip(self._layers, self._previous, strict=True):
            layer.sampling = previous


def is_sampling(model: nn.Module) -> bool:
    """True when every adapted layer samples."""
    return all(layer.sampling for _, layer in adapted_layers(unwrap(model)))


def _logits(output: object) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not torch.is_tensor(logits):
        raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")
    return logits


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def summarize(sample_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """docs/method.md §6 fields from per-sample class probabilities ``[N, S, C]`` (float64 math).

    ``variance`` is the population variance over samples of the predicted class's probability.
    """
    p = sample_probs.double()
    mean = p.mean(1)  # [N, C]
    label = mean.argmax(-1)
    total = _entropy(mean)
    aleatoric = _entropy(p).mean(1)
    chosen = p.gather(2, label.view(-1, 1, 1).expand(-1, p.shape[1], 1)).squeeze(-1)  # [N, S]
    return {
        "probs": mean.float(),
        "label": label,
        "confidence": mean.max(-1).values.float(),
        "entropy": total.float(),
        "expected_entropy": aleatoric.float(),
        "mutual_info": (total - aleatoric).clamp_min(0.0).float(),
        "variance": chosen.var(1, unbiased=False).float(),
    }


@torch.no_grad()
def mc_predict(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor] | torch.Tensor,
    samples: int = 16,
    seed: int = 0,
    max_batch: int = 256,
    return_samples: bool = False,
) -> dict[str, torch.Tensor]:
    """Predict with ``samples`` posterior samples per input, averaging probabilities (not logits).

    Args:
        inputs: model keyword inputs, each ``[N, ...]`` (e.g. ``input_ids``, ``attention_mask``), or
            a bare ``input_ids`` tensor ``[N, T]``.
        samples: S; 0 = mean mode (one deterministic pass, no noise).
        seed: seeds the noise, so a call is reproducible.
        max_batch: rows per forward; the S copies of each input are stacked along the batch axis,
            so one forward runs ``max_batch // S`` inputs at once.
        return_samples: also return ``sample_probs [N, S, C]``.

    Returns:
        ``probs [N, C]``, ``label [N]``, ``confidence [N]``, ``entropy [N]`` (total),
        ``expected_entropy [N]`` (aleatoric), ``mutual_info [N]`` (epistemic), ``variance [N]``.

    Raises:
        ShapeError: the model is a causal language model, or returns logits that are not
            ``[batch, classes]`` (per-token logits ``[B, T, V]``): ``bl.lm`` evaluates and scores those.
    """
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    if is_causal_lm(model):
        raise ShapeError(
            _NOT_A_CLASSIFIER.format(what=f"a causal language model ({type(unwrap(model)).__name__})")
        )
    if torch.is_tensor(inputs):
        inputs = {"input_ids": inputs}
    if not inputs:
        raise ValueError("inputs is empty")
    n = next(iter(inputs.values())).shape[0]
    for key, value in inputs.items():
        if value.shape[0] != n:
            raise ValueError(f"inputs[{key!r}] has batch size {value.shape[0]}, expected {n}")
    base = unwrap(model)
    layers = [layer for _, layer in adapted_layers(base)]
    if not layers and samples > 0:
        raise ValueError(
            f"samples={samples} needs posterior noise, but the model has no BayesLoRA adapters "
            "(use samples=0 for a deterministic model, e.g. a PEFT one)"
        )
    was_training = model.training
    model.eval()
    s_eff = max(samples, 1)
    per_call = max(1, max_batch // s_eff)
    device = next(model.parameters()).device
    chunks = []
    try:
        with sampling(model, samples > 0) if layers else contextlib.nullcontext():
            # One stream per module, so that a module's draws never shift another's (a module
            # pruned to rank 0 draws nothing, and the others' noise must not change with it).
            for index, layer in enumerate(layers):
                layer.generator = torch.Generator(device=device)
                layer.generator.manual_seed((int(seed) * 1_000_003 + index) % (2**63))
            for start in range(0, n, per_call):
                part = {k: v[start : start + per_call].to(device) for k, v in inputs.items()}
                rows = next(iter(part.values())).shape[0]
                if s_eff > 1:
                    part = {k: v.repeat_interleave(s_eff, dim=0) for k, v in part.items()}
                logits = _logits(model(**part)).float()
                if logits.dim() != 2:
                    raise ShapeError(_NOT_A_CLASSIFIER.format(what=f"logits of shape {list(logits.shape)}"))
                chunks.append(torch.softmax(logits, -1).reshape(rows, s_eff, -1).cpu())
    finally:
        for layer in layers:
            layer.generator = None
        model.train(was_training)
    sample_probs = torch.cat(chunks, 0)
    out = summarize(sample_probs)
    if return_samples:
        out["sample_probs"] = sample_probs
    return out
