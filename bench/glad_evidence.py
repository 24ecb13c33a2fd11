"""GLAD evidence (v2): paired-seed base-to-novel test of GLAD against LoRA on TREC, through the shipped trainers.

The claim tested: GLAD (LoRA plus the SAM-referenced gradient, `regtune.GLADTrainer`) keeps novel-class accuracy
better than plain LoRA (`regtune.RegTrainer` + peft LoRA). The test bed is [`bench.base_to_novel`]'s (the
all-MiniLM-L6-v2 dual encoder, class descriptions as the classifier, TREC base ABBR/ENTY/DESC, novel HUM/LOC/NUM),
and every run goes through its loaders and its `train` (the shipped trainers, their logged diagnostics).

Protocol:

1. **lr on a validation split, for both methods.** Each lr of `--lora-lrs` (LoRA) and `--glad-lrs` (GLAD) is trained
   on the k shots of each `--val-seeds` seed and scored on `--n-val` held-out pool examples per *base* class (no
   test data, no novel class). Best = highest mean validation accuracy, ties to the lower validation CE.
2. **Controls.** (a) `lora`: LoRA at its own validation-best lr; (b) `lora-same-lr`: LoRA at GLAD's lr (when it
   differs from (a)); (c) `lora-matched`: LoRA at the lr of the LoRA grid below (a)'s whose validation accuracy is
   closest to GLAD's: a LoRA that fits the base classes about as much as GLAD does, so that a novel gain is not just
   fitting less.
3. **Paired seeds.** For each test seed, every configuration gets the same k shots, the same initialization
   (`torch.manual_seed(seed)` before the adapter is built) and the same batch order (`TrainingArguments.seed`);
   GLAD's second pass replays the first pass's random state (shared dropout masks) and restores it, so its run draws
   what LoRA's draws. Reported: the paired difference GLAD - control of novel, base and H accuracy, mean and 95%
   t-interval over seeds, next to GLAD's diagnostics `glad/cos_g_gsam` and `glad/rel_diff` (means over the logged
   steps).

Each (configuration, seed) result is its own JSON file under `--runs-dir`; existing files are skipped, so a killed
run resumes where it stopped. Usage (from the repository root):

    OMP_NUM_THREADS=1 python -m bench.glad_evidence --seeds $(seq 0 19)      # 20 steps, batch 8: glad_evidence.*
    OMP_NUM_THREADS=1 python -m bench.glad_evidence --seeds $(seq 0 19) --steps 50 --batch-size 16 \
        --out bench/results/glad_evidence_50steps                              # the base-to-novel docs' protocol
    python -m bench.glad_evidence --seeds $(seq 0 19) --report-only          # the report from the files on disk

Several processes with disjoint `--seeds` can share one `--runs-dir` (they reuse the validation files). Writes
`--out`.{json,md,png} (default bench/results/glad_evidence).

The recipe `recipes/evidence/glad.yaml` runs the same protocol through the experiment engine (`regtune run`), with
the dual encoder and the base-to-novel task built into regtune; this script produced the 20-seed figures of
docs/glad.md "Evidence (v2)" before the bench used regtune's sampler (then, a seed's validation examples were
drawn jointly with its shots; now, as in the recipe, after them: the test shots are the same, the validation sets
are not).
"""

from __future__ import annotations

import os


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import base_to_novel as b2n  # noqa: E402
from bench._common import machine_description, quiet_transformers  # noqa: E402
from bench.results import write_results  # noqa: E402
from regtune.experiments.io import write_atomic  # noqa: E402
from regtune.experiments.stats import mean_ci  # noqa: E402


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GLAD_DIAGNOSTICS = ("glad/cos_g_gsam", "glad/rel_diff")


# -------------------------------------------------------------------------------------------------------- runs
def _method_name(glad_lambda: float, rho: float) -> str:
    name = f"glad-l{glad_lambda}-r{rho}"
    if name not in b2n.METHODS:
        b2n.register_method(name, default_lr=3e-3)(b2n._glad_builder(glad_lambda, rho))
    return name


def _load(path: str) -> dict | None:
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None


