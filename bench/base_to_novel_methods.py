"""regtune's methods on the base-to-novel text harness (bench/base_to_novel.py): GLAD and R-AMT mask tuning.

The steps use regtune's layer-1 math (`regtune.functional`), the same functions the Trainer regularizers call.

    # GLAD (issue 5): LoRA vs GLAD for lambda in {0.5, 1.0} and rho in {0.05, 0.2}
    python bench/base_to_novel_methods.py --datasets trec ag_news --seeds 0 1 2 \
        --methods zero-shot lora glad-l0.5-r0.05 glad-l1.0-r0.05 glad-l0.5-r0.2 glad-l1.0-r0.2 \
        --out bench/out/base_to_novel_glad
    # mask tuning (issue 4): without gradient dropout, and with lambda 0.3 / 1.0
    python bench/base_to_novel_methods.py --datasets trec ag_news --seeds 0 1 2 \
        --methods zero-shot lora mask mask-gd0.3 mask-gd1.0 --out bench/out/base_to_novel_mask
"""

from __future__ import annotations

import os
import sys


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting threads crawl on shared cores
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from base_to_novel import (
    METHODS,
    MethodConfig,
    StepContext,
    TrainSetup,
    build_lora,
    cosine_schedule,
    main,
    register_method,
)  # noqa: E402
from peft import get_peft_model  # noqa: E402

import regtune  # noqa: E402
from regtune.functional.masks import gradient_dropout, score_penalty, soft_cross_entropy  # noqa: E402
from regtune.functional.sam import sam_perturbation, sam_referenced_gradient  # noqa: E402


# ------------------------------------------------------------------------------------------------------ GLAD
def _glad_builder(glad_lambda: float, rho: float):
    def build(model: torch.nn.Module, cfg: MethodConfig) -> TrainSetup:
        setup = build_lora(model, cfg)  # the same adapter, optimizer, lr and schedule as `lora`
        params = [p for p in setup.model.parameters() if p.requires_grad]

        def step(ctx: StepContext) -> float:
            loss = ctx.loss()
            loss.backward()
            grads = [p.grad.detach().clone() for p in params]
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_add_(params, sam_perturbation(grads, rho))
            ctx.optimizer.zero_grad(set_to_none=True)
            ctx.loss().backward()  # g_sam at theta + eps
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
                for p, g in zip(params, sam_referenced_gradient(grads, [p.grad for p in params], glad_lambda)):
                    p.grad = g
            ctx.optimizer.step()
            ctx.optimizer.zero_grad(set_to_none=True)
            return loss.item()

        setup.step_fn = step
        return setup

    return build


for _lam in (0.5, 1.0):
    for _rho in (0.05, 0.2):
        register_method(
            f"glad-l{_lam}-r{_rho}",
            default_lr=METHODS["lora"].default_lr,
            description=f"GLAD: LoRA (as `lora`) + SAM-referenced gradient, lambda {_lam}, rho {_rho}",
        )(_glad_builder(_lam, _rho))


# ------------------------------------------------------------------------------------------------ mask tuning
MASK_TARGETS = r".*encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)$"
MASK_LR = 3e-4  # tuned on base-class validation data (grid 1e-4 .. 1e-2): see docs/mask_tuning.md


def _mask_builder(graddrop_lambda: float):
    def build(model: torch.nn.Module, cfg: MethodConfig) -> TrainSetup:
        config = regtune.MaskTuningConfig(target_modules=MASK_TARGETS)
        model = get_peft_model(model, config)
        scores = [p for n, p in model.named_parameters() if "masktune_scores" in n]
        optimizer = torch.optim.Adam(scores, lr=cfg.lr)  # no weight decay on scores (the paper)
        weight = float(cfg.options.get("score_l2_weight", config.score_l2_weight))
        generator = torch.Generator().manual_seed(cfg.seed)

        def step(ctx: StepContext) -> float:
            logits = ctx.logits()
            task = ctx.loss(logits)
            loss_a = task + weight * score_penalty(scores)
            if graddrop_lambda > 0:
                with torch.no_grad(), model.disable_adapter():
                    teacher = ctx.logits()
                g_b = torch.autograd.grad(soft_cross_entropy(logits, teacher), scores, retain_graph=True)
            loss_a.backward()
            if graddrop_lambda > 0:
                for s, gb in zip(scores, g_b):
                    s.grad = gradient_dropout(s.grad, gb, graddrop_lambda, torch.rand(s.shape, generator=generator))
            ctx.optimizer.step()
            ctx.optimizer.zero_grad(set_to_none=True)
            return task.item()

        return TrainSetup(model, optimizer, step_fn=step, scheduler=cosine_schedule(optimizer, cfg.steps))

    return build


register_method("mask", default_lr=MASK_LR, description="R-AMT mask tuning on attention, score penalty, no GD")(
    _mask_builder(0.0)
)
register_method("mask-gd0.3", default_lr=MASK_LR, description="mask tuning + gradient dropout lambda 0.3")(
    _mask_builder(0.3)
)
register_method("mask-gd1.0", default_lr=MASK_LR, description="mask tuning + gradient dropout lambda 1.0")(
    _mask_builder(1.0)
)


if __name__ == "__main__":
    main()
