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
sweep:                             # optional: method -> {GARDOConfig field: values}; one method per value,
  kl_all: {beta: [0.04, 0.4]}      # named <method>_<field><value> (kl_all_beta0.04, ...), of the family <method>
matched_proxy:                     # optional: compare the families at the same proxy reward, paired over seeds
  baseline: kl_all                 # the family every other one is compared with
  proxy_gains: [0.02, 0.04]        # proxy reward above the seed's pretrained model
```

Runs are resumable (each checkpoints into its folder; a finished run is not trained again). The study writes
`results.json`, `results.md` (final values and the mechanism's diagnostics, mean and 95% CI over seeds; the
matched-proxy comparison), `curves.png` and, with `matched_proxy`, `tradeoff.png` into `output_dir`.

At a proxy gain `g`, a run's true metric (and diversity) is read off its evaluation trajectory where its proxy reward
first reaches the seed's pretrained proxy + `g` (linear interpolation between evaluations); a family's value is
the best of its runs that reach it (its frontier over the swept values and training time). The difference to the
baseline family is paired over the seeds where both reach `g`.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from regtune.diffusion.config import GARDOConfig
from regtune.diffusion.testbed import TestbedConfig

from .checks import SectionModel, check_mapping, check_model, construct_checked
from .errors import Errors, RecipeError, join_path, suggest
from .io import RecipeProgress, is_main_process, write_atomic
from .report import ExperimentResult, markdown_lines, pyplot, save_figure, write_results
from .stats import format_ci, mean_ci, paired_difference


PER_RUN = ("output_dir", "seed")
CURVE_KEYS = ("eval_proxy_reward", "eval_class_prob", "eval_diversity_l2", "eval_diversity_feat")
MATCHED_KEYS = ("eval_class_prob", "eval_diversity_l2", "eval_diversity_feat")
DIAGNOSTICS = ("clip_fraction", "gated_fraction", "kl", "kl_micro_step", "approx_kl")  # means over a run's epochs
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
    families: dict[str, list[str]] = field(default_factory=dict)  # recipe method -> its (swept) methods
    matched_proxy: dict | None = None
    raw: dict = field(default_factory=dict)
    kind = "gardo"

    def family(self, method: str) -> str:
        return next((f for f, members in self.families.items() if method in members), method)

    def config(self, method: str, seed: int, output_dir: str | None = None) -> GARDOConfig:
        root = output_dir or self.output_dir
        fields = {**self.training, **self.methods[method]}
        return GARDOConfig(output_dir=os.path.join(root, method, f"seed{seed}"), seed=seed, **fields)


class MatchedProxy(SectionModel):
    """The `matched_proxy` section: the baseline family and the proxy reward gains the families are compared at."""

    baseline: str = Field(min_length=1)
    proxy_gains: list[float] = Field(min_length=1)


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
    sweep: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    matched_proxy: MatchedProxy | None = None


def expand_sweep(methods: dict, sweep: dict, errors: Errors, forbidden: dict) -> tuple[dict, dict]:
    """
    `(methods, families)`: every method of `sweep` replaced by one method per combination of its swept values,
    named `<method>_<field><value>...`; `families` maps each recipe method to its methods.
    """
    out, families = {}, {}
    for method, fields in methods.items():
        grid = sweep.get(method) or {}
        for name, values in grid.items():
            for value in values:
                check_mapping({name: value}, GARDOConfig, join_path("sweep", method), errors, forbidden=forbidden)
            if not values:
                errors.add(join_path(join_path("sweep", method), name), "expected a non-empty list of values")
        names = [n for n, v in grid.items() if v]
        families[method] = []
        for combo in itertools.product(*(grid[n] for n in names)):
            label = "".join(f"_{n}{v:g}" if isinstance(v, float) else f"_{n}{v}" for n, v in zip(names, combo))
            out[method + label] = {**fields, **dict(zip(names, combo))}
            families[method].append(method + label)
    for method in set(sweep) - set(methods):
        errors.add(join_path("sweep", method), f"not a method of the recipe.{suggest(method, methods)}")
    return out, families


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
    methods, families = expand_sweep(methods, top.sweep, errors, forbidden)
    matched = top.matched_proxy.model_dump() if top.matched_proxy else None
    if matched and matched["baseline"] not in families:
        hint = suggest(matched["baseline"], families)
        errors.add("matched_proxy.baseline", f"not a method of the recipe.{hint} Methods: {sorted(families)}")
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
        families=families,
        matched_proxy=matched,
        raw=raw,
    )
    for method in study.methods:  # GARDOConfig's own checks, under the key paths of the fields they name
        path = f"methods.{method}" if method in top.methods else f"sweep.{study.family(method)}"
        fields = {**study.training, **study.methods[method]}
        construct_checked(lambda m=method: study.config(m, study.seeds[0]), path, fields, errors, "GARDOConfig")
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
    if only:  # method or family names
        unknown = sorted(set(only) - set(study.methods) - set(study.families))
        if unknown:
            allowed = sorted(set(study.methods) | set(study.families))
            raise RecipeError([("--only", f"unknown method(s) {unknown}; allowed: {allowed}")], study.name)
    methods = [m for m in study.methods if not only or m in only or study.family(m) in only]
    if study.torch_num_threads:
        torch.set_num_threads(study.torch_num_threads)
    os.makedirs(root, exist_ok=True)
    if not report_only:
        info = None
        progress = RecipeProgress(len(study.seeds) * len(methods), lambda line: print(line, flush=True))
        for seed in study.seeds:  # seed by seed: a study stopped early still holds complete paired seeds
            for method in methods:
                cfg = study.config(method, seed, root)
                bed = build_testbed(study.testbed, log=print if is_main_process() else None)  # cached on disk
                info = bed.pop("info")
                trainer = GARDOTrainer(cfg, **bed)
                if is_main_process() and seed == study.seeds[0]:
                    shown = ", ".join(f"{k}={v}" for k, v in trainer.resolved_settings.items())
                    print(f"[{method}] resolved settings: {shown}", flush=True)
                start = time.perf_counter()
                trainer.train()  # resumes from the run's last checkpoint
                if is_main_process():
                    last = trainer.history[-1]
                    shown = {k: round(v, 4) for k, v in last.items() if k in CURVE_KEYS}
                    print(f"[{method} seed {seed}] epoch {trainer.epoch}: {shown}", flush=True)
                progress.finished(time.perf_counter() - start)
        if info and is_main_process():
            write_atomic(os.path.join(root, "testbed.json"), info)
    if not is_main_process():
        return ExperimentResult(root, [])
    results = gather_results(study, root, methods)
    matched = matched_proxy(study, results) if study.matched_proxy else None
    table = results_table(results) + ("\n" + matched_table(matched) if matched else "")
    plots = {"curves": lambda path: plot_curves(results, path)}
    if matched:
        plots["tradeoff"] = lambda path: plot_tradeoff(matched, path)
    files = write_results(root, study.name, results, table, plots, matched_proxy=matched)
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


def _summary(per_seed: dict) -> dict:
    """[`mean_ci`] of per-seed values, with their std and the values themselves (`per_seed`)."""
    values = list(per_seed.values())
    if not values:
        return {}
    return {**mean_ci(values), "std": float(np.std(values)), "per_seed": per_seed}


def gather_results(study: GARDOStudy, root: str, methods: list[str]) -> list[dict]:
    """
    One entry per method from its runs' logs: final eval metrics and the mechanism's diagnostics (per seed, mean
    and 95% CI over seeds), initial values, curves.
    """
    results = []
    for method in methods:
        runs = {seed: read_history(os.path.join(root, method, f"seed{seed}")) for seed in study.seeds}
        runs = {seed: h for seed, h in runs.items() if h}
        finals = {}
        for key in (*CURVE_KEYS, "refreshes"):
            per_seed = {s: next((r[key] for r in reversed(h) if key in r), None) for s, h in runs.items()}
            per_seed = {s: v for s, v in per_seed.items() if v is not None}
            if per_seed:
                finals[key] = _summary(per_seed)
        trained = {s: [r for r in h if r["epoch"] > 0 and "reward" in r] for s, h in runs.items()}
        diagnostics = {  # a key absent from older logs (kl_micro_step) is left out
            key: _summary(
                {s: float(np.mean([r[key] for r in rs])) for s, rs in trained.items() if rs and key in rs[0]}
            )
            for key in DIAGNOSTICS
        }
        start = [h[0] for h in runs.values() if h[0].get("epoch") == 0]
        initial = {k: float(np.mean([r[k] for r in start if k in r])) for k in CURVE_KEYS if start}
        curves = {
            str(s): [{k: r.get(k) for k in ("epoch", "reward", *CURVE_KEYS)} for r in h] for s, h in runs.items()
        }
        results.append({
            "run": method, "method": method, "family": study.family(method), "final": finals,
            "diagnostics": diagnostics, "initial": initial, "curves": curves,
            "epochs": {str(s): h[-1]["epoch"] for s, h in runs.items()},
            "mean_gated_fraction": diagnostics["gated_fraction"].get("mean"),
        })  # fmt: skip
    return results


def value_at_proxy(curve: list[dict], key: str, proxy: float) -> float | None:
    """`key` where a run's evaluated proxy reward first reaches `proxy` (linear interpolation), or None if never."""
    points = [(r["eval_proxy_reward"], r[key]) for r in curve if r.get(key) is not None]
    for i, (x, y) in enumerate(points):
        if x >= proxy:
            if i == 0:
                return y
            (x0, y0) = points[i - 1]
            return y0 + (proxy - x0) / (x - x0) * (y - y0)
    return None


def matched_proxy(study: GARDOStudy, results: list[dict]) -> dict:
    """
    Every family's frontier at each proxy gain of `study.matched_proxy` (the best of its runs where they first reach
    the seed's pretrained proxy + gain), mean and 95% CI over seeds, and its difference to the baseline family,
    paired over seeds.
    """
    spec = study.matched_proxy
    families: dict[str, list[dict]] = {}
    for res in results:
        families.setdefault(res["family"], []).append(res)
    seeds = sorted({s for res in results for s in res["curves"]}, key=int)
    levels = []
    for gain in spec["proxy_gains"]:
        frontier: dict[str, dict[str, dict]] = {}  # family -> key -> {seed: value}
        for family, members in families.items():
            for key in MATCHED_KEYS:
                per_seed = {}
                for seed in seeds:
                    values = []
                    for res in members:
                        curve = res["curves"].get(seed)
                        if curve and curve[0].get("epoch") == 0:
                            target = curve[0]["eval_proxy_reward"] + gain
                            values.append(value_at_proxy(curve, key, target))
                    values = [v for v in values if v is not None]
                    if values:
                        per_seed[seed] = max(values)
                frontier.setdefault(family, {})[key] = per_seed
        base = frontier.get(spec["baseline"], {})
        levels.append({
            "proxy_gain": gain,
            "families": {f: {k: {**mean_ci(list(v.values())), "per_seed": v} for k, v in kv.items()}
                         for f, kv in frontier.items()},
            "vs_baseline": {f: {k: paired_difference(v, base.get(k, {})) for k, v in kv.items()}
                            for f, kv in frontier.items() if f != spec["baseline"]},
        })  # fmt: skip
    return {"baseline": spec["baseline"], "families": list(families), "levels": levels}


def results_table(results: list[dict]) -> str:
    def cell(summary, fmt):
        return "n/a" if not summary else format_ci(summary, fmt)

    finals = list(zip(CURVE_KEYS, (".4f", ".3f", ".2f", ".3f")))
    header = ["method", "proxy reward (JPEG)", "true metric (class prob)", "diversity (pixel L2)", "diversity (feat)"]
    initial = (results[0] if results else {}).get("initial")
    rows = [["pretrained (epoch 0)"] + [f"{initial.get(k, float('nan')):{f}}" for k, f in finals]] if initial else []
    rows += [[res["method"]] + [cell(res["final"].get(k), f) for k, f in finals] for res in results]
    n = max((v["n"] for r in results for v in r["final"].values()), default=0)
    lines = ["## Final held-out evaluation", "", *markdown_lines(header, rows)]
    lines += [
        f"\nMean [95% CI] over {n} seed(s) (t-interval), at the last epoch.",
        "",
        "## The mechanism's diagnostics",
        "",
    ]
    diagnostics = list(zip(DIAGNOSTICS, (".3f", ".3f", ".2e", ".2e", ".1e")))
    header = [
        "method",
        "clip fraction",
        "gated fraction",
        "KL (per gated sample)",
        "KL (micro-step mean)",
        "approx KL",
        "refreshes",
    ]
    rows = [
        [res["method"]]
        + [cell(res.get("diagnostics", {}).get(k), f) for k, f in diagnostics]
        + [cell(res["final"].get("refreshes"), ".1f")]
        for res in results
    ]
    lines += markdown_lines(header, rows)
    lines.append(
        "\nMeans over a run's epochs, then mean [95% CI] over seeds; refreshes: the run's total. The gated fraction is "
        "the gate's size in every run (only kl_mode=gated applies the KL to it; kl_all applies it to every sample). "
        "KL per gated sample: the mean KL per gated sample and timestep; KL micro-step mean: the released code's "
        "statistic (per optimizer step, the mean over micro-batches and timesteps of each one's mean gated KL, 0 "
        "where none is gated), which the refresh compares with ref_kl_threshold by default."
    )
    return "\n".join(lines)


def matched_table(matched: dict) -> str:
    base = matched["baseline"]
    header = ["proxy gain", "family", "n", "true metric", "diversity (L2)", "diversity (feat)"]
    header += [f"{name} - {base}" for name in header[3:]]
    rows = []
    for level in matched["levels"]:
        for family, values in level["families"].items():
            diffs = level["vs_baseline"].get(family)
            cells = [format_ci(values[k], ".3f") if values[k]["n"] else "not reached" for k in MATCHED_KEYS]
            if diffs:
                cells += [
                    f"{format_ci(diffs[k], '+.3f')} ({diffs[k]['wins']}/{diffs[k]['n']})" if diffs[k]["n"] else "-"
                    for k in MATCHED_KEYS
                ]
            else:
                cells += ["(baseline)"] * 3
            rows.append([f"{level['proxy_gain']:+.3f}", family, str(values["eval_class_prob"]["n"])] + cells)
    text = (
        f"Each family's best run where the proxy reward first reaches the seed's pretrained proxy + gain; mean [95% CI]"
        f" over the seeds that reach it (n), and the difference to {base}, paired over seeds (wins / pairs)."
    )
    return "\n".join(["", "## At matched proxy reward", "", text, "", *markdown_lines(header, rows)])


def plot_tradeoff(matched: dict, path: str) -> str:
    """True metric and diversity of each family's frontier against the proxy gain (mean and 95% CI over seeds)."""
    keys = [("eval_class_prob", "true metric (class probability)"), ("eval_diversity_l2", "diversity (pixel L2)")]
    fig, axes = pyplot().subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8))
    for i, family in enumerate(matched["families"]):
        for ax, (key, title) in zip(axes, keys):
            pts = [(lv["proxy_gain"], lv["families"][family][key]) for lv in matched["levels"]]
            pts = [(g, v) for g, v in pts if v["n"]]
            if not pts:
                continue
            xs = [g + (i - len(matched["families"]) / 2) * 0.0006 for g, _ in pts]  # dodge the error bars
            ys = [v["mean"] for _, v in pts]
            err = [[v["mean"] - v["lo"] if v["n"] > 1 else 0 for _, v in pts],
                   [v["hi"] - v["mean"] if v["n"] > 1 else 0 for _, v in pts]]  # fmt: skip
            ax.errorbar(xs, ys, yerr=err, color=f"C{i}", marker="o", ms=4, capsize=3, label=family)
            ax.set_title(f"{title} at matched proxy", fontsize=10)
            ax.set_xlabel("proxy reward gain over the pretrained model")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def plot_curves(results: list[dict], path: str) -> str:
    keys = [
        ("eval_proxy_reward", "proxy reward (JPEG compressibility)"),
        ("eval_class_prob", "true metric (class probability)"),
        ("eval_diversity_l2", "diversity (within-prompt pixel L2)"),
    ]
    fig, axes = pyplot().subplots(1, len(keys) + 1, figsize=(4.6 * (len(keys) + 1), 3.6))
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
    return save_figure(fig, path, dpi=110)