def val_run(method: str, ds, lr: float, seed: int, args, path: str) -> dict:
    """Train `method` at `lr` on the k shots of `seed`; score on n_val base-class pool examples per class."""
    done = _load(path)
    if done is not None:
        return done
    t0 = time.perf_counter()
    base, _ = ds.split
    setup, cfg, _ = b2n.build_method(method, ds, base, lr=lr, steps=args.steps, batch_size=args.batch_size, seed=seed)
    train_set, val = b2n.sample_kshot(ds, base, args.k, seed, n_val=args.n_val)
    with tempfile.TemporaryDirectory() as tmp:
        trained = b2n.train(setup, train_set, cfg, tmp)
    v_emb = b2n.embed_all(setup.model, [t for t, _ in val])
    c_emb = b2n.embed_all(setup.model, [ds.descriptions[c] for c in base])
    v_y = [y for _, y in val]
    res = {
        "method": method,
        "lr": lr,
        "seed": seed,
        "val_acc": b2n._acc(v_emb, c_emb, v_y, range(len(base)))[0],
        "val_ce": F.cross_entropy(b2n.cosine_logits(v_emb, c_emb), torch.tensor(v_y)).item(),
        "final_train_loss": trained["losses"][-1] if trained["losses"] else None,
        "diagnostics": trained["diagnostics"],
        "wall_s": time.perf_counter() - t0,
    }
    write_atomic(path, res)
    print(f"  val {method} lr={lr:g} seed {seed}: acc {res['val_acc']:.3f} ce {res['val_ce']:.3f} "
          f"{_diag_text(res)} ({res['wall_s']:.0f} s)", flush=True)  # fmt: skip
    return res


def test_run(method: str, ds, lr: float, seed: int, args, path: str) -> dict:
    done = _load(path)
    if done is not None:
        return done
    t0 = time.perf_counter()
    res = b2n.run_one(method, ds, k=args.k, seed=seed, steps=args.steps, batch_size=args.batch_size, lr=lr)
    res.update(method=method, wall_s=time.perf_counter() - t0)
    write_atomic(path, res)
    print(f"  test {method} lr={lr:g} seed {seed}: base {res['base']:.3f} novel {res['novel']:.3f} H {res['H']:.3f} "
          f"{_diag_text(res)} ({res['wall_s']:.0f} s)", flush=True)  # fmt: skip
    return res


def _diag_text(res: dict) -> str:
    d = res.get("diagnostics", {})
    return " ".join(f"{k.split('/')[-1]} {d[k]:.3f}" for k in GLAD_DIAGNOSTICS if k in d)


def choose_lrs(val: dict[tuple[str, float], list[dict]], lora: str, glad: str) -> dict:
    """Best lr per method (mean val acc, ties to the lower mean val CE) and the base-matched LoRA lr."""

    def score(method):
        rows = {
            lr: (statistics.fmean(r["val_acc"] for r in runs), statistics.fmean(r["val_ce"] for r in runs))
            for (m, lr), runs in val.items()
            if m == method
        }
        return rows, max(rows, key=lambda lr: (round(rows[lr][0], 6), -rows[lr][1]))

    lora_rows, lora_lr = score(lora)
    glad_rows, glad_lr = score(glad)
    target = glad_rows[glad_lr][0]
    lower = [lr for lr in lora_rows if lr < lora_lr]
    matched = min(lower, key=lambda lr: (abs(lora_rows[lr][0] - target), -lr)) if lower else None
    return {
        "lora_lr": lora_lr,
        "glad_lr": glad_lr,
        "matched_lr": matched,
        "val_lora": lora_rows,
        "val_glad": glad_rows,
        "glad_val_acc": target,
    }


