"""What a training run depends on: :class:`TrainSettings`, the recipes its defaults come from
(``"select"``, ``"vi"``, ``"paper"``) and the default length of a run. Plain data, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import KL_SCALE_DEFAULTS
from ..errors import ConfigError

# the default length of a run (TrainSettings.epochs = None): at least MIN_EPOCHS and MIN_STEPS
# optimizer steps, so that a few hundred rows still train long enough for the half-way rank cut to
# see what the adapter is worth (30 steps of a 480-row CSV were not: its benefit was below one
# standard error), at most MAX_EPOCHS
MIN_EPOCHS, MIN_STEPS, MAX_EPOCHS = 2, 150, 20
# The authors' GLUE harness (recipe "paper"): additive posterior, a deterministic training forward
# (the noise never switched on, so λ moves only under the KL), CE + 1e-6·ΣKL with no 1/N and β = 1,
# AdamW (factors 1e-3, log σ² 1e-4 with plain Adam, head 1e-2 with weight decay 1e-2), grad-norm clip
# 0.1, 6 % warm-up then linear decay, r = 8, alpha 16 on query/key/value, attention output,
# intermediate and output; prune ℓ_k > 4 every 1,000 steps from the end of the warm-up.
PAPER_RECIPE: dict[str, Any] = {
    "method": "bayeslora",
    "posterior": "additive",
    "rank": 8,
    "alpha": 16.0,
    "targets": ["query", "key", "value", "intermediate.dense", "output.dense"],
    "lr": 1e-3,
    "rank_lr": 1e-4,
    "rank_optimizer": "adamw",
    "head_lr": 1e-2,
    "head_weight_decay": 1e-2,
    "max_grad_norm": 0.1,
    "batch_size": 32,
    "kl_scale": 1e-6,
    "kl_per_example": False,
    "kl_freeze": 0,
    "kl_warmup": 0,
    "sample_start": None,
    "init_log_sigma2": -8.0,
    "prune_threshold": 4.0,
    "prune_start": 0.06,
    "prune_every": 1000,
}
# The default (recipe "select", issue #19): the paper's training, then "select, then refit" half-way —
# the smallest cut of the relevance order whose validation NLL stays within select_tolerance of the
# best cut's, the ranks frozen, the KL off, the surviving factors trained on. Chosen on the
# validation split of VADER movies among the configurations of benches/bench_fidelity.py
# (benches/RESULTS_methods.md): the best validation accuracy and NLL of every configuration that prunes.
SELECT_RECIPE: dict[str, Any] = {
    **PAPER_RECIPE,
    "prune_start": 0.5,
    "refit_start": 0.5,
    "rank_select": "validation",
}
# Our variational recipe (the default before issue #19): the gate posterior, noise and a tempered
# per-example KL from step 30, τ = 3 passes every 20 steps from step 60, the rank group SGD-like.
VI_RECIPE: dict[str, Any] = {
    "method": "bayeslora",
    "posterior": "gate",
    "rank": 8,
    "alpha": 16.0,
    "targets": ["query", "value"],
    "lr": 2e-3,
    "rank_lr": 150.0,
    "rank_optimizer": "sgd-like",
    "head_lr": None,
    "head_weight_decay": None,
    "max_grad_norm": 1.0,
    "batch_size": 32,
    "kl_scale": None,
    "kl_per_example": True,
    "kl_freeze": 30,
    "kl_warmup": 0,
    "sample_start": 30,
    "init_log_alpha": -2.5,
    "prune_threshold": 3.0,
    "prune_start": 60,
    "prune_every": 20,
    "refit_start": None,
    "rank_select": "threshold",
}
RECIPES: dict[str, dict[str, Any]] = {
    "select": SELECT_RECIPE,
    "vi": VI_RECIPE,
    "paper": {**PAPER_RECIPE, "refit_start": None, "rank_select": "threshold"},
}
DEFAULT_RECIPE = "select"


@dataclass
class TrainSettings:
    """Everything a training run depends on (saved to ``run.json``).

    The defaults are recipe ``"select"`` (``SELECT_RECIPE``, issue #19): the authors' training —
    additive posterior, a noise-free training forward, ``1e-6·ΣKL`` without 1/N, their optimiser
    groups — then, half-way, the validation rank cut and a refit of the surviving factors. It was
    chosen on the validation split of VADER movies against our variational recipe (``"vi"``, the
    gate posterior with a tempered per-example KL: 3–5 accuracy points below LoRA at N = 2,000) and
    the authors' own (``"paper"``: prunes almost nothing at τ = 4); benches/RESULTS_methods.md has
    the numbers.

    ``recipe`` names where the defaults come from: ``"select"`` (the default), ``"vi"`` (ours,
    variational, ``VI_RECIPE``) or ``"paper"`` (the authors' GLUE harness, ``PAPER_RECIPE``); build
    one with :meth:`for_recipe`, which lets explicitly given fields override the recipe's. Schedule
    fields are steps (int) or fractions of the run (float), see ``BayesLoRAConfig``.
    ``rank_select="validation"`` settles the ranks at ``refit_start`` by the smallest cut of the
    relevance order whose validation NLL stays within ``select_tolerance`` (and a tenth of what the
    adapter adds) of the best cut's (see :func:`validation_rank_cut`). ``rank_lr`` is the learning
    rate of the rank group (plain AdamW here; SGD-like units with ``rank_optimizer="sgd-like"``, see
    ``bayeslora.training``). ``rank_budget`` steers the KL's weight towards that total rank (int, or a
    fraction of the initial total; ``bayeslora.train.budget``). ``max_eval`` caps every evaluation
    set of the run, the validation examples of the rank cut and of the noise fit included (smoke
    runs; by default the cut uses ``SELECT_EXAMPLES``). ``select_examples`` sets how many validation
    examples the cut and the noise fit use whatever ``max_eval`` says (benchmarks that cap only the
    run's own report); None: ``SELECT_EXAMPLES``, capped by ``max_eval``.
    """

    recipe: str = DEFAULT_RECIPE
    model: str = "default"
    data: str = "vader-movies"
    method: str = "bayeslora"
    posterior: str = "additive"
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(
        default_factory=lambda: ["query", "key", "value", "intermediate.dense", "output.dense"]
    )
    epochs: float | None = None
    lr: float = 1e-3
    rank_lr: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    kl_scale: float | None = 1e-6
    kl_group: str = "params"
    kl_per_example: bool = False
    kl_freeze: int | float = 0
    kl_warmup: int | float = 0
    sample_start: int | float | None = None
    init_log_alpha: float = -2.5
    init_log_sigma2: float = -8.0
    prune_threshold: float = 4.0
    prune_start: int | float = 0.5
    prune_every: int | float = 1000
    refit_start: int | float | None = 0.5
    refit_sampling: bool = False
    rank_budget: int | float | None = None
    gate_lrt: bool = False
    noise_scale: float | str = 1.0
    rank_select: str = "validation"
    select_tolerance: float = 0.02
    rank_optimizer: str = "adamw"
    head_lr: float | None = 1e-2
    head_weight_decay: float | None = 1e-2
    max_grad_norm: float = 0.1
    min_rank: int = 0
    dropout: float = 0.1
    max_train: int | None = None
    samples: int = 16
    save_steps: int = 50
    max_eval: int | None = None
    select_examples: int | None = None

    def __post_init__(self) -> None:
        if self.select_examples is not None and not (
            isinstance(self.select_examples, int)
            and not isinstance(self.select_examples, bool)
            and self.select_examples >= 1
        ):
            raise ConfigError(
                f"select_examples must be an integer >= 1 (or None), got {self.select_examples!r}"
            )
        if self.epochs is not None and not (isinstance(self.epochs, int | float) and 0 < self.epochs < 1e6):
            raise ConfigError(
                f"epochs must be a number > 0 (or None: the default length), got {self.epochs!r}"
            )
        if not (
            self.noise_scale == "fit" or (isinstance(self.noise_scale, float | int) and self.noise_scale > 0)
        ):
            raise ConfigError(f"noise_scale must be 'fit' or a number > 0, got {self.noise_scale!r}")
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}")
        if self.rank_select not in ("threshold", "validation"):
            raise ConfigError(f"rank_select must be 'threshold' or 'validation', got {self.rank_select!r}")
        if self.rank_select == "validation" and self.refit_start is None:
            raise ConfigError("rank_select='validation' settles the ranks at refit_start: set refit_start")
        if self.kl_scale is None:
            self.kl_scale = KL_SCALE_DEFAULTS.get(self.posterior, KL_SCALE_DEFAULTS["gate"])

    def epochs_for(self, n_train: int) -> float:
        """The epochs a run over ``n_train`` examples trains for: ``epochs`` when given, else at
        least ``MIN_EPOCHS`` and at least ``MIN_STEPS`` optimizer steps, at most ``MAX_EPOCHS``
        (2 epochs of VADER movies' 8,054 sentences; 10 of a 480-row CSV)."""
        if self.epochs is not None:
            return float(self.epochs)
        per_epoch = max(1, math.ceil(n_train / self.batch_size))
        return float(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(MIN_STEPS / per_epoch))))

    @classmethod
    def for_recipe(cls, recipe: str = DEFAULT_RECIPE, **overrides: Any) -> TrainSettings:
        """The settings of ``recipe`` (``"select"``, ``"vi"`` or ``"paper"``) with ``overrides`` on top."""
        if recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
        return cls(**{**RECIPES[recipe], **overrides, "recipe": recipe})

    def bayes_config(self, head: str) -> Any:
        from ..config import BayesLoRAConfig

        targets: list[str] | str = self.targets
        if len(self.targets) == 1 and (
            self.targets[0] == "all-linear" or any(c in self.targets[0] for c in "*[]|")
        ):
            targets = self.targets[0]
        return BayesLoRAConfig(
            rank=self.rank,
            alpha=self.alpha,
            target_modules=targets,
            posterior=self.posterior,  # type: ignore[arg-type]
            method=self.method,  # type: ignore[arg-type]
            init_log_alpha=self.init_log_alpha,
            init_log_sigma2=self.init_log_sigma2,
            kl_scale=float(self.kl_scale),  # type: ignore[arg-type]  # set in __post_init__
            kl_group=self.kl_group,  # type: ignore[arg-type]
            kl_per_example=self.kl_per_example,
            kl_freeze=self.kl_freeze,
            kl_warmup=self.kl_warmup,
            sample_start=self.sample_start,
            prune_threshold=self.prune_threshold,
            prune_start=self.prune_start,
            prune_every=self.prune_every,
            min_rank=self.min_rank,
            dropout=self.dropout,
            modules_to_save=[head],
            refit_start=self.refit_start,
            refit_sampling=self.refit_sampling,
            rank_budget=self.rank_budget,
            gate_lrt=self.gate_lrt,
        )
