"""A grid of testbed samples after GARDO and its baselines (what reward hacking looks like).

    OMP_NUM_THREADS=1 python -m bench.gardo_samples [--study bench/out/gardo_testbed] [--seed 0]

Loads each method's final checkpoint from a finished `regtune study gardo` folder, samples the four prompts with
the deterministic ODE sampler from the same initial noise (the evaluation noise), and writes
`<study>/samples.png` (rows: pretrained model, then each method; 4 prompts x 4 noises per row).
"""

from __future__ import annotations

import argparse
import os

import torch

from regtune.diffusion import GARDOConfig, GARDOTrainer  # noqa: E402
from regtune.diffusion.testbed import build_testbed  # noqa: E402
from regtune.experiments.gardo import load_gardo_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", default="bench/out/gardo_testbed")
    parser.add_argument("--recipe", default="recipes/gardo_testbed.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per_prompt", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    study = load_gardo_study(args.recipe)
    methods = [
        m for m in sorted(os.listdir(args.study)) if os.path.isdir(os.path.join(args.study, m, f"seed{args.seed}"))
    ]
    rows = {}
    for method in methods:
        path = os.path.join(args.study, method, f"seed{args.seed}", "checkpoint.pt")
        state = torch.load(path, map_location="cpu", weights_only=True)
        cfg = GARDOConfig(**{**state["config"], "resume": False, "output_dir": os.path.join(args.study, "_samples")})
        bed = build_testbed(study.testbed, log=None)
        bed.pop("info")
        trainer = GARDOTrainer(cfg, **bed)
        if "pretrained" not in rows:
            rows["pretrained"] = _grid_row(trainer, bed["prompts"], args)
        trainer.load_checkpoint(path)
        rows[method] = _grid_row(trainer, bed["prompts"], args)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = rows["pretrained"].shape[0]
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(n_cols * 0.75, len(rows) * 0.85))
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(images[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(
        "rows: method; columns: 4 prompts (square, vertical, horizontal, frame) x 4 initial noises", fontsize=8
    )
    fig.tight_layout()
    out = args.out or os.path.join(args.study, "samples.png")
    fig.savefig(out, dpi=120)
    print(out)


def _grid_row(trainer: GARDOTrainer, prompts, args) -> torch.Tensor:
    from regtune.diffusion.trainer import _seed_for

    n = args.per_prompt
    seeds = [_seed_for(args.seed, 10**6, g) for g in range(len(prompts))]
    batch = trainer.sample(list(prompts), seeds, n, noise_level=0.0)
    return batch["images"].cpu()


if __name__ == "__main__":
    main()
