"""Causal language models: the next-token loss, MC evaluation (perplexity, token calibration) and
multiple-choice scoring with posterior samples (``bl.lm``; torch side, docs/method.md §4 and §6).

Conventions (those of 🤗 causal LMs): ``labels`` are ``[N, T]`` token ids aligned with ``input_ids``;
the logits at position t predict ``labels[t + 1]`` (the shift), and a label of ``-100`` is never
predicted (padding; the prompt, for response-only training). A "predicted token" is a position
``t ≥ 1`` whose label is not ``-100``.

MC mode draws S posterior samples of the adapters per sequence. Every adapted module draws a
sequence's noise from a stream of its own, seeded from ``(seed, the sequence's token ids, sample,
module)``, so a sequence's result depends only on the model, the sequence, the seed and S: not on
its batch-mates, its position or ``batch_size``.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, DataError, ShapeError
from .metrics import calibration_error
from .nn.model import adapted_layers, unwrap
from .nn.prediction import _logits, sampling, summarize

IGNORE_INDEX = -100
ECE_BINS = 15


# ---- the loss ---------------------------------------------------------------------------------
def predicted_tokens(labels: torch.Tensor) -> int:
    """The number of predicted tokens of ``labels [N, T]``: positions t ≥ 1 whose label is not -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def causal_lm_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token negative log-likelihood of ``labels [N, T]`` under ``logits [N, T, V]`` (float32).

    The logits at t predict ``labels[t + 1]``; labels of -100 are skipped. ``reduction``: ``"mean"``
    over the predicted tokens (0 when there are none), or ``"sum"``.
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ShapeError(
            f"logits {list(logits.shape)} do not match labels {list(labels.shape)} as [N, T, V] / [N, T]"
        )
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = labels[:, 1:].reshape(-1).to(pred.device)
    total = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    return total / max(1, int((target != IGNORE_INDEX).sum()))


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _pad(rows: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    t = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    lab = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.long)
    for i, (row, lrow) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
        lab[i, : len(lrow)] = torch.tensor(lrow, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def encode_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` for language modelling: ``input_ids``, ``attention_mask``, ``labels``,
    each ``[N, T]``, right-padded (the tokenizer's pad id, else its EOS id, else 0); ``labels`` are
    the ids with -100 on the padding. ``max_length`` truncates each text's tokens from the right."""
    rows = [_ids(tokenizer, text, True)[:max_length] for text in texts]
    return _pad(rows, rows, _pad_id(tokenizer))


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int | None = None,
    add_eos: bool = True,
) -> dict[str, torch.Tensor]:
    """Tokenise prompt/response pairs for response-only training: as :func:`encode_texts`, with the
    labels -100 on the prompt's tokens too, so that only the response is predicted.

    Each row is the prompt's tokens (with the tokenizer's special tokens, e.g. BOS) followed by the
    response's (without; plus EOS when ``add_eos`` and the tokenizer has one), truncated to
    ``max_length`` from the right. Write the separator (a space, a newline) into the response or
    the prompt: the two token lists are joined as they are.
    """
    if len(prompts) != len(responses):
        raise ShapeError(f"{len(prompts)} prompts but {len(responses)} responses")
    eos = getattr(tokenizer, "eos_token_id", None)
    rows, labels = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p = _ids(tokenizer, prompt, True)
        r = _ids(tokenizer, response, False) + ([int(eos)] if add_eos and eos is not None else [])
        row = (p + r)[:max_length]
        rows.append(row)
        labels.append(([IGNORE_INDEX] * len(p) + r)[: len(row)])
    return _pad(rows, labels, _pad_id(tokenizer))


# ---- per-sequence noise streams ---------------------------------------------------------------
def _content_key(ids: Sequence[int] | torch.Tensor) -> int:
    data = np.asarray(ids.tolist() if torch.is_tensor(ids) else list(ids), dtype="<i8").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _stream_seed(seed: int, key: int, sample: int, module: int) -> int:
    packed = struct.pack("<qQqq", int(seed), key, sample, module)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") & (2**63 - 1)


def _set_streams(
    layers: list[nn.Module], device: torch.device, seed: int, rows: list[tuple[int, int]]
) -> None:
    """Give every layer one generator per row, row = (content key, sample index)."""
    for index, layer in enumerate(layers):
        gens = []
        for key, sample in rows:
            g = torch.Generator(device=device)
            g.manual_seed(_stream_seed(seed, key, sample, index))
            gens.append(g)
        layer.generators = gens


def _prepare(model: nn.Module, samples: int) -> tuple[list[nn.Module], torch.device]:
    if samples < 0:
        raise ConfigError(f"samples must be >= 0, got {samples}")
    layers = [layer for _, layer in adapted_layers(unwrap(model))]
    if samples > 0 and not layers:
        raise ConfigError(
            f"samples={samples} needs posterior noise, but the model has no BayesLoRA adapters "
            "(use samples=0 for a deterministic model)"
        )
    return layers, next(model.parameters()).device


class _Streams:
    """Sampling on (MC) or off (mean mode) and the per-row streams cleared on exit; eval mode inside."""

    def __init__(self, model: nn.Module, layers: list[nn.Module], samples: int) -> None:
        self.model, self.layers, self.samples = model, layers, samples
        self._sampling: sampling | None = None
        self._training = model.training

    def __enter__(self) -> _Streams:
        self.model.eval()
        if self.layers:
            self._sampling = sampling(self.model, self.samples > 0)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.generators = None
        if self._sampling is not None:
            self._sampling.__exit__(None, None, None)
        self.model.train(self._training)


# ---- evaluation -------------------------------------------------------------------------------
def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy (float64) of each row of log-probabilities ``[M, V]``; a zero probability adds 0."""
    return -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1).double()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    samples: int = 0,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Next-token metrics of a causal LM under the posterior predictive ``p̄ = (1/S) Σ_s p_s``.

    Args:
        input_ids: ``[N, T]`` token ids.
        attention_mask: ``[N, T]`` (default: all ones).
        labels: ``[N, T]`` targets, -100 where nothing is predicted (default: ``input_ids`` with -100
            where ``attention_mask`` is 0).
        samples: S posterior samples per sequence; 0 = mean mode (one deterministic pass).
        seed: seeds the noise (per sequence, see the module docstring).
        batch_size: sequences per forward. Peak memory is about ``batch_size · T · V`` floats a few
            times over: the S samples are accumulated one forward at a time (log-sum-exp of the
            log-probabilities), never as one ``[S, T, V]`` tensor.

    Returns:
        ``nll`` (mean over the predicted tokens of −log p̄(y)), ``perplexity`` (exp of it),
        ``token_accuracy`` (argmax of p̄), ``ece`` (token-level, 15 equal-width bins of max p̄),
        ``tokens`` (the number of predicted tokens), and per sequence (``[N]`` float tensors, NaN for
        a sequence with no predicted token): ``sequence_nll`` (its tokens' mean −log p̄(y)),
        ``sequence_entropy`` (mean entropy of p̄) and ``sequence_mutual_info`` (mean of
        H(p̄) − (1/S) Σ_s H(p_s), the epistemic part; 0 in mean mode).

    Raises:
        ShapeError: the tensors are not ``[N, T]`` alike, or the model does not give ``[N, T, V]``.
        DataError: there is no predicted token.
    """
    if input_ids.dim() != 2:
        raise ShapeError(f"input_ids must be [N, T], got {list(input_ids.shape)}")
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is not None and t.shape != input_ids.shape:
            raise ShapeError(f"{name} is {list(t.shape)} but input_ids is {list(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    layers, device = _prepare(model, samples)
    s_eff = max(samples, 1)
    n = input_ids.shape[0]
    seq_nll = torch.full((n,), float("nan"), dtype=torch.float64)
    seq_ent, seq_mi = seq_nll.clone(), seq_nll.clone()
    nll_sum, correct_sum, count = 0.0, 0, 0
    confidences: list[np.ndarray] = []
    corrects: list[np.ndarray] = []
    with _Streams(model, layers, samples):
        for start in range(0, n, batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device)
            target_all = labels[start : start + batch_size, 1:].to(device)
            chosen = target_all != IGNORE_INDEX  # [b, T-1]
            if not bool(chosen.any()):
                continue
            target = target_all[chosen]  # [M]
            row_of = chosen.nonzero()[:, 0]  # [M]
            keys = [_content_key(ids[i][mask[i] > 0]) for i in range(ids.shape[0])]
            acc: torch.Tensor | None = None
            sample_entropy = torch.zeros(target.shape[0], dtype=torch.float64, device=device)
            for s in range(s_eff):
                if samples > 0:
                    _set_streams(layers, device, seed, [(k, s) for k in keys])
                logits = _logits(model(input_ids=ids, attention_mask=mask))
                if logits.dim() != 3 or logits.shape[:2] != ids.shape:
                    raise ShapeError(
                        f"a causal LM gives [N, T, V] logits; this model gave {list(logits.shape)}"
                    )
                logp = torch.log_softmax(logits[:, :-1][chosen].float(), -1)  # [M, V]
                del logits
                if samples > 0:
                    sample_entropy += _entropy(logp)
                acc = logp if acc is None else torch.logaddexp(acc, logp)
            assert acc is not None
            log_mean = acc - math.log(s_eff)  # log p̄ [M, V]
            tok_nll = -log_mean.gather(1, target.view(-1, 1)).squeeze(1).double()
            entropy = _entropy(log_mean)
            mi = (
                (entropy - sample_entropy / s_eff).clamp_min(0.0)
                if samples > 0
                else torch.zeros_like(entropy)
            )
            top, pred = log_mean.max(-1)
            hit = pred == target
            nll_sum += float(tok_nll.sum())
            correct_sum += int(hit.sum())
            count += int(target.numel())
            confidences.append(top.exp().double().cpu().numpy())
            corrects.append(hit.cpu().numpy().astype(np.float64))
            b = ids.shape[0]
            per_row = torch.zeros(b, dtype=torch.float64, device=device).index_add_(
                0, row_of, torch.ones_like(tok_nll)
            )
            rows = slice(start, start + b)
            for out, values in ((seq_nll, tok_nll), (seq_ent, entropy), (seq_mi, mi)):
                total = torch.zeros(b, dtype=torch.float64, device=device).index_add_(0, row_of, values)
                out[rows] = torch.where(per_row > 0, total / per_row.clamp_min(1), float("nan")).cpu()
    if count == 0:
        raise DataError(
            "no predicted tokens: every label is -100, or the sequences are shorter than 2 tokens"
        )
    nll = nll_sum / count
    return {
        "nll": nll,
        "perplexity": math.exp(nll),
        "token_accuracy": correct_sum / count,
        "ece": calibration_error(np.concatenate(confidences), np.concatenate(corrects), n_bins=ECE_BINS),
        "tokens": count,
        "sequence_nll": seq_nll.float(),
        "sequence_entropy": seq_ent.float(),
        "sequence_mutual_info": seq_mi.float(),
    }


# ---- multiple choice --------------------------------------------------------------------------
@torch.no_grad()
def score_choices(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]] | Sequence[str],
    samples: int = 0,
    seed: int = 0,
    max_batch: int = 16,
) -> dict[str, torch.Tensor]:
    """Score the options of multiple-choice questions by their likelihood given the prompt.

    An option's score is the summed log-likelihood of its tokens after the prompt's (the prompt is
    tokenised with the tokenizer's special tokens, e.g. BOS, the option without; put the separating
    space in the option, ``" Paris"``). In each posterior sample the options' probabilities are the
    softmax of their scores; ``probs`` averages them over the S samples. All options of one question
    share each posterior sample (their noise streams are seeded from the prompt's token ids, the
    sample and the module), so a question's result depends neither on the other questions nor on
    the order of its options (permuting the options permutes ``probs`` alike).

    Args:
        prompts: N question texts.
        choices: the C options of each question (``[N][C]``), or one list of C options for all.
        samples: S; 0 = mean mode.
        seed: seeds the noise.
        max_batch: sequences (option × sample) per forward.

    Returns:
        The fields of ``bl.mc_predict`` over the options: ``probs [N, C]``, ``label [N]`` (index of the
        most probable option), ``confidence [N]``, ``entropy [N]``, ``expected_entropy [N]``,
        ``mutual_info [N]``, ``variance [N]``.
    """
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    if choices and all(isinstance(c, str) for c in choices):
        options = [list(choices)] * len(prompts)  # one list of options for every question
    else:
        options = [list(c) for c in choices]
    if len(options) != len(prompts):
        raise ShapeError(f"{len(prompts)} prompts but {len(options)} lists of choices")
    if not prompts:
        raise DataError("no prompts to score")
    n_choices = len(options[0])
    if n_choices < 1 or any(len(c) != n_choices for c in options):
        raise ShapeError(
            f"every prompt needs the same number (>= 1) of choices; got {sorted({len(c) for c in options})}"
        )
    layers, device = _prepare(model, samples)
    s_eff = max(samples, 1)
    pad_id = _pad_id(tokenizer)
    per_question = []
    with _Streams(model, layers, samples):
        for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True)):
            p_ids = _ids(tokenizer, prompt, True)
            if not p_ids:
                raise DataError(
                    f"prompt {i} has no tokens: an option's first token needs a context to be predicted"
                )
            c_ids = [_ids(tokenizer, c, False) for c in opts]
            if any(not c for c in c_ids):
                raise DataError(f"prompt {i} has an option with no tokens: {opts!r}")
            key = _content_key(p_ids)
            rows = [p_ids + c for c in c_ids]
            row_labels = [[IGNORE_INDEX] * len(p_ids) + c for c in c_ids]
            jobs = [(s, c) for s in range(s_eff) for c in range(n_choices)]
            loglik = torch.zeros(s_eff, n_choices, dtype=torch.float64)
            for start in range(0, len(jobs), max_batch):
                part = jobs[start : start + max_batch]
                batch = _pad([rows[c] for _, c in part], [row_labels[c] for _, c in part], pad_id)
                if samples > 0:
                    _set_streams(layers, device, seed, [(key, s) for s, _ in part])
                logits = _logits(
                    model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                    )
                )
                if logits.dim() != 3:
                    raise ShapeError(
                        f"a causal LM gives [N, T, V] logits; this model gave {list(logits.shape)}"
                    )
                target = batch["labels"][:, 1:].to(device)
                logp = torch.log_softmax(logits[:, :-1].float(), -1)
                tok = logp.gather(2, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                sums = torch.where(target != IGNORE_INDEX, tok, 0.0).double().sum(1).cpu()
                for (s, c), value in zip(part, sums, strict=True):
                    loglik[s, c] = value
            per_question.append(torch.softmax(loglik, -1))
    return summarize(torch.stack(per_question))


__all__ = [
    "IGNORE_INDEX",
    "causal_lm_nll",
    "encode_pairs",
    "encode_texts",
    "evaluate",
    "predicted_tokens",
    "score_choices",
]
