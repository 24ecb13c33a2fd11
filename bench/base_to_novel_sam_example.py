"""Example plug-in for bench/base_to_novel.py: a two-pass method (LoRA + SAM) registered from another script.

Shows the method API for GLAD-style methods (a custom step function with two forward/backward passes) and the
side-by-side step-time helper. Not a tuned method: rho is illustrative and the lr is LoRA's.

    python bench/base_to_novel_sam_example.py --datasets trec --methods zero-shot lora lora-sam --seeds 0 \
        --steps 50 --time-steps 10 --out bench/out/base_to_novel_sam_example
"""

from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: see base_to_novel.py

import torch  # noqa: E402
from base_to_novel import METHODS, MethodConfig, StepContext, TrainSetup, build_lora, main, register_method  # noqa: E402


@register_method("lora-sam", default_lr=METHODS["lora"].default_lr, description="LoRA + SAM (rho 0.05), two passes")
def build_lora_sam(model: torch.nn.Module, cfg: MethodConfig) -> TrainSetup:
    setup = build_lora(model, cfg)  # same adapter, optimizer and schedule as `lora`
    rho = float(cfg.options.get("rho", 0.05))
    params = [p for p in setup.model.parameters() if p.requires_grad]

    def sam_step(ctx: StepContext) -> float:
        loss = ctx.loss()  # pass 1: gradient g at theta
        loss.backward()
        with torch.no_grad():
            norm = torch.sqrt(sum((p.grad**2).sum() for p in params if p.grad is not None)) + 1e-12
            eps = [rho * p.grad / norm if p.grad is not None else None for p in params]
            for p, e in zip(params, eps):
                if e is not None:
                    p.add_(e)
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.loss().backward()  # pass 2: gradient at theta + eps (class embeddings recomputed there too)
        with torch.no_grad():
            for p, e in zip(params, eps):
                if e is not None:
                    p.sub_(e)
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    setup.step_fn = sam_step
    return setup


if __name__ == "__main__":
    main()
