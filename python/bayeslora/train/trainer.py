"""Training with 🤗 ``transformers.Trainer``: the ELBO objective, sampling, and the prune schedule.

An existing HF script gains BayesLoRA in a few lines::

    model = bl.inject(model, bl.BayesLoRAConfig(rank=8, modules_to_save=["classifier"]))
    trainer = bl.training.BayesLoRATrainer(model=model, args=args, train_dataset=ds, ...)
    trainer.train()
    bl.shrink(model)

``BayesLoRATrainer`` adds ``β(t)·kl_scale·KL/N`` to the loss (N = training-set size), switches
posterior noise on in training from ``sample_start`` (and off for evaluation), masks noisy ranks
every ``prune_every`` steps after ``prune_start`` (identically on every process), logs NLL, KL, β and
the total active rank, and saves checkpoints as adapters (``bl.save_adapter``) instead of full models.
The rank parameters get their own optimizer group: AdamW with ``eps = 1``, which for gradients well
below 1 is SGD with momentum at learning rate ``rank_lr``. Plain Adam normalises each parameter's
step to about its learning rate whatever the gradient's size, so every ``log α`` would rise in
lockstep under the KL's steady push and the ranks the likelihood needs could not hold back more than
the others: the gradient's magnitude *is* the relevance signal (``rank_optimizer="adamw"`` gives
plain AdamW, as the authors' harness used).

Causal language models (``*ForCausalLM``, GPT-2's ``LMHeadModel``; ``task="causal-lm"`` forces it)
train on the next-token loss: the logits at t predict ``labels[t + 1]``, labels of -100 are never
predicted (padding; the prompt, for response-only training: ``bl.lm.encode_pairs``), and the model's
own loss is used when it returns one. N is then the number of training *sequences*, and the
likelihood term is, by default (``lm_loss="token"``), the mean NLL per predicted token, so that

    loss = (1/M) Σ_tokens NLL + β·kl_scale·KL/N          (M: predicted tokens in the batch)

This is the per-sequence ELBO ``(1/N)[Σ_sequences Σ_tokens NLL + KL]`` divided by T̄ (the mean
number of predicted tokens per sequence) with the KL weighed T̄ times more: a stronger prior than
the exact ELBO, on the scale of the model's own loss (learning rates, gradient clipping and the
SGD-like rank group keep the meaning they have for classifiers). ``lm_loss="sequence"`` trains the
exact per-sequence ELBO instead: ``(1/B) Σ_tokens NLL + β·kl_scale·KL/N`` (B: sequences in the
batch), the same as ``"token"`` with ``kl_scale`` divided by T̄. Evaluation losses are always the
per-token mean (its exp is the perplexity). docs/method.md §4 says the same.

Schedule fields given as fractions of the run are resolved once the run's length is known
(``trainer.schedule``). From ``refit_start`` on ("select, then refit") the ranks are settled once —
by a last τ pass or by the ``select`` callable (the pipeline's validation cut) — and then frozen:
no more pruning, no KL, the rank parameters restored after every optimiser step, the surviving
factors training on.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..errors import ConfigError, ShapeError
from ..files import CHECKPOINT_ADAPTER, TRAINING_STATE
from ..lm import causal_lm_nll, predicted_tokens
from ..nn.checkpoint import save_adapter
from ..nn.model import adapted_layers, get_config, is_causal_lm, is_sharded, unwrap
from ..nn.objective import kl_divergence
from ..nn.prediction import sampling
from ..nn.pruning import prune, prune_to_floor, ranks
from .budget import RankBudgetController


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def sync_rank_masks(model: nn.Module) -> None:
    """Make every process hold rank 0's masks (they should already agree; this makes it certain)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for _, layer in adapted_layers(unwrap(model)):
        torch.distributed.broadcast(layer.rank_mask, src=0)


RankSelector = Callable[[nn.Module], None]
TASKS = ("auto", "classification", "causal-lm")
LM_LOSSES = ("token", "sequence")


