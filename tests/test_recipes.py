"""Recipe validation (key paths, close matches, types, ranges), overrides, runs, and the built-in quickstart task."""

from __future__ import annotations

import copy
import glob
import os

import pytest
import yaml

from regtune.cli import main as cli_main
from regtune.data import BUILTIN_TASKS, get_task, load_task
from regtune.data.quickstart import (
    HELD_OUT_EXPRESSIONS,
    HELD_OUT_WORDS,
    TEST_TEMPLATES,
    TRAIN_TEMPLATES,
    TRAIN_WORDS,
)
from regtune.experiments import RecipeError, apply_overrides, load_recipe, load_yaml, parse_override_args
from regtune.experiments.finetune import merge_run, validate_recipe


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = {
    "name": "t",
    "model": {"name_or_path": "builtin:all-MiniLM-L6-v2"},
    "data": {"builtin": "quickstart-sentiment", "options": {"n_train": 16, "n_eval": 16}},
    "adapter": {"type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
    "training": {"learning_rate": 1e-3, "num_train_epochs": 1},
    "runs": [
        {"name": "lora"},
        {"name": "allora", "adapter": {"type": "ALLORA", "r": 4, "eta": 2.0, "target_modules": ["query", "value"]}},
    ],
}


def recipe(**changes) -> dict:
    raw = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        raw = apply_overrides(raw, {dotted.replace("__", "."): value})
    return raw


def errors_of(raw) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    assert isinstance(info.value, ValueError)
    return dict(info.value.errors)


# -- valid recipes --------------------------------------------------------------------------------------------------


def test_valid_recipe_resolves_runs():
    r = validate_recipe(recipe())
    assert [run.name for run in r.runs] == ["lora", "allora"]
    lora, allora = r.runs
    assert lora.adapter.type == "LORA" and lora.adapter.kwargs["lora_alpha"] == 8
    # a run whose adapter type differs replaces the base adapter: ALLoRA does not inherit lora_alpha
    assert allora.adapter.type == "ALLORA" and "lora_alpha" not in allora.adapter.kwargs
    # the task type is filled in from the model's task, so peft trains the classification head
    assert allora.adapter.kwargs["task_type"] == "SEQ_CLS"
    assert allora.task == "sequence-classification"
    assert allora.evaluation.splits == ["in_distribution", "held_out"]
    assert allora.evaluation.metrics == ["accuracy"]
    assert r.output_dir == "runs/t"
    assert lora.method == "LORA" and allora.method == "ALLORA"


def test_run_to_dict_round_trips():
    for run in validate_recipe(recipe()).runs:
        again = validate_recipe(run.to_dict()).runs
        assert len(again) == 1 and again[0].to_dict() == run.to_dict()


def test_single_run_recipe_is_named_after_the_method():
    raw = recipe()
    del raw["runs"]
    assert [r.name for r in validate_recipe(raw).runs] == ["lora"]
    raw["adapter"] = None
    (run,) = validate_recipe(raw).runs
    assert run.name == "full" and run.adapter is None and run.method == "full"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "recipes", "*.yaml"))))
def test_every_shipped_recipe_validates(path):
    """Every recipe in recipes/, of every kind, passes the loader (what `regtune validate` runs)."""
    r = load_recipe(path)
    assert r.kind in ("runs", "token-budget", "gardo")
    assert r.runs if r.kind == "runs" else r.output_dir


def test_kind_is_explicit_or_told_by_the_sections(tmp_path):
    from regtune.experiments import read_recipe

    path = tmp_path / "r.yaml"
    for data, kind in [(BASE, "runs"), ({"budget": {}}, "token-budget"), ({"testbed": {}}, "gardo"),
                       ({**BASE, "kind": "runs"}, "runs"), ({"kind": "multi-epoch"}, "token-budget")]:  # fmt: skip
        path.write_text(yaml.safe_dump(data))
        assert read_recipe(str(path))[0] == kind
    path.write_text(yaml.safe_dump({**BASE, "kind": "run"}))
    with pytest.raises(RecipeError, match="Did you mean 'runs'"):
        load_recipe(str(path))


