"""The built-in task `shakespeare-turns` (one speaker's turns as prompt/completion pairs, held-out text for
forgetting) and a recipe that fine-tunes a pretrained char-level Llama on it, with a pretrained reference run."""

import json
import math
import os

import pytest

from regtune.data import get_task
from regtune.data.shakespeare import held_out_windows, pretraining_text, read_corpus, shakespeare_turns
from regtune.experiments.errors import RecipeError


def write_corpus(root, turns: int = 40) -> str:
    """A play of `turns` exchanges between KING and GLOUCESTER, then other plays (the held-out tail)."""
    blocks = []
    for i in range(turns):
        blocks.append(f"KING:\nWhat news, my lord, of battle number {i}?")
        blocks.append(f"GLOUCESTER:\nThe field is ours, my liege, and {i} men fell there.")
    blocks += [f"HAMLET:\nTo be, or not to be, that is question {i}." for i in range(30)]
    path = root / "text" / "input.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(blocks))
    return str(root)


def test_splits_formats_and_disjoint_turns(tmp_path):
    data_dir = write_corpus(tmp_path)
    splits = shakespeare_turns(data_dir=data_dir, n_train=20, n_val=5, n_held_out=6, window_chars=32)
    assert set(splits) == {"train", "validation", "test", "held_out"}
    assert (len(splits["train"]), len(splits["validation"])) == (20, 5)
    train_text, held_out_text = read_corpus(data_dir)
    n_pairs = train_text.count("GLOUCESTER:\n")
    assert len(splits["test"]) == n_pairs - 25
    for name in ("train", "validation", "test"):
        assert splits[name].column_names == ["prompt", "completion"]
        assert all(p.endswith("\n\nGLOUCESTER:\n") for p in splits[name]["prompt"])
        assert all(c.startswith("The field is ours") for c in splits[name]["completion"])
    seen = [c for name in ("train", "validation", "test") for c in splits[name]["completion"]]
    assert len(set(seen)) == len(seen)  # every turn in exactly one split
    assert splits["held_out"].column_names == ["text"]
    windows = splits["held_out"]["text"]
    assert len(windows) == 6 and all(len(w) == 32 and w in held_out_text for w in windows)
    assert windows == held_out_windows(held_out_text, 6, 32)
    # pretraining text: the training text without the speaker's turns
    pretrain = pretraining_text(data_dir)
    assert "GLOUCESTER:" not in pretrain and "KING:\nWhat news" in pretrain
    # the same options give the same splits
    again = shakespeare_turns(data_dir=data_dir, n_train=20, n_val=5, n_held_out=6, window_chars=32)
    assert again["test"]["completion"] == splits["test"]["completion"]


def test_bad_options_name_the_field(tmp_path):
    task = get_task("shakespeare-turns")
    assert task.problem == "causal-lm" and task.eval_splits == ("test", "held_out")
    problems = task.check_options({"data_dir": str(tmp_path / "missing")})
    assert problems and problems[0][0] == "data_dir" and "text/input.txt" in problems[0][1]
    data_dir = write_corpus(tmp_path)
    with pytest.raises(ValueError, match="n_train"):
        shakespeare_turns(data_dir=data_dir, n_train=100)
    # found at validation, before anything is built: a speaker without turns, too few turns for the splits
    assert task.check_options({"data_dir": data_dir, "speaker": "Gloucester"})[0][0] == "speaker"
    assert task.check_options({"data_dir": data_dir, "speaker": 3})[0][0] == "speaker"
    problem = task.check_options({"data_dir": data_dir, "n_train": 30, "n_val": 10})
    assert problem[0][0] == "n_train" and "has 40 turns" in problem[0][1]
    assert task.check_options({"data_dir": data_dir, "n_train": 20, "n_val": 5}) == []


def test_recipe_checks_the_options_before_loading(tmp_path):
    import yaml

    from regtune.experiments import load_recipe

    model_dir = _char_llama(tmp_path, write_corpus(tmp_path))
    base = {
        "model": {"name_or_path": model_dir, "task": "causal-lm"},
        "trainer": "trl.SFTTrainer",
        "training": {"bf16": False},  # trl's SFTConfig defaults to bf16, which a CPU-only machine refuses
    }
    path = tmp_path / "r.yaml"
    for options, field in [({"data_dir": str(tmp_path / "x")}, "data.options.data_dir"), ({"n_val": -1}, "n_val")]:
        path.write_text(yaml.safe_dump({**base, "data": {"builtin": "shakespeare-turns", "options": options}}))
        with pytest.raises(RecipeError, match=field):
            load_recipe(str(path))
    # a shared section's error is reported once, not again as "no run named ..." by every comparison
    protocol = {
        "kind": "runs",
        "seeds": [0, 1],
        "compare": {"baseline": "sft", "metrics": ["held_out.loss"]},
        "runs": [{"name": "sft"}, {"name": "lfu", "trainer": "LfUTrainer"}],
    }
    bad = {"builtin": "shakespeare-turns", "options": {"data_dir": str(tmp_path / "x")}}
    path.write_text(yaml.safe_dump({**base, **protocol, "data": bad}))
    with pytest.raises(RecipeError) as error:
        load_recipe(str(path))
    assert [p for p, _ in error.value.errors] == ["data.options.data_dir"], error.value.errors