class PruneCallback(TrainerCallback):
    """Masks ranks whose relevance exceeds τ every ``prune_every`` steps from ``prune_start`` on;
    at ``refit_start`` a last pass (or ``select``, when given), then the rank parameters freeze."""

    def __init__(self, trainer: BayesLoRATrainer, select: RankSelector | None = None) -> None:
        self.trainer = trainer
        self.select = select
        self.history: list[dict[str, Any]] = []
        self.refit_step: int | None = None
        self._frozen: list[tuple[nn.Parameter, torch.Tensor]] = []

    @property
    def model(self) -> nn.Module:
        return self.trainer.model

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        config = self.trainer.schedule
        step = state.global_step
        if not config.is_bayesian:
            return
        if self.refit_step is not None:
            self._restore_frozen()
            return
        if config.refitting(step):
            self.start_refit(step)
            return
        if step < config.prune_start or (step - config.prune_start) % config.prune_every != 0:
            return
        report = self.prune_pass(step)
        sync_rank_masks(self.model)
        self.history.append({"step": step, "ranks": {k: v[1] for k, v in report.items()}})

    def prune_pass(
        self, step: int | None = None, model: nn.Module | None = None
    ) -> dict[str, tuple[int, int]]:
        """One τ pass over ``model`` (default: the trainer's); with a rank budget, never below the
        controller's floor at ``step`` (``None``: the budget itself)."""
        model = self.model if model is None else model
        budget = self.trainer.budget
        if budget is None:
            return prune(model)
        floor = budget.budget if step is None else budget.floor(step)
        return prune_to_floor(model, floor)

    @torch.no_grad()
    def _restore_frozen(self) -> None:
        for p, value in self._frozen:
            if p.shape == value.shape:  # a shrink in between would have replaced the parameter
                p.copy_(value)

    def start_refit(self, step: int) -> None:
        """Settle the ranks (the selector or a last τ pass), then freeze the rank parameters."""
        if self.select is not None:
            self.select(self.model)
        else:
            self.prune_pass(None)
        sync_rank_masks(self.model)
        # Frozen by restoring the values after every optimizer step, not by requires_grad: DDP
        # fixed its set of parameters when it wrapped the model.
        self._frozen = [
            (p, p.detach().clone())
            for _, layer in adapted_layers(unwrap(self.model))
            if (p := layer.rank_parameter()) is not None
        ]
        self.refit_step = step
        self.history.append({"step": step, "refit": True, "ranks": dict(ranks(self.model))})


@contextlib.contextmanager
def _adapters_on_quantized_base(model: Any) -> Iterator[None]:
    """Let ``transformers.Trainer`` accept a quantized base (``--load-in-4bit``) that carries our
    adapters: it refuses "purely quantized models" unless PEFT's flag ``_hf_peft_config_loaded`` is
    set. Set only while the Trainer is built, only when trainable BayesLoRA layers are present."""
    quantized = getattr(model, "is_quantized", False) and not getattr(model, "_hf_peft_config_loaded", False)
    if not (quantized and any(True for _ in adapted_layers(unwrap(model)))):
        yield
        return
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        del model._hf_peft_config_loaded