def test_quickstart_recipe_compares_lora_and_allora():
    r = load_recipe(os.path.join(REPO, "recipes", "quickstart.yaml"))
    assert [run.adapter.type for run in r.runs] == ["LORA", "ALLORA"]
    assert {run.model.name_or_path for run in r.runs} == {"builtin:all-MiniLM-L6-v2"}
    assert {run.data.builtin for run in r.runs} == {"quickstart-sentiment"}


def test_yaml_reads_exponent_floats():
    assert load_yaml("lr: 1e-3\nb: 5E4\nc: 1.0e-2\nd: 3\ne: '1e-3'") == {
        "lr": 1e-3,
        "b": 5e4,
        "c": 1e-2,
        "d": 3,
        "e": "1e-3",
    }


def test_yaml_booleans_are_only_true_and_false():
    assert load_yaml("a: no\nb: yes\nc: off\nd: true\ne: False\nf: .inf\ng: null") == {
        "a": "no",
        "b": "yes",
        "c": "off",
        "d": True,
        "e": False,
        "f": float("inf"),
        "g": None,
    }
    assert parse_override_args(["--training.save_strategy=no"]) == [("training.save_strategy", "no")]


def test_trainer_config_class_fields_are_checked():
    r = validate_recipe(recipe(trainer="Trainer", training__weight_decay=0.1))
    assert r.runs[0].trainer == "Trainer" and r.runs[0].training["weight_decay"] == 0.1


# -- unknown keys name their path and the close matches ----------------------------------------------------------------


def test_typo_in_adapter_names_key_path_and_suggestion():
    errors = errors_of(recipe(adapter__ra=8))
    assert "adapter.ra" in errors and "'r'" in errors["adapter.ra"]


def test_typo_in_a_run_is_reported_under_the_run():
    raw = recipe()
    raw["runs"][1]["adapter"]["etaa"] = 2.0
    errors = errors_of(raw)
    assert list(errors) == ["runs[1].adapter.etaa"]
    assert "Did you mean 'eta'?" in errors["runs[1].adapter.etaa"]
    assert "ALLoRAConfig" in errors["runs[1].adapter.etaa"]


def test_error_in_base_section_is_reported_once():
    errors = errors_of(recipe(training__learning_rat=1e-3))
    assert list(errors) == ["training.learning_rat"]
    assert "learning_rate" in errors["training.learning_rat"]


@pytest.mark.parametrize(
    "key, suggestion",
    [("trainig", "training"), ("adaptor", "adapter"), ("regularisers", "regularizers"), ("evalution", "evaluation")],
)
def test_top_level_typo(key, suggestion):
    raw = recipe()
    raw[key] = {}
    errors = errors_of(raw)
    assert key in errors and repr(suggestion) in errors[key]


@pytest.mark.parametrize(
    "path, value, suggestion",
    [
        ("model.name_or_pth", "x", "name_or_path"),
        ("data.max_lenght", 32, "max_length"),
        ("data.options.n_trian", 8, "n_train"),
        ("evaluation.metric", ["accuracy"], "metrics"),
    ],
)
def test_section_typos(path, value, suggestion):
    errors = errors_of(apply_overrides(recipe(), {path: value}))
    assert path in errors and repr(suggestion) in errors[path]


def test_unknown_run_key():
    raw = recipe()
    raw["runs"][0]["adpter"] = {}
    errors = errors_of(raw)
    assert "runs[0].adpter" in errors and "'adapter'" in errors["runs[0].adpter"]


def test_unknown_adapter_type_suggests_allora():
    raw = recipe()
    raw["runs"][1]["adapter"]["type"] = "ALORA"
    errors = errors_of(raw)
    assert "ALLORA" in errors["runs[1].adapter.type"] and "Did you mean" in errors["runs[1].adapter.type"]


def test_adapter_type_is_case_insensitive():
    raw = recipe()
    raw["runs"][1]["adapter"]["type"] = "allora"
    assert validate_recipe(raw).runs[1].adapter.type == "ALLORA"


