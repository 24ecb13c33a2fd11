"""Recipe metrics from the `evaluate` library (a local metric folder: no network), `select.mode`, and the errors:
a causal-lm task asking for metrics, a metric that cannot be loaded offline, malformed metric items."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from regtune.data import resolve_model_path
from regtune.experiments import RecipeError, run_recipe
from regtune.experiments.build import load_metrics
from regtune.experiments.finetune import validate_recipe


TINY_BERT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24}
# A metric script in the form `evaluate.load(folder)` reads: <folder>/<folder name>.py with one evaluate.Metric.
HITS_METRIC = """
import datasets
import evaluate


class Hits(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="scale * correct predictions, and the number of predictions",
            citation="",
            inputs_description="predictions, references: class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, scale=1.0):
        return {"hits": scale * sum(int(p == r) for p, r in zip(predictions, references)), "n": len(predictions),
                "per_class": [0.0, 1.0]}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT saved to a local directory, and the local metric folder `hits`."""
    root = tmp_path_factory.mktemp("metrics")
    model_dir = str(root / "tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, **TINY_BERT)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (root / "hits").mkdir()
    (root / "hits" / "hits.py").write_text(HITS_METRIC, encoding="utf-8")
    return {"model": model_dir, "metric": str(root / "hits")}


def recipe(setup, out, **changes) -> dict:
    raw = {
        "name": "tiny-metrics",
        "output_dir": str(out),
        "model": {"name_or_path": setup["model"]},
        "data": {"builtin": "quickstart-sentiment", "options": {"n_train": 8, "n_eval": 8}, "max_length": 24},
        "adapter": {"type": "LORA", "r": 2, "target_modules": ["query", "value"]},
        "training": {"max_steps": 1, "per_device_train_batch_size": 8, "save_strategy": "no", "disable_tqdm": True,
                     "report_to": "none"},
        "evaluation": {"metrics": ["accuracy", {"name": setup["metric"], "args": {"scale": 2.0}}]},
    }  # fmt: skip
    raw.update(changes)
    return raw


def errors_of(raw) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    return dict(info.value.errors)


def test_local_evaluate_metric_end_to_end(setup, tmp_path):
    result = run_recipe(validate_recipe(recipe(setup, tmp_path / "out")), log=lambda _: None)
    saved = json.load(open(tmp_path / "out" / "lora" / "metrics.json"))
    assert set(saved["metrics"]) == {"in_distribution", "held_out"}
    for split, values in saved["metrics"].items():
        # the metric's own scalar keys next to the built-in accuracy (its per-class list is not kept)
        assert set(values) == {"loss", "accuracy", "hits", "n"}, (split, values)
        assert values["n"] == 8
        # by hand: hits = scale * correct predictions = 2 * accuracy * n
        assert values["hits"] == pytest.approx(2.0 * values["accuracy"] * 8)
    assert "in_distribution hits" in result.table and "held_out n" in result.table


def sweep_recipe(setup, out, mode: str | None) -> dict:
    scales = [{"name": setup["metric"], "args": {"scale": s}} for s in (0.5, 3.0)]
    select = {"split": "in_distribution", "metric": "hits", "seeds": [7]} | ({"mode": mode} if mode else {})
    return recipe(
        setup, out, seeds=[0], select=select,
        runs=[{"name": "lora", "sweep": {"evaluation.metrics": [[m] for m in scales]}}],
    )  # fmt: skip


@pytest.mark.parametrize("mode", [None, "min"])
def test_select_mode_chooses_by_the_evaluate_metric(setup, tmp_path, mode):
    rec = validate_recipe(sweep_recipe(setup, tmp_path / "out", mode))
    assert rec.selection.mode == (mode or "max")
    run_recipe(rec, log=lambda _: None)
    summary = json.load(open(tmp_path / "out" / "results.json"))
    sweep = summary["sweeps"]["lora"]
    by_scale = {row["values"]["evaluation.metrics"][0]["args"]["scale"]: row for row in sweep["rows"]}
    # the same model and data at both scales: hits differ by the factor of the scales (unless none is correct)
    low, high = by_scale[0.5]["mean_metric"], by_scale[3.0]["mean_metric"]
    assert high == pytest.approx(6.0 * low)
    assert low > 0  # (some predictions of the tiny model are right: the choice below means something)
    chosen = sweep["chosen"]["evaluation.metrics"][0]["args"]["scale"]
    assert chosen == (0.5 if mode == "min" else 3.0)


def test_select_defaults_and_checks(setup, tmp_path):
    base = recipe(setup, tmp_path, seeds=[0], runs=[{"name": "a", "sweep": {"training.learning_rate": [1e-3, 1e-2]}}])
    assert validate_recipe({**base, "select": {"metric": "loss"}}).selection.mode == "min"
    assert validate_recipe({**base, "select": {"metric": "accuracy"}}).selection.mode == "max"
    assert validate_recipe({**base, "select": {"metric": "perplexity", "mode": "max"}}).selection.mode == "max"
    # a result key of an evaluate metric is known once it ran; without one configured, a name must be built in
    plain = {**base, "evaluation": {"metrics": ["accuracy"]}}
    assert "Did you mean 'accuracy'?" in errors_of({**plain, "select": {"metric": "acuracy"}})["select.metric"]
    assert "expected one of 'max', 'min'" in errors_of({**base, "select": {"mode": "up"}})["select.mode"]


def test_causal_lm_metrics_are_refused(setup, tmp_path):
    raw = recipe(setup, tmp_path, data={"builtin": "shakespeare-turns"}, evaluation={"metrics": ["rouge"]})
    raw["model"] = {"name_or_path": "builtin:all-MiniLM-L6-v2", "task": "causal-lm"}
    raw["adapter"] = {"type": "LORA", "r": 2, "target_modules": ["query"]}
    message = errors_of(raw)["evaluation.metrics"]
    assert "loss and perplexity only" in message and "generated text" in message


def test_metric_items_are_checked(setup, tmp_path):
    metrics = ["acuracy", {"name": "accuracy", "args": {"x": 1}}, {"nam": "f1"}, "a b", "loss", "f1", "f1"]
    errors = errors_of(recipe(setup, tmp_path, evaluation={"metrics": metrics}))
    assert "Did you mean 'accuracy'?" in errors["evaluation.metrics[0]"]
    assert "takes no args" in errors["evaluation.metrics[1].args"]
    assert "Did you mean 'name'?" in errors["evaluation.metrics[2].nam"]
    assert "local metric folder" in errors["evaluation.metrics[3]"]
    assert "always reported" in errors["evaluation.metrics[4]"]
    assert "listed twice" in errors["evaluation.metrics[6]"]
    # evaluate names are taken as they are (loaded when the run starts)
    ok = validate_recipe(recipe(setup, tmp_path, evaluation={"metrics": ["f1", {"name": "precision", "args": {}}]}))
    assert ok.runs[0].evaluation.metrics == ["f1", {"name": "precision", "args": {}}]


def test_metric_not_loadable_offline_stops_before_training(setup, tmp_path, monkeypatch):
    import evaluate.config

    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = recipe(setup, tmp_path / "out", evaluation={"metrics": ["accuracy", "regtune_no_such_metric"]})
    rec = validate_recipe(raw)
    with pytest.raises(RecipeError) as info:
        load_metrics(rec.runs[0])
    with pytest.raises(RecipeError) as again:
        run_recipe(rec, log=lambda _: None)
    for error in (info.value, again.value):
        [(path, message)] = error.errors
        assert path == "evaluation.metrics[1]"
        assert "'regtune_no_such_metric'" in message and "needs the network" in message
        assert "local metric folder" in message
    assert not os.path.exists(tmp_path / "out" / "lora" / "checkpoints")  # nothing was trained


def test_metric_args_that_compute_rejects(setup, tmp_path):
    raw = recipe(
        setup, tmp_path / "out", evaluation={"metrics": ["accuracy", {"name": setup["metric"], "args": {"bogus": 1}}]}
    )
    with pytest.raises(RecipeError) as info:
        run_recipe(validate_recipe(raw), log=lambda _: None)
    [(path, message)] = info.value.errors
    assert path == "evaluation.metrics[1]" and "bogus" in message
