"""Worker of tests/test_launchers.py: FSDP2 (``fully_shard``) against DDP, on CPU with gloo.

Usage, under ``torchrun --nproc_per_node 2``: ``fsdp_worker.py ddp|fsdp2 MODEL_DIR OUT``. accelerate
leaves FSDP off on CPU (see the test), so this worker shards the model itself, as accelerate does
on GPUs: ``fully_shard`` on every ``BertLayer``, then on the whole model. A plain loop of the
library's pieces (``elbo_loss``, ``prune`` + mask broadcast, ``save_adapter``) trains a gate and
an additive adapter for 12 steps. Every process draws the same noise in both modes (the global RNG
is seeded per step and process), sees its own half of each batch, and writes the gathered adapter
state to ``OUT/{posterior}-rank{r}.safetensors``, the adapter saved by ``bl.save_adapter`` (called
on every process) to ``OUT/{posterior}-adapter``, and what it checked to ``OUT/rank{r}.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import bayeslora as bl
from bayeslora.errors import ConfigError
from bayeslora.nn.checkpoint import adapter_state
from bayeslora.nn.model import adapted_layers, is_sharded
from bayeslora.train.pipeline import _unsharded_copy
from bayeslora.train.trainer import sync_rank_masks
from conftest import WORDS_NEG, WORDS_NEUTRAL, WORDS_POS

STEPS, BATCH, PRUNE_EVERY = 12, 8, 3


def batches(tokenizer, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """STEPS global batches of BATCH sentences; this process's share is every world-th row."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        labels = torch.randint(0, 2, (BATCH,), generator=g)
        texts = []
        for y in labels.tolist():
            words = WORDS_POS if y else WORDS_NEG
            pick = torch.randint(0, len(WORDS_NEUTRAL), (3,), generator=g).tolist()
            texts.append(
                " ".join(
                    [WORDS_NEUTRAL[i] for i in pick] + [words[int(torch.randint(0, 8, (1,), generator=g))]]
                )
            )
        enc = tokenizer(texts[rank::world], padding="max_length", max_length=8, return_tensors="pt")
        out.append({**enc, "labels": labels[rank::world]})
    return out


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run(mode: str, posterior: str, model_dir: str, out: Path, tokenizer) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    config = bl.BayesLoRAConfig(
        rank=4,
        posterior=posterior,
        modules_to_save=["classifier"],
        kl_scale=1e-2,
        sample_start=0,
        prune_threshold=-0.4 if posterior == "gate" else 3.2,
        prune_start=3,
        prune_every=PRUNE_EVERY,
        min_rank=1,
        refit_start=None,
        init_b_std=0.02,
    )
    torch.manual_seed(0)  # the same initial adapter in both modes
    bl.inject(model, config)
    with torch.no_grad():  # the KL moves every log α of a layer in step: start them apart, so that
        for _, layer in adapted_layers(model):  # no mask hangs on a tie broken by the last bit
            if layer.uses_gate:
                layer.log_alpha.add_(0.3 * torch.randn(layer.rank))
    model.train()
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if mode == "ddp" else shard(model)
    assert is_sharded(model) == (mode == "fsdp2")
    # the trainer's groups: AdamW for the factors and the head, SGD-like steps (eps = 1) for the
    # rank parameters, so that their gradients' sizes, not just signs, order the ranks
    rank_ids = {id(p) for _, layer in adapted_layers(model) if (p := layer.rank_parameter()) is not None}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if id(p) not in rank_ids]},
            {"params": [p for p in params if id(p) in rank_ids], "lr": 1.0, "eps": 1.0},
        ],
        lr=1e-2,
        weight_decay=0.0,
        foreach=False,
    )
    bl.sampling(model, True)
    for step, batch in enumerate(batches(tokenizer, rank, world), start=1):
        torch.manual_seed(1000 * step + rank)  # this process's noise and dropout, whatever the mode
        labels = batch.pop("labels")
        logits = wrapped(**batch).logits
        nll = nn.functional.cross_entropy(logits, labels)
        loss, _ = bl.elbo_loss(nll, model, num_train=64, step=step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= config.prune_start and step % PRUNE_EVERY == 0:
            bl.prune(model)
            sync_rank_masks(model)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in adapter_state(model).items()}
    save_file(state, str(out / f"{posterior}-rank{rank}.safetensors"))
    if is_sharded(model) or rank == 0:
        # FSDP2: every process calls it (the shards are gathered), process 0 writes; DDP: one
        # process saves, as the Trainer does (two writers of one directory collide)
        bl.save_adapter(model, out / f"{posterior}-adapter")
    dist.barrier()
    report = {"sharded": is_sharded(model), "ranks": bl.ranks(model)}
    # what `bayeslora train` finishes on: an unsharded copy (every process gathers), which shrinks
    plain = _unsharded_copy(model, Path(model_dir), ["neg", "pos"], config)
    assert not is_sharded(plain)
    copied = adapter_state(plain)
    report["copy_equal"] = copied.keys() == state.keys() and all(
        torch.equal(copied[k], state[k]) for k in state
    )
    report["copy_shrunk"] = {k: v[1] for k, v in bl.shrink(plain).items()}
    try:
        bl.shrink(model)
    except ConfigError as e:
        report["shrink_error"] = str(e)
    else:
        report["shrink_error"] = None
    return report


def main() -> None:
    mode, model_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    report = {p: run(mode, p, model_dir, out, tokenizer) for p in ("gate", "additive")}
    report["world_size"] = dist.get_world_size()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