def test_unknown_builtin_task_and_model():
    errors = errors_of(recipe(data__builtin="quickstart-sentimnt", model__name_or_path="builtin:all-MiniLM-L12"))
    assert "'quickstart-sentiment'" in errors["data.builtin"]
    assert "builtin:all-MiniLM-L6-v2" in errors["model.name_or_path"]


def test_unknown_regularizer_type():
    errors = errors_of(recipe(regularizers=[{"type": "multi_sample_dropot"}]))
    assert "regularizers[0].type" in errors and "multi_sample_dropout" in errors["regularizers[0].type"]


def test_regularizer_kwargs_are_checked_against_its_signature():
    from regtune.regularizers import REGULARIZERS

    name = sorted(REGULARIZERS)[0]
    errors = errors_of(recipe(regularizers=[{"type": name, "no_such_option": 1}]))
    assert "regularizers[0].no_such_option" in errors


def test_regularizer_own_checks_run_at_validation():
    errors = errors_of(recipe(regularizers=[{"type": "dropout_schedule", "p": 2.0}]))
    assert "regularizers[0].p" in errors and "`p`" in errors["regularizers[0].p"]
    (run, _) = validate_recipe(recipe(regularizers=[{"type": "dropout_schedule", "p": 0.2}])).runs
    assert run.regularizers[0].type == "dropout_schedule" and run.method == "LORA + dropout_schedule"


def test_regularizers_need_a_trainer_that_takes_them():
    errors = errors_of(recipe(trainer="Trainer", regularizers=[{"type": "dropout_schedule", "p": 0.2}]))
    assert "RegTrainer" in errors["regularizers"]


def test_unknown_trainer():
    errors = errors_of(recipe(trainer="RegTrainr"))
    assert "'RegTrainer'" in errors["trainer"]


def test_all_errors_are_reported_together():
    errors = errors_of(recipe(adapter__ra=8, training__num_train_epochs="three", data__max_length=0))
    assert {"adapter.ra", "training.num_train_epochs", "data.max_length"} <= set(errors)


def test_error_message_lists_every_problem():
    raw = recipe(adapter__ra=8, training__num_train_epochs="three")
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    text = str(info.value)
    assert "adapter.ra" in text and "training.num_train_epochs" in text and "2 errors" in text


# -- wrong types and out-of-range values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("adapter.r", "eight", "expected an integer"),
        ("adapter.r", 2.5, "expected an integer"),
        ("adapter.target_modules", 3, "expected"),
        ("training.num_train_epochs", "three", "expected a number"),
        ("training.per_device_train_batch_size", True, "expected an integer"),
        ("data.max_length", "long", "expected an integer"),
        ("model.trust_remote_code", "yes", "expected a boolean"),
        ("seed", "x", "expected an integer"),
        ("evaluation.metrics", ["acuracy"], "Did you mean 'accuracy'?"),
    ],
)
def test_wrong_type(path, value, expected):
    errors = errors_of(apply_overrides(recipe(), {path: value}))
    key = path if path != "evaluation.metrics" else "evaluation.metrics[0]"
    assert key in errors and expected in errors[key], errors


def test_enum_value_suggests_close_match():
    errors = errors_of(recipe(training__eval_strategy="epochs"))
    assert "Did you mean 'epoch'?" in errors["training.eval_strategy"]


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("training.learning_rate", -1.0, ">= 0.0"),
        ("training.adam_beta2", 1.5, "< 1.0"),
        ("training.weight_decay", -0.1, ">= 0.0"),
        ("training.per_device_train_batch_size", 0, ">= 1"),
        ("data.max_length", 0, ">= 1"),
        ("data.options.n_train", 1, ">= 2"),
        ("seed", -3, ">= 0"),
    ],
)
def test_out_of_range(path, value, expected):
    errors = errors_of(apply_overrides(recipe(), {path: value}))
    assert path in errors and expected in errors[path], errors


def test_adapter_config_own_checks_are_reported_under_the_run():
    raw = recipe()
    raw["runs"][1]["adapter"]["eta"] = -1.0
    errors = errors_of(raw)
    assert "runs[1].adapter.eta" in errors and "> 0" in errors["runs[1].adapter.eta"]


