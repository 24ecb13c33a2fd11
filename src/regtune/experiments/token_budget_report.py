"""The tables and plots of a token-budget (multi-epoch) recipe, from its result files: one cell per (model,
repetitions, dropout), with the mean and 95% t-interval over seeds and paired differences between runs of one seed."""

from __future__ import annotations

import math

from .report import pyplot, save_figure, write_results
from .stats import format_ci, mean_ci, paired_difference
from .token_budget_recipe import MultiEpochStudy


def _orders(results: list[dict], study: MultiEpochStudy | None):
    """The models, repetitions and dropout settings that `results` hold, in the study's order (else sorted)."""
    keys = ("model", "repetitions", "dropout")
    if study is None:
        return [sorted({r[k] for r in results}) for k in keys]
    orders = (study.models, study.repetitions, study.dropout)
    return [[v for v in values if any(r[k] == v for r in results)] for values, k in zip(orders, keys)]


def _seed(run: dict):
    return run.get("seed", run.get("spec", {}).get("seed", 0))


def summarize(results: list[dict], study: MultiEpochStudy | None = None) -> list[dict]:
    """
    One summary per (model, repetitions, dropout) cell, over the seeds it was run with:

    - `heldout`, `gap` (held-out loss minus the loss on the unique training data, eval mode): [`mean_ci`] over seeds;
    - `vs_reference`: [`paired_difference`] of held-out loss, this dropout setting minus the first one of the study
      (e.g. `none`), run by run on the same seeds (same initial weights, unique subset and batch order); `None` for the
      reference itself;
    - `degradation`: the paired difference of held-out loss against the fewest repetitions, same dropout and seed;
    - `degradation_vs_reference`: the degradation minus that of the reference dropout setting, seed by seed (negative:
      this dropout setting reduces the degradation); `None` for the reference and at the fewest repetitions;
    - `mean_dropout` / `phase_dropout`: the dropout rate read from the model at every step, over the run and per
      quarter of training, averaged over the cell's runs.
    """
    models, repetitions, dropouts = _orders(results, study)
    by_key = {(r["model"], r["repetitions"], r["dropout"], _seed(r)): r for r in results}

    def heldout(model, rep, dropout) -> dict:
        return {s: r["heldout_loss"] for (m, k, d, s), r in by_key.items() if (m, k, d) == (model, rep, dropout)}

    def degradation(model, rep, dropout) -> dict:
        base = heldout(model, repetitions[0], dropout)
        return {s: loss - base[s] for s, loss in heldout(model, rep, dropout).items() if s in base}

    cells = []
    for model in models:
        for rep in repetitions:
            for dropout in dropouts:
                runs = [r for (m, k, d, _), r in sorted(by_key.items()) if (m, k, d) == (model, rep, dropout)]
                if not runs:
                    continue
                losses = heldout(model, rep, dropout)
                first = runs[0]
                types = first.get("phase_dropout", {})
                cells.append(
                    {
                        **{k: first[k] for k in ("model", "n_params", "repetitions", "unique_tokens", "train_tokens")},
                        "tokens_per_param": first["train_tokens"] / first["n_params"],
                        "dropout": dropout,
                        "seeds": sorted(losses),
                        "heldout": mean_ci(list(losses.values())),
                        "gap": mean_ci([r["heldout_loss"] - r["train_loss_eval"] for r in runs]),
                        "vs_reference": None
                        if dropout == dropouts[0]
                        else paired_difference(losses, heldout(model, rep, dropouts[0])),
                        "degradation": None
                        if rep == repetitions[0]
                        else paired_difference(losses, heldout(model, repetitions[0], dropout)),
                        "degradation_vs_reference": None
                        if rep == repetitions[0] or dropout == dropouts[0]
                        else paired_difference(degradation(model, rep, dropout), degradation(model, rep, dropouts[0])),
                        "mean_dropout": {t: mean_ci([r["mean_dropout"][t] for r in runs])["mean"] for t in types},
                        "phase_dropout": {
                            t: [mean_ci(q)["mean"] for q in zip(*(r["phase_dropout"][t] for r in runs))] for t in types
                        },
                        "train_seconds": sum(r["train_seconds"] for r in runs),
                    }
                )
    return cells


def _wins(summary: dict | None) -> str:
    if summary is None:
        return ""
    return f"{format_ci(summary, '+.4f')} ({summary['wins']}/{summary['n']} higher)"


