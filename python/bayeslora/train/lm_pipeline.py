"""End-to-end fine-tuning of a causal LM (issue #14): text → blocks → inject → Trainer → prune/shrink
→ perplexity, token calibration and per-sequence uncertainty (``bayeslora train --task causal-lm``).

The checkpoint has the layout of the classifier's (``adapter/``, ``tokenizer/``, ``run.json``), with
``"task": "causal-lm"`` in ``run.json``; ``load_checkpoint`` and the CLI's ``evaluate`` and
``export-peft`` see that and come here.

The likelihood is the mean NLL per predicted token (``lm_loss="token"``) and the KL's N is the number
of training sequences. The per-sequence ELBO, divided by N·T̄ (T̄ = the mean number of predicted
tokens per training sequence), is ``token NLL + KL / (N·T̄)``; so ``kl_scale=None`` resolves to
``kl_temper / T̄`` for the run's own T̄ (default ``LM_KL_TEMPER``; how it was chosen: there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BundleError, ConfigError
from ..files import CHECKPOINT_ADAPTER, CHECKPOINT_TOKENIZER, CHECKPOINT_TRAINER, RUN_FILE

TASK = "causal-lm"
# kl_scale = LM_KL_TEMPER / T̄ (module docstring; 1 = the untempered per-token ELBO). Chosen on the
# validation plays' MC NLL (benches/bench_lm.py, SmolLM2, 384 blocks of 64 tokens, 48 steps, seed 0)
# among {1, 0.3, 0.1, 0.01, 0}: 1 switched all 480 ranks off (NLL 4.40, the base model's), 0.3 kept 14
# (4.16), 0.1 / 0.01 / 0 kept all (3.809 / 3.8036 / 3.8035; LoRA 3.803). No tempering learned a rank
# that kept the likelihood: the KL either prunes nothing or everything here, and 0 won by 1e-4 nats.
# With 0, the gates' noise is fitted by the likelihood alone; --kl-temper 0.3 prunes, at a cost.
LM_KL_TEMPER = 0.0
# default LoRA targets by model type; any other type gets "all-linear"
LM_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    **{t: ["q_proj", "v_proj"] for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
}
MODEL_ALIASES = ("smollm2",)  # --model smollm2: SmolLM2-135M-Instruct from the cache (data.lm_model)


@dataclass
class LMSettings:
    """Everything a causal-LM training run depends on (saved to ``run.json``).

    Our variational recipe (the gate posterior, noise from ``sample_start``, a per-sequence KL
    tempered by ``kl_scale``, τ passes from ``prune_start``), as ``TrainSettings``' recipe ``"vi"``;
    schedule fields are steps (int) or fractions of the run (float). ``max_length`` is the block
    size (tokens per training sequence); ``max_train`` / ``max_eval`` cap the number of blocks.
    ``targets=None``: ``LM_TARGETS`` of the model's type. ``kl_scale=None``: ``kl_temper / T̄``.
    ``bf16`` / ``fp16`` cast the base model after the adapters are injected (the adapters stay
    float32); ``gradient_checkpointing`` recomputes the activations in the backward pass.
    """

    task: str = TASK
    model: str = "smollm2"
    data: str = "shakespeare"
    method: str = "bayeslora"
    posterior: str = "gate"
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] | None = None
    epochs: float = 1.0
    lr: float = 1e-3
    rank_lr: float = 150.0
    rank_optimizer: str = "sgd-like"
    batch_size: int = 8
    max_length: int = 128
    seed: int = 0
    kl_scale: float | None = None
    kl_temper: float = LM_KL_TEMPER
    kl_freeze: int | float = 0.1
    kl_warmup: int | float = 0
    sample_start: int | float | None = 0.1
    init_log_alpha: float = -2.5
    init_log_sigma2: float = -8.0
    prune_threshold: float = 3.0
    prune_start: int | float = 0.5
    prune_every: int | float = 0.1
    max_grad_norm: float = 1.0
    min_rank: int = 0
    dropout: float = 0.0
    lm_loss: str = "token"
    max_train: int | None = None
    max_eval: int | None = None
    samples: int = 8
    save_steps: int = 200
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False

    def epochs_for(self, n_train: int) -> float:
        """The epochs a run trains for (``epochs``; the classifier's ``TrainSettings`` derives a
        default from ``n_train``), as ``pipeline.training_arguments`` asks."""
        return float(self.epochs)

    def __post_init__(self) -> None:
        if self.task != TASK:
            raise ConfigError(f"LMSettings is for task {TASK!r}, got {self.task!r}")
        if not (isinstance(self.epochs, int | float) and 0 < self.epochs < 1e6):
            raise ConfigError(f"epochs must be a number > 0, got {self.epochs!r}")
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 exclude each other")
        if self.max_length < 2:
            raise ConfigError(f"max_length (the block size) must be >= 2, got {self.max_length}")
        if self.kl_scale is not None and not self.kl_scale >= 0:
            raise ConfigError(f"kl_scale must be >= 0, got {self.kl_scale}")
        if not self.kl_temper >= 0:
            raise ConfigError(f"kl_temper must be >= 0, got {self.kl_temper}")

    def bayes_config(self, model_type: str, kl_scale: float) -> Any:
        from ..config import BayesLoRAConfig

        targets: list[str] | str = self.targets or LM_TARGETS.get(model_type, "all-linear")
        if isinstance(targets, list) and len(targets) == 1 and targets[0] == "all-linear":
            targets = "all-linear"
        return BayesLoRAConfig(
            rank=self.rank,
            alpha=self.alpha,
            target_modules=targets,
            posterior=self.posterior,  # type: ignore[arg-type]
            method=self.method,  # type: ignore[arg-type]
            init_log_alpha=self.init_log_alpha,
            init_log_sigma2=self.init_log_sigma2,
            kl_scale=kl_scale,
            kl_per_example=True,
            kl_freeze=self.kl_freeze,
            kl_warmup=self.kl_warmup,
            sample_start=self.sample_start,
            prune_threshold=self.prune_threshold,
            prune_start=self.prune_start,
            prune_every=self.prune_every,
            min_rank=self.min_rank,
            dropout=self.dropout,
        )


def resolve_lm_model(model: str) -> Path:
    """``"smollm2"`` → SmolLM2-135M-Instruct from the cache (converted on first use); else a local
    🤗 model directory."""
    if model == "smollm2":
        from ..data.lm_model import smollm2_path

        return smollm2_path()
    from .pipeline import resolve_model

    if model == "default":
        raise ConfigError("--task causal-lm: give --model DIR (a causal LM) or --model smollm2")
    return resolve_model(model)


def quantization_config(settings: LMSettings) -> Any:
    """``--load-in-4bit``: bitsandbytes' NF4 (double quantisation, compute dtype bf16, or fp16 with
    ``--fp16``), the QLoRA setting; None without it. bitsandbytes (extra ``qlora``) runs its 4-bit
    layers on CUDA and, since 0.48, on the CPU. A missing bitsandbytes is one ``ConfigError``."""
    if not settings.load_in_4bit:
        return None
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--load-in-4bit needs bitsandbytes: pip install 'bayeslora[qlora]'")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16 if settings.fp16 else torch.bfloat16,
    )


def load_lm(model_dir: str | os.PathLike, settings: LMSettings | None = None) -> Any:
    """The 🤗 causal LM in ``model_dir`` (float32, or bitsandbytes 4-bit with ``load_in_4bit``:
    on the first CUDA device when there is one, else the CPU), in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: stderr stays for our one-line errors
    quant = quantization_config(settings) if settings is not None else None
    if quant is None:
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()
    import torch

    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, device_map={"": device}
    )
    if device == "cpu":
        import bitsandbytes as bnb

        for name, m in model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit) and m.out_features % 32:
                raise ConfigError(
                    f"--load-in-4bit on the CPU: {name} has out_features {m.out_features}, not a "
                    "multiple of 32, which bitsandbytes' CPU 4-bit kernel needs (on CUDA it is not)"
                )
    return model.eval()


