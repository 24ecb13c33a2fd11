"""`regtune study gardo RECIPE.yaml`: the testbed recipe runs tiny through the CLI; invalid recipes name the key."""

from __future__ import annotations

import json
import os

import pytest
import torch

from regtune.cli import main


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
    }
    return [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]


def test_gardo_recipe_runs_through_the_cli(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "gardo", RECIPE, "--output_dir", str(out), *_tiny(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| gardo |" in printed and "| no_kl |" in printed and "| kl_all |" in printed
    with open(out / "results.json") as f:
        results = {"methods": {r["method"]: r for r in json.load(f)["results"]}}  # the one results format
    assert set(results["methods"]) == {"no_kl", "kl_all", "gardo"}
    for method, res in results["methods"].items():
        assert res["final"]["eval_class_prob"]["n"] == 1
        assert len(res["curves"]["0"]) == 3  # epochs 0, 1, 2
        assert (out / method / "seed0" / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (out / "curves.png").exists() and (out / "testbed.json").exists()
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
        ("epochs=3", "epochs: unknown key for a GARDO recipe. (allowed: description, methods, name"),
        (
            "methods.gardo.gate_init=0.5",
            "methods.gardo.gate_init: GARDOConfig rejected these values: Invalid GARDOConfig",
        ),
    ],
)
def test_invalid_recipe_names_the_key(tmp_path, capsys, override, expected):
    assert main(["study", "gardo", RECIPE, "--output_dir", str(tmp_path), "--set", override]) == 2
    assert expected in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing ran
