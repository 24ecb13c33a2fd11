"""`regtune run` under the launchers users type: torchrun and `accelerate launch --multi_gpu` give one data-parallel
run on CPUs; `accelerate launch --num_processes 2` without `--multi_gpu` (one process on CPUs) stops with a message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import yaml
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from regtune.data import resolve_model_path
from regtune.experiments.launch import requested_processes


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(ROOT, "tests")}


def _tiny_recipe(tmp_path) -> str:
    model_dir = str(tmp_path / "tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = {
        "name": "launch",
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": model_dir},
        "data": {"builtin": "quickstart-sentiment", "options": {"n_train": 16, "n_eval": 8}, "max_length": 16},
        "training": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "save_strategy": "no"},
        "runs": [{"name": "full"}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_requested_processes_parsing():
    assert requested_processes(["accelerate", "launch", "--num_processes", "4", "-m", "regtune"]) == 4
    assert requested_processes(["accelerate", "launch", "--num-processes=2", "x.py"]) == 2
    assert requested_processes(["accelerate", "launch", "x.py"]) is None


def test_accelerate_launch_without_multi_gpu_stops_and_torchrun_is_data_parallel(tmp_path):
    recipe = _tiny_recipe(tmp_path)
    one = subprocess.run(
        [os.path.join(BIN, "accelerate"), "launch", "--num_processes", "2", "-m", "regtune", "run", recipe],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # regtune exits 2 with one line; accelerate's simple launcher then reports the failed child with its own traceback
    assert one.returncode != 0 and not (tmp_path / "out").exists()
    assert "regtune run: `accelerate launch --num_processes 2` started 1 process" in one.stderr
    assert "accelerate launch --multi_gpu --num_processes 2 -m regtune run" in one.stderr

    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "regtune",
         "run", recipe],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "full" / "metrics.json").read_text())
    # 16 examples, 4 per process: 2 processes take 2 optimizer steps (1 process would take 4)
    assert metrics["global_step"] == 2
