"""Example plug-in for `bench.base_to_novel`: a method registered from another module.

`lora-sam` is the `lora` model trained with a regularizer added to its trainer: `GLADRegularizer` with lambda 1,
which is SAM (two passes per step: the gradient at theta + rho * g / ||g|| replaces g). Any `regtune.Regularizer`
(a loss term, a forward context or a whole training step) plugs in the same way. Not a tuned method: rho is
illustrative and the lr is LoRA's.

    python -m bench.base_to_novel_sam_example --datasets trec --methods zero-shot lora lora-sam --seeds 0 \
        --steps 50 --time-steps 10 --out bench/out/base_to_novel_sam_example
"""

from __future__ import annotations

from bench.base_to_novel import (
    DualEncoderClassifier,
    MethodConfig,
    TrainSetup,
    build_lora,
    main,
    register_method,
)
from regtune.regularizers import GLADRegularizer


@register_method("lora-sam", default_lr=3e-3, description="LoRA + SAM (GLADRegularizer, lambda 1, rho 0.05)")
def build_lora_sam(model: DualEncoderClassifier, cfg: MethodConfig) -> TrainSetup:
    setup = build_lora(model, cfg)  # same adapter, optimizer and schedule as `lora`
    setup.regularizers.append(GLADRegularizer(rho=float(cfg.options.get("rho", 0.05)), glad_lambda=1.0))
    return setup


if __name__ == "__main__":
    main()
