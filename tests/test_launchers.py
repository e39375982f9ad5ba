"""Training under the launchers a user runs, each with 2 CPU processes (gloo): ``torchrun``,
``accelerate launch`` (DDP) and ``accelerate launch`` with FSDP2. The same worker
(``tests/ddp_worker.py``: ``bayeslora.train.pipeline.train``, recipe vi, 3 epochs of 5 steps) runs
under each; every launch gets its own free port and a timeout, and ``accelerate`` reads a config file
written here (never the user's ``~/.cache/huggingface/accelerate``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bayeslora as bl
from bayeslora.nn.checkpoint import adapter_state
from bayeslora.train.pipeline import load_checkpoint, sequence_classifier
from conftest import write_sentiment_csv

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"
TIMEOUT = 900

ACCELERATE_DDP = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
use_cpu: true
"""


ACCELERATE_FSDP2 = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: BertLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp / "hf-home"),  # whatever accelerate might read or write stays here
        "CUDA_VISIBLE_DEVICES": "",  # the same gloo/CPU path on a machine with GPUs
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }


def _run(cmd: list[str], tmp: Path, out: Path) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(tmp))
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-6000:])
    s0, s1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    meta = json.loads((out / "rank0.json").read_text())
    return {"s0": s0, "s1": s1, "meta": meta, "out": out, "stderr": res.stderr}