def test_allora_rejects_lora_alpha_from_its_own_run():
    raw = recipe()
    raw["runs"][1]["adapter"]["lora_alpha"] = 16
    assert "lora_alpha" in errors_of(raw)["runs[1].adapter.lora_alpha"]


@pytest.mark.parametrize("key", ["output_dir", "push_to_hub"])
def test_forbidden_training_keys(key):
    errors = errors_of(recipe(**{f"training__{key}": "x" if key == "output_dir" else True}))
    assert f"training.{key}" in errors


def test_model_needs_exactly_one_source():
    errors = errors_of(recipe(model={"tokenizer": "x"}))
    assert "model" in errors


def test_config_model_needs_model_type_and_tokenizer():
    errors = errors_of(recipe(model={"config": {"hidden_size": 16}}))
    assert "model.config.model_type" in errors and "model.tokenizer" in errors


def test_run_names_must_be_unique_and_present():
    raw = recipe()
    raw["runs"].append({"name": "lora"})
    raw["runs"].append({"adapter": None})
    errors = errors_of(raw)
    assert "duplicate" in errors["runs[2].name"] and "required" in errors["runs[3].name"]


def test_run_name_must_be_a_folder_name():
    raw = recipe()
    raw["runs"][0]["name"] = "../evil"
    assert "runs[0].name" in errors_of(raw)


# -- overrides and merging --------------------------------------------------------------------------------------------


def test_parse_override_args_reads_yaml_scalars():
    parsed = parse_override_args(
        [
            "--training.learning_rate=1e-3",
            "--adapter.target_modules=[query, value]",
            "--seed",
            "7",
            "--x.flag",
            "--y=null",
        ]
    )
    assert parsed == [
        ("training.learning_rate", 1e-3),
        ("adapter.target_modules", ["query", "value"]),
        ("seed", 7),
        ("x.flag", True),
        ("y", None),
    ]


def test_parse_override_args_rejects_positionals():
    with pytest.raises(RecipeError):
        parse_override_args(["oops"])


def test_apply_overrides_by_run_name_index_and_new_sections():
    raw = apply_overrides(
        recipe(),
        [
            ("runs.allora.adapter.eta", 4.0),
            ("runs.0.training.learning_rate", 5e-4),
            ("evaluation.metrics", ["macro_f1"]),
        ],
    )
    assert raw["runs"][1]["adapter"]["eta"] == 4.0
    assert raw["runs"][0]["training"] == {"learning_rate": 5e-4}
    r = validate_recipe(raw)
    assert r.runs[1].adapter.kwargs["eta"] == 4.0
    assert r.runs[0].training["learning_rate"] == 5e-4 and r.runs[1].training["learning_rate"] == 1e-3
    assert r.runs[0].evaluation.metrics == ["macro_f1"]
    assert BASE["runs"][1]["adapter"].get("eta") == 2.0  # the input is not modified


def test_apply_overrides_unknown_run_name():
    with pytest.raises(RecipeError) as info:
        apply_overrides(recipe(), {"runs.alora.adapter.eta": 4.0})
    assert "'allora'" in str(info.value)


def test_override_typo_is_reported_with_its_path(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe()))
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path), parse_override_args(["--training.learnig_rate=1e-3"]))
    assert "training.learnig_rate" in dict(info.value.errors)
    assert str(path) in str(info.value)


def test_merge_run_semantics():
    base = {"adapter": {"type": "LORA", "r": 8, "lora_alpha": 16}, "training": {"a": 1, "b": 2}, "regularizers": [1]}
    same_type = merge_run(base, {"adapter": {"r": 4}, "training": {"b": 3}, "regularizers": []})
    assert same_type == {
        "adapter": {"type": "LORA", "r": 4, "lora_alpha": 16},
        "training": {"a": 1, "b": 3},
        "regularizers": [],
    }
    other = merge_run(base, {"adapter": {"type": "allora", "eta": 2}})
    assert other["adapter"] == {"type": "allora", "eta": 2}
    assert merge_run(base, {"adapter": None})["adapter"] is None
    assert base["adapter"]["r"] == 8