def cast_and_checkpoint(model: Any, settings: LMSettings) -> None:
    """Apply ``bf16``/``fp16`` (the base only: the adapters stay float32) and gradient checkpointing.

    With checkpointing, the training noise is drawn from the global RNG, whose state
    ``torch.utils.checkpoint`` saves and restores for the recomputation: the recomputed forward
    draws the same noise as the first."""
    import torch

    if (settings.bf16 or settings.fp16) and not settings.load_in_4bit:  # 4-bit: the compute dtype
        model.to(torch.bfloat16 if settings.bf16 else torch.float16)
    if settings.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen embeddings give no grad to checkpoint


def lm_metrics(
    model: Any, rows: list[dict[str, list[int]]], samples: int, seed: int, batch_size: int = 8
) -> dict[str, Any]:
    """``bl.lm.evaluate`` of ``rows`` (padded by :class:`CausalLMCollator`): nll, perplexity,
    token_accuracy, ece, tokens, sequences, and the per-sequence ``[N]`` lists."""
    from ..lm import evaluate
    from .lm_data import CausalLMCollator

    batch = CausalLMCollator(pad_id=0)(rows)
    res = evaluate(model, samples=samples, seed=seed, batch_size=batch_size, **batch)
    out = {k: v for k, v in res.items() if not k.startswith("sequence_")}
    out["sequences"] = len(rows)
    out.update({k: v.tolist() for k, v in res.items() if k.startswith("sequence_")})
    return out


