"""The configuration of a BayesLoRA adapter (docs/method.md §2–§5). Plain data; no torch."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

Posterior = Literal["gate", "additive"]
Method = Literal["bayeslora", "lora", "mcdropout"]
KLGroup = Literal["params", "unit"]

POSTERIORS = ("gate", "additive")
# kl_scale per posterior when a config leaves it unset (benches/RESULTS_methods.md chose them on
# the validation split of VADER movies; see TrainSettings in bayeslora.pipeline)
KL_SCALE_DEFAULTS = {"gate": 0.02, "additive": 0.01}
# kl_scale when the KL is added without 1/N (kl_per_example=False, the default): the authors' 1e-6
KL_SCALE_ABSOLUTE = 1e-6
# Fields that are a step count (int) or a fraction of the run (float in [0, 1]).
SCHEDULE_FIELDS = ("kl_freeze", "kl_warmup", "sample_start", "prune_start", "prune_every", "refit_start")
METHODS = ("bayeslora", "lora", "mcdropout")
# Module-level settings of the training recipes (see bayeslora.pipeline.RECIPES): "select" is the
# default of every field; "vi" is the variational recipe that was the default before issue #19.
CONFIG_RECIPES: dict[str, dict[str, Any]] = {
    "select": {},
    "vi": {
        "posterior": "gate",
        "kl_per_example": True,
        "sample_start": 0,
        "prune_threshold": 3.0,
        "prune_start": 100,
        "prune_every": 50,
        "refit_start": None,
    },
}


@dataclass
class BayesLoRAConfig:
    """What to adapt and how.

    The defaults are those of the default training recipe (``bayeslora train``'s ``select``, issue
    #19, benches/RESULTS_methods.md): the additive posterior, a noise-free training forward
    (``sample_start=None``), ``1e-6·ΣKL`` without 1/N, and "select, then refit" half-way
    (``refit_start=0.5``: the ranks are settled once — by a τ = 4 pass, or by a validation cut
    when the trainer is given ``select=`` — then frozen while the surviving factors train on).
    They never prune every rank of a freshly initialised adapter, whatever N and the run's length.
    The variational recipe of earlier versions: ``posterior="gate", kl_per_example=True,
    sample_start=0, prune_threshold=3.0, prune_start=100, prune_every=50, refit_start=None``.

    Args:
        rank: initial rank ``r0`` of every adapter. The scale ``alpha / r0`` never changes when
            ranks are pruned.
        alpha: LoRA scaling numerator.
        target_modules: which ``nn.Linear`` / HF ``Conv1D`` layers to adapt: a list of exact module
            names or name suffixes (``["query", "value"]`` matches ``…attention.self.query``), a
            regular expression string (full match on the module name), or ``"all-linear"``
            (every linear layer except the output head and ``modules_to_save``).
        posterior: ``"gate"`` (multiplicative Gaussian rank gates) or ``"additive"`` (tied additive
            Gaussian noise on the factors, local reparameterisation in training).
        method: ``"bayeslora"``; ``"lora"`` (deterministic baseline, no KL); ``"mcdropout"``
            (Bernoulli dropout on the rank activation, kept on when sampling).
        init_log_alpha: initial ``log α_k`` of the gate family.
        init_log_sigma2: initial ``λ_k = log σ_k²`` of the additive family.
        kl_scale: multiplies the KL term of the objective; None: ``KL_SCALE_ABSOLUTE`` (1e-6) when
            ``kl_per_example`` is False, else the posterior's per-example default
            (``KL_SCALE_DEFAULTS``: 0.02 for gate, 0.01 for additive, chosen on validation data —
            at 1.0 the per-example KL of rank-8 adapters on a few thousand examples switches every
            rank off).
        kl_group: per-rank KL weight of the gate family: ``"params"`` (d_in + d_out) or ``"unit"`` (1).
        kl_per_example: True (docs/method.md §4): the loss adds ``β·kl_scale·KL/N``, a per-example
            ELBO; False: ``β·kl_scale·KL`` with no 1/N (the authors' GLUE harness, recipe ``paper``).
        kl_freeze: steps with β = 0 before the KL warm-up.
        kl_warmup: steps over which β rises linearly from 0 to 1.
        sample_start: first training step with posterior noise on (``None``: never, the noise stays
            off in training — the authors' GLUE harness).
        prune_threshold: τ; a rank whose relevance score exceeds it is pruned.
        prune_start: no pruning before this step (at init the additive score is already above τ).
        prune_every: steps between pruning passes.
        refit_start: from this step on the ranks are settled: a last pruning pass, then the rank
            parameters and masks are frozen, the KL is off, and the surviving factors train on
            ("select, then refit"). ``None``: no refit phase.
        refit_sampling: noise in the forward during the refit phase (at the frozen, learned α).
        rank_budget: total active rank (over every adapted module) to steer to — an ``int`` number of
            ranks or a ``float`` in (0, 1], a fraction of the initial total (issue #19 H6). The KL
            weight is then multiplied by a factor that a controller adapts every step so that the
            number of ranks below τ follows a straight line from the initial total to the budget at
            ``refit_start`` (or the end of the run); pruning passes never go below that line, noisiest
            ranks first over all modules together. ``None``: no controller, a plain τ pass.

        Every schedule field (``kl_freeze``, ``kl_warmup``, ``sample_start``, ``prune_start``,
        ``prune_every``, ``refit_start``) is an ``int`` number of optimizer steps or a ``float`` in
        [0, 1], a fraction of the run's steps, so that one setting fits a 45-step and a 5,000-step
        run; :meth:`resolved` turns fractions into steps once the length of the run is known.
        min_rank: ranks every module keeps whatever their scores.
        dropout: Bernoulli drop probability of ``mcdropout``.
        gate_lrt: the gate family in training draws per-token output noise of the exact marginal
            variance ``s² Σ_k α_k (a_kᵀx)² B_jk²`` (local reparameterisation, Kingma et al. 2015)
            instead of one gate vector per sequence; sampling at test time is unchanged.
        init_b_std: std of the initial B factor for ``gate``/``lora``/``mcdropout`` (0 = PEFT's zero init).
        modules_to_save: modules left trainable in full (e.g. the classifier head).
        exclude_modules: modules never adapted (names or suffixes).
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    posterior: Posterior = "additive"
    method: Method = "bayeslora"
    init_log_alpha: float = -3.0
    init_log_sigma2: float = -8.0
    kl_scale: float | None = None
    kl_group: KLGroup = "params"
    kl_per_example: bool = False
    kl_freeze: int | float = 0
    kl_warmup: int | float = 0
    sample_start: int | float | None = None
    prune_threshold: float = 4.0
    prune_start: int | float = 0.5
    prune_every: int | float = 0.1
    min_rank: int = 0
    dropout: float = 0.1
    init_b_std: float = 0.0
    gate_lrt: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)
    refit_start: int | float | None = 0.5
    refit_sampling: bool = False
    rank_budget: int | float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save)
        self.exclude_modules = list(self.exclude_modules)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha!r}")
        if self.posterior not in POSTERIORS:
            raise ConfigError(f"posterior must be one of {POSTERIORS}, got {self.posterior!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.kl_group not in ("params", "unit"):
            raise ConfigError(f"kl_group must be 'params' or 'unit', got {self.kl_group!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.kl_scale is None:
            self.kl_scale = KL_SCALE_DEFAULTS[self.posterior] if self.kl_per_example else KL_SCALE_ABSOLUTE
        if not self.kl_scale >= 0:
            raise ConfigError(f"kl_scale must be >= 0, got {self.kl_scale!r}")
        if not isinstance(self.min_rank, int) or self.min_rank < 0:
            raise ConfigError(f"min_rank must be an integer >= 0, got {self.min_rank!r}")
        for name in SCHEDULE_FIELDS:
            value = getattr(self, name)
            if value is None and name in ("sample_start", "refit_start"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a step count (int) or a fraction of the run (float)")
            if isinstance(value, float) and not 0.0 <= value <= 1.0:
                raise ConfigError(
                    f"{name} = {value!r}: a float is a fraction of the run's steps, in [0, 1] "
                    f"(give an int for a number of steps)"
                )
            if isinstance(value, int) and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value!r}")
        if self.prune_every == 0:
            raise ConfigError("prune_every must be > 0")
        if self.min_rank > self.rank:
            raise ConfigError(f"min_rank ({self.min_rank}) cannot exceed rank ({self.rank})")
        if self.init_b_std < 0:
            raise ConfigError(f"init_b_std must be >= 0, got {self.init_b_std!r}")
        budget = self.rank_budget
        if budget is not None and (
            isinstance(budget, bool)
            or not isinstance(budget, (int, float))
            or (isinstance(budget, float) and not 0.0 < budget <= 1.0)
            or (isinstance(budget, int) and budget < 0)
        ):
            raise ConfigError(
                f"rank_budget must be an int >= 0 (ranks) or a float in (0, 1] (a fraction of the "
                f"initial total rank), got {budget!r}"
            )
        if not self.target_modules:
            raise ConfigError("target_modules is empty: name at least one module, a regex or 'all-linear'")

    @classmethod
    def recipe(cls, name: str, **overrides: Any) -> BayesLoRAConfig:
        """The config of recipe ``name`` (``"select"``, the defaults, or ``"vi"``, the gate
        posterior with a per-example KL and τ = 3 passes) with ``overrides`` on top."""
        if name not in CONFIG_RECIPES:
            raise ConfigError(f"recipe must be one of {sorted(CONFIG_RECIPES)}, got {name!r}")
        return cls(**{**CONFIG_RECIPES[name], **overrides})

    @property
    def has_fractions(self) -> bool:
        """True when a schedule field is a fraction of the run (see :meth:`resolved`)."""
        return any(isinstance(getattr(self, name), float) for name in SCHEDULE_FIELDS)

    def resolved(self, total_steps: int) -> BayesLoRAConfig:
        """This config with every fractional schedule field turned into steps of a
        ``total_steps``-step run (rounded; ``prune_every`` at least 1)."""
        if total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {total_steps!r}")
        changes: dict[str, Any] = {}
        for name in SCHEDULE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, float):
                steps = round(value * total_steps)
                changes[name] = max(1, steps) if name == "prune_every" else steps
        return dataclasses.replace(self, **changes) if changes else self

    def _steps(self, name: str) -> int | None:
        value = getattr(self, name)
        if isinstance(value, float):
            raise ConfigError(
                f"{name} = {value!r} is a fraction of the run: call config.resolved(total_steps) first "
                f"(BayesLoRATrainer does)"
            )
        return value

    def sampling_at(self, step: int) -> bool:
        """Is posterior noise on in the training forward at ``step``?"""
        if self.method == "lora":
            return False
        refit = self._steps("refit_start")
        if refit is not None and step >= refit:
            return self.refit_sampling
        start = self._steps("sample_start")
        return start is not None and step >= start

    def refitting(self, step: int) -> bool:
        """Is ``step`` in the refit phase (ranks and rank parameters frozen, no KL)?"""
        refit = self._steps("refit_start")
        return refit is not None and step >= refit

    @property
    def scale(self) -> float:
        """``s = alpha / r0``."""
        return self.alpha / self.rank

    @property
    def is_bayesian(self) -> bool:
        """True for the methods with a KL term."""
        return self.method == "bayeslora"

    def kl_beta(self, step: int) -> float:
        """β(t) of docs/method.md §4: 0 for ``kl_freeze`` steps, then linear to 1 over ``kl_warmup``; 0 again
        in the refit phase."""
        freeze, warmup = self._steps("kl_freeze"), self._steps("kl_warmup")
        assert freeze is not None and warmup is not None
        if step < freeze or self.refitting(step):
            return 0.0
        if warmup == 0:
            return 1.0
        return min(1.0, (step - freeze + 1) / warmup)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BayesLoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown BayesLoRAConfig fields: {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> BayesLoRAConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read BayesLoRA config {path}: {e}") from e
        return cls.from_dict(data)