def _char_llama(tmp_path, data_dir: str) -> str:
    """A tiny randomly initialized char-level Llama and its tokenizer, saved like bench/char_llama.py saves its own."""
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    from regtune.data.char_tokenizer import build_char_tokenizer

    path = tmp_path / "char-llama"
    if not path.is_dir():
        set_seed(0)
        tokenizer = build_char_tokenizer(read_corpus(data_dir)[0] + read_corpus(data_dir)[1])
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=32, max_position_embeddings=256, pad_token_id=0,
            bos_token_id=2, eos_token_id=3,
        )  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_recipe_measures_forgetting_against_a_pretrained_reference(tmp_path):
    """lr 0 leaves the model as pretrained; SFT and LfU move the held-out loss; compare pairs them per seed."""
    import yaml

    from regtune.cli import main

    data_dir = write_corpus(tmp_path)
    model_dir = _char_llama(tmp_path, data_dir)
    recipe = {
        "kind": "runs",
        "name": "lfu-tiny",
        "output_dir": str(tmp_path / "out"),
        "seeds": [0, 1],
        "select": {"split": "validation", "metric": "loss", "seeds": [100]},
        "compare": [
            {"baseline": ["pretrained"], "runs": ["sft", "lfu"], "metrics": ["held_out.loss"]},
            {"baseline": ["sft-matched"], "runs": ["lfu"], "metrics": ["test.loss", "held_out.loss"]},
        ],
        "model": {"name_or_path": model_dir, "task": "causal-lm", "dtype": "float32"},
        "data": {"builtin": "shakespeare-turns", "options": {"data_dir": data_dir, "n_train": 16, "n_val": 8}},
        "adapter": {"type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "trainer": "LfUTrainer",
        "training": {
            "max_steps": 3,
            "per_device_train_batch_size": 8,
            "max_length": 128,
            "report_to": "none",
            "save_strategy": "no",
            "gradient_checkpointing": False,
            "bf16": False,
            "logging_steps": 1,
        },  # fmt: skip
        "evaluation": {"splits": ["test", "held_out"]},
        "runs": [
            {"name": "pretrained", "trainer": "trl.SFTTrainer", "training": {"learning_rate": 0.0, "max_steps": 1}},
            {"name": "sft", "trainer": "trl.SFTTrainer", "training": {"learning_rate": 3e-2}},
            {
                "name": "lfu",
                "training": {"lfu_mode": "perturb", "lfu_alpha": 1.0, "lfu_beta": 10.0},
                "sweep": {"training.learning_rate": [1e-2, 3e-2]},
            },
            {
                "name": "sft-matched",
                "trainer": "trl.SFTTrainer",
                "sweep": {"training.learning_rate": [1e-3, 1e-2, 3e-2]},
                "select": {"match": "lfu"},
            },
        ],
    }
    path = tmp_path / "lfu.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    out = json.load(open(tmp_path / "out" / "results.json"))
    runs = {(r["run"], r["seed"]): r for r in out["results"]}
    # the lr-0 reference is the pretrained model (LoRA's B stays 0): the same held-out loss whatever the seed
    reference = runs[("pretrained", 0)]["metrics"]["held_out"]["loss"]
    assert runs[("pretrained", 1)]["metrics"]["held_out"]["loss"] == pytest.approx(reference, rel=1e-6)
    for seed in (0, 1):
        assert runs[("sft", seed)]["metrics"]["held_out"]["loss"] != pytest.approx(reference, rel=1e-4)
        assert math.isfinite(runs[("lfu", seed)]["metrics"]["test"]["loss"])
        assert runs[("lfu", seed)]["diagnostics"]["lfu/cons_to_sft"] > 0
    forgetting = {c["run"]: c["metrics"]["held_out.loss"] for c in out["comparisons"] if c["baseline"] == "pretrained"}
    assert set(forgetting) == {"sft", "lfu"} and forgetting["sft"]["n"] == 2
    sweeps = out["sweeps"]
    assert sweeps["sft-matched"]["rule"].startswith("match lfu")
    assert os.path.isfile(tmp_path / "out" / "results.md")
