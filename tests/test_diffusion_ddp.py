"""GARDOTrainer in 2 CPU processes (torchrun, gloo, DDP) equals 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from diffusion_ddp_worker import run
from diffusion_tiny import fresh_accelerate_state  # noqa: F401 (a fixture)


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffusion_ddp_worker.py")


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    run(str(one))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, str(two)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"

    single = torch.load(one / "rank0.pt", weights_only=True)
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert single["world_size"] == 1
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["num_processes"] for r in ranks] == [2, 2]
    assert {r["wrapped"] for r in ranks} == {"DistributedDataParallel"}
    # both processes hold identical adapters, equal to the 1-process run's (same global batch, same gate)
    for name, value in single["params"].items():
        torch.testing.assert_close(ranks[0]["params"][name], ranks[1]["params"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=1e-4, atol=1e-6)
    for a, b in zip(single["history"], ranks[0]["history"]):
        assert a["gated_fraction"] == b["gated_fraction"] and a["gate_k"] == b["gate_k"]
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-5)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-12)
    trained = [n for n in single["params"] if ".default." in n]
    moved = max(
        (single["params"][n] - ranks[0]["params"][n.replace(".default.", ".ref.")]).abs().max() for n in trained
    )
    assert moved > 1e-4  # the policy moved away from the reference: the runs trained
