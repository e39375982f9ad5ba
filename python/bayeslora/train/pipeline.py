"""End-to-end fine-tuning of a sequence classifier: data → inject → Trainer → prune/shrink → metrics.

Used by ``bayeslora train`` and ``bayeslora quickstart``; a checkpoint directory holds ``adapter/``
(``bl.save_adapter``), ``run.json`` (settings, base model, labels, ranks, metrics) and the
intermediate Trainer checkpoints under ``checkpoints/``. The settings and recipes are in
``settings.py``, the classifier, its inputs and predictions in ``classifier.py``, the validation
rank cut in ``cut.py``; their names stay importable from here (``bayeslora.pipeline``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import metrics
from ..config import KL_SCALE_DEFAULTS
from ..errors import BundleError, ConfigError
from ..files import CHECKPOINT_ADAPTER, CHECKPOINT_TOKENIZER, CHECKPOINT_TRAINER, RUN_FILE
from ..files import SEQ_CLS_HEADS as HEAD_NAMES
from .classifier import _Encoded, _head_name, evaluate_probs, predict, resolve_model, sequence_classifier
from .cut import (
    SELECT_CUTS,
    SELECT_EXAMPLES,
    SELECT_FRACTION,
    SELECT_MIN_BENEFIT,
    SELECT_SIGNIFICANCE,
    choose_cut,
    validation_rank_cut,
)
from .settings import (
    DEFAULT_RECIPE,
    MAX_EPOCHS,
    MIN_EPOCHS,
    MIN_STEPS,
    PAPER_RECIPE,
    RECIPES,
    SELECT_RECIPE,
    VI_RECIPE,
    TrainSettings,
)

if TYPE_CHECKING:
    from ..data.splits import DatasetSplits

# This module is also the old ``bayeslora.pipeline``: what moved to settings.py, classifier.py and
# cut.py stays importable from here.
__all__ = [
    "DEFAULT_RECIPE",
    "HEAD_NAMES",
    "KL_SCALE_DEFAULTS",
    "MAX_EPOCHS",
    "MIN_EPOCHS",
    "MIN_STEPS",
    "NOISE_FIT_SAMPLES",
    "NOISE_SCALES",
    "PAPER_RECIPE",
    "RECIPES",
    "SELECT_CUTS",
    "SELECT_EXAMPLES",
    "SELECT_FRACTION",
    "SELECT_MIN_BENEFIT",
    "SELECT_RECIPE",
    "SELECT_SIGNIFICANCE",
    "VI_RECIPE",
    "TrainSettings",
    "_Encoded",
    "check_splits",
    "choose_cut",
    "evaluate_probs",
    "fit_noise_scale",
    "load_checkpoint",
    "predict",
    "resolve_model",
    "scale_noise",
    "sequence_classifier",
    "train",
    "training_arguments",
    "validation_rank_cut",
]

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
    text_pairs: list[str] | None = None,
) -> dict[str, Any]:
    """Choose the posterior noise scale (see :func:`scale_noise`) with the lowest MC validation
    NLL among ``scales`` (all ≤ 1: tempering never prunes), apply it, and return ``scale``, its
    ``nll`` and every candidate's NLL in ``curve`` (``text_pairs``: sentence pairs). The cheap
    counterpart of a temperature fitted on validation data, for the posterior instead of the
    logits."""
    if any(not 0 < c <= 1 for c in scales):
        raise ConfigError(f"noise scales must be in (0, 1], got {scales}")
    labels = np.asarray(labels)
    curve = []
    applied = 1.0
    for c in sorted(scales, reverse=True):
        scale_noise(model, c / applied)
        applied = c
        probs = predict(model, tokenizer, texts, samples, seed, max_length, text_pairs=text_pairs).mean(1)
        curve.append((c, metrics.nll(probs, labels)))
    best = min(curve, key=lambda cn: cn[1])
    scale_noise(model, best[0] / applied)
    return {"scale": best[0], "nll": best[1], "curve": curve}


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


def run_into(out: Path, body: Callable[[Path], dict]) -> dict:
    """``body(out)`` for a run writing into ``out`` (created when missing, checked writable first);
    when it fails, the directories this created are removed again where they are still empty, so a
    run that failed before it saved anything leaves nothing behind."""
    created = _check_writable(out)
    try:
        return body(out)
    except BaseException:
        _remove_if_empty(created)
        raise


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
    settings: Any,
    output_dir: str | os.PathLike,
    n_train: int,
    progress: bool = True,
    save: bool = True,
) -> Any:
    """The ``transformers.TrainingArguments`` of a run: AdamW at ``settings.lr`` with linear decay
    after a 6 % warm-up, no weight decay, CPU unless CUDA is there; adapter checkpoints every
    ``save_steps`` when ``save``. Shared by :func:`train`, ``train_lm`` (``settings`` is a
    ``TrainSettings`` or an ``LMSettings``: what both have) and the baselines of ``benches/``."""
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


def _validation_examples(available: int, settings: TrainSettings) -> int:
    """Validation examples the rank cut and the noise fit use: ``settings.select_examples`` when set,
    else ``SELECT_EXAMPLES`` capped by ``max_eval`` (smoke runs); never more than the split holds."""
    if settings.select_examples is not None:
        return min(available, settings.select_examples)
    max_eval = settings.max_eval
    return min(available, SELECT_EXAMPLES, max_eval if max_eval is not None else available)


def _parallel(model: Any) -> dict[str, Any]:
    """How the run was spread: ``world_size`` processes, ``sharded`` when FSDP2 sharded the model."""
    import torch

    from ..nn.model import is_sharded

    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {"world_size": world, "sharded": is_sharded(model)}


def _unsharded_copy(model: Any, model_dir: Path, labels: list[str], config: Any) -> Any:
    """A plain model equal to the FSDP2-sharded ``model``: the base reloaded from ``model_dir`` (the
    training froze it), the adapter and ``modules_to_save`` gathered from the shards (a collective:
    every process calls it)."""
    import torch

    from ..nn.checkpoint import adapter_state
    from ..nn.model import inject

    state = adapter_state(model)
    plain = sequence_classifier(model_dir, labels)
    inject(plain, config)
    targets = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}
    missing = sorted(set(state) - set(targets))
    if missing:  # the same structure was built twice: a mismatch is a bug, not a user error
        raise RuntimeError(f"the unsharded copy lacks {missing[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            targets[key].copy_(value)
    plain.train(model.training)
    return plain


def train(
    settings: TrainSettings,
    out: str | os.PathLike,
    progress: bool = True,
    log: Any = print,
    data: DatasetSplits | None = None,
) -> dict:
    """Fine-tune per ``settings``, write the checkpoint to ``out``, return the run summary.

    ``data``: splits to train and report on instead of loading ``settings.data`` (benchmarks that
    derive their own splits, e.g. with topics held out; the summary's ``data_source`` is theirs).
    A run that fails before it saved anything (bad data, model or targets) leaves no ``out``
    directory behind that it created."""
    return run_into(Path(out), lambda o: _train(settings, o, progress, log, data))


def _train(
    settings: TrainSettings, out: Path, progress: bool, log: Any, data: DatasetSplits | None = None
) -> dict:
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
    if data is None:
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
    n_train = len(data.train) if settings.max_train is None else min(settings.max_train, len(data.train))
    train_split = data.train.head(n_train)
    train_ds = _Encoded(
        tokenizer, train_split.texts, train_split.labels, settings.max_length, train_split.text_pairs
    )
    log(
        f"[bayeslora] {settings.method}/{settings.posterior} rank {settings.rank} on {settings.data}: "
        f"{n_train} training examples, {settings.epochs_for(n_train):g} epochs, {len(initial)} adapted "
        f"modules, model {model_dir}"
    )
    args = training_arguments(settings, out / CHECKPOINT_TRAINER, n_train, progress=progress)
    select = None
    if settings.rank_select == "validation":
        n_sel = _validation_examples(len(data.validation), settings)
        sel = data.validation.head(n_sel)

        def select(m: Any) -> None:
            cut = validation_rank_cut(
                m,
                tokenizer,
                sel.texts,
                sel.labels,
                settings.select_tolerance,
                settings.max_length,
                text_pairs=sel.text_pairs,
            )
            log(
                f"[bayeslora] rank cut on {n_sel} validation examples: total rank "
                f"{cut['total_rank']} (validation NLL {cut['nll']:.4f}, best {cut['nll_best']:.4f}, "
                f"uncut {cut['nll_uncut']:.4f})"
            )
            selections.append({**cut, "examples": n_sel})

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
    parallel = _parallel(model)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not parallel["sharded"]:
        log(
            "[bayeslora] the accelerate config asks for FSDP, but accelerate left it off (it does on "
            "CPU): this run trained as DDP, each process holding the whole model"
        )
    if parallel["sharded"]:
        # FSDP2 sharded the model in place: from here on (final prune, shrink, evaluation, save)
        # every process works on a whole, unsharded copy with the trained adapter.
        model = _unsharded_copy(model, model_dir, labels, config)
    if config.is_bayesian and trainer.prune_callback.refit_step is None:
        final = trainer.prune_callback.prune_pass(None, model)  # the last pass may be old
        changed = {k: v for k, v in final.items() if v[0] != v[1]}
        if changed:
            log(f"[bayeslora] final pruning pass: {sum(a - b for a, b in changed.values())} more ranks off")
    shrink(model)
    model.eval()
    noise_fit = None
    if config.is_bayesian and settings.noise_scale != 1.0:
        if settings.noise_scale == "fit":
            n_fit = _validation_examples(len(data.validation), settings)
            fit = data.validation.head(n_fit)
            noise_fit = fit_noise_scale(
                model,
                tokenizer,
                fit.texts,
                fit.labels,
                seed=settings.seed,
                max_length=settings.max_length,
                text_pairs=fit.text_pairs,
            )
            log(
                f"[bayeslora] posterior noise scale fitted on {n_fit} validation examples: "
                f"{noise_fit['scale']:g} (MC validation NLL {noise_fit['nll']:.4f})"
            )
        else:
            scale_noise(model, float(settings.noise_scale))
    final_ranks = ranks(model)
    n_eval = settings.max_eval
    val_set, test_set = data.validation.head(n_eval), data.test.head(n_eval)

    def probs_of(split: Any, samples: int) -> np.ndarray:
        return predict(
            model,
            tokenizer,
            split.texts,
            samples,
            settings.seed,
            settings.max_length,
            text_pairs=split.text_pairs,
        )

    val, test = probs_of(val_set, 0), probs_of(test_set, 0)
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
            "validation_mean": evaluate_probs(val, val_set.labels),
            "test_mean": evaluate_probs(test, test_set.labels),
        },
        "log_history": trainer.state.log_history,
        "prune_history": trainer.prune_callback.history,
        "rank_selection": selections,
        "noise_fit": noise_fit,
        "parallel": parallel,
    }
    if settings.method != "lora" and settings.samples > 0:
        val_mc, test_mc = probs_of(val_set, settings.samples), probs_of(test_set, settings.samples)
        summary["metrics"]["validation_mc"] = evaluate_probs(val_mc, val_set.labels)
        summary["metrics"]["test_mc"] = evaluate_probs(test_mc, test_set.labels)
    if _is_main_process():  # every process holds the same adapter; one writes it
        save_adapter(model, out / CHECKPOINT_ADAPTER)
        tokenizer.save_pretrained(out / CHECKPOINT_TOKENIZER)
        tmp = out / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, out / RUN_FILE)
    summary["model"], summary["tokenizer"], summary["data"] = model, tokenizer, data
    return summary