def markdown_table(results: list[dict], study: MultiEpochStudy | None = None) -> str:
    """
    The study's table in Markdown, one per model, a row per (repetitions, dropout): held-out loss, its paired
    differences against the first dropout setting and against the fewest repetitions, and the generalization gap;
    then the dropout rates applied per quarter of training.
    """
    cells = summarize(results, study)
    models, repetitions, dropouts = _orders(results, study)
    seeds = max(len(c["seeds"]) for c in cells)
    ref, rep0 = dropouts[0], repetitions[0]
    out = [
        f"Held-out loss in nats/token (lower is better){f', mean [95% CI] over {seeds} seeds' if seeds > 1 else ''}. "
        f"`- {ref}` and `- {rep0} rep.`: paired differences in held-out loss against dropout `{ref}` and against "
        f"{rep0} repetition(s), run by run on the same seed (k/n higher: the seeds where it is positive); "
        f"`degradation - {ref}`: the degradation (`- {rep0} rep.`) minus that of `{ref}`, seed by seed (negative: "
        "the dropout setting reduces the degradation). Gap: held-out loss minus the loss on the unique training data "
        "(eval mode).\n"
    ]
    for model in models:
        mine = [c for c in cells if c["model"] == model]
        c0 = mine[0]
        out += [
            f"### {model} ({c0['n_params']:,} parameters, {c0['train_tokens']:,} training tokens per run: "
            f"{c0['tokens_per_param']:.1f} tokens per parameter)\n",
            f"| repetitions | unique tokens | dropout | held-out loss | - {ref} | - {rep0} rep. | degradation - {ref} | gap |",
            "|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for c in mine:
            out.append(
                f"| {c['repetitions']} | {c['unique_tokens']} | {c['dropout']} | {format_ci(c['heldout'], '.4f')} | "
                f"{_wins(c['vs_reference'])} | {_wins(c['degradation'])} | {_wins(c['degradation_vs_reference'])} | "
                f"{format_ci(c['gap'], '+.4f')} |"
            )
        out.append("")
    types = sorted({t for c in cells for t in c["phase_dropout"]})
    if types:
        out.append("Dropout rate applied, read from the model at every step (mean per quarter of training):\n")
        out += ["| dropout | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
        for dropout in dropouts:
            phases = next(c["phase_dropout"] for c in cells if c["dropout"] == dropout)
            texts = [" / ".join(f"{p:.3f}" for p in phases.get(t, [])) or "not scheduled" for t in types]
            out.append(f"| {dropout} | " + " | ".join(texts) + " |")
        out.append("")
    return "\n".join(out)


def plot_heldout_vs_repetitions(results: list[dict], path: str, study: MultiEpochStudy | None = None) -> str:
    """Held-out loss (mean and 95% CI over seeds) against repetitions, one line per dropout setting and panel per size."""
    cells = summarize(results, study)
    models, repetitions, dropouts = _orders(results, study)
    fig, axes = pyplot().subplots(1, len(models), figsize=(5.2 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for d in dropouts:
            mine = [c for c in cells if (c["model"], c["dropout"]) == (model, d)]
            means = [c["heldout"]["mean"] for c in mine]
            errors = [
                0.0 if math.isnan(c["heldout"]["lo"]) else c["heldout"]["mean"] - c["heldout"]["lo"] for c in mine
            ]
            ax.errorbar([c["repetitions"] for c in mine], means, yerr=errors, marker="o", capsize=3, label=d)
        ax.set_xscale("log", base=2)
        ax.set_xticks(repetitions, [str(r) for r in repetitions])
        ax.set_xlabel("repetitions (epochs over budget / repetitions unique tokens)")
        ax.set_ylabel("held-out loss (nats/token)")
        n_params = next(c["n_params"] for c in cells if c["model"] == model)
        ax.set_title(f"{model} ({n_params:,} parameters)")
        ax.grid(alpha=0.3)
        ax.legend(title="dropout")
    fig.suptitle("Multi-epoch degradation at a fixed token budget")
    return save_figure(fig, path)


def plot_training_curves(results: list[dict], path: str, study: MultiEpochStudy | None = None) -> str:
    """
    Held-out (solid) and training (dashed) loss against tokens seen, for the first seed; rows: model sizes, columns:
    repetitions.
    """
    plt = pyplot()
    from matplotlib.ticker import EngFormatter

    seed = min(_seed(r) for r in results)
    results = [r for r in results if _seed(r) == seed]
    models, repetitions, dropouts = _orders(results, study)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # zoom on the part that differs between runs: everything after the first fifth of training
    losses = [(t >= 0.2 * r["train_tokens"], loss) for r in results for c in r["curves"].values() for t, loss in c]
    fig, axes = plt.subplots(
        len(models), len(repetitions), figsize=(3.6 * len(repetitions), 3.2 * len(models)), squeeze=False, sharey=True
    )
    for i, model in enumerate(models):
        for j, rep in enumerate(repetitions):
            ax = axes[i][j]
            for k, d in enumerate(dropouts):
                run = next(
                    (r for r in results if (r["model"], r["repetitions"], r["dropout"]) == (model, rep, d)), None
                )
                if run is None:
                    continue
                color = colors[k % len(colors)]
                if run["curves"]["heldout"]:
                    ax.plot(*zip(*run["curves"]["heldout"]), color=color, label=f"{d} held-out")
                if run["curves"]["train"]:
                    ax.plot(*zip(*run["curves"]["train"]), color=color, linestyle="--", alpha=0.6, label=f"{d} train")
            ax.set_title(f"{model}, {rep} repetition(s), seed {seed}", fontsize=9)
            ax.set_xlabel("training tokens")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.grid(alpha=0.3)
            late = [loss for is_late, loss in losses if is_late]
            if late:
                ax.set_ylim(min(loss for _, loss in losses) - 0.05, max(late) + 0.1)
            if j == 0:
                ax.set_ylabel("loss (nats/token)")
    handles, labels = max((ax.get_legend_handles_labels() for row in axes for ax in row), key=lambda h: len(h[0]))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    return save_figure(fig, path, dpi=110, rect=(0, 0.08 if handles else 0, 1, 1))


def write_report(output_dir: str, results: list[dict], study: MultiEpochStudy | None = None) -> dict[str, str]:
    """
    Write `results.json` (every run, and the cell summaries under `cells`), `results.md`, `heldout_vs_repetitions.png`
    and `training_curves.png`; return the paths.
    """
    if not results:
        return {}
    plots = {
        "heldout_vs_repetitions": lambda path: plot_heldout_vs_repetitions(results, path, study),
        "training_curves": lambda path: plot_training_curves(results, path, study),
    }
    name = f"Multi-epoch study: {study.name}" if study else "Multi-epoch study"
    table = markdown_table(results, study)
    return write_results(output_dir, name, results, table, plots, cells=summarize(results, study))
