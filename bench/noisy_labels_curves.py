"""Plot the memorization curves of the noisy-label evidence (the ELR paper's first figure, per method).

    python bench/noisy_labels_curves.py bench/results/evidence/noisy_labels [more result folders ...]
    python bench/noisy_labels_curves.py --vs_noise docs/img/noisy_labels_vs_noise.png \
        bench/results/evidence/noisy_labels_sym20 bench/results/evidence/noisy_labels

For each result folder written by `regtune run recipes/evidence/noisy_labels*.yaml`, reads every
`<run>/seed-<seed>/metrics.json` and draws, per run, the seed-mean over training of `noisy_labels/memorized` (the
fraction of mislabeled training examples predicted as their given wrong label) and `noisy_labels/true_label`
(predicted as their true label), from the NoisyLabelMonitor's logged values. Writes `<folder>/memorization.png` and
`<folder>/memorization.json` (the curves). With `--vs_noise PNG`, also plots each run's test accuracy (mean and 95%
interval over the seeds, from `<folder>/results.json`) against the folders' noise rates (read from their recipes).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np


KEYS = ("noisy_labels/memorized", "noisy_labels/true_label")


def curves(folder: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*", "seed-*", "metrics.json"))):
        run = os.path.basename(os.path.dirname(os.path.dirname(path)))
        with open(path) as f:
            history = [h for h in json.load(f)["history"] if KEYS[0] in h]
        entry = out.setdefault(run, {"epoch": [h["epoch"] for h in history], **{k: [] for k in KEYS}})
        for key in KEYS:
            entry[key].append([h[key] for h in history])
    for entry in out.values():
        for key in KEYS:
            n = min(len(c) for c in entry[key])
            entry[key] = np.mean([c[:n] for c in entry[key]], axis=0).round(4).tolist()
        entry["epoch"] = entry["epoch"][: len(entry[KEYS[0]])]
    return out


def plot(data: dict[str, dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, label in zip(axes, KEYS, ("predicted as the given (wrong) label", "predicted as the true label")):
        for run, entry in data.items():
            ax.plot(entry["epoch"], entry[key], label=run)
        ax.set_title(f"mislabeled training examples {label}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction (training forward passes, seed mean)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vs_noise(folders: list[str], path: str) -> None:
    import matplotlib
    import yaml

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, list[tuple[float, float, float, float]]] = {}
    for folder in folders:
        with open(os.path.join(folder, "recipe.yaml")) as f:
            options = yaml.safe_load(f)["data"]["options"]
        with open(os.path.join(folder, "results.json")) as f:
            runs = json.load(f)["runs"]
        for run in runs:
            ci = run["ci"]["test"]["accuracy"]
            points.setdefault(run["run"], []).append((options["noise_rate"], ci["mean"], ci["lo"], ci["hi"]))
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for run, values in points.items():
        values.sort()
        x, mean, lo, hi = (np.array(v) for v in zip(*values))
        ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3, label=run)
    ax.set_xlabel("symmetric noise rate (training and validation labels)")
    ax.set_ylabel("clean test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--vs_noise", help="also plot test accuracy against the folders' noise rates into this PNG")
    parsed = parser.parse_args()
    if parsed.vs_noise:
        plot_vs_noise(parsed.folders, parsed.vs_noise)
        print(parsed.vs_noise)
    for folder in parsed.folders:
        data = curves(folder)
        with open(os.path.join(folder, "memorization.json"), "w") as f:
            json.dump(data, f, indent=1)
        plot(data, os.path.join(folder, "memorization.png"), os.path.basename(os.path.normpath(folder)))
        print(os.path.join(folder, "memorization.png"))


if __name__ == "__main__":
    main()
