"""Exported adapters load and compute the same outputs in a process that never imports regtune."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_bert, tiny_llama

import regtune
from regtune.cli import main as cli_main
from regtune.export import lora_config_dict


IDS = torch.tensor([[5, 17, 42, 9, 63, 8, 21, 77]])

# Runs in a fresh interpreter: loads each exported folder with peft (or transformers alone for merged models) and
# writes its logits; fails if anything imported regtune.
LOADER = r"""
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

jobs = json.load(open(sys.argv[1]))
auto = {"causal": AutoModelForCausalLM, "cls": AutoModelForSequenceClassification}
ids = torch.tensor(jobs["ids"])
out = {}
for job in jobs["jobs"]:
    cls = auto[job["kind"]]
    if job["adapter"] is None:  # a merged model: transformers alone
        model = cls.from_pretrained(job["model"])
    else:
        with open(job["adapter"] + "/adapter_config.json") as f:
            assert json.load(f)["peft_type"] == "LORA"
        model = PeftModel.from_pretrained(cls.from_pretrained(job["model"]), job["adapter"])
    with torch.no_grad():
        out[job["name"]] = model.eval()(input_ids=ids).logits.tolist()
assert not any(name == "regtune" or name.startswith("regtune.") for name in sys.modules), "regtune was imported"
json.dump(out, open(sys.argv[2], "w"))
"""


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def _load_without_regtune(tmp_path, jobs: list[dict]) -> dict[str, torch.Tensor]:
    (tmp_path / "jobs.json").write_text(json.dumps({"ids": IDS.tolist(), "jobs": jobs}))
    (tmp_path / "loader.py").write_text(LOADER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, str(tmp_path / "loader.py"), str(tmp_path / "jobs.json"), str(tmp_path / "out.json")],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    return {name: torch.tensor(value) for name, value in json.loads((tmp_path / "out.json").read_text()).items()}


def _randomize_lora(model) -> None:
    """Give every LoRA factor random values, as after training (B = 0 at init would hide a scaling error)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def test_glad_allora_and_mask_tuning_load_without_regtune(tmp_path):
    llama, bert = tiny_llama(), tiny_bert()
    llama.save_pretrained(tmp_path / "llama")
    bert.save_pretrained(tmp_path / "bert")
    cases = {
        "glad": (tiny_llama, "causal", regtune.GLADConfig(r=4, lora_alpha=16, target_modules="all-linear")),
        "allora": (tiny_llama, "causal", regtune.ALLoRAConfig(r=4, eta=3.0, target_modules="all-linear")),
        "glad_cls": (  # a classifier: the trained head (modules_to_save) travels with the adapter
            tiny_bert,
            "cls",
            regtune.GLADConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
        ),
    }
    expected, jobs = {}, []
    for name, (build, kind, config) in cases.items():
        model = get_peft_model(build(), config)
        _randomize_lora(model)
        if kind == "cls":
            with torch.no_grad():
                model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
        expected[name] = _logits(model)
        written = regtune.export_as_lora(model, str(tmp_path / name))
        assert written == [str(tmp_path / name)]
        base = "llama" if kind == "causal" else "bert"
        jobs.append({"name": name, "kind": kind, "model": str(tmp_path / base), "adapter": str(tmp_path / name)})
    masked = get_peft_model(tiny_llama(), regtune.MaskTuningConfig(init_weights=False))
    expected["mask_tuning"] = _logits(masked)
    assert not torch.equal(expected["mask_tuning"], _logits(llama)), "random masks must change the outputs"
    regtune.export_merged(masked, str(tmp_path / "mask_merged"))
    assert torch.equal(_logits(masked), expected["mask_tuning"]), "export_merged must leave the peft model intact"
    jobs.append({"name": "mask_tuning", "kind": "causal", "model": str(tmp_path / "mask_merged"), "adapter": None})

    loaded = _load_without_regtune(tmp_path, jobs)
    for name, logits in expected.items():
        difference = (loaded[name] - logits).abs().max().item()
        print(f"{name}: max |logit difference| {difference:.2e}")
        assert difference <= 1e-5, f"{name}: exported outputs differ by {difference}"
    assert not torch.allclose(loaded["allora"], _logits(llama), atol=1e-3), "the ALLoRA update must be non-trivial"
    config = json.loads((tmp_path / "allora" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 4, 0.0)
    provenance = json.loads((tmp_path / "allora" / "regtune_export.json").read_text())
    assert provenance["exported_from"] == "ALLORA" and provenance["training_settings"]["eta"] == 3.0


def test_lora_config_dict_keeps_scaling_and_refuses_masks():
    glad = regtune.GLADConfig(r=8, lora_alpha=32, rho=0.1).to_dict()
    lora, dropped = lora_config_dict(json.loads(json.dumps(glad, default=str)))
    assert lora["peft_type"] == "LORA" and lora["lora_alpha"] == 32 and lora["r"] == 8
    assert set(dropped) == {"rho", "glad_lambda", "share_dropout_masks"}
    with pytest.raises(ValueError, match=r"`peft_type` = 'MASK_TUNING'.*export_merged"):
        lora_config_dict({"peft_type": "MASK_TUNING"})
    with pytest.raises(ValueError, match=r"allowed: LORA, GLAD, ALLORA"):
        lora_config_dict({"peft_type": "IA3"})


def test_cli_exports_every_seed_of_a_run_and_refuses_masks_in_one_line(tmp_path, capsys):
    llama = tiny_llama()
    llama.save_pretrained(tmp_path / "base")
    for seed in (0, 1):
        model = get_peft_model(tiny_llama(), regtune.GLADConfig(r=2, target_modules=["q_proj"]))
        model.save_pretrained(tmp_path / "run" / f"seed-{seed}" / "adapter")
    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    for seed in (0, 1):
        config = json.loads((tmp_path / "out" / f"seed-{seed}" / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"

    masked = get_peft_model(tiny_llama(), regtune.MaskTuningConfig(init_weights=False))
    masked.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    masked.save_pretrained(tmp_path / "masked")
    capsys.readouterr()
    assert cli_main(["export", str(tmp_path / "masked"), str(tmp_path / "masked-lora")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("regtune export: `peft_type` = 'MASK_TUNING'") and error.count("\n") == 1
    assert not (tmp_path / "masked-lora").exists()

    assert cli_main(["export", "--as", "merged", str(tmp_path / "masked"), str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(_logits(merged), _logits(masked), atol=1e-6)