# ----------------------------------------------------------------------------------------------------- report
def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences ([`regtune.experiments.stats.mean_ci`])."""
    summary = mean_ci(diffs)
    return summary["mean"], summary["lo"], summary["hi"]


def summarize(configs: dict[str, dict], runs: dict[str, dict[int, dict]], seeds: list[int]) -> dict:
    rows, pairs = [], []
    for name, cfg in configs.items():
        got = runs.get(name, {})
        done = [s for s in seeds if s in got]
        row = {"config": name, "method": cfg["method"], "lr": cfg["lr"], "seeds": done}
        for key in ("base", "novel", "H", "all"):
            vals = [got[s][key] for s in done]
            row[key] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else None
        for key in GLAD_DIAGNOSTICS:
            vals = [got[s]["diagnostics"][key] for s in done if key in got[s].get("diagnostics", {})]
            if vals:
                row[key] = (statistics.fmean(vals), min(vals), max(vals))
        row["train_s"] = statistics.fmean(got[s]["train_s"] for s in done) if done else None
        rows.append(row)
    treatments = [name for name in configs if name.startswith("glad")]
    for treatment in treatments:
        glad = runs.get(treatment, {})
        for name in configs:
            if name in treatments or (name == "lora-same-lr" and treatment != "glad"):
                continue  # lora-same-lr is LoRA at the lr of `glad`, not of the other GLAD configurations
            common = [s for s in seeds if s in glad and s in runs.get(name, {})]
            pair = {"treatment": treatment, "control": name, "seeds": common}
            for key in ("novel", "base", "H"):
                diffs = [glad[s][key] - runs[name][s][key] for s in common]
                pair[key] = {"diffs": diffs, "mean_ci": t_interval(diffs) if diffs else None,
                             "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs)}  # fmt: skip
            pairs.append(pair)
    return {"rows": rows, "pairs": pairs}


def markdown(result: dict) -> str:
    cfg = result["config"]
    ch = result["choice"]
    out = [
        f"GLAD evidence, TREC base-to-novel (base ABBR/ENTY/DESC, novel HUM/LOC/NUM), all-MiniLM-L6-v2 dual encoder, "
        f"k={cfg['k']} shots per base class, {cfg['steps']} steps, batch {cfg['batch_size']}, GLAD lambda "
        f"{cfg['glad_lambda']}, rho {cfg['rho']} (shared dropout masks), LoRA r 8 / alpha 16 / dropout 0.1 on "
        f"query/key/value, AdamW, cosine to 0.",
        "",
        f"Validation (seeds {cfg['val_seeds']}, {cfg['n_val']} base-class pool examples per class; no test or novel "
        "data): mean val accuracy / CE per lr.",
        "",
        "| method | lr | val acc | val CE |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, key, best in (("LoRA", "val_lora", ch["lora_lr"]), ("GLAD", "val_glad", ch["glad_lr"])):
        for lr, (acc, ce) in sorted(ch[key].items(), key=lambda kv: float(kv[0])):
            star = " (best)" if float(lr) == best else ""
            out.append(f"| {label} | {float(lr):g}{star} | {acc:.3f} | {ce:.3f} |")
    matched = "none (no LoRA lr below the best)" if ch["matched_lr"] is None else f"{ch['matched_lr']:g}"
    out += [
        "",
        f"Chosen: LoRA lr {ch['lora_lr']:g}, GLAD lr {ch['glad_lr']:g}; base-matched LoRA control lr {matched} "
        f"(the lower LoRA lr whose val accuracy is closest to GLAD's {ch['glad_val_acc']:.3f}).",
        "",
        "Test accuracy (mean ± sample std over seeds) and GLAD's diagnostics (mean over steps; mean [min-max] over "
        "seeds):",
        "",
        "| config | lr | seeds | base | novel | H | all (6-way) | cos(g, g_sam) | ‖g_sam − g‖/‖g‖ | train s |",
        "| --- | ---: | ---: | --- | --- | --- | --- | --- | --- | ---: |",
    ]
    for r in result["summary"]["rows"]:
        if not r["seeds"]:
            continue
        cells = [f"{r[k][0]:.3f} ± {r[k][1]:.3f}" for k in ("base", "novel", "H", "all")]
        diags = [f"{r[k][0]:.3f} [{r[k][1]:.3f}-{r[k][2]:.3f}]" if k in r else "–" for k in GLAD_DIAGNOSTICS]
        out.append(f"| {r['config']} | {r['lr']:g} | {len(r['seeds'])} | " + " | ".join(cells + diags)
                   + f" | {r['train_s']:.0f} |")  # fmt: skip
    out += [
        "",
        "Paired difference GLAD − control (same shots, init and batch order), mean [95% t-interval]; wins = seeds "
        "where GLAD is higher:",
        "",
        "| GLAD config | control | seeds | Δ novel | Δ base | Δ H | novel wins / ties |",
        "| --- | --- | ---: | --- | --- | --- | ---: |",
    ]
    for p in result["summary"]["pairs"]:
        if not p["seeds"]:
            continue
        cells = []
        for key in ("novel", "base", "H"):
            m, lo, hi = p[key]["mean_ci"]
            cells.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        n = len(p["seeds"])
        out.append(f"| {p['treatment']} | {p['control']} | {n} | " + " | ".join(cells)
                   + f" | {p['novel']['wins']}/{n}, {p['novel']['ties']} |")  # fmt: skip
    out += ["", f"Wall time of this invocation {result['wall_s']:.0f} s; {result['machine']['date']}."]
    return "\n".join(out) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [p for p in result["summary"]["pairs"] if p["seeds"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    for i, p in enumerate(pairs):
        for j, key in enumerate(("novel", "base", "H")):
            x = i * 4 + j
            ax.scatter([x] * len(p[key]["diffs"]), p[key]["diffs"], s=12, alpha=0.5, color=f"C{j}")
            m, lo, hi = p[key]["mean_ci"]
            ax.errorbar([x + 0.25], [m], yerr=[[m - lo], [hi - m]], fmt="o", color=f"C{j}", capsize=3,
                        label=f"Δ {key}" if i == 0 else None)  # fmt: skip
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(
        [i * 4 + 1 for i in range(len(pairs))], [f"{p['treatment']}\n− {p['control']}" for p in pairs], fontsize=7
    )
    ax.set_ylabel("paired difference (accuracy)")
    ax.set_title("per seed, mean and 95% t-interval")
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, r in enumerate(r for r in result["summary"]["rows"] if r["seeds"]):
        ax.errorbar([r["base"][0]], [r["novel"][0]], xerr=[r["base"][1]], yerr=[r["novel"][1]], fmt="o",
                    color=f"C{i}", capsize=3, label=f"{r['config']} (lr {r['lr']:g})")  # fmt: skip
    ax.set_xlabel("base accuracy")
    ax.set_ylabel("novel accuracy")
    ax.set_title("mean ± std over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--glad-lambda", type=float, default=0.5)
    p.add_argument("--rho", type=float, default=0.2)
    p.add_argument("--lora-lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--glad-lrs", nargs="+", type=float, default=[3e-3, 1e-2])
    p.add_argument("--val-seeds", nargs="+", type=int, default=[100])
    p.add_argument("--n-val", type=int, default=48, help="validation examples per base class (from the pool)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(20)))
    p.add_argument(
        "--controls",
        nargs="+",
        default=["lora", "lora-matched", "lora-same-lr", "glad-lora-lr"],
        help="extra configurations; glad-lora-lr: GLAD at LoRA's lr",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs-dir", default=os.path.join(RESULTS, "glad_evidence_runs"))
    p.add_argument("--out", default=os.path.join(RESULTS, "glad_evidence"), help="output stem")
    p.add_argument("--report-only", action="store_true", help="no training: report the runs already on disk")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    start = time.time()
    os.makedirs(args.runs_dir, exist_ok=True)
    ds = b2n.load_dataset("trec")
    glad = _method_name(args.glad_lambda, args.rho)
    tag = f"k{args.k}_st{args.steps}_b{args.batch_size}"

    def fname(kind, method, lr, seed):
        return os.path.join(args.runs_dir, f"{kind}_{tag}_{method}_lr{lr:g}_s{seed}.json")

    def get(kind, method, lr, seed, fn):
        path = fname(kind, method, lr, seed)
        return _load(path) if args.report_only else fn(method, ds, lr, seed, args, path)

    val: dict[tuple[str, float], list[dict]] = {}
    for method, lrs in (("lora", args.lora_lrs), (glad, args.glad_lrs)):
        for lr in lrs:
            for seed in args.val_seeds:
                res = get("val", method, lr, seed, val_run)
                if res is not None:
                    val.setdefault((method, lr), []).append(res)
    choice = choose_lrs(val, "lora", glad)
    chosen = {k: v for k, v in choice.items() if k.endswith("_lr")}
    print(f"chosen: {chosen}", flush=True)
    configs = {"glad": {"method": glad, "lr": choice["glad_lr"]}}
    if "lora" in args.controls:
        configs["lora"] = {"method": "lora", "lr": choice["lora_lr"]}
    if "lora-same-lr" in args.controls and choice["glad_lr"] != choice["lora_lr"]:
        configs["lora-same-lr"] = {"method": "lora", "lr": choice["glad_lr"]}
    if "glad-lora-lr" in args.controls and choice["glad_lr"] != choice["lora_lr"]:
        configs["glad-lora-lr"] = {"method": glad, "lr": choice["lora_lr"]}
    if "lora-matched" in args.controls and choice["matched_lr"] is not None:
        configs["lora-matched"] = {"method": "lora", "lr": choice["matched_lr"]}
    runs: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:  # seed-major: a cut-short run still has complete pairs
        for name, cfg in configs.items():
            res = get("test", cfg["method"], cfg["lr"], seed, test_run)
            if res is not None:
                runs.setdefault(name, {})[seed] = res
    result = {
        "bench": "glad_evidence",
        "config": {k: v for k, v in vars(args).items() if k not in ("runs_dir", "out", "report_only")},
        "machine": machine_description("cpu"),
        "choice": {
            k: {str(lr): v for lr, v in rows.items()} if isinstance(rows, dict) else rows for k, rows in choice.items()
        },  # fmt: skip
        "configs": configs,
        "summary": summarize(configs, runs, args.seeds),
        "runs": {name: {str(s): r for s, r in got.items()} for name, got in runs.items()},
    }
    result["wall_s"] = time.time() - start
    write_results(args.out, result, markdown(result), plot)
    return result


if __name__ == "__main__":
    main()
