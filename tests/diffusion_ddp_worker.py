"""Worker of tests/test_diffusion_ddp.py: GARDOTrainer on a tiny SD3 transformer, in 1 process or under torchrun.

`torchrun --standalone --nproc_per_node 2 tests/diffusion_ddp_worker.py OUT` (or `run(OUT)` in-process) trains 2
epochs with the gated KL and writes `rank{r}.pt`: the world size, the flat LoRA weights of both adapters, the log.
"""

from __future__ import annotations

import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffusion_tiny import tiny_config, tiny_setup  # noqa: E402


def run(out_dir: str) -> None:
    import torch.distributed as dist

    from regtune.diffusion import GARDOTrainer

    torch.set_num_threads(1)
    # the KL normalised by the global gated count: the trajectory does not depend on the number of processes (the
    # released per-micro-batch mean does: each process averages over its own micro-batches' gated samples)
    cfg = tiny_config(
        out_dir,
        num_epochs=2,
        prompts_per_epoch=4,
        num_generations=4,
        kl_mode="gated",
        kl_normalization="gated_count",
        eval_every=0,
        resume=False,
    )
    trainer = GARDOTrainer(cfg, **tiny_setup())
    history = trainer.train()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "world_size": world,
            "num_processes": trainer.accelerator.num_processes,
            "wrapped": type(trainer.ddp_model).__name__,
            "params": params,
            "history": history,
            "gate_k": trainer.gate.k,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    from worker_exit import run_and_exit

    run_and_exit(run, sys.argv[1])
