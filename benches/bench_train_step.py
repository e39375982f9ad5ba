"""One training step of BayesLoRA (gate, additive) vs our plain LoRA vs PEFT's LoRA.

MiniLM-sized BERT (6 layers, hidden 384, 12 heads, FFN 1536), rank 8 on query/value, batch 32,
sequence 64, 2 threads. Run as a script for the ratio table:

    python benches/bench_train_step.py [--rounds 7] [--threads 2]

Under pytest (CI uses --benchmark-disable) each variant runs one step as a smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pytest
import torch

import bayeslora as bl
from minilm_shape import minilm_classifier

BATCH, SEQ, RANK, N_TRAIN = 32, 64, 8, 10_000
VARIANTS = ("peft-lora", "lora", "bayeslora-gate", "bayeslora-additive")


def make_step(variant: str) -> Callable[[], float]:
    """Build a model for ``variant`` and return a closure running one optimizer step (returns the loss)."""
    model = minilm_classifier()
    if variant == "peft-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=RANK,
                lora_alpha=16,
                target_modules=["query", "value"],
                lora_dropout=0.0,
                modules_to_save=["classifier"],
            ),
        )
    else:
        method, _, posterior = variant.partition("-")
        cfg = bl.BayesLoRAConfig.recipe(
            "vi",  # noise in every training step, no refit phase: the step cost of the recipe measured
            rank=RANK,
            alpha=16,
            target_modules=["query", "value"],
            method=method,
            posterior=posterior or "gate",
            modules_to_save=["classifier"],
        )
        bl.inject(model, cfg)
        bl.sampling(model, True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (BATCH,), generator=g)
    bayes = variant.startswith("bayeslora")
    step_count = [0]

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits
        nll = torch.nn.functional.cross_entropy(logits, labels)
        loss = bl.elbo_loss(nll, model, N_TRAIN, step_count[0])[0] if bayes else nll
        loss.backward()
        opt.step()
        step_count[0] += 1
        return float(loss.detach())

    return step


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, variant):
    torch.set_num_threads(2)
    step = make_step(variant)
    loss = benchmark(step)
    assert loss == loss and loss > 0  # finite, positive


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = {v: make_step(v) for v in VARIANTS}
    for step in steps.values():  # warm-up
        step()
        step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):  # interleaved, so drift on a shared box hits every variant alike
        for v, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[v].append(time.perf_counter() - t0)
    ref = statistics.median(times["peft-lora"])
    print(
        f"torch {torch.__version__}, threads={args.threads}, batch={BATCH}, seq={SEQ}, rank={RANK}, "
        f"rounds={args.rounds} (median step time)"
    )
    print("| variant | step time (ms) | ratio vs PEFT LoRA |")
    print("|---|---:|---:|")
    for v in VARIANTS:
        med = statistics.median(times[v])
        print(f"| {v} | {med * 1e3:.0f} | {med / ref:.3f} |")


if __name__ == "__main__":
    main()
