"""The Hub model card, the staged upload folder, and `push_to_hub` through a monkeypatched HfApi (no network)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import regtune
import regtune.hub
from regtune.cli import main
from regtune.data import resolve_model_path
from regtune.experiments.finetune import validate_recipe
from regtune.experiments.runner import run_recipe
from regtune.hub import collect_runs, make_model_card, paper_url, prepare_hub_folder, push_to_hub


TINY_BERT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (tiny) `regtune run` output: LoRA and ALLoRA on a 16-wide BERT saved to a local directory."""
    root = tmp_path_factory.mktemp("hub")
    model_dir = str(root / "tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, **TINY_BERT)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = validate_recipe(
        {
            "name": "tiny-card",
            "description": "Tiny LoRA vs ALLoRA comparison.",
            "output_dir": str(root / "out"),
            "model": {"name_or_path": model_dir},
            "data": {"builtin": "quickstart-sentiment", "options": {"n_train": 8, "n_eval": 8}, "max_length": 24},
            "adapter": {"type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]},
            "training": {
                "max_steps": 1,
                "per_device_train_batch_size": 8,
                "save_strategy": "no",
                "disable_tqdm": True,
            },
            "runs": [
                {"name": "lora"},
                {
                    "name": "allora",
                    "adapter": {"type": "ALLORA", "r": 2, "eta": 3.0, "target_modules": ["query", "value"]},
                },
            ],
        }
    )
    run_recipe(recipe, log=lambda _: None)
    # files that must not be uploaded
    os.makedirs(root / "out" / "lora" / "checkpoints" / "checkpoint-1", exist_ok=True)
    (root / "out" / "lora" / "adapter" / "training_args.bin").write_bytes(b"pickle")
    return str(root / "out")


def _files(folder) -> set[str]:
    return {os.path.relpath(os.path.join(r, f), folder) for r, _, names in os.walk(folder) for f in names}


def test_paper_links():
    assert paper_url("ALLORA") == "https://huggingface.co/papers/2410.09692"
    assert paper_url("LORA") == "https://huggingface.co/papers/2106.09685"
    assert paper_url(None) is None


def test_card_for_one_run(run_dir):
    runs, _ = collect_runs(run_dir, ["allora"])
    card = make_model_card(runs, "me/allora", "name: x\n", subfolders=False)
    # metadata
    assert card.startswith("---\n") and "library_name: peft" in card
    assert "- regtune" in card and "- allora" in card and "pipeline_tag: text-classification" in card
    # method, paper, hyper-parameters, metrics, version
    assert "ALLORA" in card and "https://huggingface.co/papers/2410.09692" in card
    assert "eta: 3.0" in card and "max_steps: 1" in card
    held_out = runs[0]["metrics"]["metrics"]["held_out"]["accuracy"]
    assert f"{held_out:.3f}" in card and "held_out accuracy" in card
    assert regtune.__version__ in card and f"pip install regtune=={regtune.__version__}" in card
    # how to load: `import regtune` comes before PeftModel.from_pretrained
    assert card.index("import regtune") < card.index('PeftModel.from_pretrained(base, "me/allora")')
    assert "num_labels=2" in card
    assert "## Recipe" in card and "```yaml\nname: x\n```" in card


def test_card_uses_hub_id_of_builtin_base_model(run_dir):
    runs, _ = collect_runs(run_dir, ["lora"])
    runs[0]["metrics"]["base_model"] = "sentence-transformers/all-MiniLM-L6-v2"
    card = make_model_card(runs, "me/lora", "name: x\n", subfolders=False)
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert 'from_pretrained("sentence-transformers/all-MiniLM-L6-v2", num_labels=2)' in card


def test_staged_folder_for_one_run(run_dir, tmp_path):
    folder = prepare_hub_folder(run_dir, str(tmp_path / "stage"), "me/allora", runs=["allora"])
    files = _files(folder)
    assert ADAPTER_FILES | {"README.md", "recipe.yaml", "metrics.json", "results.png"} <= files
    assert not any(f.startswith("checkpoints") or f.endswith("training_args.bin") for f in files)
    assert json.load(open(os.path.join(folder, "adapter_config.json")))["peft_type"] == "ALLORA"
    # the embedded and uploaded recipe is the run's own (standalone) recipe
    recipe_yaml = open(os.path.join(folder, "recipe.yaml")).read()
    assert "eta: 3.0" in recipe_yaml and "runs:" not in recipe_yaml
    assert recipe_yaml.strip() in open(os.path.join(folder, "README.md")).read()
    # what is uploaded loads with peft after `import regtune`
    from peft import PeftModel

    base = BertForSequenceClassification.from_pretrained(
        os.path.join(os.path.dirname(run_dir), "tiny-bert"), num_labels=2
    )
    model = PeftModel.from_pretrained(base, folder)
    assert model.peft_config["default"].peft_type == "ALLORA" and model.peft_config["default"].eta == 3.0


def test_staged_folder_for_a_recipe(run_dir, tmp_path):
    folder = prepare_hub_folder(run_dir, str(tmp_path / "stage"), "me/tiny")
    files = _files(folder)
    assert {"README.md", "recipe.yaml", "results.json", "results.png"} <= files
    results = json.load(open(os.path.join(folder, "results.json")))["results"]  # the one results format
    assert [r["run"] for r in results] == ["lora", "allora"] and not any("history" in r for r in results)
    for run in ("lora", "allora"):
        assert {f"{run}/{f}" for f in ADAPTER_FILES | {"recipe.yaml", "metrics.json"}} <= files
        assert f"{run}/README.md" not in files  # peft's template card is not uploaded; the root card covers all
    assert not any("checkpoint" in f or f.endswith("training_args.bin") for f in files)
    card = open(os.path.join(folder, "README.md")).read()
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == "# tiny-card"
    assert 'subfolder="lora"' in card and 'subfolder="allora"' in card
    assert "runs:" in card  # the full recipe, with both runs


def test_one_run_folder_can_be_pushed_directly(run_dir, tmp_path):
    folder = prepare_hub_folder(os.path.join(run_dir, "lora"), str(tmp_path / "stage"), "me/lora")
    assert ADAPTER_FILES | {"README.md", "recipe.yaml", "metrics.json"} <= _files(folder)


def test_staging_errors(run_dir, tmp_path):
    with pytest.raises(ValueError, match="no run named 'nope'"):
        prepare_hub_folder(run_dir, str(tmp_path / "a"), "me/x", runs=["nope"])
    with pytest.raises(ValueError, match="not a regtune run folder"):
        prepare_hub_folder(str(tmp_path), str(tmp_path / "b"), "me/x")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "f").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        prepare_hub_folder(run_dir, str(tmp_path / "c"), "me/x")


