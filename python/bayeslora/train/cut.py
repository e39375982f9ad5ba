"""The validation rank cut (``rank_select="validation"``, docs/method.md): mask the noisiest ranks as far
as the validation NLL stays near the best cut's. :func:`validation_rank_cut` runs it on a model;
:func:`choose_cut` is its rule on a curve of per-example NLLs."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import metrics
from .classifier import predict

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
    text_pairs: list[str] | None = None,
) -> dict[str, Any]:
    """Mask the noisiest ranks (by relevance score, over all modules together) as far as the
    validation NLL (mean mode) stays near the best candidate's (on ``texts``, or on the sentence
    pairs with ``text_pairs``).

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
        probs = predict(model, tokenizer, texts, 0, 0, max_length, text_pairs=text_pairs).mean(1)
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
