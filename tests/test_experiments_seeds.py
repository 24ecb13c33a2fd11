"""Recipes with paired `seeds`, sweeps chosen on a validation split, paired comparisons and diagnostics; the
dual-encoder head and the few-shot / base-to-novel text tasks (a tiny data folder and a tiny BERT: no ../shared)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from regtune.data import fewshot_text, get_task, shakespeare
from regtune.data.dual_encoder import DualEncoderClassifier, cosine_logits, mean_pool
from regtune.experiments import RecipeError, load_recipe, run_recipe
from regtune.experiments.finetune import validate_recipe
from regtune.experiments.report import summarize_seeds


TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 24,
    "max_position_embeddings": 64,
}


def make_data_dir(root) -> str:
    """A TREC folder with 8 pool and 3 test questions per class (words that tell the classes apart)."""
    words = {"ABBR": "acronym", "ENTY": "thing", "DESC": "why", "HUM": "who", "LOC": "where", "NUM": "many"}
    trec = root / "data" / "trec"
    trec.mkdir(parents=True)
    pool = [f"{c}:x {w} question number {i} ?" for c, w in words.items() for i in range(8)]
    test = [f"{c}:y {w} test {i} ?" for c, w in words.items() for i in range(3)]
    (trec / "train_5500.label").write_text("\n".join(pool) + "\n", encoding="latin-1")
    (trec / "TREC_10.label").write_text("\n".join(test) + "\n", encoding="latin-1")
    return str(root / "data")


def recipe(data_dir: str, out: str, **changes) -> dict:
    raw = {
        "name": "tiny-b2n",
        "output_dir": out,
        "seeds": [0, 1],
        "select": {"split": "validation", "metric": "accuracy", "seeds": [7]},
        "compare": {"baseline": "lora", "metrics": ["test_novel.accuracy", "H.accuracy"]},
        "model": {"config": TINY_BERT, "tokenizer": "builtin:all-MiniLM-L6-v2", "head": "class-descriptions"},
        "data": {"builtin": "base-to-novel", "options": {"dataset": "trec", "k": 2, "n_val": 2, "data_dir": data_dir}},
        "adapter": {"type": "LORA", "r": 2, "target_modules": ["query", "value"]},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "no",
                     "report_to": "none", "disable_tqdm": True, "learning_rate": 1e-3},
        "runs": [
            {"name": "lora", "sweep": {"training.learning_rate": [1e-3, 1e-2]}},
            {"name": "glad", "trainer": "GLADTrainer", "training": {"glad_rho": 0.1}, "select": {"values_from": "lora"}},
            {"name": "lora-matched", "sweep": {"training.learning_rate": [1e-3]}, "select": {"match": "lora"}},
        ],
    }  # fmt: skip
    raw.update(changes)
    return raw


def test_text_tasks_splits_classes_and_seeded_shots(tmp_path):
    data_dir = make_data_dir(tmp_path)
    splits = get_task("base-to-novel").build(dataset="trec", k=2, n_val=3, seed=0, data_dir=data_dir)
    assert set(splits) == {"train", "validation", "test", "test_base", "test_novel"}
    base, novel = [0, 1, 2], [3, 4, 5]  # the first half of TREC's label order is base
    assert sorted(set(splits["train"]["label"])) == base and len(splits["train"]) == 6
    assert len(splits["validation"]) == 9 and not set(splits["validation"]["text"]) & set(splits["train"]["text"])
    assert sorted(set(splits["test_novel"]["label"])) == novel and len(splits["test"]) == 18
    assert splits["test_novel"]["class_mask"][0] == [0, 0, 0, 1, 1, 1]
    assert splits["test"]["class_mask"][0] == [1] * 6
    # the shots depend on the seed, not on n_val
    again = get_task("base-to-novel").build(dataset="trec", k=2, n_val=0, seed=0, data_dir=data_dir)
    assert again["train"]["text"] == splits["train"]["text"]
    other = get_task("base-to-novel").build(dataset="trec", k=2, seed=1, data_dir=data_dir)
    assert other["train"]["text"] != splits["train"]["text"]
    custom = get_task("base-to-novel").build(
        dataset="trec", k=1, base_classes=["HUM", "LOC"], novel_classes=["NUM"], data_dir=data_dir
    )
    assert sorted(set(custom["train"]["label"])) == [3, 4] and sorted(set(custom["test_novel"]["label"])) == [5]
    few = get_task("few-shot").build(dataset="trec", k=2, n_val=1, data_dir=data_dir)
    assert set(few) == {"train", "validation", "test"} and len(few["train"]) == 12
    assert fewshot_text.base_novel_summary({"test_base": {"accuracy": 0.5}, "test_novel": {"accuracy": 1.0}}) == {
        "H": {"accuracy": pytest.approx(2 / 3)}
    }


def test_missing_data_dir_and_bad_classes_name_the_fields(tmp_path):
    raw = recipe(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    raw["data"]["options"]["base_classes"] = ["HUMAN"]
    with pytest.raises(RecipeError) as e:
        validate_recipe(raw)
    paths = dict(e.value.errors)
    assert "data.options.data_dir" in paths and "nowhere" in paths["data.options.data_dir"]
    assert "HUM" in paths["data.options.base_classes"]


def test_protocol_sections_are_checked(tmp_path):
    data_dir = make_data_dir(tmp_path)
    raw = recipe(data_dir, str(tmp_path / "out"), compare={"baseline": "lorra", "metrics": ["accuracy"]})
    raw.pop("seeds")
    raw["runs"][2]["select"] = {"match": "glad"}  # glad has no sweep
    raw["runs"][0]["sweep"] = {"training.learning_rat": [1e-3]}
    with pytest.raises(RecipeError) as e:
        validate_recipe(raw)
    paths = dict(e.value.errors)
    assert "lora" in paths["compare.baseline"] and "split.metric" in paths["compare.metrics[0]"]
    assert "required" in paths["seeds"]
    assert "no value of its own" in paths["runs[2].select.match"]
    assert "learning_rate" in paths["runs[0].sweep.training.learning_rat"]
    raw = recipe(data_dir, str(tmp_path / "out"))
    raw["model"] = {"config": TINY_BERT, "tokenizer": "builtin:all-MiniLM-L6-v2", "prototypes": "frozen"}
    with pytest.raises(RecipeError, match="model.prototypes: only with `head: class-descriptions`"):
        validate_recipe(raw)


def test_dual_encoder_frozen_and_encoder_prototypes():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"}, vocab_size=50)
    descriptions = {
        "input_ids": torch.tensor([[1, 5, 2], [1, 6, 7]]),
        "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
    }
    ids, mask = torch.tensor([[1, 8, 9, 2]]), torch.ones(1, 4, dtype=torch.long)
    for prototypes in ("encoder", "frozen"):
        model = DualEncoderClassifier(BertModel(config), descriptions, scale=10.0, prototypes=prototypes).eval()
        out = model(ids, mask, labels=torch.tensor([1]), class_mask=torch.tensor([[1, 1]]))
        text = mean_pool(model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        classes = mean_pool(model.encoder(**descriptions).last_hidden_state, descriptions["attention_mask"])
        assert torch.allclose(out.logits, cosine_logits(text, classes, 10.0), atol=1e-5)
        assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([1])))
        masked = model(ids, mask, class_mask=torch.tensor([[0, 1]])).logits
        assert masked[0, 0] < -1e3 and torch.isclose(masked[0, 1], out.logits[0, 1])
        model.train()
        model(ids, mask, labels=torch.tensor([0])).loss.backward()
        grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
        assert grads  # the text side always has gradient
        if prototypes == "frozen":  # fixed prototypes: a changed encoder leaves them as computed at construction
            with torch.no_grad():
                model.encoder.embeddings.word_embeddings.weight.add_(1.0)
            assert torch.equal(model.class_embeddings(), model.frozen_class_embeddings)
            assert not model.class_embeddings().requires_grad
    with pytest.raises(ValueError, match="prototypes"):
        DualEncoderClassifier(BertModel(config), descriptions, prototypes="clip")


def test_seeds_sweeps_comparison_and_diagnostics_end_to_end(tmp_path):
    data_dir = make_data_dir(tmp_path)
    out = str(tmp_path / "out")
    rec = validate_recipe(recipe(data_dir, out))
    lines: list[str] = []
    result = run_recipe(rec, log=lines.append)
    # progress over the whole recipe: 3 sweep trials (lora-matched's is read back) + 3 runs x 2 seeds
    progress = [line for line in lines if line.startswith("[regtune] progress:")]
    assert len(progress) == 8 and progress[0].startswith("[regtune] progress: 1/9 trainings, elapsed ")
    assert progress[-1].startswith("[regtune] progress: 9/9 trainings") and progress[-1].endswith("about 0m00s left")
    # every (run, seed) once, in its own folder; the matched run reused lora's 1e-3 trial
    assert sorted(result.ran) == sorted(f"{r}/seed-{s}" for r in ("lora", "glad", "lora-matched") for s in (0, 1))
    trials = os.listdir(os.path.join(out, "select"))
    assert len(trials) == 2  # lora 1e-3 and 1e-2 on select seed 7; lora-matched's 1e-3 trial is lora's
    saved = json.load(open(os.path.join(out, "results.json")))
    by = {(r["run"], r["seed"]): r for r in saved["results"]}
    assert set(by) == {(r, s) for r in ("lora", "glad", "lora-matched") for s in (0, 1)}
    assert set(by[("glad", 0)]["metrics"]) == {"test_base", "test_novel", "H"}
    assert {"glad/cos_g_gsam", "glad/rel_diff"} <= set(by[("glad", 0)]["diagnostics"])
    assert by[("lora", 0)]["diagnostics"] == {}
    # paired seeds: the same shots and initialization -> lora-matched at lora's lr equals lora exactly
    sweeps = saved["sweeps"]
    assert sweeps["lora"]["chosen"]["training.learning_rate"] in (1e-3, 1e-2)
    assert len(sweeps["lora"]["rows"]) == 2 and sweeps["lora-matched"]["rule"].startswith("match lora")
    assert sweeps["glad"]["chosen"] == sweeps["lora"]["chosen"]  # values_from
    glad0 = load_recipe(os.path.join(out, "glad", "seed-0", "recipe.yaml")).runs[0]
    assert glad0.training["learning_rate"] == sweeps["lora"]["chosen"]["training.learning_rate"]
    pairs = {(c["run"], c["baseline"]): c for c in saved["comparisons"]}
    assert set(pairs) == {("glad", "lora"), ("lora-matched", "lora")}
    diff = pairs[("glad", "lora")]["metrics"]["test_novel.accuracy"]
    novel = {s: by[(r, s)]["metrics"]["test_novel"]["accuracy"] for r in ("glad", "lora") for s in (0, 1)}
    assert diff["diffs"] == [by[("glad", s)]["metrics"]["test_novel"]["accuracy"]
                             - by[("lora", s)]["metrics"]["test_novel"]["accuracy"] for s in (0, 1)]  # fmt: skip
    assert novel  # (used above)
    table = open(os.path.join(out, "results.md")).read()
    assert "glad/cos_g_gsam" in table and "Paired difference" in table and "Sweeps" in table
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 0
    # resuming trains nothing; a changed setting of a (run, seed) is refused, naming the field
    again = run_recipe(validate_recipe(recipe(data_dir, out)), log=lambda *_: None)
    assert again.ran == [] and len(again.skipped) == 6
    changed = recipe(data_dir, out)
    changed["runs"][1]["training"]["glad_rho"] = 0.3
    with pytest.raises(RecipeError, match="glad_rho"):
        run_recipe(validate_recipe(changed), log=lambda *_: None)


def test_seed_sets_shots_init_and_order_and_equal_runs_train_once(tmp_path):
    data_dir = make_data_dir(tmp_path)
    out = str(tmp_path / "out")
    raw = recipe(data_dir, out, compare={"baseline": "a", "metrics": ["test_novel.accuracy"]})
    raw.pop("select")
    raw["runs"] = [{"name": "a"}, {"name": "b"}]  # equal settings
    result = run_recipe(validate_recipe(raw), log=lambda *_: None)
    assert sorted(result.ran) == ["a/seed-0", "a/seed-1"]
    b0 = json.load(open(os.path.join(out, "b", "seed-0", "metrics.json")))
    a0 = json.load(open(os.path.join(out, "a", "seed-0", "metrics.json")))
    a1 = json.load(open(os.path.join(out, "a", "seed-1", "metrics.json")))
    assert b0["same_as"] == "a" and b0["metrics"] == a0["metrics"] and b0["run"] == "b"
    stored = load_recipe(os.path.join(out, "a", "seed-1", "recipe.yaml"))
    run = stored.runs[0]
    assert run.seed == 1 and run.training["seed"] == 1 and run.data.options["seed"] == 1
    assert a0["train_loss"] != a1["train_loss"]


def test_summarize_seeds_pairs_only_common_seeds():
    def entry(run, seed, acc):
        return {"run": run, "seed": seed, "method": "LORA", "trainable_params": 1, "train_seconds": 1.0,
                "metrics": {"test": {"accuracy": acc}}, "diagnostics": {"x/y": acc}}  # fmt: skip

    from regtune.experiments.finetune import CompareSpec

    results = [entry("a", 0, 0.5), entry("a", 1, 0.7), entry("a", 2, 0.1), entry("b", 0, 0.4), entry("b", 1, 0.7)]
    summary = summarize_seeds(results, CompareSpec(baseline="b", metrics=["test.accuracy"]))
    pair = summary["comparisons"][0]["metrics"]["test.accuracy"]
    assert pair["seeds"] == [0, 1] and pair["diffs"] == pytest.approx([0.1, 0.0]) and pair["ties"] == 1
    a = summary["runs"][0]
    assert a["ci"]["test"]["accuracy"]["n"] == 3 and a["diagnostics"]["x/y"]["mean"] == pytest.approx(13 / 30)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def placeholder_data_dir(root) -> str:
    """Empty files where the text tasks look for their data (validation only checks that they exist), and a small
    generated play for `shakespeare-turns` (whose validation counts the speaker's turns)."""
    for file in [f for files in fewshot_text.FILES.values() for f in files]:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).write_text("")
    blocks = [f"KING:\nNews {i}?\n\nGLOUCESTER:\nThe field is ours, {i}." for i in range(200)]
    (root / shakespeare.CORPUS_FILE).parent.mkdir(parents=True, exist_ok=True)
    (root / shakespeare.CORPUS_FILE).write_text("\n\n".join(blocks + ["HAMLET:\nTo be."] * 40))
    return str(root)


