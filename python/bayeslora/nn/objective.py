"""The variational objective (docs/method.md §4): per-example ELBO = NLL + β(t)·kl_scale·KL/N."""

from __future__ import annotations

import torch
from torch import nn

from .model import adapted_layers, get_config, unwrap

_unwrap = unwrap  # the name train/pipeline.py and train/cut.py import


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """Sum of the KL of every adapted module (scalar, fp32), before any 1/N scaling."""
    model = unwrap(model)
    terms = [layer.kl() for _, layer in adapted_layers(model)]
    if not terms:
        raise ValueError("model has no BayesLoRA adapters: call bl.inject(model, config) first")
    return torch.stack([t.to(terms[0].device) for t in terms]).sum()


def elbo_loss(
    nll: torch.Tensor, model: nn.Module, num_train: int, step: int, total_steps: int | None = None
) -> tuple[torch.Tensor, dict]:
    """``nll + β(step)·kl_scale·KL/N`` (no 1/N when the config's ``kl_per_example`` is False); also
    returns the parts for logging.

    Args:
        nll: mean negative log-likelihood of the batch (scalar).
        num_train: N, the size of the training set.
        step: optimizer step (for β).
        total_steps: length of the run, needed when a schedule field is a fraction of it.
    """
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    config = get_config(unwrap(model))
    if total_steps is not None:
        config = config.resolved(total_steps)
    if not config.is_bayesian:
        return nll, {"nll": float(nll.detach()), "kl": 0.0, "beta": 0.0}
    kl = kl_divergence(model)
    beta = config.kl_beta(step)
    per_example = 1.0 / num_train if config.kl_per_example else 1.0
    loss = nll + (beta * config.kl_scale * per_example) * kl.to(nll.dtype)
    return loss, {"nll": float(nll.detach()), "kl": float(kl.detach()), "beta": beta}
