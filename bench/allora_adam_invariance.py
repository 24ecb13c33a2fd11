"""Does gradient-side ALLoRA differ from plain LoRA under AdamW? (METHODS.md §1 ambiguity b)

Trains, from the same seed and on the same random-token batches, peft LoRA with `lora_alpha = r` and no dropout
(scaling 1, ALLoRA's forward) and gradient-side ALLoRA with several `eta`, all with AdamW; base-model dropout is
switched off so that the runs are deterministic. Reports ||B - B_LoRA|| / ||B_LoRA|| after `--steps` steps. Adam
divides every gradient element by a running estimate of its own magnitude, so a per-row gradient scale that changes
slowly (ALLoRA's coefficient is exactly `eta` for every row at B = 0) cancels out, and `eta` should barely matter.

Usage: python -m bench.allora_adam_invariance [--steps 20 --lr 3e-3]   (writes bench/out/allora_adam_invariance.*)
"""

from __future__ import annotations

import argparse
import json
import os

import peft  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

import regtune  # noqa: E402
from bench._common import OUT_DIR, TARGET_MODULES, machine_description, minilm_dir, quiet_transformers  # noqa: E402


def build(eta: float | None, lr: float, r: int = 8, update_side: bool = False):
    """eta None: peft LoRA with alpha = r, dropout 0; else ALLoRA with that eta (gradient-side unless update_side)."""
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if eta is None:
        config = peft.LoraConfig(
            r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGET_MODULES, task_type="SEQ_CLS"
        )
    else:
        config = regtune.ALLoRAConfig(
            r=r,
            eta=eta,
            coefficient_on="update" if update_side else "gradient",
            target_modules=TARGET_MODULES,
            task_type="SEQ_CLS",
        )
    model = peft.get_peft_model(base, config)
    model.train()
    if update_side:
        return model, regtune.create_allora_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    return model, optimizer


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--etas", type=float, nargs="+", default=[0.5, 2.0, 8.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=OUT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()

    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(1000, 20000, (8, 24), generator=gen), torch.randint(0, 2, (8,), generator=gen))
        for _ in range(args.steps)
    ]
    final_B = {}
    runs = [(None, False)] + [(eta, False) for eta in args.etas] + [(2.0, True)]
    for eta, update_side in runs:
        model, optimizer = build(eta, args.lr, update_side=update_side)
        for input_ids, labels in batches:
            model(input_ids=input_ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        side = "update" if update_side else "gradient"
        name = "LoRA (alpha = r, dropout 0)" if eta is None else f"ALLoRA {side}-side, eta {eta:g}"
        final_B[name] = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_B" in n])
    ref_name = "LoRA (alpha = r, dropout 0)"
    ref = final_B[ref_name]
    rows = [
        {"run": name, "B_norm": float(b.norm()), "rel_diff_to_lora": float((b - ref).norm() / ref.norm())}
        for name, b in final_B.items()
    ]
    result = {"config": vars(args) | {"out": None}, "machine": machine_description("cpu"), "rows": rows}
    lines = [
        f"AdamW lr {args.lr:g}, {args.steps} steps, same seed and batches; ||B|| over all adapted layers. "
        "The update-side row is a contrast: its coefficient (about eta = 2 early on) multiplies the Adam step.",
        "",
        "| run | ‖B‖ | ‖B − B_LoRA‖ / ‖B_LoRA‖ |",
        "| --- | ---: | ---: |",
    ] + [f"| {row['run']} | {row['B_norm']:.4f} | {row['rel_diff_to_lora']:.4f} |" for row in rows]
    table = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "allora_adam_invariance")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
