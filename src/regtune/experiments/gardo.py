"""The `gardo` kind: GARDO and its baselines on the offline diffusion-RL testbed (`regtune run RECIPE.yaml`).

```yaml
name: gardo_testbed
output_dir: runs/gardo_testbed     # one folder per method and seed: <output_dir>/<method>/seed<k>/
seeds: [0, 1, 2]
torch_num_threads: 1               # null: torch's default
testbed: {...}                     # regtune.diffusion.testbed.TestbedConfig fields
training: {...}                    # GARDOConfig fields shared by every method (not output_dir / seed)
methods:                           # name -> GARDOConfig fields of that method
  no_kl: {kl_mode: none, diversity_advantages: false}
  kl_all: {kl_mode: all, diversity_advantages: false, ref_kl_threshold: null, ref_refresh_every: null}
  gardo: {kl_mode: gated}
```

Runs are resumable (each checkpoints into its folder; a finished run is not trained again). The study writes
`results.json`, `results.md` (final values, mean and std over seeds) and `curves.png` into `output_dir`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from regtune.diffusion.config import GARDOConfig
from regtune.diffusion.testbed import TestbedConfig

from .checks import SectionModel, check_mapping, check_model, construct_checked
from .errors import Errors, RecipeError, join_path
from .io import is_main_process, write_atomic
from .report import ExperimentResult, write_results


PER_RUN = ("output_dir", "seed")
CURVE_KEYS = ("eval_proxy_reward", "eval_class_prob", "eval_diversity_l2", "eval_diversity_feat")
DEFAULT_METHODS = {
    "no_kl": {"kl_mode": "none", "diversity_advantages": False},
    "kl_all": {"kl_mode": "all", "diversity_advantages": False, "ref_kl_threshold": None, "ref_refresh_every": None},
    "gardo": {"kl_mode": "gated"},
}


@dataclass
class GARDOStudy:
    """A validated GARDO study recipe."""

    name: str
    output_dir: str
    seeds: list[int]
    testbed: TestbedConfig
    training: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    description: str = ""
    torch_num_threads: int | None = 1
    raw: dict = field(default_factory=dict)
    kind = "gardo"

    def config(self, method: str, seed: int, output_dir: str | None = None) -> GARDOConfig:
        root = output_dir or self.output_dir
        fields = {**self.training, **self.methods[method]}
        return GARDOConfig(output_dir=os.path.join(root, method, f"seed{seed}"), seed=seed, **fields)


class TopLevel(SectionModel):
    """The top-level keys of a GARDO recipe (`testbed`, `training` and `methods` are checked by their classes)."""

    name: str | None = Field(None, min_length=1)
    description: str = ""
    output_dir: str | None = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    torch_num_threads: int | None = Field(1, ge=1)
    testbed: dict | None = None
    training: dict | None = None
    methods: dict[str, dict | None] = Field(default_factory=lambda: copy.deepcopy(DEFAULT_METHODS), min_length=1)


def validate_recipe(raw: dict, source: str | None = None, default_name: str | None = None) -> GARDOStudy:
    """Validate a parsed GARDO recipe (overrides applied); raises [`RecipeError`] naming every invalid key path."""
    errors = Errors()
    top = check_model(raw, TopLevel, "", errors, "a GARDO recipe")
    name = top.name or default_name or "gardo"
    testbed = check_mapping(top.testbed, TestbedConfig, "testbed", errors)
    forbidden = {k: "set per run by the study (<output_dir>/<method>/seed<k>), not in the recipe" for k in PER_RUN}
    training = check_mapping(top.training, GARDOConfig, "training", errors, forbidden=forbidden)
    methods = {
        str(method): check_mapping(fields, GARDOConfig, join_path("methods", str(method)), errors, forbidden=forbidden)
        for method, fields in (top.methods if isinstance(top.methods, dict) else {}).items()
    }
    testbed = construct_checked(lambda: TestbedConfig(**testbed), "testbed", testbed, errors, "TestbedConfig")
    errors.raise_if_any(source)
    study = GARDOStudy(
        name=str(name),
        output_dir=str(top.output_dir or os.path.join("runs", str(name))),
        seeds=list(top.seeds),
        testbed=testbed,
        training=training,
        methods=methods,
        description=top.description,
        torch_num_threads=top.torch_num_threads,
        raw=raw,
    )
    for method in study.methods:  # GARDOConfig's own checks, under the key paths of the fields they name
        fields = {**study.training, **study.methods[method]}
        construct_checked(
            lambda m=method: study.config(m, study.seeds[0]), f"methods.{method}", fields, errors, "GARDOConfig"
        )
    errors.raise_if_any(source)
    return study


def load_gardo_study(source, overrides=None) -> GARDOStudy:
    """Load and validate a GARDO recipe: a path (see [`~regtune.experiments.load_recipe`]) or a mapping."""
    from .recipe import apply_overrides, load_recipe

    if isinstance(source, dict):
        return validate_recipe(apply_overrides(source, overrides or {}), None, "gardo")
    return load_recipe(str(source), overrides)


def run_gardo_study(
    study: GARDOStudy,
    output_dir: str | None = None,
    only: list[str] | None = None,
    report_only: bool = False,
    **unused,
) -> ExperimentResult:
    """
    Train every (method, seed) run not finished yet (each resumes from its checkpoint), then write `results.json`,
    `results.md` and `curves.png`.
    """
    import torch

    from regtune.diffusion.testbed import build_testbed
    from regtune.diffusion.trainer import GARDOTrainer

    root = output_dir or study.output_dir
    if only:
        unknown = sorted(set(only) - set(study.methods))
        if unknown:
            raise RecipeError(
                [("--only", f"unknown method(s) {unknown}; allowed: {sorted(study.methods)}")], study.name
            )
    methods = [m for m in study.methods if not only or m in only]
    if study.torch_num_threads:
        torch.set_num_threads(study.torch_num_threads)
    os.makedirs(root, exist_ok=True)
    if not report_only:
        info = None
        for method in methods:
            for seed in study.seeds:
                cfg = study.config(method, seed, root)
                bed = build_testbed(study.testbed, log=print if is_main_process() else None)
                info = bed.pop("info")
                trainer = GARDOTrainer(cfg, **bed)
                trainer.train()
                if is_main_process():
                    last = trainer.history[-1]
                    shown = {k: round(v, 4) for k, v in last.items() if k in CURVE_KEYS}
                    print(f"[{method} seed {seed}] epoch {trainer.epoch}: {shown}", flush=True)
        if info and is_main_process():
            write_atomic(os.path.join(root, "testbed.json"), info)
    if not is_main_process():
        return ExperimentResult(root, [])
    results = gather_results(study, root, methods)
    table = results_table(results)
    files = write_results(root, study.name, results, table, {"curves": lambda path: plot_curves(results, path)})
    return ExperimentResult(root, results, table, files)


def read_history(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[row["epoch"]] = row  # a resumed run may repeat an epoch: keep the last
    return [rows[e] for e in sorted(rows)]


def gather_results(study: GARDOStudy, root: str, methods: list[str]) -> list[dict]:
    """One entry per method from its runs' logs: final eval metrics (mean/std over seeds), initial values, curves."""
    results = []
    for method in methods:
        runs = {seed: read_history(os.path.join(root, method, f"seed{seed}")) for seed in study.seeds}
        finals = {}
        for key in (*CURVE_KEYS, "gated_fraction", "kl", "clip_fraction", "approx_kl", "refreshes"):
            vals = [next((r[key] for r in reversed(h) if key in r), None) if h else None for h in runs.values()]
            vals = [v for v in vals if v is not None]
            if vals:
                finals[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
        start = [h[0] for h in runs.values() if h and h[0].get("epoch") == 0]
        initial = {k: float(np.mean([r[k] for r in start if k in r])) for k in CURVE_KEYS if start}
        mean_gated = [np.mean([r["gated_fraction"] for r in h if "gated_fraction" in r]) for h in runs.values() if h]
        curves = {
            str(s): [{k: r.get(k) for k in ("epoch", "reward", *CURVE_KEYS)} for r in h] for s, h in runs.items()
        }
        results.append({"run": method, "method": method, "final": finals, "initial": initial, "curves": curves,
                        "mean_gated_fraction": float(np.mean(mean_gated)) if mean_gated else None})  # fmt: skip
    return results


def results_table(results: list[dict]) -> str:
    head = (
        "| method | proxy reward (JPEG) | true metric (class prob) | diversity (pixel L2) | diversity (feat) | gated |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    first = results[0] if results else {}
    if first.get("initial"):
        ini = first["initial"]
        lines.append(
            f"| pretrained (epoch 0) | {ini.get('eval_proxy_reward', float('nan')):.4f} | "
            f"{ini.get('eval_class_prob', float('nan')):.3f} | {ini.get('eval_diversity_l2', float('nan')):.2f} | "
            f"{ini.get('eval_diversity_feat', float('nan')):.3f} | |"
        )
    for res in results:
        f = res["final"]

        def cell(key, fmt, f=f):
            if key not in f:
                return "n/a"
            return f"{f[key]['mean']:{fmt}} ± {f[key]['std']:{fmt}}"

        gated = res.get("mean_gated_fraction")
        lines.append(
            f"| {res['method']} | {cell('eval_proxy_reward', '.4f')} | {cell('eval_class_prob', '.3f')} | "
            f"{cell('eval_diversity_l2', '.2f')} | {cell('eval_diversity_feat', '.3f')} | "
            f"{'' if gated is None else f'{gated:.3f}'} |"
        )
    n = max((v["n"] for r in results for v in r["final"].values()), default=0)
    lines.append(f"\nFinal held-out evaluation, mean ± std over {n} seed(s).")
    return "\n".join(lines)


def plot_curves(results: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("eval_proxy_reward", "proxy reward (JPEG compressibility)"),
        ("eval_class_prob", "true metric (class probability)"),
        ("eval_diversity_l2", "diversity (within-prompt pixel L2)"),
    ]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.6 * (len(keys) + 1), 3.6))
    for m_i, res in enumerate(results):
        method = res["method"]
        color = f"C{m_i}"
        # the trade-off: true metric against proxy reward along each run (seed mean per evaluation)
        pairs = [
            [(r["eval_proxy_reward"], r["eval_class_prob"]) for r in curve if r.get("eval_class_prob") is not None]
            for curve in res["curves"].values()
        ]
        pairs = [p for p in pairs if p]
        if pairs:
            n = min(len(p) for p in pairs)
            xs = [np.mean([p[i][0] for p in pairs]) for i in range(n)]
            ys = [np.mean([p[i][1] for p in pairs]) for i in range(n)]
            axes[-1].plot(xs, ys, color=color, lw=1.5, marker=".", ms=3, label=method)
        for ax, (key, title) in zip(axes, keys):
            per_seed = []
            for curve in res["curves"].values():
                pts = [(r["epoch"], r[key]) for r in curve if r.get(key) is not None]
                if pts:
                    per_seed.append(dict(pts))
                    ax.plot(*zip(*pts), color=color, alpha=0.25, lw=0.8)
            common = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
            if common:
                ax.plot(common, [np.mean([p[e] for p in per_seed]) for e in common], color=color, lw=2, label=method)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("epoch")
    axes[-1].set_title("true metric vs proxy reward (seed mean)", fontsize=10)
    axes[-1].set_xlabel("proxy reward")
    axes[-1].set_ylabel("class probability")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
