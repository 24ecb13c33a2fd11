"""The `regtune` command line: validate, a tiny end-to-end `run` (with --push_to_hub on a fake HfApi), overrides."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from regtune.cli import main
from regtune.data import resolve_model_path
from regtune.experiments import load_recipe


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "recipes", "quickstart.yaml")
TINY_BERT = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
}
TINY_TRAINING = {
    "max_steps": 2,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 1e-2,
    "eval_strategy": "steps",
    "eval_steps": 1,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
}


def save_tiny_model(path) -> str:
    """A 2-layer, 16-wide BERT with the MiniLM tokenizer, saved like a Hub checkpoint (loaded by from_pretrained)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, **TINY_BERT))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_recipe(model_dir: str, output_dir: str) -> dict:
    return {
        "name": "tiny",
        "description": "a tiny end-to-end recipe",
        "seed": 0,
        "output_dir": output_dir,
        "model": {"name_or_path": model_dir},
        "data": {"builtin": "quickstart-sentiment", "options": {"n_train": 16, "n_eval": 16}, "max_length": 24},
        "adapter": {"type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]},
        "training": dict(TINY_TRAINING),
        "runs": [
            {"name": "lora"},
            {
                "name": "allora",
                "adapter": {"type": "ALLORA", "r": 2, "eta": 2.0, "target_modules": ["query", "value"]},
            },
        ],
    }


class FakeHfApi:
    """Records the Hub calls; `upload_folder` snapshots the folder it is given (it is deleted afterwards)."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        files = sorted(
            os.path.relpath(os.path.join(root, f), folder_path)
            for root, _, names in os.walk(folder_path)
            for f in names
        )
        with open(os.path.join(folder_path, "README.md")) as f:
            readme = f.read()
        FakeHfApi.calls.append(("upload_folder", repo_id, files, readme))
        return f"https://huggingface.co/{repo_id}/commit/0"


# -- validate ---------------------------------------------------------------------------------------------------------


def test_validate_prints_resolved_runs_with_overrides(capsys):
    assert main(["validate", QUICKSTART, "--training.num_train_epochs=1", "--runs.allora.adapter.eta", "4"]) == 0
    out = capsys.readouterr().out
    assert "# run lora: LORA" in out and "# run allora: ALLORA" in out
    assert "num_train_epochs: 1\n" in out and "eta: 4\n" in out


def test_validate_typo_exits_2_naming_the_key_path(capsys):
    assert main(["validate", QUICKSTART, "--runs.allora.adapter.etaa=4"]) == 2
    err = capsys.readouterr().err
    assert "runs[1].adapter.etaa" in err and "Did you mean 'eta'?" in err


def test_validate_bad_value_exits_2(capsys):
    assert main(["validate", QUICKSTART, "--training.learning_rate=-1"]) == 2
    assert "training.learning_rate: must be >= 0.0" in capsys.readouterr().err


def test_missing_recipe_file_exits_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_study_command_is_dispatched_to_regtune_studies(capsys):
    with pytest.raises(SystemExit) as info:
        main(["study", "multi-epoch", "--help"])
    assert info.value.code == 0
    assert "--report_only" in capsys.readouterr().out


def test_run_options_take_hyphens_or_underscores():
    from regtune.cli import _build_parser

    parser = _build_parser()
    for argv in (["--report-only", "--output-dir", "x"], ["--report_only", "--output_dir", "x"]):
        args, rest = parser.parse_known_args(["run", "r.yaml", *argv])
        assert args.report_only and args.output_dir == "x" and rest == []


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["fly"])


@pytest.mark.slow
def test_python_dash_m_regtune(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "regtune", "validate", QUICKSTART, "--adapter.ra=8"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "adapter.ra" in proc.stderr


# -- user errors: one message, exit 2, no traceback -------------------------------------------------------------------

# (overrides of the quickstart recipe, the key path the message must name)
BAD_RECIPES = [
    (["--adapter.ra=8"], "adapter.ra"),
    (["--runs.allora.adapter.etaa=4"], "runs[1].adapter.etaa"),
    (["--runs.allora.adapter.eta=.inf"], "runs[1].adapter.eta"),
    (["--runs.allora.adapter.eta=.nan"], "runs[1].adapter.eta"),
    (["--runs.allora.adapter.eta=-1"], "runs[1].adapter.eta"),
    (["--adapter.r=0"], "adapter.r"),
    (["--adapter.r=-3"], "adapter.r"),
    (["--adapter.r=eight"], "adapter.r"),
    (["--adapter.r=2.5"], "adapter.r"),
    (["--adapter.lora_dropout=1.5"], "adapter.lora_dropout"),
    (["--adapter.target_modules=3"], "adapter.target_modules"),
    (["--adapter.type=LORAA"], "adapter.type"),
    (["--training.learning_rate=-1"], "training.learning_rate"),
    (["--training.learning_rate=.inf"], "training.learning_rate"),
    (["--training.learning_rat=1e-3"], "training.learning_rat"),
    (["--training.num_train_epochs=three"], "training.num_train_epochs"),
    (["--training.eval_strategy=epochs"], "training.eval_strategy"),
    (["--training.output_dir=x"], "training.output_dir"),
    (["--training.push_to_hub=true"], "training.push_to_hub"),
    (["--training.adam_beta2=1.5"], "training.adam_beta2"),
    (["--data.max_length=0"], "data.max_length"),
    (["--data.builtin=quickstart"], "data.builtin"),
    (["--data.options.n_train=1"], "data.options.n_train"),
    (["--data.options.bogus=1"], "data.options.bogus"),
    (["--model.name_or_path=/no/such/model"], "model.name_or_path"),
    (["--model.name_or_path=./missing-model"], "model.name_or_path"),
    (["--model.name_or_path=builtin:nope"], "model.name_or_path"),
    (["--model.trust_remote_code=yes"], "model.trust_remote_code"),
    (["--model.task=regression"], "model.task"),
    (["--seed=-3"], "seed"),
    (["--trainer=RegTrainr"], "trainer"),
    (["--regularizers=[{type: multi_sample_dropoutt}]"], "regularizers[0].type"),
    (["--regularizers=[{type: dropout_schedule, p: 2.0}]"], "regularizers[0].p"),
    (["--evaluation.metrics=[acuracy]"], "evaluation.metrics[0]"),
    (["--runs.nope.adapter.r=4"], "runs.nope"),
    (["--nme=x"], "nme"),
]


@pytest.mark.parametrize("overrides, path", BAD_RECIPES, ids=[" ".join(o) for o, _ in BAD_RECIPES])
def test_bad_recipe_exits_2_with_one_message_naming_the_key_path(overrides, path, capsys):
    assert main(["validate", QUICKSTART, *overrides]) == 2
    err = capsys.readouterr().err
    assert f"  {path}: " in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "nope.yaml"], "nope.yaml: No such file or directory"),
        (["run", "{tmp}"], "is a folder without recipe.yaml"),
        (["validate", "{tmp}/bad.yaml"], "not valid YAML"),
        (["validate", "{tmp}/list.yaml"], "a recipe is a YAML mapping, got list"),
        (["push", "{tmp}/nope", "me/x"], "not a regtune run folder"),
        (["push", "{tmp}", "me/x", "--bogus"], "unexpected arguments --bogus"),
        (["validate", QUICKSTART, "--only", "nope"], "no run named 'nope'"),
        (["run", QUICKSTART, "--only", "nope"], "no run named 'nope'"),
        (["validate", QUICKSTART, "--kind=gardo"], "unknown key for a GARDO recipe"),
        (["validate", QUICKSTART, "--kind=ruuns"], "Did you mean 'runs'"),
        (["study", "gardo", QUICKSTART], "is a 'runs' recipe, not a gardo one"),
        (["validate", QUICKSTART, "--training"], "training: expected a mapping"),
        (["validate", QUICKSTART, "--runs.5.adapter.r=2"], "index out of range"),
        (["validate", QUICKSTART, "positional"], "expected an override --key.path=value"),
    ],
)
def test_cli_user_errors_exit_2_with_one_message(argv, expected, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("value", ["", ",", " , "])
def test_empty_only_is_a_usage_error_not_every_run(command, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, QUICKSTART, f"--only={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--only: expected comma-separated run names" in err and "Traceback" not in err, err


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    import regtune.cli as cli

    def closed_pipe(args, extra):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_validate", closed_pipe)
    assert main(["validate", QUICKSTART]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_debug_shows_the_traceback():
    from regtune.experiments import RecipeError

    with pytest.raises(RecipeError, match="adapter.ra"):
        main(["validate", QUICKSTART, "--adapter.ra=8", "--debug"])


def test_validate_a_directory_checks_every_recipe(tmp_path, capsys):
    good = yaml.safe_load(open(QUICKSTART))
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**good, "adapter": {**good["adapter"], "r": 0}}))
    assert main(["validate", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "good.yaml: valid" in captured.out
    assert "bad.yaml" in captured.err and "adapter.r" in captured.err and "1 of 2 recipes" in captured.err
    (tmp_path / "bad.yaml").unlink()
    assert main(["validate", str(tmp_path)]) == 0
    assert main(["validate", str(tmp_path / "empty")]) == 2  # a missing path: one line, no traceback
    assert "Traceback" not in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("regtune ")


@pytest.mark.parametrize(
    "argv", [["run"], ["validate"], ["push"], ["study"], ["study", "multi-epoch"], ["study", "gardo"]]
)
def test_every_command_help_has_a_description(argv, capsys):
    from regtune.cli import _build_parser

    parser = _build_parser()
    for name in argv:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = actions[0].choices[name]
    assert parser.description and len(parser.description) > 40, argv


def test_push_without_credentials_hints_at_login(tmp_path, monkeypatch, capsys):
    import regtune.hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token
    monkeypatch.setattr(regtune.hub, "prepare_hub_folder", lambda run_dir, folder, *a: os.makedirs(folder) or folder)

    class Unauthorized(FakeHfApi):
        def create_repo(self, *args, **kwargs):
            raise RuntimeError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create")

    monkeypatch.setattr(regtune.hub, "HfApi", Unauthorized)
    assert main(["push", str(tmp_path), "me/repo"]) == 2
    err = capsys.readouterr().err
    assert "hf auth login" in err and "huggingface-cli login" in err and "HF_TOKEN" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_push_with_a_refused_token_says_so(tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import HfHubHTTPError

    import regtune.hub

    monkeypatch.setattr(regtune.hub, "prepare_hub_folder", lambda run_dir, folder, *a: os.makedirs(folder) or folder)

    class Response:  # the attributes HfHubHTTPError reads
        status_code, headers, request = 401, {}, None

    response = Response()

    class Refused(FakeHfApi):
        def create_repo(self, *args, **kwargs):
            raise HfHubHTTPError("401 Unauthorized", response=response)

    monkeypatch.setattr(regtune.hub, "HfApi", Refused)
    monkeypatch.setenv("HF_TOKEN", "hf_invalid")
    assert main(["push", str(tmp_path), "me/repo"]) == 2
    assert "refused the token" in capsys.readouterr().err


def test_method_label_names_the_trainer():
    overrides = [("trainer", "LfUTrainer"), ("runs.lora.trainer", "trl.SFTTrainer"), ("training.bf16", False)]
    recipe = load_recipe(QUICKSTART, overrides)
    labels = {run.name: run.method for run in recipe.runs}
    assert labels == {"lora": "LORA / SFTTrainer", "allora": "ALLORA / LfUTrainer"}


def _tiny_config_recipe(tmp_path, **changes) -> str:
    recipe = {
        "name": "tiny",
        "output_dir": str(tmp_path / "out"),
        "model": {
            "config": {"model_type": "bert", "vocab_size": 30522, **TINY_BERT},
            "tokenizer": "builtin:all-MiniLM-L6-v2",
        },
        "data": {"builtin": "quickstart-sentiment", "options": {"n_train": 8, "n_eval": 8}, "max_length": 16},
        "adapter": {"type": "LORA", "r": 2, "target_modules": ["query"]},
        "training": {**TINY_TRAINING, "max_steps": 1, "eval_strategy": "no"},
    }
    for key, value in changes.items():
        recipe[key] = {**recipe[key], **value}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize(
    "changes, path, expected",
    [
        ({"adapter": {"target_modules": ["no_such_layer"]}}, "adapter.target_modules", "no_such_layer"),
        ({"model": {"tokenizer": "nobody-here/no-such-model"}}, "model.tokenizer", "no-such-model"),
    ],
)
def test_run_failures_that_need_the_model_exit_2(tmp_path, changes, path, expected, capsys):
    """What only loading the model can tell (a missing Hub model, target modules that match nothing)."""
    assert main(["run", _tiny_config_recipe(tmp_path, **changes)]) == 2
    err = capsys.readouterr().err
    assert f"  {path}: " in err and expected in err and "Traceback" not in err, err


# -- run, end to end --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_end_to_end_and_push(tmp_path, monkeypatch, capsys):
    import regtune.hub

    monkeypatch.setattr(regtune.hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    model_dir = save_tiny_model(tmp_path / "tiny-bert")
    out = str(tmp_path / "out")
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(model_dir, out), sort_keys=False))

    assert main(["run", str(recipe_path), "--training.learning_rate=5e-3", "--push_to_hub", "me/tiny"]) == 0
    printed = capsys.readouterr().out
    assert "| run" in printed and "held_out accuracy" in printed and "in_distribution accuracy" in printed
    assert os.path.join(out, "results.png") in printed

    # the run folder
    for name in ("recipe.yaml", "results.json", "results.md", "results.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    summary = {"runs": {r["run"]: r for r in json.load(open(os.path.join(out, "results.json")))["results"]}}
    assert list(summary["runs"]) == ["lora", "allora"]
    for run, peft_type in (("lora", "LORA"), ("allora", "ALLORA")):
        result = summary["runs"][run]
        assert result["adapter_type"] == peft_type
        assert 0.0 <= result["metrics"]["held_out"]["accuracy"] <= 1.0
        assert result["trainable_params"] < result["total_params"]
        config = json.load(open(os.path.join(out, run, "adapter", "adapter_config.json")))
        assert config["peft_type"] == peft_type
        per_run = json.load(open(os.path.join(out, run, "metrics.json")))
        assert any("eval_held_out_accuracy" in h for h in per_run["history"])
        # the run's recipe is a standalone recipe that validates, with the override applied
        (again,) = load_recipe(os.path.join(out, run, "recipe.yaml")).runs
        assert again.training["learning_rate"] == 5e-3 and again.adapter.type == peft_type
    assert load_recipe(os.path.join(out, "recipe.yaml")).runs[0].training["learning_rate"] == 5e-3

    # the adapter loads back with peft after `import regtune`
    from peft import PeftModel

    import regtune  # noqa: F401

    base = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base, os.path.join(out, "allora", "adapter"))
    assert loaded.peft_config["default"].peft_type == "ALLORA"

    # --push_to_hub went through HfApi with the staged folder
    create, upload = FakeHfApi.calls
    assert create == ("create_repo", "me/tiny", None, True)
    assert upload[1] == "me/tiny"
    files = upload[2]
    assert {"README.md", "recipe.yaml", "results.json", "results.png"} <= set(files)
    assert {"lora/adapter_model.safetensors", "allora/adapter_config.json", "allora/metrics.json"} <= set(files)
    assert not [f for f in files if "checkpoint" in f or f.endswith("training_args.bin")]
    assert 'PeftModel.from_pretrained(base, "me/tiny", subfolder="allora")' in upload[3]

    # re-running one run with other settings needs --overwrite; the other run's earlier results stay in the table
    assert main(["run", str(recipe_path), "--only", "allora", "--runs.allora.adapter.eta=4"]) == 2
    assert "adapter.eta: 2.0 -> 4" in capsys.readouterr().err
    assert main(["run", str(recipe_path), "--only", "allora", "--runs.allora.adapter.eta=4", "--overwrite"]) == 0
    summary = json.load(open(os.path.join(out, "results.json")))
    assert [r["run"] for r in summary["results"]] == ["lora", "allora"]
    (allora,) = load_recipe(os.path.join(out, "allora", "recipe.yaml")).runs
    assert allora.adapter.kwargs["eta"] == 4.0


@pytest.mark.slow
def test_run_model_built_from_config_full_finetuning(tmp_path, capsys):
    recipe = {
        "name": "from-config",
        "output_dir": str(tmp_path / "out"),
        "model": {
            "config": {"model_type": "bert", "vocab_size": 30522, **TINY_BERT},
            "tokenizer": "builtin:all-MiniLM-L6-v2",
        },
        "data": {"builtin": "quickstart-sentiment", "options": {"n_train": 8, "n_eval": 8}, "max_length": 24},
        "adapter": None,
        "regularizers": [{"type": "dropout_schedule", "p": 0.2}],
        "training": {**TINY_TRAINING, "max_steps": 1, "eval_strategy": "no"},
        "evaluation": {"splits": {"unseen_words": "held_out"}, "metrics": ["accuracy", "macro_f1"]},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    result = json.load(open(tmp_path / "out" / "full" / "metrics.json"))
    assert result["method"] == "full + dropout_schedule"
    assert result["trainable_params"] == result["total_params"]
    assert set(result["metrics"]["unseen_words"]) == {"loss", "accuracy", "macro_f1"}
    assert os.path.isfile(tmp_path / "out" / "full" / "model" / "config.json")
    assert "unseen_words accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_run_local_files_classification_and_causal_lm(tmp_path, capsys):
    """`data.path` (datasets.load_dataset on local csv / json files), string labels, and a causal-lm run."""
    rows = [("a fine and good day", "pos"), ("a bad and awful day", "neg")] * 8
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,verdict\n" + "\n".join(f"{t},{y}" for t, y in rows) + "\n")
    jsonl = tmp_path / "text.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t, _ in rows) + "\n")
    common = {
        "output_dir": str(tmp_path / "out"),
        "training": {**TINY_TRAINING, "max_steps": 1, "eval_strategy": "no"},
    }
    tiny = {"vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    recipe = {
        "name": "local",
        **common,
        "model": {
            "config": {"model_type": "bert", "intermediate_size": 32, **tiny},
            "tokenizer": "builtin:all-MiniLM-L6-v2",
        },
        "data": {
            "path": "csv",
            "data_files": {"train": str(csv), "validation": str(csv)},
            "text_column": "review",
            "label_column": "verdict",
        },
        "adapter": {"type": "LORA", "r": 2, "target_modules": ["query", "value"]},
        "runs": [
            {"name": "cls"},
            {
                "name": "lm",
                "model": {"config": {"model_type": "llama", "intermediate_size": 32, **tiny}, "task": "causal-lm"},
                "data": {
                    "path": "json",
                    "data_files": {"train": str(jsonl), "validation": str(jsonl)},
                    "text_column": "text",
                    "label_column": None,
                },
                "adapter": {"type": "LORA", "r": 2, "target_modules": ["q_proj", "v_proj"]},
            },
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    summary = {r["run"]: r for r in json.load(open(tmp_path / "out" / "results.json"))["results"]}
    assert summary["cls"]["label_names"] == ["neg", "pos"]
    assert set(summary["cls"]["metrics"]["validation"]) == {"loss", "accuracy"}
    assert summary["lm"]["task"] == "causal-lm" and summary["lm"]["label_names"] is None
    assert set(summary["lm"]["metrics"]["validation"]) == {"loss", "perplexity"}
    assert json.load(open(tmp_path / "out" / "lm" / "adapter" / "adapter_config.json"))["task_type"] == "CAUSAL_LM"


# -- resuming, and recipes from the Hub -------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_resumes_skips_finished_runs_and_refuses_changed_settings(tmp_path, capsys):
    path = _tiny_config_recipe(tmp_path, training={"max_steps": 2, "save_strategy": "steps", "save_steps": 1})
    recipe = yaml.safe_load(open(path))
    recipe["runs"] = [{"name": "a"}, {"name": "b", "adapter": {"type": "ALLORA", "r": 2, "target_modules": ["query"]}}]
    open(path, "w").write(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["run", path]) == 0
    first = {run: json.load(open(out / run / "metrics.json")) for run in ("a", "b")}
    mtimes = {run: os.path.getmtime(out / run / "metrics.json") for run in ("a", "b")}
    capsys.readouterr()

    assert main(["run", path]) == 0  # everything finished: nothing is trained again
    assert capsys.readouterr().out.count("finished earlier with the same settings") == 2
    assert {run: os.path.getmtime(out / run / "metrics.json") for run in ("a", "b")} == mtimes

    # a run killed after its first checkpoint continues from it and ends where the uninterrupted run ended
    os.remove(out / "b" / "metrics.json")
    import shutil

    shutil.rmtree(out / "b" / "checkpoints" / "checkpoint-2")
    assert main(["run", path]) == 0
    printed = capsys.readouterr().out
    assert "a finished earlier" in printed and "b (ALLORA) resumed" in printed
    again = json.load(open(out / "b" / "metrics.json"))
    assert again["global_step"] == 2
    assert again["metrics"]["held_out"]["loss"] == pytest.approx(first["b"]["metrics"]["held_out"]["loss"], abs=1e-5)

    # changed settings are refused, naming the fields, before anything is trained; --overwrite starts again
    assert main(["run", path, "--training.learning_rate=5e-3", "--runs.b.adapter.eta=3"]) == 2
    err = capsys.readouterr().err
    assert "runs.a: " in err and "training.learning_rate: 0.01 -> 0.005" in err and "--overwrite" in err
    assert "runs.b: " in err and "adapter.eta" in err
    assert {run: os.path.getmtime(out / run / "metrics.json") for run in ("a",)} == {"a": mtimes["a"]}
    assert main(["run", path, "--training.learning_rate=5e-3", "--overwrite"]) == 0
    assert json.load(open(out / "a" / "metrics.json"))["history"][0]["learning_rate"] <= 5e-3


def test_recipe_from_a_folder_or_the_hub_cache(tmp_path, monkeypatch, capsys):
    """`regtune validate|run owner/name[:path]` downloads with huggingface_hub: here from its own cache, offline."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--me--quickstart-allora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    (snapshot / "variants").mkdir(parents=True)
    text = open(QUICKSTART).read()
    (snapshot / "recipe.yaml").write_text(text)  # what `regtune push` uploads beside the adapter
    (snapshot / "variants" / "small.yaml").write_text(text.replace("r: 8", "r: 2"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    assert main(["validate", "me/quickstart-allora"]) == 0
    assert "# run allora: ALLORA" in capsys.readouterr().out
    assert main(["validate", "me/quickstart-allora:variants/small.yaml"]) == 0
    assert "r: 2\n" in capsys.readouterr().out
    assert load_recipe("me/quickstart-allora").name == "quickstart"
    assert main(["validate", "me/quickstart-allora:variants/nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert "variants/nope.yaml" in err and "me/quickstart-allora" in err and "Traceback" not in err
    assert main(["validate", str(snapshot)]) == 0  # a local folder holding recipe.yaml
