"""The variational objective (SPEC §4): per-example ELBO = NLL + β(t)·kl_scale·KL/N."""

from __future__ import annotations

import torch
from torch import nn

from .injection import adapted_layers, get_config


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / FSDP / accelerate wrappers keep the real model in .module.
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """Sum of the KL of every adapted module (scalar, fp32), before any 1/N scaling."""
    model = _unwrap(model)
    terms = [layer.kl() for _, layer in adapted_layers(model)]
    if not terms:
        raise ValueError("model has no BayesLoRA adapters: call bl.inject(model, config) first")
    return torch.stack([t.to(terms[0].device) for t in terms]).sum()


def elbo_loss(nll: torch.Tensor, model: nn.Module, num_train: int, step: int) -> tuple[torch.Tensor, dict]:
    """``nll + β(step)·kl_scale·KL/N``; also returns the parts for logging.

    Args:
        nll: mean negative log-likelihood of the batch (scalar).
        num_train: N, the size of the training set.
        step: optimizer step (for β).
    """
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    config = get_config(_unwrap(model))
    if not config.is_bayesian:
        return nll, {"nll": float(nll.detach()), "kl": 0.0, "beta": 0.0}
    kl = kl_divergence(model)
    beta = config.kl_beta(step)
    loss = nll + (beta * config.kl_scale / num_train) * kl.to(nll.dtype)
    return loss, {"nll": float(nll.detach()), "kl": float(kl.detach()), "beta": beta}