class BayesLoRATrainer(Trainer):
    """``transformers.Trainer`` with the BayesLoRA objective and prune schedule (docs/method.md §4, §5).

    Args:
        rank_lr: learning rate of ``log_alpha`` / ``log_sigma2`` (SGD-like, see the module docstring).
        num_train: N of the objective (default: ``len(train_dataset)``).
        rank_optimizer: ``"sgd-like"`` (AdamW with eps = 1, see the module docstring) or ``"adamw"``
            (plain AdamW, eps 1e-8, as the authors' harness).
        head_lr, head_weight_decay: learning rate and weight decay of the ``modules_to_save``
            (the classifier head); default: the factors' (``args.learning_rate``, ``args.weight_decay``).
            Biases and LayerNorm weights of the head get no weight decay.
        select: called at ``refit_start`` instead of the last τ pass to settle the ranks (e.g. a
            cut chosen on validation data, see ``bayeslora.train.pipeline``).
        task: ``"auto"`` (a causal LM when the model is one, see ``bl.lm``), ``"classification"``
            (one label per input: ``cross_entropy(logits, labels)``) or ``"causal-lm"`` (the shifted
            next-token loss over labels ``[B, T]``, -100 skipped).
        lm_loss: the likelihood scaling of a causal LM (module docstring): ``"token"`` (mean NLL per
            predicted token) or ``"sequence"`` (summed NLL per sequence: the exact per-sequence ELBO).
        Other arguments as ``transformers.Trainer``.
    """

    # compute_loss returns the micro-batch's mean loss (it never uses num_items_in_batch), so the
    # Trainer divides it by the gradient-accumulation steps whatever the model's forward accepts.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        rank_lr: float | None = None,
        num_train: int | None = None,
        rank_optimizer: str = "sgd-like",
        head_lr: float | None = None,
        head_weight_decay: float | None = None,
        select: RankSelector | None = None,
        task: str = "auto",
        lm_loss: str = "token",
        **kwargs: Any,
    ):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and training_args.ddp_find_unused_parameters is None:
            # The loss reaches every adapter parameter (the KL term touches the rank parameters even
            # while the forward does not sample), so DDP needs no unused-parameter search; with it,
            # DDP would mark log_alpha "unused" after the forward and then see the KL's gradient.
            training_args.ddp_find_unused_parameters = False
        model = kwargs.get("model", args[0] if args else None)
        with _adapters_on_quantized_base(model):
            super().__init__(*args, **kwargs)
        if getattr(self, "is_fsdp_enabled", False) and not getattr(self.accelerator, "is_fsdp2", False):
            # FSDP1 keeps flattened shards outside the forward: the KL, the prune pass and the
            # checkpoints, all outside it, would see pieces of the rank parameters. FSDP2 gathers them.
            raise ConfigError(
                "BayesLoRA trains under FSDP version 2 only: set fsdp_version: 2 in the accelerate "
                "config (accelerate launch --use_fsdp --fsdp_version 2)"
            )
        self.bayes_config = get_config(unwrap(self.model))
        if rank_lr is not None and not (rank_lr >= 0.0 and rank_lr < float("inf")):
            raise ValueError(
                f"rank_lr must be a finite number >= 0 (0 freezes the rank parameters), got {rank_lr}"
            )
        self.rank_lr = rank_lr
        if num_train is None:
            if self.train_dataset is None:
                raise ValueError("num_train is needed when no train_dataset is given")
            num_train = len(self.train_dataset)  # type: ignore[arg-type]
        self.num_train = int(num_train)
        if rank_optimizer not in ("sgd-like", "adamw"):
            raise ValueError(f"rank_optimizer must be 'sgd-like' or 'adamw', got {rank_optimizer!r}")
        self.rank_optimizer = rank_optimizer
        self.head_lr, self.head_weight_decay = head_lr, head_weight_decay
        if task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
        if lm_loss not in LM_LOSSES:
            raise ConfigError(f"lm_loss must be one of {LM_LOSSES}, got {lm_loss!r}")
        self.causal_lm = is_causal_lm(self.model) if task == "auto" else task == "causal-lm"
        self.lm_loss = lm_loss
        forward = inspect.signature(unwrap(self.model).forward).parameters
        self._forward_takes_labels = "labels" in forward
        self.budget: RankBudgetController | None = None
        if self.bayes_config.rank_budget is not None and self.bayes_config.is_bayesian:
            initial = sum(layer.rank for _, layer in adapted_layers(unwrap(self.model)))
            self.budget = RankBudgetController(self, initial)
            self.add_callback(self.budget)  # before the pruning callback: the floor it uses is current
        self.prune_callback = PruneCallback(self, select)
        self.add_callback(self.prune_callback)
        self._parts: dict[str, float] = {}
        self._schedule: tuple[int, Any] | None = None

    @property
    def schedule(self) -> Any:
        """The BayesLoRA config with its fractional schedule fields resolved for this run's length."""
        total = max(1, int(self.state.max_steps or 0))
        if self._schedule is None or self._schedule[0] != total:
            self._schedule = (total, self.bayes_config.resolved(total))
        return self._schedule[1]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = unwrap(self.model if model is None else model)
            rank_params = {
                id(p) for _, layer in adapted_layers(model) if (p := layer.rank_parameter()) is not None
            }
            head_decay, head_no_decay = set(), set()
            if self.head_lr is not None or self.head_weight_decay is not None:
                for head in self.bayes_config.modules_to_save:
                    for name, p in model.named_parameters():
                        if name == head or name.startswith(f"{head}.") or f".{head}." in f".{name}":
                            no_decay = name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name
                            (head_no_decay if no_decay else head_decay).add(id(p))
            special = rank_params | head_decay | head_no_decay
            trainable = [p for p in model.parameters() if p.requires_grad]
            lr = self.args.learning_rate
            groups = [
                {
                    "params": [p for p in trainable if id(p) not in special],
                    "lr": lr,
                    "weight_decay": self.args.weight_decay,
                }
            ]
            head_lr = lr if self.head_lr is None else self.head_lr
            head_wd = self.args.weight_decay if self.head_weight_decay is None else self.head_weight_decay
            for ids, wd in ((head_decay, head_wd), (head_no_decay, 0.0)):
                if params := [p for p in trainable if id(p) in ids]:
                    groups.append({"params": params, "lr": head_lr, "weight_decay": wd})
            if rank := [p for p in trainable if id(p) in rank_params]:
                group = {
                    "params": rank,
                    "lr": 1.0 if self.rank_lr is None else self.rank_lr,
                    "weight_decay": 0.0,
                }
                if self.rank_optimizer == "sgd-like":
                    group["eps"] = 1.0
                groups.append(group)
            self.optimizer = torch.optim.AdamW(groups, lr=lr)
        return self.optimizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        config = self.schedule
        step = self.state.global_step
        training = model.training
        sampling(model, training and config.sampling_at(step))
        labels = inputs.pop("labels")
        if self.causal_lm:
            nll, logits = self._causal_lm_nll(model, inputs, labels, training)
        else:
            outputs = model(**inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            nll = nn.functional.cross_entropy(logits.float(), labels)
        loss = nll
        if training and config.is_bayesian:
            beta = config.kl_beta(step)
            kl = kl_divergence(model)
            per_example = 1.0 / self.num_train if config.kl_per_example else 1.0
            factor = 1.0 if self.budget is None else self.budget.factor
            loss = nll + (beta * factor * config.kl_scale * per_example) * kl
            self._parts = {"nll": float(nll.detach()), "kl": float(kl.detach()), "beta": beta}
            if self.budget is not None:
                self._parts["kl_factor"] = factor
        elif training:
            self._parts = {"nll": float(nll.detach())}
        return (loss, {"logits": logits}) if return_outputs else loss

    def _causal_lm_nll(
        self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's next-token NLL (float32) as the likelihood term, and the logits [B, T, V]."""
        if labels.dim() != 2:
            raise ShapeError(f"a causal LM trains on labels [batch, tokens], got {list(labels.shape)}")
        tokens = predicted_tokens(labels)
        outputs = model(**inputs, labels=labels) if self._forward_takes_labels else model(**inputs)
        if isinstance(outputs, dict):  # a ModelOutput
            logits, own = outputs["logits"], outputs.get("loss")
        elif torch.is_tensor(outputs):
            logits, own = outputs, None
        else:  # a tuple: (loss, logits, ...) when the model computed a loss, else (logits, ...)
            own = outputs[0] if outputs[0].dim() == 0 else None
            logits = outputs[0] if own is None else outputs[1]
        if tokens == 0:  # nothing to predict (0/0 in a mean): no likelihood, gradients stay 0
            nll = logits.float().sum() * 0.0
        elif torch.is_tensor(own):
            nll = own.float()
        else:
            nll = causal_lm_nll(logits, labels)
        if training and self.lm_loss == "sequence":
            nll = nll * (tokens / labels.shape[0])
        return nll, logits

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._parts:
            logs = {**logs, **{k: round(v, 6) for k, v in self._parts.items()}}
            logs["active_rank"] = sum(ranks(self.model).values())
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Checkpoints are adapters (+ head + config): the frozen base never needs saving again.
        output_dir = output_dir or self.args.output_dir
        sharded = is_sharded(self.model)  # FSDP2: every process gathers, process 0 writes
        if not _is_main_process() and not sharded:
            return
        save_adapter(self.model, Path(output_dir) / CHECKPOINT_ADAPTER)
        if not _is_main_process():
            return
        meta: dict[str, Any] = {
            "global_step": self.state.global_step,
            "prune_history": self.prune_callback.history,
        }
        if self.budget is not None:
            meta["rank_budget"] = {"log_factor": self.budget.log_factor, "history": self.budget.history}
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(output_dir) / f".{TRAINING_STATE}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, Path(output_dir) / TRAINING_STATE)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        with sampling(model, False):  # evaluation in mean mode; MC evaluation is bl.mc_predict
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
