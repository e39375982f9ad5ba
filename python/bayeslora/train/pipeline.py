"""End-to-end fine-tuning of a sequence classifier: data → inject → Trainer → prune/shrink → metrics.

Used by ``bayeslora train`` and ``bayeslora quickstart``; a checkpoint directory holds ``adapter/``
(``bl.save_adapter``), ``run.json`` (settings, base model, labels, ranks, metrics) and the
intermediate Trainer checkpoints under ``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics
from ..config import KL_SCALE_DEFAULTS
from ..errors import BundleError, ConfigError
from ..files import CHECKPOINT_ADAPTER, CHECKPOINT_TOKENIZER, CHECKPOINT_TRAINER, RUN_FILE
from ..files import SEQ_CLS_HEADS as HEAD_NAMES

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
    ``bayeslora.training``).
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

    def __post_init__(self) -> None:
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


class _Encoded:
    """A list-like torch dataset of tokenised examples."""

    def __init__(self, tokenizer: Any, texts: list[str], labels: np.ndarray | None, max_length: int) -> None:
        self.enc = tokenizer(list(texts), truncation=True, max_length=max_length)
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
) -> np.ndarray:
    """Per-sample class probabilities ``[N, max(S, 1), C]`` (mean mode when ``samples`` = 0)."""
    import torch

    from ..nn.prediction import mc_predict

    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            truncation=True,
            max_length=max_length,
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


NOISE_SCALES = (1.0, 0.5, 0.25, 0.1, 0.03, 0.01)  # candidates of fit_noise_scale
NOISE_FIT_SAMPLES = 8


def scale_noise(model: Any, factor: float) -> None:
    """Multiply every module's posterior variance by ``factor``: ``α_k`` (gate) or ``σ_k²``
    (additive) — a tempered posterior. Relevance scores shift by ``log factor`` alike, so their
    order (and, for ``factor`` ≤ 1, every pruning decision) stays."""
    import torch

    from ..nn.model import adapted_layers
    from ..nn.objective import _unwrap

    if not factor > 0:
        raise ConfigError(f"a noise scale must be > 0, got {factor!r}")
    with torch.no_grad():
        for _, layer in adapted_layers(_unwrap(model)):
            p = layer.rank_parameter()
            if p is not None:
                p.add_(float(np.log(factor)))


def fit_noise_scale(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    labels: np.ndarray,
    samples: int = NOISE_FIT_SAMPLES,
    seed: int = 0,
    max_length: int = 64,
    scales: tuple[float, ...] = NOISE_SCALES,
) -> dict[str, Any]:
    """Choose the posterior noise scale (see :func:`scale_noise`) with the lowest MC validation
    NLL among ``scales`` (all ≤ 1: tempering never prunes), apply it, and return ``scale``, its
    ``nll`` and every candidate's NLL in ``curve``. The cheap counterpart of a temperature fitted
    on validation data, for the posterior instead of the logits."""
    if any(not 0 < c <= 1 for c in scales):
        raise ConfigError(f"noise scales must be in (0, 1], got {scales}")
    labels = np.asarray(labels)
    curve = []
    applied = 1.0
    for c in sorted(scales, reverse=True):
        scale_noise(model, c / applied)
        applied = c
        probs = predict(model, tokenizer, texts, samples, seed, max_length).mean(1)
        curve.append((c, metrics.nll(probs, labels)))
    best = min(curve, key=lambda cn: cn[1])
    scale_noise(model, best[0] / applied)
    return {"scale": best[0], "nll": best[1], "curve": curve}


SELECT_EXAMPLES = 1000  # validation examples the rank cut is chosen on (mean mode: one pass per cut)
SELECT_CUTS = 9  # candidate cuts, evenly spaced in total rank
SELECT_FRACTION = 0.1  # a cut may also cost at most this fraction of what the adapter adds (nats)
# Before a cut is made the adapter must be worth SELECT_MIN_BENEFIT nats of validation NLL over
# rank 0, and more than SELECT_SIGNIFICANCE standard errors of that benefit (per-example NLL
# differences). One standard error, not two: on the 60 validation rows of a 600-row CSV the
# per-example differences are heavy-tailed (an adapter at 0.78 test accuracy against a 1/3 majority
# rate had a benefit of 0.31 ± 0.16 nats), and two would have kept it from ever being cut.
SELECT_MIN_BENEFIT = 0.01
SELECT_SIGNIFICANCE = 1.0


def validation_rank_cut(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    labels: np.ndarray,
    tolerance: float,
    max_length: int = 64,
    cuts: int = SELECT_CUTS,
    min_benefit: float = SELECT_MIN_BENEFIT,
    fraction: float = SELECT_FRACTION,
    significance: float = SELECT_SIGNIFICANCE,
) -> dict[str, Any]:
    """Mask the noisiest ranks (by relevance score, over all modules together) as far as the
    validation NLL (mean mode) stays near the best candidate's.

    Candidates are ``cuts`` totals evenly spaced from all active ranks down to 0. The smallest total
    rank whose NLL is within ``min(tolerance, fraction · benefit)`` nats of the lowest NLL on the
    curve wins and its masks are applied, where ``benefit`` is what the adapter adds over cutting
    every rank (NLL at rank 0 minus the lowest NLL): a cut may cost neither more than ``tolerance``
    nats nor more than a ``fraction`` of the adapter's worth, so a weak adapter early in a short run
    is not cut to nothing. The reference is the best cut, not the uncut adapter: when cutting the
    noisiest ranks first *improves* the NLL, as it often does, a reference at the uncut adapter lets
    the next cut spend that gain, and the chosen rank then swings with the seed.

    When the adapter has not yet shown a benefit — the uncut adapter's per-example NLL advantage
    over rank 0 is not above ``significance`` (1) standard errors and ``min_benefit``, as at B = 0
    or after a few steps on a hard task — the curve says nothing about which ranks matter, and
    nothing is cut.
    Returns the chosen ``total_rank``, its ``nll``, ``nll_uncut``, ``nll_best``, ``benefit`` (rank-0
    NLL minus uncut), its standard error ``benefit_se``, the ``threshold`` used, and every
    candidate's ``(total rank, nll)`` in ``curve``.
    """
    import torch

    from ..nn.model import adapted_layers
    from ..nn.objective import _unwrap

    layers = [layer for _, layer in adapted_layers(_unwrap(model))]
    masks = [layer.rank_mask.clone() for layer in layers]
    entries = [  # (score, layer index, rank index) of every active rank
        (float(score), i, k)
        for i, layer in enumerate(layers)
        for k, score in enumerate(layer.rank_scores().tolist())
        if layer.rank_mask[k] > 0
    ]
    entries.sort(key=lambda e: -e[0])  # noisiest first
    labels = np.asarray(labels)
    was_training = model.training
    model.eval()

    def cut(removed: int) -> None:
        for layer, mask in zip(layers, masks, strict=True):
            layer.rank_mask.copy_(mask)
        for _, i, k in entries[:removed]:
            layers[i].rank_mask[k] = 0.0

    def nll_with(removed: int) -> np.ndarray:
        cut(removed)
        probs = predict(model, tokenizer, texts, 0, 0, max_length).mean(1)
        return metrics.nll_per_example(probs, labels)

    total = len(entries)
    candidates = sorted({round(total * j / max(1, cuts - 1)) for j in range(cuts)})
    with torch.no_grad():
        per_example = [nll_with(m) for m in candidates]
        pick, info = choose_cut(per_example, tolerance, fraction, min_benefit, significance)
        best = candidates[pick]
        cut(best)  # its NLL is on the curve already
    model.train(was_training)
    curve = [(total - m, float(v.mean())) for m, v in zip(candidates, per_example, strict=True)]
    return {"total_rank": total - best, "nll": curve[pick][1], **info, "curve": curve}


def choose_cut(
    per_example: list[np.ndarray],
    tolerance: float,
    fraction: float = SELECT_FRACTION,
    min_benefit: float = SELECT_MIN_BENEFIT,
    significance: float = SELECT_SIGNIFICANCE,
) -> tuple[int, dict[str, float]]:
    """The rule of :func:`validation_rank_cut` on its curve: ``per_example[j]`` is the ``[N]``
    validation NLL of candidate ``j``, from the uncut adapter (``j = 0``) to every rank cut (last).
    Returns the index of the chosen candidate (the largest cut within the threshold; 0 when the
    adapter's benefit — rank-0 minus uncut NLL — is not above ``min_benefit`` and ``significance``
    standard errors of its per-example differences) and ``nll_uncut``, ``nll_best``, ``benefit``,
    ``benefit_se`` and ``threshold``."""
    means = [float(np.mean(v)) for v in per_example]
    uncut, zero = means[0], means[-1]
    lowest = min(means)
    gain = np.asarray(per_example[-1], np.float64) - np.asarray(per_example[0], np.float64)
    benefit = zero - uncut
    se = float(gain.std(ddof=1) / np.sqrt(gain.size)) if gain.size > 1 else 0.0
    threshold = lowest + min(tolerance, fraction * (zero - lowest))
    info = {
        "nll_uncut": uncut,
        "nll_best": lowest,
        "benefit": benefit,
        "benefit_se": se,
        "threshold": threshold,
    }
    bar = significance * se if se > 0 else 0.0
    if len(means) == 1 or not (benefit > bar and benefit >= min_benefit):
        return 0, info
    return max(j for j, m in enumerate(means) if m <= threshold), info


def load_checkpoint(path: str | os.PathLike) -> tuple[Any, Any, dict]:
    """(model, tokenizer, run metadata) of a ``bayeslora train`` output directory."""
    from transformers import AutoTokenizer

    from ..nn.checkpoint import load_adapter
    from .lm_pipeline import is_lm_checkpoint, load_lm_checkpoint

    if is_lm_checkpoint(path):
        return load_lm_checkpoint(path)
    run_path = Path(path) / RUN_FILE
    try:
        run = json.loads(run_path.read_text())
    except FileNotFoundError as e:
        raise BundleError(f"{run_path} not found: not a bayeslora training checkpoint") from e
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {run_path}: {e}") from e
    base = Path(run["base_model"])
    labels = run["label_names"]
    model = sequence_classifier(base, labels)
    tokenizer = AutoTokenizer.from_pretrained(base)
    load_adapter(model, Path(path) / CHECKPOINT_ADAPTER)
    return model.eval(), tokenizer, run


def _check_writable(out: Path) -> list[Path]:
    """Create ``out`` and check that it is writable; returns the directories this created,
    innermost first (see :func:`_remove_if_empty`)."""
    created = [p for p in (out, *out.parents) if not os.path.lexists(p)]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        _remove_if_empty(created)
        raise ConfigError(f"--out {out}: not writable ({e.strerror or e})") from e
    return created


def _remove_if_empty(created: list[Path]) -> None:
    """Remove the directories of ``created`` (innermost first) that are still empty."""
    for p in created:
        try:
            p.rmdir()
        except OSError:
            break


def check_splits(data: Any, n_eval: int | None) -> None:
    """Raise :class:`DataError` (one line) unless ``data`` has a training, a validation and a test
    example (after ``max_eval``): a run trains on the first and reports on the other two."""
    from ..errors import DataError

    if n_eval is not None and n_eval < 1:
        raise DataError(f"max_eval must be >= 1, got {n_eval}")
    sizes = {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)}
    if all(sizes.values()):
        return
    counts = ", ".join(f"{n} {name}" for name, n in sizes.items())
    raise DataError(  # round(0.1 n) >= 1 from n = 5 on (data.stratified_split)
        f"{data.name}: {len(data.all)} examples give {counts} (each class gives 10 % to validation "
        "and 10 % to test); training needs at least one in each: give some class 5 or more examples"
    )


def training_arguments(
    settings: TrainSettings,
    output_dir: str | os.PathLike,
    n_train: int,
    progress: bool = True,
    save: bool = True,
) -> Any:
    """The ``transformers.TrainingArguments`` of a run: AdamW at ``settings.lr`` with linear decay
    after a 6 % warm-up, no weight decay, CPU unless CUDA is there; adapter checkpoints every
    ``save_steps`` when ``save``. Shared by :func:`train` and the baselines of ``benches/``."""
    import torch
    from transformers import TrainingArguments

    epochs = settings.epochs_for(n_train)
    steps = epochs * n_train / settings.batch_size
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        num_train_epochs=epochs,
        learning_rate=settings.lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, int(0.06 * steps)),
        weight_decay=0.0,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=10,
        save_strategy="steps" if save else "no",
        save_steps=settings.save_steps,
        save_total_limit=1,
        save_only_model=True,
        report_to="none",
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def train(settings: TrainSettings, out: str | os.PathLike, progress: bool = True, log: Any = print) -> dict:
    """Fine-tune per ``settings``, write the checkpoint to ``out``, return the run summary.

    A run that fails before it saved anything (bad data, model or targets) leaves no ``out``
    directory behind that it created."""
    out = Path(out)
    created = _check_writable(out)
    try:
        return _train(settings, out, progress, log)
    except BaseException:
        _remove_if_empty(created)
        raise


def _train(settings: TrainSettings, out: Path, progress: bool, log: Any) -> dict:
    from transformers import (
        AutoTokenizer,
        DataCollatorWithPadding,
        set_seed,
    )
    from transformers.utils import logging as hf_logging

    from ..data import load_dataset
    from ..nn.checkpoint import save_adapter
    from ..nn.model import inject
    from ..nn.pruning import adapter_parameter_count, ranks, shrink
    from .trainer import BayesLoRATrainer, _is_main_process

    hf_logging.set_verbosity_error()
    data = load_dataset(settings.data, seed=settings.seed)
    check_splits(data, settings.max_eval)
    model_dir = resolve_model(settings.model)
    set_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    labels = list(data.label_names)
    model = sequence_classifier(model_dir, labels)
    config = settings.bayes_config(_head_name(model))
    inject(model, config)
    initial = ranks(model)
    train_split = data.train
    n_train = len(train_split) if settings.max_train is None else min(settings.max_train, len(train_split))
    train_ds = _Encoded(
        tokenizer, train_split.texts[:n_train], train_split.labels[:n_train], settings.max_length
    )
    log(
        f"[bayeslora] {settings.method}/{settings.posterior} rank {settings.rank} on {settings.data}: "
        f"{n_train} training examples, {settings.epochs_for(n_train):g} epochs, {len(initial)} adapted "
        f"modules, model {model_dir}"
    )
    args = training_arguments(settings, out / CHECKPOINT_TRAINER, n_train, progress=progress)
    select = None
    if settings.rank_select == "validation":
        n_sel = min(len(data.validation), SELECT_EXAMPLES)
        sel_texts, sel_labels = data.validation.texts[:n_sel], data.validation.labels[:n_sel]

        def select(m: Any) -> None:
            cut = validation_rank_cut(
                m, tokenizer, sel_texts, sel_labels, settings.select_tolerance, settings.max_length
            )
            log(
                f"[bayeslora] rank cut on {n_sel} validation examples: total rank "
                f"{cut['total_rank']} (validation NLL {cut['nll']:.4f}, best {cut['nll_best']:.4f}, "
                f"uncut {cut['nll_uncut']:.4f})"
            )
            selections.append(cut)

    selections: list[dict[str, Any]] = []
    trainer = BayesLoRATrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        rank_lr=settings.rank_lr,
        num_train=n_train,
        rank_optimizer=settings.rank_optimizer,
        head_lr=settings.head_lr,
        head_weight_decay=settings.head_weight_decay,
        select=select,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if config.is_bayesian and trainer.prune_callback.refit_step is None:
        final = trainer.prune_callback.prune_pass(None)  # the last scheduled pass may be old
        changed = {k: v for k, v in final.items() if v[0] != v[1]}
        if changed:
            log(f"[bayeslora] final pruning pass: {sum(a - b for a, b in changed.values())} more ranks off")
    shrink(model)
    model.eval()
    noise_fit = None
    if config.is_bayesian and settings.noise_scale != 1.0:
        if settings.noise_scale == "fit":
            n_fit = min(len(data.validation), SELECT_EXAMPLES)
            noise_fit = fit_noise_scale(
                model,
                tokenizer,
                data.validation.texts[:n_fit],
                data.validation.labels[:n_fit],
                seed=settings.seed,
                max_length=settings.max_length,
            )
            log(
                f"[bayeslora] posterior noise scale fitted on {n_fit} validation examples: "
                f"{noise_fit['scale']:g} (MC validation NLL {noise_fit['nll']:.4f})"
            )
        else:
            scale_noise(model, float(settings.noise_scale))
    final_ranks = ranks(model)
    n_eval = settings.max_eval
    val_texts, val_labels = data.validation.texts[:n_eval], data.validation.labels[:n_eval]
    test_texts, test_labels = data.test.texts[:n_eval], data.test.labels[:n_eval]
    val = predict(model, tokenizer, val_texts, 0, settings.seed, settings.max_length)
    test = predict(model, tokenizer, test_texts, 0, settings.seed, settings.max_length)
    summary: dict[str, Any] = {
        "settings": dataclasses.asdict(settings),
        "base_model": str(model_dir),
        "data_source": data.source,
        "label_names": labels,
        "num_train": n_train,
        "epochs": settings.epochs_for(n_train),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,  # all threads of this process: robust to other load
        "initial_ranks": initial,
        "ranks": final_ranks,
        "total_rank": sum(final_ranks.values()),
        "initial_total_rank": sum(initial.values()),
        "adapter_parameters": adapter_parameter_count(model),
        "metrics": {
            "validation_mean": evaluate_probs(val, val_labels),
            "test_mean": evaluate_probs(test, test_labels),
        },
        "log_history": trainer.state.log_history,
        "prune_history": trainer.prune_callback.history,
        "rank_selection": selections,
        "noise_fit": noise_fit,
    }
    if settings.method != "lora" and settings.samples > 0:
        val_mc = predict(model, tokenizer, val_texts, settings.samples, settings.seed, settings.max_length)
        test_mc = predict(model, tokenizer, test_texts, settings.samples, settings.seed, settings.max_length)
        summary["metrics"]["validation_mc"] = evaluate_probs(val_mc, val_labels)
        summary["metrics"]["test_mc"] = evaluate_probs(test_mc, test_labels)
    if _is_main_process():  # every process holds the same adapter; one writes it
        save_adapter(model, out / CHECKPOINT_ADAPTER)
        tokenizer.save_pretrained(out / CHECKPOINT_TOKENIZER)
        tmp = out / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, out / RUN_FILE)
    summary["model"], summary["tokenizer"], summary["data"] = model, tokenizer, data
    return summary
