"""Unit tests of the regularizers layer: schedule math, set_dropout, the registry, validation, multi-sample dropout."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from distributed_worker import VOCAB, tiny_bert, tiny_llama
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification, PretrainedConfig
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.trainer_pt_utils import LabelSmoother

from regtune.functional.dropout import (
    dropout_sites,
    get_dropout_values,
    restore_dropout,
    scheduled_dropout_rate,
    set_dropout,
)
from regtune.regularizers import (
    REGULARIZERS,
    DropoutSchedule,
    MultiSampleDropout,
    Regularizer,
    build_regularizer,
)


# ---- scheduled_dropout_rate ----


def test_constant_rate():
    assert [scheduled_dropout_rate(t, 0.1) for t in (0, 5, 1000)] == [0.1, 0.1, 0.1]


def test_step_rate_switches_on_at_k():
    rates = [scheduled_dropout_rate(t, 0.2, "step", start_step=3) for t in range(6)]
    assert rates == [0.0, 0.0, 0.0, 0.2, 0.2, 0.2]
    assert scheduled_dropout_rate(0, 0.2, "step", start_p=0.05, start_step=1) == 0.05


def test_linear_rate_ramps_between_start_and_end():
    rates = [scheduled_dropout_rate(t, 0.4, "linear", start_step=2, end_step=6) for t in range(9)]
    assert rates == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    # ramping down works too
    assert scheduled_dropout_rate(1, 0.0, "linear", start_p=0.3, start_step=0, end_step=3) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "cosine"}, "`mode` must be one of"),
        ({"mode": "linear"}, "`end_step` must be given"),
        ({"mode": "linear", "start_step": 4, "end_step": 4}, "`end_step` must be given and > `start_step`"),
    ],
)
def test_rate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scheduled_dropout_rate(0, 0.1, **kwargs)


# ---- set_dropout ----


def test_set_dropout_sets_modules_and_config_fields():
    model = tiny_bert(dropout=0.1)
    n = set_dropout(model, 0.3)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.3 for m in dropouts)
    assert model.config.hidden_dropout_prob == 0.3
    assert model.config.attention_probs_dropout_prob == 0.3
    assert model.config.classifier_dropout is None  # None means "use hidden_dropout_prob": left alone
    assert n == len(dropouts) + 2


def test_set_dropout_kinds_selects_places():
    model = tiny_bert(dropout=0.1)
    set_dropout(model, 0.3, kinds=("modules",))
    assert model.config.hidden_dropout_prob == 0.1
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, nn.Dropout))
    set_dropout(model, 0.25, kinds=("config",))
    assert model.config.hidden_dropout_prob == 0.25
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, nn.Dropout))
    with pytest.raises(ValueError, match="`kinds` must be a non-empty subset of"):
        set_dropout(model, 0.1, kinds=("weights",))
    with pytest.raises(ValueError, match="`p` must be a number in"):
        set_dropout(model, 1.5)


def test_set_dropout_reaches_attention_attributes_read_in_forward():
    """Llama copies `attention_dropout` to each attention module and passes it to the attention kernel."""
    model = tiny_llama(attention_dropout=0.0).train()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, model(ids).logits)  # no dropout anywhere: deterministic
    set_dropout(model, 0.5)
    attention = model.model.layers[0].self_attn
    assert attention.attention_dropout == 0.5 and model.config.attention_dropout == 0.5
    assert not torch.allclose(model(ids).logits, model(ids).logits)
    set_dropout(model, 0.0)
    assert torch.equal(model(ids).logits, model(ids).logits)


class _ConfigReadingModel(nn.Module):
    """A model that reads its dropout from the config at forward time (as e.g. ProphetNet does)."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig(hidden_dropout=0.0, use_dropout=True, layerdrop=0.2, drop_path_rate=0.1)
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.linear(x), p=self.config.hidden_dropout, training=self.training)


