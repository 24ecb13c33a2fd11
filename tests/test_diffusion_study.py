"""`regtune study gardo RECIPE.yaml`: the testbed recipe runs tiny through the CLI; invalid recipes name the key."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusion_tiny import fresh_accelerate_state  # noqa: F401 (a fixture)

from regtune.cli import main
from regtune.experiments.gardo import load_gardo_study, matched_proxy, matched_table, value_at_proxy


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "gardo_testbed.yaml")


def _tiny(tmp_path) -> list[str]:
    sets = {
        "seeds": "[0]",
        "testbed.pretrain_steps": "3",
        "testbed.classifier_steps": "3",
        "testbed.width": "4",
        "testbed.cache_dir": str(tmp_path / "cache"),
        "training.num_epochs": "2",
        "training.num_generations": "4",
        "training.num_inference_steps": "3",
        "training.eval_every": "1",
        "training.eval_generations": "2",
        "sweep.kl_all.beta": "[0.04, 0.4]",
        "matched_proxy.baseline": "kl_all",
        "matched_proxy.proxy_gains": "[0.0]",
    }
    return [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]


def test_gardo_recipe_runs_through_the_cli(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "gardo", RECIPE, "--output_dir", str(out), *_tiny(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| gardo |" in printed and "| no_kl |" in printed and "| kl_all_beta0.4 |" in printed
    assert "## The mechanism's diagnostics" in printed and "## At matched proxy reward" in printed
    assert "[regtune] progress: 4/4 trainings, elapsed " in printed  # 4 methods x 1 seed, with an ETA
    with open(out / "results.json") as f:
        data = json.load(f)  # the one results format
    results = {"methods": {r["method"]: r for r in data["results"]}}
    assert set(results["methods"]) == {"no_kl", "kl_all_beta0.04", "kl_all_beta0.4", "gardo"}  # the sweep expanded
    assert results["methods"]["kl_all_beta0.4"]["family"] == "kl_all"
    for method, res in results["methods"].items():
        assert res["final"]["eval_class_prob"]["n"] == 1
        assert len(res["curves"]["0"]) == 3  # epochs 0, 1, 2
        assert (out / method / "seed0" / "lora" / "pytorch_lora_weights.safetensors").exists()
        assert set(res["diagnostics"]) == {"clip_fraction", "gated_fraction", "kl", "kl_micro_step", "approx_kl"}
    with open(out / "kl_all_beta0.4" / "seed0" / "metrics.jsonl") as f:
        kls = [json.loads(line).get("kl") for line in f][1:]
    assert results["methods"]["kl_all_beta0.4"]["diagnostics"]["kl"]["mean"] == pytest.approx(sum(kls) / len(kls))
    # at a proxy gain of 0 every family's value is its pretrained value: the paired differences are exactly 0
    level = data["matched_proxy"]["levels"][0]
    assert set(level["families"]) == {"no_kl", "kl_all", "gardo"}
    assert level["vs_baseline"]["gardo"]["eval_class_prob"]["diffs"] == [0.0]
    assert (out / "curves.png").exists() and (out / "tradeoff.png").exists() and (out / "testbed.json").exists()
    assert len(os.listdir(tmp_path / "cache")) == 1  # the pretrained testbed is cached once and reused
    # GARDO gates some samples; the baselines have no reference adapter
    ckpt = torch.load(out / "gardo" / "seed0" / "checkpoint.pt", weights_only=True)
    assert any(".ref." in k for k in ckpt["adapters"])
    assert not any(
        ".ref." in k for k in torch.load(out / "no_kl" / "seed0" / "checkpoint.pt", weights_only=True)["adapters"]
    )
    assert results["methods"]["gardo"]["mean_gated_fraction"] > 0
    # a second call resumes: nothing is retrained, the report is rewritten
    mtime = os.path.getmtime(out / "gardo" / "seed0" / "checkpoint.pt")
    assert main(["study", "gardo", RECIPE, "--output_dir", str(out), "--only", "gardo", *_tiny(tmp_path)]) == 0
    with open(out / "gardo" / "seed0" / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2]
    assert os.path.getmtime(out / "gardo" / "seed0" / "checkpoint.pt") >= mtime


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.betta=1", "training.betta: unknown key for GARDOConfig. Did you mean 'beta'?"),
        ("methods.gardo.kl_mode=some", "methods.gardo.kl_mode: expected one of 'gated', 'all', 'none', got 'some'"),
        ("training.output_dir=x", "training.output_dir: set per run by the study"),
        ("testbed.width=2", "testbed.width: must be >= 4"),
        ("epochs=3", "epochs: unknown key for a GARDO recipe. (allowed: description, matched_proxy, methods, name"),
        (
            "methods.gardo.gate_init=0.5",
            "methods.gardo.gate_init: GARDOConfig rejected these values: Invalid GARDOConfig",
        ),
        ("sweep.nokl.beta=[1]", "sweep.nokl: not a method of the recipe. Did you mean 'no_kl'?"),
        ("sweep.kl_all.betta=[1]", "sweep.kl_all.betta: unknown key for GARDOConfig. Did you mean 'beta'?"),
        ("sweep.kl_all.beta=[0.1, -1]", "sweep.kl_all.beta: must be >= 0"),
        ("sweep.kl_all.seed=[1, 2]", "sweep.kl_all.seed: set per run by the study"),
        (
            "matched_proxy={baseline: klall, proxy_gains: [0.01]}",
            "matched_proxy.baseline: not a method of the recipe. Did you mean 'kl_all'?",
        ),
        ("matched_proxy={baseline: kl_all}", "matched_proxy.proxy_gains"),
    ],
)
def test_invalid_recipe_names_the_key(tmp_path, capsys, override, expected):
    assert main(["study", "gardo", RECIPE, "--output_dir", str(tmp_path), "--set", override]) == 2
    assert expected in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing ran


def test_value_at_proxy_interpolates_at_the_first_crossing():
    curve = [
        {"epoch": 0, "eval_proxy_reward": -0.8, "eval_class_prob": 0.5},
        {"epoch": 5, "eval_proxy_reward": -0.78, "eval_class_prob": 0.4},
        {"epoch": 10, "eval_proxy_reward": -0.74, "eval_class_prob": 0.3},
        {"epoch": 15, "eval_proxy_reward": -0.77, "eval_class_prob": 0.1},  # crosses -0.75 again: ignored
        {"epoch": 20, "eval_proxy_reward": -0.70, "eval_class_prob": 0.0},
    ]
    # -0.75 lies 3/4 of the way from -0.78 to -0.74: 0.4 + 0.75 * (0.3 - 0.4)
    assert value_at_proxy(curve, "eval_class_prob", -0.75) == pytest.approx(0.325)
    assert value_at_proxy(curve, "eval_class_prob", -0.81) == 0.5  # already reached at the start
    assert value_at_proxy(curve, "eval_class_prob", -0.6) is None  # never reached


def _run(family, method, per_seed):
    """A results entry with a two-point curve per seed: pretrained (proxy -0.8, metric 0.5), then (proxy, metric)."""
    curves = {
        str(s): [
            {"epoch": 0, "eval_proxy_reward": -0.8, "eval_class_prob": 0.5, "eval_diversity_l2": 5.0,
             "eval_diversity_feat": 0.3},
            {"epoch": 10, "eval_proxy_reward": proxy, "eval_class_prob": metric, "eval_diversity_l2": 4.0,
             "eval_diversity_feat": 0.2},
        ]
        for s, (proxy, metric) in per_seed.items()
    }  # fmt: skip
    return {"run": method, "method": method, "family": family, "curves": curves}


def test_matched_proxy_takes_each_familys_best_run_and_pairs_over_seeds():
    study = load_gardo_study(
        {
            "seeds": [0, 1, 2],
            "methods": {"kl_all": {"kl_mode": "all"}, "gardo": {"kl_mode": "gated"}},
            "sweep": {"kl_all": {"beta": [0.1, 1.0]}},
            "matched_proxy": {"baseline": "kl_all", "proxy_gains": [0.04]},
        }
    )
    assert list(study.methods) == ["kl_all_beta0.1", "kl_all_beta1", "gardo"]
    assert study.families == {"kl_all": ["kl_all_beta0.1", "kl_all_beta1"], "gardo": ["gardo"]}
    assert study.config("kl_all_beta1", 2).beta == 1.0 and study.config("kl_all_beta1", 2).seed == 2
    results = [
        # target proxy -0.76: a run ending at -0.72 is halfway there, one ending at -0.76 reaches it at its end
        _run("kl_all", "kl_all_beta0.1", {0: (-0.72, 0.1), 1: (-0.72, 0.3), 2: (-0.72, 0.3)}),  # 0.3, 0.4, 0.4
        _run("kl_all", "kl_all_beta1", {0: (-0.76, 0.35), 1: (-0.79, 0.5), 2: (-0.76, 0.2)}),  # 0.35, -, 0.2
        _run("gardo", "gardo", {0: (-0.76, 0.45), 1: (-0.72, 0.7), 2: (-0.77, 0.5)}),  # 0.45, 0.6, -
    ]
    level = matched_proxy(study, results)["levels"][0]
    base = level["families"]["kl_all"]["eval_class_prob"]
    assert base["per_seed"] == pytest.approx({"0": 0.35, "1": 0.4, "2": 0.4})  # the better of the two betas
    assert base["mean"] == pytest.approx((0.35 + 0.4 + 0.4) / 3) and base["n"] == 3
    diff = level["vs_baseline"]["gardo"]["eval_class_prob"]
    assert diff["seeds"] == ["0", "1"]  # gardo does not reach the gain in seed 2
    assert diff["diffs"] == pytest.approx([0.45 - 0.35, 0.6 - 0.4]) and diff["wins"] == 2
    assert diff["mean"] == pytest.approx(0.15) and diff["lo"] < 0.15 < diff["hi"]
    # the table prints the pairs and marks the baseline
    table = matched_table(matched_proxy(study, results))
    assert "| +0.040 | gardo | 2 | 0.525" in table and "(2/2)" in table and "| kl_all | 3 |" in table
