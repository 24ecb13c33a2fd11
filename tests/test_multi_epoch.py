"""The multi-epoch study: budget arithmetic, text data and tokenizers, recipe validation, and a micro study end to end
(table and plots written, resume skips finished runs, changed settings are refused)."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import yaml

from regtune.cli import main as regtune_main
from regtune.data.char_tokenizer import build_byte_tokenizer, build_char_tokenizer, load_text_tokenizer
from regtune.data.text import BlockDataset, make_blocks, split_text, tokenize_text
from regtune.experiments import RecipeError
from regtune.experiments.recipe import parse_set_overrides as parse_overrides
from regtune.experiments.token_budget import plan_run, run_multi_epoch_study, run_name
from regtune.experiments.token_budget_recipe import load_study_recipe


def main(argv):
    """`regtune study multi-epoch ...` (an alias of `regtune run`)."""
    return regtune_main(["study", "multi-epoch", *argv])


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- budget arithmetic ----


def test_plan_run_spends_the_budget_in_full_batches():
    plan = plan_run(524288, 16, 128, 32)
    assert (plan.unique_blocks, plan.unique_tokens, plan.steps, plan.train_tokens) == (256, 32768, 128, 524288)
    assert plan_run(524288, 1, 128, 32).steps == 128
    # not a power of two: the subset is rounded down to full batches
    odd = plan_run(100_000, 3, 64, 8)
    assert odd.unique_blocks == 520 and odd.steps == 195 and odd.train_tokens == 99840
    with pytest.raises(ValueError, match="fewer than one global batch"):
        plan_run(524288, 64, 128, 128)


# ---- text and tokenizers ----


def test_char_tokenizer_round_trip_and_save(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_char_tokenizer("To be, or not to be:\nthat is the question.")
    ids = tokenizer("not to be\n")["input_ids"]
    assert len(ids) == 10 and tokenizer.decode(ids) == "not to be\n"
    assert tokenizer("xyz")["input_ids"][0] == tokenizer.unk_token_id  # unseen characters
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("not to be\n")["input_ids"] == ids
    byte = build_byte_tokenizer()
    text = "naïve café, 日本\n"
    ids = byte(text)["input_ids"]
    assert len(ids) == len(text.encode()) and byte.decode(ids) == text and len(byte) == 260
    assert load_text_tokenizer("byte")("a")["input_ids"] == byte("a")["input_ids"]
    with pytest.raises(ValueError, match="pass `text`"):
        load_text_tokenizer("char")


def test_split_and_blocks():
    text = "".join(f"line {i}\n" for i in range(100))
    train, heldout = split_text(text, 0.1)
    assert train + heldout == text and heldout.startswith("line ") and len(heldout) <= 0.1 * len(text)
    tokenizer = build_char_tokenizer(text)
    ids = tokenize_text(tokenizer, text, chunk_chars=50)
    assert ids.tolist() == tokenizer(text)["input_ids"]
    blocks = make_blocks(ids, 16, 3)
    assert blocks.shape == (3, 16) and torch.equal(blocks[1], ids[16:32])
    assert BlockDataset(blocks)[2]["labels"].tolist() == ids[32:48].tolist()
    with pytest.raises(ValueError, match="only"):
        make_blocks(ids, 16, 10_000)


# ---- recipe ----


def _text_file(path) -> str:
    rng = random.Random(0)
    words = "the a king queen lord lady speak hear fair foul night day come go love hate my thy".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "." for _ in range(900)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _recipe(tmp_path, **changes) -> dict:
    recipe = {
        "name": "micro",
        "output_dir": str(tmp_path / "study"),
        "torch_num_threads": 1,
        "data": {"text_file": _text_file(tmp_path / "corpus.txt"), "block_size": 16, "heldout_tokens": 512},
        "budget": {"tokens": 4096, "repetitions": [1, 4]},
        "models": {
            "micro": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
        },  # fmt: skip
        "dropout": {"none": {"p": 0.0}, "late": {"p": 0.2, "mode": "step", "start_epoch": 2}},
        "training": {"per_device_train_batch_size": 8, "learning_rate": 1e-2, "use_cpu": True},
        "evaluation": {"points": 2, "curve_tokens": 128, "batch_size": 32},
    }
    recipe.update(changes)
    return recipe


def test_recipe_errors_name_the_key_path(tmp_path):
    recipe = _recipe(tmp_path)
    recipe["data"]["blok_size"] = 8
    recipe["budget"]["repetitions"] = [1, 1]
    recipe["models"]["micro"]["hidden_sise"] = 8
    recipe["dropout"]["bad"] = {"p": 0.1, "mode": "step"}
    recipe["training"]["num_train_epochs"] = 3
    recipe["training"]["learning_rat"] = 1e-3
    recipe["evaluation"] = {"point": 3}
    recipe["extra"] = True
    with pytest.raises(RecipeError) as info:
        load_study_recipe(recipe)
    message = str(info.value)
    for expected in [
        "extra: unknown key for a token-budget recipe. (allowed: budget, data, description, dropout",
        "data.blok_size: unknown key for data. Did you mean 'block_size'?",
        "budget.repetitions: must be a list of distinct integers >= 1",
        "models.micro.hidden_sise: unknown key for LlamaConfig. Did you mean 'hidden_size'",
        "dropout.bad: ",
        "mode='step' needs `start_step` or `start_fraction`",
        "training.num_train_epochs: set by the study from `budget.repetitions`",
        "training.learning_rat: unknown key for TrainingArguments. Did you mean 'learning_rate'?",
        "evaluation.point: unknown key for evaluation. Did you mean 'points'?",
    ]:
        assert expected in message, message


def test_recipe_reads_yaml_like_regtune_recipes(tmp_path):
    path = tmp_path / "study.yaml"
    recipe = _recipe(tmp_path)
    path.write_text(yaml.safe_dump(recipe).replace("learning_rate: 0.01", "learning_rate: 1e-2"))
    study = load_study_recipe(path, parse_overrides(["budget.tokens=8192", "training.save_strategy=no"]))
    assert study.training["learning_rate"] == 0.01 and study.training["save_strategy"] == "no"
    assert study.budget_tokens == 8192 and study.name == "micro"


@pytest.mark.parametrize("name", ["multi_epoch.yaml", "multi_epoch_gpu.yaml"])
def test_shipped_recipes_are_valid(name):
    study = load_study_recipe(os.path.join(REPO, "recipes", name))
    assert len(study.repetitions) >= 4 and {"none", "constant", "late", "ramp"} <= set(study.dropout)


def test_evidence_recipe_trains_every_size_on_at_least_20_tokens_per_parameter():
    import string

    from regtune.data.char_tokenizer import build_char_tokenizer
    from regtune.experiments.token_budget import build_model

    study = load_study_recipe(os.path.join(REPO, "recipes", "evidence", "multi_epoch.yaml"))
    assert len(study.models) == 3 and len(study.run_seeds) >= 3 and min(study.repetitions) == 1
    assert list(study.dropout)[0] == "none" and len(study.dropout) == 4
    # a superset of Tiny Shakespeare's 65 characters, so at least as many parameters as the real models
    tokenizer = build_char_tokenizer(string.ascii_letters + string.punctuation + " \n3")
    for name in study.models:
        lm = build_model(study, name, len(tokenizer), tokenizer, seed=0)
        assert study.budget_tokens / sum(p.numel() for p in lm.parameters()) >= 20, name


def test_recipe_seeds(tmp_path):
    assert load_study_recipe(_recipe(tmp_path, seeds=[2, 5])).run_seeds == [2, 5]
    assert load_study_recipe(_recipe(tmp_path, seed=3)).run_seeds == [3]
    with pytest.raises(RecipeError, match="seeds: must be a list of distinct integers >= 0"):
        load_study_recipe(_recipe(tmp_path, seeds=[1, 1]))
    with pytest.raises(RecipeError, match="give `seed` .* or `seeds` .*, not both"):
        load_study_recipe(_recipe(tmp_path, seed=1, seeds=[0, 1]))


# ---- the report ----


def _result(rep: int, dropout: str, seed: int, heldout: float, train: float) -> dict:
    p = 0.0 if dropout == "none" else 0.1
    return {
        **{"model": "m", "n_params": 1000, "repetitions": rep, "unique_tokens": 4096 // rep, "train_tokens": 4096},
        **{"dropout": dropout, "seed": seed, "heldout_loss": heldout, "train_loss_eval": train, "train_seconds": 1.0},
        **{"mean_dropout": {"hidden": p}, "phase_dropout": {"hidden": [0.0, p, p, p]}, "curves": {}},
    }


def test_report_pairs_runs_by_seed():
    from scipy import stats

    from regtune.experiments.token_budget_report import markdown_table, summarize

    losses = {  # (repetitions, dropout): held-out loss per seed; seed 2 of (4, none) is missing
        (1, "none"): [2.0, 2.1, 2.3],
        (1, "p0.1"): [2.1, 2.15, 2.4],
        (4, "none"): [2.5, 2.6],
        (4, "p0.1"): [2.2, 2.4, 2.3],
    }
    results = [_result(r, d, s, v, v - 0.2 * r) for (r, d), vs in losses.items() for s, v in enumerate(vs)]
    cells = {(c["repetitions"], c["dropout"]): c for c in summarize(results)}
    assert len(cells) == 4 and cells[(1, "none")]["vs_reference"] is None and cells[(1, "p0.1")]["degradation"] is None
    held = cells[(1, "p0.1")]["heldout"]
    half = stats.t.ppf(0.975, 2) * stats.tstd([2.1, 2.15, 2.4]) / 3**0.5
    assert held["mean"] == pytest.approx(2.2166667) and held["hi"] - held["mean"] == pytest.approx(half)
    pair = cells[(4, "p0.1")]["vs_reference"]  # dropout - none, on the seeds both have
    assert pair["seeds"] == [0, 1] and pair["diffs"] == pytest.approx([-0.3, -0.2]) and pair["wins"] == 0
    assert cells[(4, "none")]["degradation"]["diffs"] == pytest.approx([0.5, 0.5])
    # how much dropout reduces the degradation: (2.2 - 2.1) - (2.5 - 2.0) and (2.4 - 2.15) - (2.6 - 2.1)
    assert cells[(4, "p0.1")]["degradation_vs_reference"]["diffs"] == pytest.approx([-0.4, -0.25])
    assert cells[(4, "none")]["degradation_vs_reference"] is None
    assert cells[(4, "p0.1")]["gap"]["mean"] == pytest.approx(0.8)
    assert cells[(1, "p0.1")]["tokens_per_param"] == 4.096
    table = markdown_table(results)
    assert "(1,000 parameters, 4,096 training tokens per run: 4.1 tokens per parameter)" in table
    assert "| 4 | 1024 | p0.1 | 2.3000 [" in table
    assert "| -0.2500 [-0.8853, +0.3853] (0/2 higher) |" in table  # mean of -0.3 and -0.2, t(1) interval
    assert "| p0.1 | 0.000 / 0.100 / 0.100 / 0.100 |" in table


# ---- the study end to end ----


def _mtimes(folder) -> dict[str, int]:
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


def test_micro_study_end_to_end_and_resume(tmp_path):
    recipe = _recipe(tmp_path)
    out = tmp_path / "study"
    first = run_multi_epoch_study(recipe, verbose=False)
    names = [run_name("micro", r, d) for r in (1, 4) for d in ("none", "late")]
    assert sorted(first.ran) == sorted(names) and first.skipped == []
    for key in ("json", "table", "heldout_vs_repetitions", "training_curves"):
        assert os.path.getsize(first.files[key]) > 0
    assert [r["run"] for r in json.loads((out / "results.json").read_text())["results"]] == [
        r["run"] for r in first.results
    ]
    with open(first.files["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    header = "| repetitions | unique tokens | dropout | held-out loss | - none | - 1 rep. | degradation - none | gap |"
    assert header in table
    assert "| 4 | 1024 | late |" in table
    result = json.loads((out / "results" / "micro-r4-late.json").read_text())
    assert result["steps"] == 32 and result["train_tokens"] == 4096 and result["unique_tokens"] == 1024
    assert result["mean_dropout"]["hidden"] == pytest.approx(0.1)  # 0.2 from epoch 2 on: during 2 of 4 epochs
    assert result["phase_dropout"]["hidden"] == [0.0, 0.0, 0.2, 0.2]  # read from the model's modules, per quarter
    assert result["tokens_per_param"] == pytest.approx(4096 / result["n_params"], abs=0.01)
    # paired runs: until dropout starts, `late` trains exactly like `none` (same weights, same batches)
    none = json.loads((out / "results" / "micro-r4-none.json").read_text())
    assert result["curves"]["train"][:8] == none["curves"]["train"][:8] != result["curves"]["train"][8:16]
    assert result["curves"]["heldout"][0][0] == 0 and len(result["curves"]["heldout"]) == 3
    assert not (out / "runs").exists()  # run folders are removed once their result is saved

    # running again trains nothing: every run is finished
    before = _mtimes(out / "results")
    second = run_multi_epoch_study(recipe, verbose=False)
    assert second.ran == [] and sorted(second.skipped) == sorted(names)
    assert _mtimes(out / "results") == before
    assert {r["run"] for r in second.results} == set(names)

    # a study killed during a run: only the missing run is trained again
    os.remove(out / "results" / "micro-r4-none.json")
    third = run_multi_epoch_study(recipe, verbose=False)
    assert third.ran == ["micro-r4-none"] and len(third.skipped) == 3
    assert json.loads((out / "results" / "micro-r4-none.json").read_text())["heldout_loss"] == pytest.approx(
        json.loads(json.dumps(first.results))[[r["run"] for r in first.results].index("micro-r4-none")][
            "heldout_loss"
        ],
        abs=1e-5,
    )  # the same run again gives the same result

    # other settings in the same folder are refused, or rerun with overwrite; new settings extend the study
    changed = _recipe(tmp_path, training={**recipe["training"], "learning_rate": 5e-3})
    with pytest.raises(ValueError, match="other settings than the recipe's"):
        run_multi_epoch_study(changed, verbose=False)
    extended = _recipe(tmp_path)
    extended["dropout"]["constant"] = {"p": {"hidden": 0.1}}
    fourth = run_multi_epoch_study(extended, verbose=False)
    assert sorted(fourth.ran) == ["micro-r1-constant", "micro-r4-constant"] and len(fourth.skipped) == 4
    assert "| 4 | 1024 | constant |" in (out / "results.md").read_text()


def test_seeds_pair_dropout_with_no_dropout(tmp_path):
    recipe = _recipe(tmp_path, seeds=[0, 1], budget={"tokens": 2048, "repetitions": [2]})
    recipe["evaluation"]["points"] = 1
    recipe["dropout"] = {"none": {"p": 0.0}, "p0.2": {"p": {"hidden": 0.2}}}
    study = run_multi_epoch_study(recipe, verbose=False)
    runs = {r["run"]: r for r in study.results}
    assert sorted(runs) == ["micro-r2-none-s0", "micro-r2-none-s1", "micro-r2-p0.2-s0", "micro-r2-p0.2-s1"]
    start = {name: r["curves"]["heldout"][0] for name, r in runs.items()}  # evaluated before the first step
    assert start["micro-r2-none-s0"] == start["micro-r2-p0.2-s0"] != start["micro-r2-none-s1"]  # seed = init
    assert runs["micro-r2-p0.2-s1"]["heldout_loss"] != runs["micro-r2-none-s1"]["heldout_loss"]
    cells = json.loads((tmp_path / "study" / "results.json").read_text())["cells"]
    pair = next(c for c in cells if c["dropout"] == "p0.2")["vs_reference"]
    expected = [
        runs[f"micro-r2-p0.2-s{s}"]["heldout_loss"] - runs[f"micro-r2-none-s{s}"]["heldout_loss"] for s in (0, 1)
    ]
    assert pair["seeds"] == [0, 1] and pair["diffs"] == pytest.approx(expected)
    assert "mean [95% CI] over 2 seeds" in (tmp_path / "study" / "results.md").read_text()


def test_cli_runs_a_study_and_reports_invalid_recipes(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    recipe = _recipe(tmp_path)
    recipe["budget"]["repetitions"] = [2]
    recipe["dropout"] = {"none": {"p": 0.0}}
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path), "--set", "evaluation.points=0"]) == 0
    out = capsys.readouterr().out
    assert "| 2 | 2048 | none | " in out  # the table is printed
    assert "[multi-epoch] progress: 1/1 runs, elapsed " in out and "about 0m00s left" in out  # progress with an ETA
    assert os.path.exists(tmp_path / "study" / "results" / "micro-r2-none.json")
    assert main([str(path), "--report_only"]) == 0
    assert main([str(path), "--set", "budget.tokenz=3"]) == 2
    assert "budget.tokenz: unknown key for budget. Did you mean 'tokens'?" in capsys.readouterr().err


def test_cli_parser_for_the_regtune_command():
    from regtune.cli import _build_parser

    args = _build_parser().parse_args(
        ["study", "multi-epoch", "r.yaml", "--set", "a.b=1", "--set", "c=x", "--overwrite"]
    )
    assert args.command == "study" and args.recipe == "r.yaml" and args.overrides == ["a.b=1", "c=x"]
    assert args.overwrite and not args.report_only and args.output_dir is None


def test_hub_corpus_path_with_a_local_datasets_builder(tmp_path):
    """The `hub` data path, through `datasets.load_dataset("text", data_files=...)` (offline)."""
    from regtune.experiments.token_budget import prepare_corpus

    recipe = _recipe(tmp_path)
    corpus_file = recipe["data"].pop("text_file")
    recipe["data"].update({"hub": {"path": "text", "data_files": corpus_file, "streaming": True}, "tokenizer": "byte"})
    study = load_study_recipe(recipe)
    corpus = prepare_corpus(study, needed_tokens=4096)
    assert corpus.train_ids.numel() == 4096 and corpus.heldout_ids.numel() == 512
    assert corpus.tokenizer.eos_token_id in corpus.train_ids.tolist()  # documents (lines) joined by EOS


def test_a_run_killed_midway_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """With save_strategy=steps, an interrupted run continues from its last checkpoint and ends as if uninterrupted."""
    from regtune.regularizers.dropout_schedule import DropoutScheduleCallback

    recipe = _recipe(tmp_path)
    recipe["budget"]["repetitions"] = [4]
    recipe["dropout"] = {"late": recipe["dropout"]["late"]}
    recipe["training"].update({"save_strategy": "steps", "save_steps": 10})
    reference = run_multi_epoch_study({**recipe, "output_dir": str(tmp_path / "reference")}, verbose=False)

    original = DropoutScheduleCallback.on_step_begin

    def killed_at_step_13(self, args, state, control, **kwargs):
        if state.global_step == 13:
            raise KeyboardInterrupt("simulated kill")
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(DropoutScheduleCallback, "on_step_begin", killed_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        run_multi_epoch_study(recipe, verbose=False)
    run_dir = tmp_path / "study" / "runs" / "micro-r4-late"
    assert sorted(os.listdir(run_dir)) == ["checkpoint-10", "spec.json"]
    monkeypatch.setattr(DropoutScheduleCallback, "on_step_begin", original)
    resumed = run_multi_epoch_study(recipe, verbose=False)
    assert resumed.ran == ["micro-r4-late"]
    assert resumed.results[0]["heldout_loss"] == pytest.approx(reference.results[0]["heldout_loss"], abs=1e-4)


@pytest.mark.slow
def test_study_under_two_processes(tmp_path):
    """`torchrun --nproc_per_node 2 -m regtune run RECIPE` (CPU, gloo): one study, runs distributed
    over both processes (global batch = 2 x per-device batch), results written once; a second launch skips them."""
    import subprocess
    import sys

    recipe = _recipe(tmp_path)
    recipe["training"]["per_device_train_batch_size"] = 4
    recipe["training"].pop("use_cpu")  # the study sets it when there is no GPU
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "regtune", "run", str(path)]
    for _ in range(2):  # the second launch finds every run finished
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert done.stdout.count("4 finished run(s) found") == 1  # printed by the main process only
    result = json.loads((tmp_path / "study" / "results" / "micro-r4-late.json").read_text())
    assert result["world_size"] == 2 and result["spec"]["global_batch_size"] == 8 and result["steps"] == 32