def test_set_dropout_reaches_config_fields_read_in_forward():
    model = _ConfigReadingModel().train()
    x = torch.randn(4, 8)
    assert torch.equal(model(x), model(x))
    sites = dropout_sites(model)
    assert [(type(obj).__name__, name) for obj, name in sites] == [(type(model.config).__name__, "hidden_dropout")]
    set_dropout(model, 0.5, sites=sites)
    assert not torch.equal(model(x), model(x))
    # bools, LayerDrop and stochastic depth are not dropout probabilities
    assert model.config.use_dropout is True and model.config.layerdrop == 0.2 and model.config.drop_path_rate == 0.1


def test_dropout_values_can_be_restored():
    model = tiny_llama(attention_dropout=0.1)
    sites = dropout_sites(model)
    original = get_dropout_values(sites)
    set_dropout(model, 0.4, sites=sites)
    assert set(get_dropout_values(sites)) == {0.4}
    restore_dropout(sites, original)
    assert get_dropout_values(sites) == original
    assert model.config.attention_dropout == 0.1


# ---- registry and validation ----


def test_registry_names_and_build():
    assert set(REGULARIZERS) == {
        "multi_sample_dropout",
        "dropout_schedule",
        "glad",
        "mask_score_penalty",
        "gradient_dropout",
    }
    assert all(issubclass(cls, Regularizer) for cls in REGULARIZERS.values())
    schedule = build_regularizer("dropout_schedule", p=0.1, mode="step", start_fraction=0.5)
    assert isinstance(schedule, DropoutSchedule) and schedule.mode == "step"
    msd = build_regularizer("multi_sample_dropout", num_samples=4, p=0.2)
    assert isinstance(msd, MultiSampleDropout) and msd.num_samples == 4


def test_build_unknown_type_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'mixup'.*allowed: \['dropout_schedule', 'glad', 'gradient_dropout'"):
        build_regularizer("mixup", alpha=0.2)


def test_build_unknown_field_lists_the_allowed_fields():
    with pytest.raises(ValueError, match=r"'dropout_schedule'.*Allowed fields: \['p', 'mode'"):
        build_regularizer("dropout_schedule", p=0.1, rate=0.2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p": 0.1, "mode": "cosine"}, r"`mode` must be one of \['constant', 'linear', 'step'\]"),
        ({"p": 1.0}, "`p` must be a number in"),
        ({"p": 0.1, "start_p": -0.1, "mode": "step", "start_step": 2}, "`start_p` must be a number in"),
        ({"p": 0.1, "mode": "step"}, "mode='step' needs `start_step` or `start_fraction`"),
        ({"p": 0.1, "mode": "linear"}, "mode='linear' needs `end_step` or `end_fraction`"),
        ({"p": 0.1, "mode": "constant", "start_step": 3}, "mode='constant' takes only `p`"),
        ({"p": 0.1, "mode": "step", "start_step": 2, "start_fraction": 0.5}, "at most one of `start_step`"),
        ({"p": 0.1, "mode": "linear", "start_step": 5, "end_step": 5}, "`end_step` .5. must be > `start_step`"),
        ({"p": 0.1, "mode": "linear", "end_fraction": 1.5}, "`end_fraction` must be a number in"),
        ({"p": 0.1, "mode": "step", "start_step": -1}, "`start_step` must be an integer >= 0"),
        ({"p": 0.1, "kinds": ("modules", "weights")}, "`kinds` must be a non-empty subset of"),
    ],
)
def test_dropout_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DropoutSchedule(**kwargs)


