"""A rank-budget controller (issue #19, H6): steer the KL weight towards a target total rank.

A fixed τ prunes whatever the KL pushed across it, and how many ranks that is swings with the seed.
AdaLoRA instead fixes the budget and schedules it. This controller does the same with the posterior:
the KL coefficient is multiplied by ``exp(g)``, and after every optimizer step

    g ← clip(g + (GAIN / T) · (survivors(t) − target(t)) / R₀, −G_MAX, G_MAX)

where ``survivors(t)`` is the number of active ranks whose relevance score is ≤ τ, ``R₀`` the initial
total rank and ``target(t)`` a straight line from ``R₀`` at step 0 to the budget at the settle step
(``refit_start``, or the end of the run), ``T`` that settle step: the gain is per run, not per step,
so that a 45-step and a 5,000-step run react alike (a relative error of ½ held over the whole run
moves ``g`` by ``GAIN/2``). Too many survivors raise the KL's weight, too few lower it
(an integral controller on the log of the weight: the KL's effect on the scores is multiplicative in
the step size of the SGD-like rank optimiser). Pruning passes never go below ``target(t)``
(``bayeslora.nn.pruning.prune_to_floor``), so the final total is the budget whenever enough ranks
crossed τ, and more when the KL could not push them there.

With plain Adam on the rank parameters (``rank_optimizer="adamw"``, the ``paper`` recipe) each step
moves ``log σ²`` by about its learning rate whatever the KL's weight, so the controller has almost no
lever there; it is meant for the SGD-like optimiser of the ``vi`` recipe.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..nn.model import adapted_layers, unwrap

GAIN = 40.0  # per run (divided by the settle step), per unit of relative rank error
G_MAX = 25.0  # |log factor| bound: e^25 ≈ 7e10, beyond any useful KL weight


def surviving_ranks(model: nn.Module, threshold: float) -> int:
    """Active ranks whose relevance score is ≤ ``threshold`` (those a τ pass would keep)."""
    total = 0
    for _, layer in adapted_layers(unwrap(model)):
        if layer.rank_parameter() is None:
            total += layer.active_rank
            continue
        scores = layer.rank_scores()
        total += int(((layer.rank_mask > 0) & (scores <= threshold)).sum().item())
    return total


class RankBudgetController(TrainerCallback):
    """The KL weight's multiplier ``factor`` and the pruning floor ``floor(step)`` for a budget.

    Args:
        trainer: the ``BayesLoRATrainer`` (its model, resolved schedule and run length).
        initial: the initial total rank R₀.
    """

    def __init__(self, trainer: Any, initial: int) -> None:
        self.trainer = trainer
        self.initial = max(1, int(initial))
        self.log_factor = 0.0
        self.history: list[dict[str, float]] = []

    @property
    def budget(self) -> int:
        """The target total rank (the config's ``rank_budget`` in ranks)."""
        value = self.trainer.schedule.rank_budget
        if isinstance(value, float):
            return round(value * self.initial)
        return min(int(value), self.initial)

    def settle_step(self) -> int:
        """The step by which the total should reach the budget."""
        config = self.trainer.schedule
        total = max(1, int(self.trainer.state.max_steps or 1))
        return config.refit_start if config.refit_start is not None else total

    def floor(self, step: int) -> int:
        """``target(step)``: the line from R₀ at step 0 to the budget at the settle step."""
        settle = max(1, self.settle_step())
        progress = min(1.0, max(0.0, step / settle))
        return math.ceil(self.initial - (self.initial - self.budget) * progress)

    @property
    def factor(self) -> float:
        """The KL weight's multiplier ``exp(g)``."""
        return math.exp(self.log_factor)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        config = self.trainer.schedule
        step = state.global_step
        if step >= self.settle_step() or config.refitting(step) or config.kl_beta(step) == 0.0:
            return
        survivors = surviving_ranks(self.trainer.model, config.prune_threshold)
        error = (survivors - self.floor(step)) / self.initial
        step_gain = GAIN / max(1, self.settle_step())
        self.log_factor = min(G_MAX, max(-G_MAX, self.log_factor + step_gain * error))
        if step % max(1, config.prune_every) == 0:
            self.history.append({"step": step, "survivors": survivors, "log_factor": self.log_factor})
