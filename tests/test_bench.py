"""The bench package: shared data readers, the results writer, and the base-to-novel harness driving the shipped
trainers (a tiny random BERT stands in for all-MiniLM-L6-v2; the tokenizer is MiniLM's)."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

import regtune
from bench import data
from bench.base_to_novel import METHODS, DualEncoderClassifier, MethodConfig, tokenizer, train
from bench.results import json_ready, write_results


def test_readers_parse_each_format(tmp_path):
    (tmp_path / "t.label").write_bytes(
        "DESC:manner How did serfdom develop ?\nNUM:date When \xe9 ?\n".encode("latin-1")
    )
    assert data.read_trec(str(tmp_path / "t.label"), data.TREC_LABELS) == [
        ("How did serfdom develop ?", 2),
        ("When \xe9 ?", 5),
    ]
    (tmp_path / "s.tsv").write_text("sentence\tlabel\na fine film \t1\nbad\t0\n")
    assert data.read_sst2(str(tmp_path / "s.tsv")) == [("a fine film", 1), ("bad", 0)]
    (tmp_path / "a.csv").write_text('"3","Title","Body\\nmore"\n')
    assert data.read_ag_news(str(tmp_path / "a.csv")) == [("Title. Body more", 2)]
    assert data.read_ag_news(str(tmp_path / "a.csv"), joiner=" ") == [("Title Body more", 2)]
    (tmp_path / "rt-polarity.neg").write_text("dull\n\n")
    (tmp_path / "rt-polarity.pos").write_text("great\n")
    assert data.read_mr(str(tmp_path)) == [("dull", 0), ("great", 1)]


def test_per_class_sample_is_seeded_and_capped():
    rows = [("x", i % 3) for i in range(30)] + [("y", 3)]
    picked = data.per_class_sample(rows, 4, 4, seed=0)
    assert picked == data.per_class_sample(rows, 4, 4, seed=0)
    assert picked != data.per_class_sample(rows, 4, 4, seed=1)
    assert [sum(rows[i][1] == c for i in picked) for c in range(4)] == [4, 4, 4, 1]


def test_write_results_writes_strict_json_and_table(tmp_path):
    stem = str(tmp_path / "sub" / "r")
    paths = write_results(stem, {"a": float("nan"), 1: (1.0, 2)}, "| t |\n")
    assert paths == [stem + ".json", stem + ".md"]
    assert json.loads(open(stem + ".json").read()) == {"a": None, "1": [1.0, 2]}
    assert open(stem + ".md").read() == "| t |\n"
    assert json_ready({"x": [float("inf")]}) == {"x": [None]}


def _tiny_classifier(n_classes: int = 3) -> DualEncoderClassifier:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer().vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    descriptions = dict(
        tokenizer()([f"class number {i}" for i in range(n_classes)], padding=True, return_tensors="pt")
    )
    return DualEncoderClassifier(BertModel(config, add_pooling_layer=False), descriptions, scale=20.0)


def test_dual_encoder_logits_are_scaled_cosines_and_loss_is_their_ce():
    model = _tiny_classifier().eval()
    enc = dict(tokenizer()(["what is it ?", "a longer question here ?"], padding=True, return_tensors="pt"))
    labels = torch.tensor([2, 0])
    out = model(enc["input_ids"], enc["attention_mask"], labels)

    def pooled(ids, mask):
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        mean = (hidden * m).sum(1) / m.sum(1)
        return mean / mean.norm(dim=-1, keepdim=True)

    text = pooled(enc["input_ids"], enc["attention_mask"])
    classes = pooled(model.class_input_ids, model.class_attention_mask)
    expected = 20.0 * text @ classes.T
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.loss, F.cross_entropy(expected, labels))


@pytest.mark.parametrize(
    "method, trainer_class, diagnostic",
    [
        ("glad-l0.5-r0.05", regtune.GLADTrainer, "glad/cos_g_gsam"),
        ("mask-gd0.3", regtune.MaskTuningTrainer, "gradient_dropout/drop_fraction"),
    ],
)
def test_methods_train_through_the_shipped_trainers(tmp_path, method, trainer_class, diagnostic):
    spec = METHODS[method]
    cfg = MethodConfig(lr=spec.default_lr, steps=2, batch_size=4, seed=0, dataset="trec")
    model = _tiny_classifier()
    setup = spec.build(model, cfg)
    assert setup.trainer_class is trainer_class
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad}
    train_set = [(f"question {i} about things ?", i % 3) for i in range(8)]
    out = train(setup, train_set, cfg, str(tmp_path))
    assert len(out["losses"]) == 2 and all(loss == loss for loss in out["losses"])
    assert diagnostic in out["diagnostics"]  # the trainer's own regularizer ran and logged its mechanism
    after = dict(setup.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