def test_recipe_name_defaults_to_the_file_name(tmp_path):
    raw = recipe()
    del raw["name"]
    path = tmp_path / "my-recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = load_recipe(str(path))
    assert r.name == "my-recipe" and r.output_dir == "runs/my-recipe"
    assert r.raw["name"] == "my-recipe"  # so the recipe.yaml written to the run folder keeps it


def test_select_runs():
    r = validate_recipe(recipe())
    assert [run.name for run in r.select(["allora"]).runs] == ["allora"]
    with pytest.raises(RecipeError):
        r.select(["nope"])


# -- the built-in quickstart task -------------------------------------------------------------------------------------


def test_quickstart_task_splits():
    task = get_task("quickstart-sentiment")
    assert task.name in BUILTIN_TASKS
    data = load_task("quickstart-sentiment", n_train=32, n_eval=40, seed=1)
    assert {k: len(v) for k, v in data.items()} == {"train": 32, "in_distribution": 40, "held_out": 40}
    assert data["train"].features["label"].names == ["negative", "positive"]
    for split in data.values():
        labels = split["label"]
        assert sum(labels) == len(labels) // 2  # balanced
        assert len(set(split["text"])) == len(split)  # distinct sentences


def _words_in(texts):
    return {w.strip(".,!:") for t in texts for w in t.split()}


def test_quickstart_held_out_words_and_templates_never_seen_in_training():
    data = load_task("quickstart-sentiment", n_train=200, n_eval=200)
    held_out_words = {w for ws in HELD_OUT_WORDS.values() for w in ws}
    expressions = {e for es in HELD_OUT_EXPRESSIONS.values() for e in es}
    seen = {w for ws in TRAIN_WORDS.values() for w in ws}
    assert not held_out_words & seen
    for split in ("train", "in_distribution"):
        texts = data[split]["text"]
        assert not held_out_words & _words_in(texts)
        assert not any(e in t for e in expressions for t in texts)
        assert seen & _words_in(texts)
    held_out = data["held_out"]["text"]
    assert not seen & _words_in(held_out)
    assert sum(any(e in t for e in expressions) for t in held_out) == 100  # half expressions, half words
    assert not set(TRAIN_TEMPLATES) & set(TEST_TEMPLATES)
    assert not set(data["train"]["text"]) & (set(data["in_distribution"]["text"]) | set(held_out))


def test_quickstart_task_is_deterministic_and_checks_sizes():
    a = load_task("quickstart-sentiment", n_train=16, n_eval=16, seed=3)
    b = load_task("quickstart-sentiment", n_train=16, n_eval=16, seed=3)
    assert a["train"]["text"] == b["train"]["text"] and a["held_out"]["text"] == b["held_out"]["text"]
    with pytest.raises(ValueError, match="n_train"):
        load_task("quickstart-sentiment", n_train=1)
    with pytest.raises(ValueError, match="quickstart-sentiment"):
        get_task("quickstart")


def test_table_and_plot(tmp_path):
    from regtune.experiments.report import format_table, plot_results

    def result(name, acc, history):
        return {
            "run": name,
            "method": name.upper(),
            "trainable_params": 1234,
            "train_seconds": 1.5,
            "metrics": {"held_out": {"loss": 0.5, "accuracy": acc}},
            "history": history,
        }

    curve = [{"step": 1, "eval_held_out_accuracy": 0.5}, {"step": 2, "eval_held_out_accuracy": 0.75}]
    results = [result("lora", 0.75, curve), result("allora", 0.8, curve[-1:])]
    table = format_table(results)
    assert table.splitlines()[0].split("|")[1:-1] == [
        " run    ",
        " method ",
        " trainable params ",
        " train time (s) ",
        " held_out accuracy ",
    ]
    assert "| lora   | LORA   | 1,234" in table and "0.800" in table
    assert plot_results(results, str(tmp_path / "a.png")) == str(tmp_path / "a.png")
    assert os.path.getsize(tmp_path / "a.png") > 0
    import matplotlib.image

    wide = matplotlib.image.imread(tmp_path / "a.png").shape[1]
    plot_results([result("lora", 0.75, curve[-1:])], str(tmp_path / "b.png"))  # one point: no curve panel
    assert matplotlib.image.imread(tmp_path / "b.png").shape[1] < wide


