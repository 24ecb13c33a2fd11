"""What every recipe kind returns ([`ExperimentResult`]) and writes ([`write_results`]); the table and plot of runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .io import write_atomic


@dataclass
class ExperimentResult:
    """
    What running a recipe returns, whatever its kind: the results of its runs (as in its results JSON), the
    markdown table printed by `regtune run`, the files written (`{"json", "table", "plot", ...}: path`), and which
    runs were trained now (`ran`) or found finished (`skipped`).
    """

    output_dir: str
    results: list[dict]
    table: str = ""
    files: dict[str, str] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    wall_seconds: float | None = None

    @property
    def plot(self) -> str | None:
        return self.files.get("plot")


def write_results(
    output_dir: str, name: str, results: list[dict], table: str, plots: dict[str, Callable[[str], object]], **extra
) -> dict[str, str]:
    """
    Write the results of a recipe of any kind in the one results format: `results.json` (`{"name", **extra,
    "results": [one entry per run, its log history left out]}`), `results.md` (a title and `table`) and one PNG per
    entry of `plots` (`{file stem: draw(path)}`; a plot is left out without matplotlib). Returns the paths written:
    `{"json", "table", <stem>...}`, and `plot`, the first plot.
    """
    os.makedirs(output_dir, exist_ok=True)
    files = {"json": os.path.join(output_dir, "results.json"), "table": os.path.join(output_dir, "results.md")}
    entries = [{k: v for k, v in r.items() if k != "history"} for r in results]
    write_atomic(files["json"], {"name": name, **extra, "results": entries})
    write_atomic(files["table"], f"# {name}\n\n{table}\n")
    for stem, draw in plots.items():
        path = os.path.join(output_dir, f"{stem}.png")
        try:
            draw(path)
        except ImportError:
            continue
        if os.path.isfile(path):
            files[stem] = path
            files.setdefault("plot", path)
    return files


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend (raises `ImportError` without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 120, **layout) -> str:
    """Lay out `fig` (`tight_layout(**layout)`), write it to `path` (folder created) and close it; returns `path`."""
    import matplotlib.pyplot as plt

    fig.tight_layout(**layout)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def primary_metric(result: dict) -> str | None:
    """
    The metric a result is compared on: accuracy, macro_f1, else the first other metric (an `evaluate` metric's, e.g.
    f1), else perplexity, else loss.
    """
    for split_metrics in result.get("metrics", {}).values():
        for name in ("accuracy", "macro_f1"):
            if name in split_metrics:
                return name
        for name in split_metrics:
            if name not in ("loss", "perplexity"):
                return name
        for name in ("perplexity", "loss"):
            if name in split_metrics:
                return name
    return None


def table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: run, method, trainable params, train time, then one column per (split, metric)."""
    header = ["run", "method", "trainable params", "train time (s)"]
    columns: list[tuple[str, str]] = []
    for result in results:
        for split, metrics in result.get("metrics", {}).items():
            for metric in metrics:
                if metric != "loss" or primary_metric(result) == "loss":
                    if (split, metric) not in columns:
                        columns.append((split, metric))
    header += [f"{split} {metric}" for split, metric in columns]
    rows = []
    for result in results:
        row = [
            result["run"],
            result["method"],
            f"{result['trainable_params']:,}",
            f"{result['train_seconds']:.1f}",
        ]
        for split, metric in columns:
            value = result.get("metrics", {}).get(split, {}).get(metric)
            row.append("-" if value is None else f"{value:.3f}")
        rows.append(row)
    return header, rows


def format_table(results: list[dict]) -> str:
    """A markdown table (readable as plain text) comparing the runs of a recipe."""
    header, rows = table_rows(results)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), separator] + [line(r) for r in rows])


