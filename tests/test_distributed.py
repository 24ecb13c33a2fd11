"""A 2-process CPU DDP run (gloo) gives the weights of a 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from distributed_worker import flat_weights, run, tiny_llama


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")


def _launch(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"


def _report(out_dir, rank: int) -> dict:
    with open(os.path.join(out_dir, f"world_size_{rank}.txt")) as f:
        return json.load(f)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    # 1 process (this one): 4 samples per micro-batch x 2 accumulation steps = 8 per optimizer step
    run(one, per_device_batch=4)
    # 2 processes: 2 samples each x 2 processes x 2 accumulation steps = 8 per optimizer step
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _launch([*torchrun, WORKER, two, "--per-device-batch", "2"])

    reports = [_report(two, rank) for rank in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]  # really two processes in one process group
    assert [r["args_world_size"] for r in reports] == [2, 2]
    assert {r["wrapped"] for r in reports} == {"DistributedDataParallel"}
    single = _report(one, 0)
    assert single["world_size"] == 1
    # every regularizer hook ran once per micro-batch on every process: 3 steps x 2 micro-batches
    for report in (single, *reports):
        assert report["calls"] == {"logit_penalty": 6, "param_l2": 6, "dropout_schedule": None, "plain_step_owner": 6}
        assert report["msd_loss_finite"]
    # regularizer state: one file per process inside the checkpoint
    checkpoint = os.path.join(two, "checkpoint-3")
    assert sorted(f for f in os.listdir(checkpoint) if f.startswith("regtune_")) == [
        "regtune_regularizers_0.pt",
        "regtune_regularizers_1.pt",
    ]
    assert "regtune_regularizers.pt" in os.listdir(os.path.join(one, "checkpoint-3"))

    w_one = torch.load(os.path.join(one, "weights.pt"), weights_only=True)
    w_two = torch.load(os.path.join(two, "weights.pt"), weights_only=True)
    torch.testing.assert_close(w_two, w_one, rtol=0, atol=1e-5)
    assert (w_one - flat_weights(tiny_llama())).abs().max() > 1e-2  # the runs trained