def test_dropout_schedule_resolves_fractions_of_max_steps():
    schedule = DropoutSchedule(p=0.2, mode="step", start_fraction=0.5)
    assert [schedule.rate(t, max_steps=10) for t in (0, 4, 5, 9)] == [0.0, 0.0, 0.2, 0.2]
    ramp = DropoutSchedule(p=0.2, mode="linear", end_fraction=0.5)
    assert [ramp.rate(t, max_steps=8) for t in (0, 2, 4, 7)] == pytest.approx([0.0, 0.1, 0.2, 0.2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 0}, "`num_samples` must be an integer >= 1"),
        ({"num_samples": 2.5}, "`num_samples` must be an integer >= 1"),
        ({"p": 1.0}, r"`p` must be None or a number in \[0, 1\)"),
        ({"head": ""}, "`head` must be None or a module path"),
        ({"head_dropout": ""}, "`head_dropout` must be 'auto', None or a module path"),
    ],
)
def test_multi_sample_dropout_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiSampleDropout(**kwargs)


# ---- multi-sample dropout ----


def _bert_inputs(batch: int = 4):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (batch, 8), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }


def test_msd_loss_is_the_mean_of_k_sample_losses():
    """BERT: the backbone has no dropout, the head dropout (0.3) is replaced by K=4 masks of the pooled output."""
    model = tiny_bert(dropout=0.0, classifier_dropout=0.3).train()
    with torch.no_grad():
        model.classifier.weight.mul_(200.0)  # logits large enough for the loss to be visibly non-linear in them
    inputs = _bert_inputs()
    msd = MultiSampleDropout(num_samples=4)
    assert msd.resolve(model)[1] == "classifier" and msd.resolve(model)[3] == "dropout"

    torch.manual_seed(7)
    with msd.forward_context(None, model, inputs):
        outputs = model(**inputs)
    assert model.dropout.p == 0.3  # the model's own head dropout is put back
    assert outputs.logits.shape == (4, 2)  # callers see one sample

    torch.manual_seed(7)
    pooled = model.bert(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    samples = F.dropout(pooled.repeat(4, 1), 0.3, training=True)
    logits = model.classifier(samples)
    per_sample = [F.cross_entropy(chunk, inputs["labels"]) for chunk in logits.chunk(4)]
    expected = torch.stack(per_sample).mean()
    torch.testing.assert_close(outputs.loss, expected)
    torch.testing.assert_close(outputs.logits, logits[:4])
    # the loss of the averaged logits (a common mis-implementation) is a different number
    averaged_logits = torch.stack(logits.chunk(4)).mean(0)
    assert not torch.allclose(outputs.loss, F.cross_entropy(averaged_logits, inputs["labels"]))


def test_msd_gradients_match_the_formula():
    model = tiny_bert(dropout=0.0, classifier_dropout=0.3).train()
    inputs = _bert_inputs()
    msd = MultiSampleDropout(num_samples=3)
    torch.manual_seed(11)
    with msd.forward_context(None, model, inputs):
        model(**inputs).loss.backward()
    got = model.classifier.weight.grad.clone()
    model.zero_grad()
    torch.manual_seed(11)
    pooled = model.bert(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    logits = model.classifier(F.dropout(pooled.repeat(3, 1), 0.3, training=True))
    F.cross_entropy(logits, inputs["labels"].repeat(3)).backward()
    torch.testing.assert_close(got, model.classifier.weight.grad)


def test_msd_causal_lm_keeps_num_items_in_batch_normalization():
    """Llama has no dropout before `lm_head`: `p` is required; the token loss is normalized by num_items_in_batch."""
    model = tiny_llama().train()
    with pytest.raises(ValueError, match="`p` is None but LlamaForCausalLM has no dropout module"):
        MultiSampleDropout(num_samples=2).resolve(model)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    num_items = labels[..., 1:].ne(-100).sum()
    msd = MultiSampleDropout(num_samples=3, p=0.25)
    assert msd.resolve(model)[1] == "lm_head"
    torch.manual_seed(2)
    with msd.forward_context(None, model, {}):
        outputs = model(input_ids=ids, labels=labels, num_items_in_batch=num_items)
    assert outputs.logits.shape == (2, 8, VOCAB)
    torch.manual_seed(2)
    hidden = model.model(input_ids=ids).last_hidden_state
    logits = model.lm_head(F.dropout(hidden.repeat(3, 1, 1), 0.25, training=True))
    per_sample = [ForCausalLMLoss(chunk, labels, VOCAB, num_items_in_batch=num_items) for chunk in logits.chunk(3)]
    torch.testing.assert_close(outputs.loss, torch.stack(per_sample).mean())


def test_msd_through_the_trainers_label_smoother():
    """With label smoothing the Trainer pops the labels: the label smoother is wrapped instead."""
    model = tiny_bert(dropout=0.0, classifier_dropout=0.2).train()
    inputs = _bert_inputs()
    smoother = LabelSmoother(epsilon=0.1)
    fake_trainer = types.SimpleNamespace(label_smoother=smoother, compute_loss_func=None)
    msd = MultiSampleDropout(num_samples=4)
    torch.manual_seed(5)
    with msd.forward_context(fake_trainer, model, inputs):
        assert fake_trainer.label_smoother is not smoother
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss = fake_trainer.label_smoother(outputs, inputs["labels"])
    assert fake_trainer.label_smoother is smoother
    assert outputs.logits.shape == (4, 2)
    torch.manual_seed(5)
    pooled = model.bert(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    logits = model.classifier(F.dropout(pooled.repeat(4, 1), 0.2, training=True))
    expected = torch.stack([smoother({"logits": c}, inputs["labels"]) for c in logits.chunk(4)]).mean()
    torch.testing.assert_close(loss, expected)


def test_msd_is_a_no_op_without_dropout_and_outside_grad():
    model = tiny_bert(dropout=0.0, classifier_dropout=0.0).train()
    inputs = _bert_inputs()
    msd = MultiSampleDropout(num_samples=4)
    with msd.forward_context(None, model, inputs):
        a = model(**inputs).loss  # p = 0: every sample is the plain forward
    torch.testing.assert_close(a, model(**inputs).loss)
    model = tiny_bert(dropout=0.0, classifier_dropout=0.3).eval()
    with torch.no_grad():
        with MultiSampleDropout(num_samples=4).forward_context(None, model, inputs):
            b = model(**inputs)
        c = model(**inputs)
    assert b.logits.shape == (4, 2)
    torch.testing.assert_close(b.loss, c.loss)


def test_msd_errors_are_explicit():
    inputs = _bert_inputs()
    # a head that the forward never calls
    model = tiny_bert(classifier_dropout=0.3).train()
    model.unused = nn.Linear(16, 2)
    with pytest.raises(RuntimeError, match="head `unused` of BertForSequenceClassification was not called"):
        with MultiSampleDropout(num_samples=2, head="unused").forward_context(None, model, inputs):
            model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="Expected input batch_size") as info:  # labels repeated, logits not
        with MultiSampleDropout(num_samples=2, head="unused").forward_context(None, model, inputs):
            model(**inputs)
    assert "did not call that head before this error" in "".join(info.value.__notes__)
    # no labels reach the model and no Trainer loss takes the samples
    model = tiny_bert(classifier_dropout=0.3).train()
    with pytest.raises(RuntimeError, match="not computed from the head samples"):
        with MultiSampleDropout(num_samples=2).forward_context(None, model, inputs):
            model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="`head`='nope' is not a module of BertForSequenceClassification"):
        MultiSampleDropout(head="nope").resolve(model)
    with pytest.raises(ValueError, match="`head_dropout`='classifier' is a Linear, not a dropout module"):
        MultiSampleDropout(head_dropout="classifier").resolve(model)
    # decoder classifiers pool the last token after the head: unsupported, and the error says why
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=VOCAB,
        num_labels=2, pad_token_id=0,
    )  # fmt: skip
    decoder = LlamaForSequenceClassification(config).train()
    with pytest.raises(Exception) as info:
        with MultiSampleDropout(num_samples=2, p=0.1).forward_context(None, decoder, inputs):
            decoder(**inputs)
    assert "pool the last token after the head" in "".join(getattr(info.value, "__notes__", []))