def torchrun_cmd() -> list[str]:
    """``torchrun`` with 2 processes on this host and a free port of its own."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    csv = tmp_path_factory.mktemp("launch-data") / "sentiment.csv"
    write_sentiment_csv(csv)
    return tiny_model_dir, csv


@pytest.fixture(scope="module")
def torchrun_run(inputs, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("torchrun")
    out = tmp / "out"
    cmd = [*torchrun_cmd(), str(WORKER), *map(str, inputs), str(out)]
    return _run(cmd, tmp, out)


def _accelerate(inputs, tmp: Path, config: str, *extra: str) -> dict:
    cfg = tmp / "accelerate.yaml"
    cfg.write_text(config)
    out = tmp / "out"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(cfg),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        str(WORKER),
        *map(str, inputs),
        str(out),
        *extra,
    ]
    return _run(cmd, tmp, out)


def _assert_ranks_agree(run: dict) -> None:
    s0, s1 = run["s0"], run["s1"]
    assert s0.keys() == s1.keys() and any(k.endswith("rank_mask") for k in s0)
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    assert run["meta"]["world_size"] == 2
    assert run["meta"]["pruned_during_training"] > 0  # masks really changed: agreement is not vacuous


def _assert_same_as_torchrun(run: dict, torchrun_run: dict) -> None:
    """The same tensors, bit for bit: accelerate starts the processes through torch's own launcher,
    and the Trainer builds the same DDP over the same gloo group, data order and seeds."""
    want = torchrun_run["s0"]
    assert run["s0"].keys() == want.keys()
    for key in want:
        assert torch.equal(run["s0"][key], want[key]), key
    assert run["meta"]["ranks"] == torchrun_run["meta"]["ranks"]


@pytest.mark.slow
def test_torchrun_two_processes_end_identical(torchrun_run):
    """torchrun, 2 CPU processes (gloo): both end with identical adapters and rank masks."""
    _assert_ranks_agree(torchrun_run)


@pytest.mark.slow
def test_accelerate_launch_trains_as_torchrun(inputs, torchrun_run, tmp_path):
    """`accelerate launch` (DDP, 2 CPU processes) ends with the masks and adapters of torchrun."""
    run = _accelerate(inputs, tmp_path, ACCELERATE_DDP)
    _assert_ranks_agree(run)
    assert run["meta"]["parallel"] == {"world_size": 2, "sharded": False}
    _assert_same_as_torchrun(run, torchrun_run)


@pytest.mark.slow
def test_accelerate_leaves_fsdp_off_on_cpu_and_says_so(inputs, torchrun_run, tmp_path):
    """The limitation, exactly: with an FSDP2 accelerate config on CPU, accelerate's state keeps
    ``MULTI_CPU`` and drops the FSDP plugin (it enables FSDP only for GPU-like devices), so the
    Trainer trains as DDP. bayeslora says so in one line; the result is torchrun's, bit for bit; the
    run's checkpoint and the Trainer's mid-run checkpoint (every 5 steps) hold the whole adapter."""
    run = _accelerate(inputs, tmp_path, ACCELERATE_FSDP2, "5")
    _assert_ranks_agree(run)
    assert run["meta"]["parallel"] == {"world_size": 2, "sharded": False}
    assert any("accelerate left it off (it does on CPU)" in line for line in run["meta"]["log"])
    _assert_same_as_torchrun(run, torchrun_run)
    model, _, _ = load_checkpoint(run["out"] / "run")
    saved = adapter_state(model)
    assert saved.keys() == run["s0"].keys()
    for key, value in run["s0"].items():
        assert torch.equal(saved[key], value), key
    found = sorted((run["out"] / "run" / "checkpoints").glob("checkpoint-*"))
    assert found, list((run["out"] / "run").rglob("*"))
    mid = load_file(str(found[-1] / "adapter" / "adapter.safetensors"))
    assert all(v.shape == (4,) for k, v in mid.items() if k.endswith("rank_mask"))
    fresh = bl.load_adapter(sequence_classifier(inputs[0], ["neg", "pos"]), found[-1] / "adapter")
    assert sum(bl.ranks(fresh).values()) >= sum(run["meta"]["ranks"].values())  # ranks only go off


# FSDP2 against DDP: the same loop (tests/fsdp_worker.py) on the same data and noise. FSDP2
# reduce-scatters the gradients where DDP all-reduces pre-divided buckets, so sums round differently
# in the last bit; 12 Adam steps carry that to at most 4.8e-7 (on a log σ² of 6.7; 5e-8 on the
# factors) here. The tolerance leaves a 2x margin; the masks must agree exactly.
FSDP_ATOL, FSDP_RTOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def fsdp_runs(inputs, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fsdp")
    outs = {}
    for mode in ("ddp", "fsdp2"):
        out = tmp / mode
        cmd = [
            *torchrun_cmd(),
            str(ROOT / "tests" / "fsdp_worker.py"),
            mode,
            str(inputs[0]),
            str(out),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(tmp))
        assert res.returncode == 0, (mode, res.stdout[-2000:], res.stderr[-6000:])
        outs[mode] = out
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("posterior", ["gate", "additive"])
def test_fsdp2_on_cpu_trains_as_ddp_and_saves_whole_adapters(fsdp_runs, inputs, posterior):
    """torch's FSDP2 (``fully_shard`` per BertLayer and on the model, CPU mesh, gloo): the KL and
    the prune pass gather the sharded rank parameters, the masks end as under DDP on every process,
    the adapters within the tolerance above, and ``bl.save_adapter`` (called on every process) writes
    the whole adapter once; ``bl.shrink`` refuses the sharded model in one line, and the unsharded
    copy `bayeslora train` finishes on holds the same tensors and shrinks."""
    ddp, fsdp = fsdp_runs["ddp"], fsdp_runs["fsdp2"]
    meta = {m: json.loads((fsdp_runs[m] / "rank0.json").read_text()) for m in fsdp_runs}
    assert meta["fsdp2"]["world_size"] == 2 and meta["fsdp2"][posterior]["sharded"] is True
    assert meta["ddp"][posterior]["sharded"] is False
    want = load_file(str(ddp / f"{posterior}-rank0.safetensors"))
    got = [load_file(str(fsdp / f"{posterior}-rank{r}.safetensors")) for r in (0, 1)]
    assert got[0].keys() == got[1].keys() == want.keys()
    for key in want:
        assert torch.equal(got[0][key], got[1][key]), key  # every process gathered the same whole
        if key.endswith(("rank_mask", "rank_index")):
            assert torch.equal(got[0][key], want[key]), key
        else:
            torch.testing.assert_close(got[0][key], want[key], atol=FSDP_ATOL, rtol=FSDP_RTOL, msg=key)
    initial = 4 * len(meta["ddp"][posterior]["ranks"])
    assert 0 < initial - sum(meta["fsdp2"][posterior]["ranks"].values()) < initial  # some ranks off
    assert meta["fsdp2"][posterior]["ranks"] == meta["ddp"][posterior]["ranks"]
    saved = load_file(str(fsdp / f"{posterior}-adapter" / "adapter.safetensors"))
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], got[0][k]) for k in saved)
    fresh = bl.load_adapter(sequence_classifier(inputs[0], ["neg", "pos"]), fsdp / f"{posterior}-adapter")
    assert bl.ranks(fresh) == meta["fsdp2"][posterior]["ranks"]
    assert meta["fsdp2"][posterior]["shrink_error"].startswith("cannot shrink a model sharded by FSDP2")
    assert meta["ddp"][posterior]["shrink_error"] is None
    for m in ("ddp", "fsdp2"):
        assert meta[m][posterior]["copy_equal"] is True
        assert meta[m][posterior]["copy_shrunk"] == meta[m][posterior]["ranks"]