def test_host_config_fields_are_checked_by_their_annotations():
    # peft's `list[int] | int`: the error inside the list is reported, not a second one for the whole field
    errors = errors_of(apply_overrides(recipe(), {"adapter.layers_to_transform": [1, "a"]}))
    assert "expected an integer" in errors["adapter.layers_to_transform[1]"]
    assert "adapter.layers_to_transform" not in errors
    # a union with no matching member names every allowed type
    errors = errors_of(apply_overrides(recipe(), {"adapter.target_modules": 3}))
    assert errors["adapter.target_modules"].startswith("expected list of string or string or null, got 3")
    # peft's pattern choice 'pissa_niter_[number of iters]' admits its instances; non-finite numbers are refused
    run = validate_recipe(apply_overrides(recipe(), {"adapter.init_lora_weights": "pissa_niter_4"})).runs[0]
    assert run.adapter.kwargs["init_lora_weights"] == "pissa_niter_4"
    errors = errors_of(apply_overrides(recipe(), {"training.learning_rate": float("inf")}))
    assert "expected a finite number" in errors["training.learning_rate"]


L2SP_MODULE = """
import math
from regtune.regularizers import Regularizer


class L2SP(Regularizer):
    name = "l2sp"

    def __init__(self, weight: float = 1e-2):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"L2SP: `weight` must be a finite number >= 0, got {weight!r}.")
        self.weight = weight
"""


def _custom_recipe(tmp_path, item: dict) -> str:
    recipe = {
        "name": "custom-reg",
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": "builtin:all-MiniLM-L6-v2"},
        "data": {"builtin": "quickstart-sentiment"},
        "regularizers": [item],
        "runs": [{"name": "a"}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_a_recipe_names_a_custom_regularizer_by_import_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_regs.py").write_text(L2SP_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for spelling in ("my_regs:L2SP", "my_regs.L2SP"):
        recipe = load_recipe(_custom_recipe(tmp_path, {"type": spelling, "weight": 0.5}))
        assert recipe.runs[0].regularizers[0].to_dict() == {"type": spelling, "weight": 0.5}
    bad = [
        ({"type": "my_regs:L2SP", "weight": -1}, "L2SP: `weight` must be a finite number >= 0, got -1"),
        ({"type": "my_regs:L2SP", "wieght": 1}, "regularizers[0].wieght"),
        ({"type": "my_regs:Nope"}, "regularizers[0].type: Regularizer type 'my_regs:Nope': cannot import it"),
        ({"type": "math:sqrt"}, "is not a regtune.regularizers.Regularizer subclass"),
    ]
    for item, message in bad:
        capsys.readouterr()
        assert cli_main(["validate", _custom_recipe(tmp_path, item)]) == 2
        assert message in capsys.readouterr().err


def test_a_hub_recipe_imports_code_only_with_trust_remote_code(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_regs.py").write_text(L2SP_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    local = _custom_recipe(tmp_path, {"type": "my_regs:L2SP", "weight": 0.5})
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, **kwargs: local)
    capsys.readouterr()
    assert cli_main(["validate", "someone/recipes:custom.yaml"]) == 2
    error = capsys.readouterr().err
    assert "regularizers[0].type: 'my_regs:L2SP' would be imported" in error and "--trust-remote-code" in error
    assert cli_main(["validate", "someone/recipes:custom.yaml", "--trust-remote-code"]) == 0


def test_a_recipe_held_in_python_and_seeds_alone_mean_the_runs_kind(tmp_path):
    raw = {
        "name": "in-python",
        "output_dir": str(tmp_path / "out"),
        "seeds": [0, 1],  # without `kind:`, seeds alone do not make a GARDO recipe
        "model": {"name_or_path": "builtin:all-MiniLM-L6-v2"},
        "data": {"builtin": "quickstart-sentiment"},
        "runs": [{"name": "a"}],
    }
    recipe = load_recipe(raw, [("training.learning_rate", 1e-3)])
    assert recipe.kind == "runs" and recipe.seeds == [0, 1] and recipe.runs[0].training["learning_rate"] == 1e-3
    assert "name" in raw and "training" not in raw  # the caller's mapping is not changed
