"""Every script of examples/ runs as a user runs it (a subprocess, offline) on tiny models built from configs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tiny_models import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from regtune.data import resolve_model_path


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TINY_BERT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
POSITIVE = ("good", "great", "lovely", "fine", "superb", "nice")
NEGATIVE = ("bad", "awful", "dull", "poor", "boring", "weak")


def run_example(name: str, *args: str, timeout: int = 240) -> str:
    """Run examples/<name> with `args` in a fresh, offline process; its stdout (the test fails with its stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _write_jsonl(path, rows) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def sentiment_data(tmp_path_factory) -> str:
    """A local folder laid out like SetFit/sst2: train / validation / test JSON lines with `text` and `label`."""
    folder = tmp_path_factory.mktemp("sst2")
    for split, n in (("train", 32), ("validation", 16), ("test", 16)):
        rows = [
            {"text": f"the film was {words[i % len(words)]} {split}", "label": label}
            for i in range(n // 2)
            for words, label in ((NEGATIVE, 0), (POSITIVE, 1))
        ]
        _write_jsonl(folder / f"{split}.jsonl", rows)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> str:
    """A 16-wide BERT classifier saved with all-MiniLM-L6-v2's tokenizer: what the Hub id is replaced by."""
    path = str(tmp_path_factory.mktemp("hub") / "tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, **TINY_BERT)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_adapter_peft(tiny_classifier, sentiment_data, tmp_path):
    out = tmp_path / "out"
    stdout = run_example(
        "adapter_peft.py", "--model", tiny_classifier, "--dataset", sentiment_data, "--max_steps", "2",
        "--output_dir", str(out),
    )  # fmt: skip
    assert re.search(r"validation accuracy: [01]\.\d{3}", stdout)
    diff = float(re.search(r"max logit difference (\S+)", stdout).group(1))
    assert diff < 1e-5
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "ALLORA"
    exported = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and exported["lora_alpha"] == exported["r"] == 8
    assert (out / "lora" / "adapter_model.safetensors").exists()


def test_regularizer_trainer(tiny_classifier, sentiment_data, tmp_path):
    stdout = run_example(
        "regularizer_trainer.py", "--model", tiny_classifier, "--dataset", sentiment_data, "--max_steps", "4",
        "--output_dir", str(tmp_path / "out"),
    )  # fmt: skip
    for name in ("RegTrainer", "MyTrainer"):
        assert re.search(rf"{name}: validation accuracy [01]\.\d{{3}}", stdout)
        rates = json.loads(re.search(rf"{name}: dropout rate over training (\[.*\])", stdout).group(1))
        assert len(rates) == 4 and rates[0] < rates[-1] == pytest.approx(0.1)  # the linear ramp, logged per step


def _word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_lfu_sft(tmp_path):
    model = tmp_path / "tiny-causal-lm"
    tiny_llama().save_pretrained(model)
    _word_tokenizer(100).save_pretrained(model)
    data = tmp_path / "sft"
    data.mkdir()
    g = torch.Generator().manual_seed(0)

    def words(k):
        return " ".join(f"w{i}" for i in torch.randint(3, 100, (k,), generator=g).tolist())

    _write_jsonl(data / "train.jsonl", [{"prompt": words(4), "completion": " " + words(3)} for _ in range(16)])
    out = tmp_path / "out"
    stdout = run_example(
        "lfu_sft.py", "--model", str(model), "--dataset", str(data), "--max_steps", "2", "--output_dir", str(out)
    )
    steps = re.findall(r"step (\d+): loss [\d.]+, .*lfu/cons_to_sft ([\d.]+)", stdout)
    assert [int(step) for step, _ in steps] == [1, 2]
    assert all(float(ratio) > 0 for _, ratio in steps)  # the consistency term is active at every step
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and (out / "adapter" / "adapter_model.safetensors").exists()


def test_gardo_diffusers(tmp_path):
    from diffusion_tiny import tiny_sd3_pipeline

    model = tmp_path / "tiny-sd3"
    tiny_sd3_pipeline().save_pretrained(model)
    out = tmp_path / "out"
    stdout = run_example(
        "gardo_diffusers.py", "--model", str(model), "--num_epochs", "2", "--num_inference_steps", "2",
        "--resolution", "16", "--output_dir", str(out), "--drop_t5",
    )  # fmt: skip
    epochs = re.findall(r"epoch (\d+): proxy reward (-?[\d.]+), KL on (\d+)%", stdout)
    assert [int(e[0]) for e in epochs] == [1, 2]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2] and "eval_contrast" in records[-1]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    with Image.open(out / "sample.png") as image:  # drawn by a fresh pipeline with the LoRA loaded
        assert image.size == (16, 16)


def test_recipe_sweep(tiny_classifier, sentiment_data, tmp_path):
    out = tmp_path / "out"
    stdout = run_example(
        "recipe_sweep.py", "--model", tiny_classifier, "--dataset", sentiment_data, "--seeds", "0", "1",
        "--max_steps", "2", "--output_dir", str(out),
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    for run in ("lora", "allora"):  # each run's learning rate chosen from its own 3-value sweep on validation
        sweep = results["sweeps"][run]
        assert len(sweep["rows"]) == 3 and sweep["chosen"]["training.learning_rate"] in (3e-4, 1e-3, 3e-3)
        assert all(row["seeds"] == [100] for row in sweep["rows"])
        assert all((out / run / f"seed-{seed}").is_dir() for seed in (0, 1))
    (comparison,) = results["comparisons"]
    assert comparison["run"] == "allora" and comparison["metrics"]["test.accuracy"]["seeds"] == [0, 1]
    assert "Δ test.accuracy" in stdout and "| allora | lora | 2 |" in stdout  # the printed results table