def plot_results(results: list[dict], path: str, title: str | None = None) -> str | None:
    """
    Write a PNG comparing the runs: final metric per evaluation split (bars) and, when the runs evaluated during
    training, the metric against the training step (curves). Returns `path`, or `None` without matplotlib or data.
    """
    try:
        plt = pyplot()
    except ImportError:
        return None
    metric = next((m for m in (primary_metric(r) for r in results) if m), None)
    if metric is None:
        return None
    splits = list(dict.fromkeys(split for result in results for split in result.get("metrics", {})))
    has_curves = any(len(_curve(r, s, metric)[0]) >= 2 for r in results for s in splits)  # evaluated during training
    fig, axes = plt.subplots(1, 2 if has_curves else 1, figsize=(11 if has_curves else 6, 4.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    ax = axes[0][0]
    width = 0.8 / max(len(results), 1)
    for i, result in enumerate(results):
        values = [result.get("metrics", {}).get(s, {}).get(metric, float("nan")) for s in splits]
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(splits))]
        bars = ax.bar(xs, values, width, label=f"{result['run']} ({result['method']})", color=colors[i % len(colors)])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(splits)), splits)
    ax.set_ylabel(metric)
    ax.set_title(f"final {metric}")
    if metric in ("accuracy", "macro_f1"):
        ax.set_ylim(0, 1.08)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(len(results), 3), frameon=False)

    if has_curves:
        ax = axes[0][1]
        styles = ["-", "--", ":", "-."]
        for i, result in enumerate(results):
            for j, split in enumerate(splits):
                steps, values = _curve(result, split, metric)
                if steps:
                    ax.plot(steps, values, styles[j % len(styles)], marker="o", markersize=3, color=colors[i % len(colors)],
                            label=f"{result['run']} / {split}")  # fmt: skip
        ax.set_xlabel("training step")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} during training")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _curve(result: dict, split: str, metric: str):
    key = f"eval_{split}_{metric}"
    points = [(h["step"], h[key]) for h in result.get("history", []) if key in h and "step" in h]
    return [p[0] for p in points], [p[1] for p in points]


# --------------------------------------------------------------------------------------------------------------------
# Recipes with `seeds:`: means with 95% t-intervals, paired differences, sweep tables


def summarize_seeds(results: list[dict], compare=None) -> dict:
    """
    `{"runs": [...], "comparisons": [...]}` from the per-(run, seed) results: per run, the mean and 95% t-interval
    over seeds of every metric and diagnostic ([`~regtune.experiments.stats.mean_ci`]); per `compare` pair, the
    paired difference run - baseline of each metric over the seeds both have
    ([`~regtune.experiments.stats.paired_difference`]).
    """
    from .stats import mean_ci, paired_difference

    by_run: dict[str, list[dict]] = {}
    for result in results:
        by_run.setdefault(result["run"], []).append(result)
    runs = []
    for name, entries in by_run.items():
        metrics: dict[str, dict] = {}
        diagnostics: dict[str, list] = {}
        for entry in entries:
            for split, values in entry.get("metrics", {}).items():
                for metric, value in values.items():
                    metrics.setdefault(split, {}).setdefault(metric, []).append(value)
            for key, value in entry.get("diagnostics", {}).items():
                diagnostics.setdefault(key, []).append(value)
        runs.append(
            {
                "run": name,
                "method": entries[0]["method"],
                "seeds": [e["seed"] for e in entries],
                "trainable_params": entries[0]["trainable_params"],
                "train_seconds": sum(e["train_seconds"] for e in entries) / len(entries),
                "same_as": entries[0].get("same_as"),
                "metrics": {s: {m: sum(v) / len(v) for m, v in ms.items()} for s, ms in metrics.items()},
                "ci": {s: {m: mean_ci(v) for m, v in ms.items()} for s, ms in metrics.items()},
                "diagnostics": {k: mean_ci(v) for k, v in diagnostics.items()},
            }
        )
    comparisons = []
    blocks = [compare] if compare is not None and not isinstance(compare, list) else compare or []
    for block in blocks:
        baselines = [block.baseline] if isinstance(block.baseline, str) else list(block.baseline)
        for baseline in baselines:
            for name in block.runs or by_run:
                if name in baselines or baseline not in by_run or name not in by_run:
                    continue
                pair = {"run": name, "baseline": baseline, "metrics": {}}
                for metric in block.metrics:
                    split, _, key = metric.rpartition(".")
                    values = {
                        run: {e["seed"]: e["metrics"][split][key] for e in by_run[run] if key in e["metrics"].get(split, {})}
                        for run in (name, baseline)
                    }  # fmt: skip
                    pair["metrics"][metric] = paired_difference(values[name], values[baseline])
                comparisons.append(pair)
    return {"runs": runs, "comparisons": comparisons}


def markdown_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table (unpadded)."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def _values(values: dict) -> str:
    return ", ".join(f"{k.rpartition('.')[2]}={v}" for k, v in values.items())


