"""The table and plots of a token-budget (multi-epoch) recipe, from its result files."""

from __future__ import annotations

from .report import write_results
from .token_budget_recipe import MultiEpochStudy


ROW_FIELDS = (
    "model",
    "n_params",
    "repetitions",
    "unique_tokens",
    "train_tokens",
    "dropout",
    "heldout_loss",
    "degradation",
    "train_loss_eval",
    "gap",
    "train_seconds",
)


def _orders(results: list[dict], study: MultiEpochStudy | None):
    models = list(study.models) if study else sorted({r["model"] for r in results})
    repetitions = list(study.repetitions) if study else sorted({r["repetitions"] for r in results})
    dropouts = list(study.dropout) if study else sorted({r["dropout"] for r in results})
    return models, repetitions, dropouts


def table_rows(results: list[dict]) -> list[dict]:
    """
    One row per run, with `degradation` (held-out loss minus that of 1 repetition, i.e. of the smallest repetition
    count of the study, at the same model and dropout) and `gap` (held-out loss minus train loss in eval mode).
    """
    base = {}
    for r in results:
        key = (r["model"], r["dropout"])
        if key not in base or r["repetitions"] < base[key]["repetitions"]:
            base[key] = r
    rows = []
    for r in results:
        reference = base[(r["model"], r["dropout"])]
        rows.append(
            {
                **{field: r.get(field) for field in ROW_FIELDS},
                "degradation": r["heldout_loss"] - reference["heldout_loss"],
                "gap": r["heldout_loss"] - r["train_loss_eval"],
            }
        )
    return rows


def _grid(rows, model, repetitions, dropouts, value, bold: bool = False) -> list[str]:
    lookup = {(r["repetitions"], r["dropout"]): r for r in rows if r["model"] == model}
    lines = []
    for rep in repetitions:
        unique = next((r["unique_tokens"] for (k, _), r in lookup.items() if k == rep), None)
        cells = []
        for d in dropouts:
            row = lookup.get((rep, d))
            cells.append("" if row is None else value(row))
        filled = [c for c in cells if c]
        if bold and len(filled) > 1:
            best = min(filled, key=float)
            cells = [f"**{c}**" if c == best else c for c in cells]
        lines.append(f"| {rep} | {unique if unique is not None else ''} | " + " | ".join(cells) + " |")
    return lines


def markdown_table(results: list[dict], study: MultiEpochStudy | None = None) -> str:
    """The study's tables in Markdown: held-out loss, degradation vs the fewest repetitions, train/held-out gap."""
    rows = table_rows(results)
    models, repetitions, dropouts = _orders(results, study)
    head = "| repetitions | unique tokens | " + " | ".join(dropouts) + " |"
    rule = "|---:|---:|" + "---:|" * len(dropouts)
    out = []
    for model in models:
        model_rows = [r for r in rows if r["model"] == model]
        if not model_rows:
            continue
        n_params = model_rows[0]["n_params"]
        budget = max(r["train_tokens"] for r in model_rows)
        out.append(f"### {model} ({n_params:,} parameters, {budget:,} training tokens per run)\n")
        out.append("Held-out loss (nats/token; lower is better; best of each row in bold):\n")
        out += [
            head,
            rule,
            *_grid(rows, model, repetitions, dropouts, lambda r: f"{r['heldout_loss']:.4f}", bold=True),
            "",
        ]
        out.append(f"Degradation: held-out loss minus that at {min(repetitions)} repetition(s), same dropout:\n")
        out += [head, rule, *_grid(rows, model, repetitions, dropouts, lambda r: f"{r['degradation']:+.4f}"), ""]
        out.append("Generalization gap: held-out loss minus loss on the unique training data (eval mode):\n")
        out += [head, rule, *_grid(rows, model, repetitions, dropouts, lambda r: f"{r['gap']:+.4f}"), ""]
    return "\n".join(out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heldout_vs_repetitions(results: list[dict], path: str, study: MultiEpochStudy | None = None) -> None:
    """Held-out loss against repetitions (log scale), one line per dropout setting, one panel per model size."""
    plt = _pyplot()
    models, repetitions, dropouts = _orders(results, study)
    models = [m for m in models if any(r["model"] == m for r in results)]
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for d in dropouts:
            points = sorted((r["repetitions"], r["heldout_loss"]) for r in results if r["model"] == model and
                            r["dropout"] == d)  # fmt: skip
            if points:
                ax.plot(*zip(*points), marker="o", label=d)
        n_params = next(r["n_params"] for r in results if r["model"] == model)
        ax.set_xscale("log", base=2)
        ax.set_xticks(repetitions, [str(r) for r in repetitions])
        ax.set_xlabel("repetitions (epochs over budget / repetitions unique tokens)")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(f"{model} ({n_params:,} parameters)")
        ax.grid(alpha=0.3)
        ax.legend(title="dropout")
    fig.suptitle("Multi-epoch degradation at a fixed token budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(results: list[dict], path: str, study: MultiEpochStudy | None = None) -> None:
    """Held-out (solid) and training (dashed) loss against tokens seen; rows: model sizes, columns: repetitions."""
    plt = _pyplot()
    from matplotlib.ticker import EngFormatter

    models, repetitions, dropouts = _orders(results, study)
    models = [m for m in models if any(r["model"] == m for r in results)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # zoom on the part that differs between runs: everything after the first fifth of training
    late = [
        loss
        for r in results
        for curve in r["curves"].values()
        for tokens, loss in curve
        if tokens >= 0.2 * r["train_tokens"]
    ]
    every = [loss for r in results for curve in r["curves"].values() for _, loss in curve]
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
            ax.set_title(f"{model}, {rep} repetition(s)", fontsize=9)
            ax.set_xlabel("training tokens")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.grid(alpha=0.3)
            if late and every:
                ax.set_ylim(min(every) - 0.05, max(late) + 0.1)
            if j == 0:
                ax.set_ylabel("loss (nats/token)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for row in axes:
        for ax in row:
            if len(ax.get_legend_handles_labels()[0]) > len(handles):
                handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(output_dir: str, results: list[dict], study: MultiEpochStudy | None = None) -> dict[str, str]:
    """Write `results.json`, `results.md`, `heldout_vs_repetitions.png` and `training_curves.png`; return the paths."""
    if not results:
        return {}
    plots = {
        "heldout_vs_repetitions": lambda path: plot_heldout_vs_repetitions(results, path, study),
        "training_curves": lambda path: plot_training_curves(results, path, study),
    }
    name = f"Multi-epoch study: {study.name}" if study else "Multi-epoch study"
    return write_results(output_dir, name, results, markdown_table(results, study), plots)