class RecordingHfApi:
    calls: list = []

    def __init__(self, token=None):
        RecordingHfApi.calls.append(("init", token))

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        RecordingHfApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        RecordingHfApi.calls.append(("upload_folder", repo_id, sorted(_files(folder_path)), commit_message))
        return "commit-info"


def test_push_to_hub_uploads_the_staged_folder(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(regtune.hub, "HfApi", RecordingHfApi)
    RecordingHfApi.calls = []
    assert push_to_hub(run_dir, "me/tiny", runs=["allora"], private=True, token="t") == "commit-info"
    init, create, upload = RecordingHfApi.calls
    assert init == ("init", "t") and create == ("create_repo", "me/tiny", True, True)
    assert upload[1] == "me/tiny" and "with regtune" in upload[3]
    expected = _files(prepare_hub_folder(run_dir, str(tmp_path / "stage"), "me/tiny", runs=["allora"]))
    assert set(upload[2]) == expected


def test_cli_push_stage_and_upload(run_dir, tmp_path, monkeypatch, capsys):
    stage = str(tmp_path / "stage")
    assert main(["push", run_dir, "me/tiny", "--only", "lora", "--stage", stage]) == 0
    out = capsys.readouterr().out
    assert "adapter_model.safetensors" in out and "nothing uploaded" in out
    assert os.path.isfile(os.path.join(stage, "README.md"))

    monkeypatch.setattr(regtune.hub, "HfApi", RecordingHfApi)
    RecordingHfApi.calls = []
    assert main(["push", run_dir, "me/tiny", "--private"]) == 0
    assert ("create_repo", "me/tiny", True, True) in RecordingHfApi.calls
    assert main(["push", str(tmp_path / "missing"), "me/tiny"]) == 2


def test_push_without_network_is_one_line_with_exit_2(run_dir, monkeypatch, capsys):
    # a real connection failure: a token is set, the endpoint is a closed local port
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_token_for_the_test")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    capsys.readouterr()
    assert main(["push", run_dir, "me/tiny", "--only", "lora"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("regtune push: cannot push to me/tiny: the Hub could not be reached"), error
    assert error.count("\n") == 1 and "Traceback" not in error


@pytest.fixture(scope="module")
def seeded_run_dir(run_dir, tmp_path_factory):
    """A `regtune run` output with seeds: `<run>/seed-<k>/adapter`, and a run trained once under two names."""
    root = tmp_path_factory.mktemp("seeded")
    recipe = validate_recipe(
        {
            "name": "tiny-seeded",
            "output_dir": str(root / "out"),
            "seeds": [0, 1],
            "model": {"name_or_path": os.path.join(os.path.dirname(run_dir), "tiny-bert")},
            "data": {"builtin": "quickstart-sentiment", "options": {"n_train": 8, "n_eval": 8}, "max_length": 24},
            "adapter": {"type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]},
            "training": {
                "max_steps": 1,
                "per_device_train_batch_size": 8,
                "save_strategy": "no",
                "disable_tqdm": True,
            },
            "runs": [{"name": "lora"}, {"name": "lora-again"}],
        }
    )
    run_recipe(recipe, log=lambda _: None)
    return str(root / "out")


def test_a_seeded_recipe_can_be_pushed(seeded_run_dir, tmp_path):
    runs, _ = collect_runs(seeded_run_dir)
    assert sorted(r["name"] for r in runs) == ["lora-again/seed-0", "lora-again/seed-1", "lora/seed-0", "lora/seed-1"]
    folder = prepare_hub_folder(seeded_run_dir, str(tmp_path / "stage"), "me/seeded", runs=["lora"])
    files = _files(folder)
    assert {f"lora/seed-{k}/{f}" for k in (0, 1) for f in ADAPTER_FILES} <= files
    assert not any(f.startswith("lora-again") for f in files)
    # a run trained once under two names pushes the adapter it shares
    single = prepare_hub_folder(seeded_run_dir, str(tmp_path / "one"), "me/one", runs=["lora-again/seed-1"])
    assert ADAPTER_FILES <= _files(single)
