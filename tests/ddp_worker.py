"""Worker of tests/test_launchers.py: one training run, started by torchrun or `accelerate launch`
(DDP or FSDP2) with 2 CPU processes. Usage: ``ddp_worker.py MODEL_DIR CSV OUT [SAVE_STEPS]``; each
process writes its final adapter state to ``OUT/rank{r}.safetensors`` and a summary to
``OUT/rank{r}.json``; the run's checkpoint is in ``OUT/run``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import bayeslora as bl
from bayeslora.nn.checkpoint import adapter_state
from bayeslora.train.pipeline import TrainSettings, train


def main() -> None:
    model_dir, csv, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    save_steps = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    settings = TrainSettings.for_recipe(
        "vi",  # the gate posterior with noise and a per-example KL, as the comments below assume
        model=model_dir,
        data=f"csv:{csv}",
        rank=4,
        epochs=3,
        batch_size=8,
        max_length=16,
        lr=5e-3,
        rank_lr=5.0,  # SGD-like group (AdamW eps=1): steps follow the gradient size
        kl_scale=1.0,
        kl_freeze=2,  # a KL-only phase and a no-noise phase: log_alpha is then reached only by the KL
        sample_start=4,
        prune_start=6,
        prune_every=2,
        prune_threshold=-2.0,
        min_rank=1,  # each layer keeps its least noisy rank: the compared adapters are not empty
        init_log_alpha=-3.0,
        samples=0,
        save_steps=save_steps,
    )
    logged: list[str] = []
    summary = train(
        settings, out / "run", progress=False, log=lambda *a: logged.append(" ".join(map(str, a)))
    )
    model = summary["model"]
    rank = dist.get_rank()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in adapter_state(model).items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    history = [h for h in summary["log_history"] if "active_rank" in h]
    pruned = summary["initial_total_rank"] - min(
        [h["active_rank"] for h in history] + [summary["total_rank"]]
    )
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "world_size": dist.get_world_size(),
                "parallel": summary["parallel"],
                "pruned_during_training": pruned,
                "ranks": bl.ranks(model),
                "log": logged,
            }
        )
    )
    dist.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