def scalar_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """``m`` without its per-sequence lists."""
    return {k: v for k, v in m.items() if not k.startswith("sequence_")}


def train_lm(settings: LMSettings, out: str | os.PathLike, progress: bool = True, log: Any = print) -> dict:
    """Fine-tune the causal LM per ``settings``, write the checkpoint to ``out``, return the summary
    (with ``model`` and ``tokenizer``). A run that fails before it saved anything leaves no ``out``
    directory behind that it created."""
    from .pipeline import run_into

    return run_into(Path(out), lambda o: _train_lm(settings, o, progress, log))


def _train_lm(settings: LMSettings, out: Path, progress: bool, log: Any) -> dict:
    from transformers import AutoTokenizer, set_seed
    from transformers.utils import logging as hf_logging

    from ..data.text import load_text_source
    from ..errors import DataError
    from ..nn.checkpoint import save_adapter
    from ..nn.model import inject
    from ..nn.pruning import adapter_parameter_count, ranks, shrink
    from .lm_data import CausalLMCollator, predicted_per_row, source_rows
    from .pipeline import training_arguments
    from .trainer import BayesLoRATrainer, _is_main_process

    hf_logging.set_verbosity_error()
    quantization_config(settings)  # a missing bitsandbytes fails before the data is read
    source = load_text_source(settings.data, seed=settings.seed)
    model_dir = resolve_lm_model(settings.model)
    set_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_rows = source_rows(tokenizer, source, "train", settings.max_length)[: settings.max_train]
    val_rows = source_rows(tokenizer, source, "validation", settings.max_length)[: settings.max_eval]
    test_rows = source_rows(tokenizer, source, "test", settings.max_length)[: settings.max_eval]
    for part, rows in (("training", train_rows), ("validation", val_rows), ("test", test_rows)):
        if not rows:
            raise DataError(f"{settings.data}: no {part} sequence (of at least 2 tokens)")
    t_bar = predicted_per_row(train_rows)
    kl_scale = settings.kl_temper / t_bar if settings.kl_scale is None else float(settings.kl_scale)
    model = load_lm(model_dir, settings)
    config = settings.bayes_config(getattr(model.config, "model_type", ""), kl_scale)
    inject(model, config)
    cast_and_checkpoint(model, settings)
    initial = ranks(model)
    n_train = len(train_rows)
    log(
        f"[bayeslora] {settings.method}/{settings.posterior} rank {settings.rank} on {settings.data}: "
        f"{n_train} training blocks of ≤ {settings.max_length} tokens (T̄ = {t_bar:.1f} predicted), "
        f"{settings.epochs:g} epochs, {len(initial)} adapted modules, kl_scale {kl_scale:.3g}, "
        f"model {model_dir}"
    )
    trainer = BayesLoRATrainer(
        model=model,
        args=training_arguments(settings, out / CHECKPOINT_TRAINER, n_train, progress=progress),
        train_dataset=train_rows,
        data_collator=CausalLMCollator.for_tokenizer(tokenizer),
        rank_lr=settings.rank_lr,
        num_train=n_train,
        rank_optimizer=settings.rank_optimizer,
        task=TASK,
        lm_loss=settings.lm_loss,
    )
    if not progress:  # stdout stays for the caller (--json): no printed log dicts
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if config.is_bayesian:
        trainer.prune_callback.prune_pass(None)  # the last scheduled pass may be old
    shrink(model)
    model.eval()
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    final_ranks = ranks(model)
    seed = settings.seed
    val = lm_metrics(model, val_rows, 0, seed)
    test = lm_metrics(model, test_rows, 0, seed)
    metrics: dict[str, Any] = {"validation_mean": scalar_metrics(val), "test_mean": scalar_metrics(test)}
    if settings.method != "lora" and settings.samples > 0:
        metrics["validation_mc"] = scalar_metrics(lm_metrics(model, val_rows, settings.samples, seed))
        metrics["test_mc"] = scalar_metrics(lm_metrics(model, test_rows, settings.samples, seed))
    summary: dict[str, Any] = {
        "task": TASK,
        "settings": dataclasses.asdict(settings),
        "base_model": str(model_dir),
        "data_source": settings.data,
        "num_train": n_train,
        "tokens_per_sequence": t_bar,
        "kl_scale": kl_scale,
        "epochs": settings.epochs,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "initial_ranks": initial,
        "ranks": final_ranks,
        "total_rank": sum(final_ranks.values()),
        "initial_total_rank": sum(initial.values()),
        "adapter_parameters": adapter_parameter_count(model),
        "metrics": metrics,
        "log_history": trainer.state.log_history,
        "prune_history": trainer.prune_callback.history,
    }
    if _is_main_process():
        save_adapter(model, out / CHECKPOINT_ADAPTER)
        tokenizer.save_pretrained(out / CHECKPOINT_TOKENIZER)
        tmp = out / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, out / RUN_FILE)
    summary["model"], summary["tokenizer"] = model, tokenizer
    return summary


def read_run(path: str | os.PathLike) -> dict | None:
    """``run.json`` of a training checkpoint, or None when ``path`` is none."""
    run_path = Path(path) / RUN_FILE
    if not run_path.is_file():
        return None
    try:
        return json.loads(run_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {run_path}: {e}") from e


def is_lm_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``bayeslora train --task causal-lm`` checkpoint."""
    run = read_run(path)
    return run is not None and run.get("task") == TASK


def load_lm_checkpoint(path: str | os.PathLike) -> tuple[Any, Any, dict]:
    """(model, tokenizer, run metadata) of a causal-LM training checkpoint (float32, eval mode)."""
    from transformers import AutoTokenizer

    from ..nn.checkpoint import load_adapter

    run = read_run(path)
    if run is None:
        raise BundleError(f"{Path(path) / RUN_FILE} not found: not a bayeslora training checkpoint")
    model = load_lm(Path(run["base_model"]))
    tok_dir = Path(path) / CHECKPOINT_TOKENIZER
    tokenizer = AutoTokenizer.from_pretrained(tok_dir if tok_dir.is_dir() else run["base_model"])
    load_adapter(model, Path(path) / CHECKPOINT_ADAPTER)
    return model.eval(), tokenizer, run