@pytest.mark.parametrize("name", ["glad", "allora", "mask_tuning", "lfu"])
def test_evidence_recipes_validate_with_any_data_dir(tmp_path, name):
    """The evidence recipes validate (data files are only looked for; empty placeholders do), and protocol holds."""
    placeholder_data_dir(tmp_path)
    rec = load_recipe(
        os.path.join(REPO, "recipes", "evidence", f"{name}.yaml"), {"data.options.data_dir": str(tmp_path)}
    )
    assert rec.seeds is not None and len(rec.seeds) >= 5 and rec.selection.split == "validation"
    if name != "lfu":  # the classification recipes: a dual encoder, no new head
        assert all(r.model.head == "class-descriptions" for r in rec.runs)
    trained = [r for r in rec.runs if r.training.get("learning_rate") != 0.0]  # lr 0: a zero-shot reference
    assert trained and all(r.sweep or r.values_from or r.match for r in trained)  # each lr is chosen on validation
    assert rec.compare and all(set(c.metrics) for c in rec.compare)
    with pytest.raises(RecipeError, match="data.options.data_dir"):
        load_recipe(
            os.path.join(REPO, "recipes", "evidence", f"{name}.yaml"), {"data.options.data_dir": str(tmp_path / "x")}
        )


def test_compare_groups_pair_only_their_runs(tmp_path):
    data_dir = make_data_dir(tmp_path)
    raw = recipe(data_dir, str(tmp_path / "out"))
    raw["compare"] = [
        {"baseline": "lora", "runs": ["glad"], "metrics": ["test_novel.accuracy"]},
        {"baseline": ["lora-matched"], "runs": ["glda"], "metrics": ["H.accuracy"]},
    ]
    with pytest.raises(RecipeError) as e:
        validate_recipe(raw)
    assert "glad" in dict(e.value.errors)["compare[1].runs"]
    raw["compare"][1]["runs"] = ["glad"]
    rec = validate_recipe(raw)
    entries = [
        {"run": r, "seed": s, "method": "m", "trainable_params": 1, "train_seconds": 1.0, "diagnostics": {},
         "metrics": {"test_novel": {"accuracy": 0.5}, "H": {"accuracy": 0.5 + s}}}
        for r in ("lora", "glad", "lora-matched") for s in (0, 1)
    ]  # fmt: skip
    pairs = summarize_seeds(entries, rec.compare)["comparisons"]
    assert [(p["run"], p["baseline"], list(p["metrics"])) for p in pairs] == [
        ("glad", "lora", ["test_novel.accuracy"]),
        ("glad", "lora-matched", ["H.accuracy"]),
    ]


@pytest.mark.parametrize("name", ["glad", "allora", "mask_tuning", "lfu"])
def test_committed_evidence_chose_every_lr_inside_its_grid(tmp_path, name):
    """A baseline is tuned as carefully as the method: no lr chosen as the best of its sweep sits on the grid's edge
    (a choice on the edge means the grid should have gone further), and the committed sweeps are the recipe's."""
    results = json.load(open(os.path.join(REPO, "bench", "results", "evidence", name, "results.json")))
    path = os.path.join(REPO, "recipes", "evidence", f"{name}.yaml")
    rec = load_recipe(path, {"data.options.data_dir": placeholder_data_dir(tmp_path)})
    grids = {r.name: r.sweep["training.learning_rate"] for r in rec.runs if "training.learning_rate" in r.sweep}
    assert set(results["sweeps"]) >= set(grids)
    for run, sweep in results["sweeps"].items():
        if sweep["rule"] != "best" or run not in grids:
            continue
        grid = sorted(grids[run])
        assert [row["values"]["training.learning_rate"] for row in sweep["rows"]] == grids[run]
        chosen = sweep["chosen"]["training.learning_rate"]
        assert grid[0] < chosen < grid[-1], f"{name}/{run}: lr {chosen} chosen at the edge of {grid}"