def format_seeded_report(summary: dict, select=None) -> str:
    """The markdown report of a recipe with `seeds:`: results with diagnostics, comparisons, sweeps."""
    from .stats import format_ci

    runs = summary["runs"]
    columns: list[tuple[str, str]] = []
    for run in runs:
        for split, metrics in run["metrics"].items():
            for metric in metrics:
                if (metric != "loss" or len(metrics) == 1) and (split, metric) not in columns:
                    columns.append((split, metric))
    chosen = {name: _values(s["chosen"]) for name, s in summary.get("sweeps", {}).items() if s.get("chosen")}
    header = ["run", "method", "chosen", "seeds"] + [f"{s} {m}" for s, m in columns] + ["diagnostics", "train s"]
    rows = []
    for run in runs:
        cells = [run["run"], run["method"], chosen.get(run["run"], "-"), str(len(run["seeds"]))]
        for split, metric in columns:
            ci = run["ci"].get(split, {}).get(metric)
            cells.append("-" if ci is None else format_ci(ci, ".3f"))
        shown = {k: v for k, v in run["diagnostics"].items() if k.count("/") == 1}  # per-layer ones: in the JSON
        diags = [f"{k} {format_ci(v, '.4g')}" for k, v in sorted(shown.items())]
        cells += ["<br>".join(diags) or "-", f"{run['train_seconds']:.0f}"]
        rows.append(cells)
    lines = [
        "Mean and 95% t-interval over the seeds; diagnostics: the mean over a run's logged steps, then over seeds.",
        "",
    ]
    lines += markdown_lines(header, rows)
    if summary.get("comparisons"):
        metrics = _metric_names(summary["comparisons"])
        header = ["run", "baseline", "seeds"] + [f"Δ {m}" for m in metrics] + ["wins / ties (first Δ)"]
        rows = []
        for pair in summary["comparisons"]:
            first = next(iter(pair["metrics"].values()))
            cells = [pair["run"], pair["baseline"], str(first["n"])]
            cells += [format_ci(pair["metrics"][m]) if m in pair["metrics"] else "-" for m in metrics]
            rows.append(cells + [f"{first['wins']}/{first['n']}, {first['ties']}"])
        lines += ["", "Paired difference run − baseline over the common seeds (same shots, initialization and data "
                  "order), mean [95% t-interval]:", ""] + markdown_lines(header, rows)  # fmt: skip
    sweeps = {n: s for n, s in summary.get("sweeps", {}).items() if s.get("rows")}
    if sweeps:
        what = f"{select.metric} on {select.split}" if select is not None else "the validation metric"
        header = ["run", "values", f"mean {what}", "mean loss", "per seed", "chosen"]
        rows = []
        for name, sweep in sweeps.items():
            for row in sweep["rows"]:
                if "mean_metric" not in row:
                    continue
                mark = sweep["rule"] if row["values"] == sweep["chosen"] else ""
                per_seed = ", ".join(f"{v:.3f}" for v in row["metric"])
                rows.append([name, _values(row["values"]), f"{row['mean_metric']:.4f}", f"{row['mean_loss']:.4f}",
                             per_seed, mark])  # fmt: skip
        seeds = f" (seeds {select.seeds})" if select is not None else ""
        best = {"max": " (highest is best)", "min": " (lowest is best)"}.get(getattr(select, "mode", None), "")
        lines += ["", f"Sweeps{seeds}: each value scored by {what}{best}, no test data:", ""] + markdown_lines(
            header, rows
        )
    return "\n".join(lines)


def _metric_names(comparisons: list[dict]) -> list[str]:
    return list(dict.fromkeys(m for pair in comparisons for m in pair["metrics"]))


def plot_comparisons(comparisons: list[dict], path: str, title: str | None = None) -> str | None:
    """A PNG of the paired differences: every seed's difference (dots) and the mean with its 95% interval."""
    if not comparisons:
        return None
    metrics = _metric_names(comparisons)
    fig, ax = pyplot().subplots(figsize=(max(5.0, 1.2 * len(comparisons) * len(metrics)), 4.2))
    step = len(metrics) + 1
    labelled = set()  # each metric named once in the legend, where it is first drawn
    for i, pair in enumerate(comparisons):
        for j, metric in enumerate(metrics):
            diff = pair["metrics"].get(metric)
            if diff is None:
                continue
            x = i * step + j
            ax.scatter([x] * len(diff["diffs"]), diff["diffs"], s=12, alpha=0.5, color=f"C{j}")
            if diff["n"] >= 2:
                err = [[diff["mean"] - diff["lo"]], [diff["hi"] - diff["mean"]]]
                ax.errorbar([x + 0.25], [diff["mean"]], yerr=err, fmt="o", color=f"C{j}", capsize=3,
                            label=None if metric in labelled else f"Δ {metric}")  # fmt: skip
                labelled.add(metric)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks([i * step + (len(metrics) - 1) / 2 for i in range(len(comparisons))],
                  [f"{p['run']}\n− {p['baseline']}" for p in comparisons], fontsize=8)  # fmt: skip
    ax.set_ylabel("paired difference")
    ax.set_title((title + ": " if title else "") + "per seed, mean and 95% t-interval")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
