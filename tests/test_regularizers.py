"""Unit tests of the regularizers layer: schedule math, set_dropout, the registry, validation, multi-sample dropout,
dropout types and the effective dropout rate in the forward."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from distributed_worker import VOCAB, tiny_bert, tiny_llama
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PretrainedConfig
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.trainer_pt_utils import LabelSmoother

from regtune.functional.dropout import (
    add_hidden_dropout,
    dropout_sites,
    dropout_type,
    get_dropout_values,
    restore_dropout,
    scheduled_dropout_rate,
    set_dropout,
    typed_dropout_sites,
)
from regtune.regularizers import (
    REGULARIZERS,
    DropoutSchedule,
    DropoutScheduleCallback,
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
        "lfu",
        "mask_score_penalty",
        "gradient_dropout",
        "elr",
        "pskd",
        "noisy_labels",
    }
    assert all(issubclass(cls, Regularizer) for cls in REGULARIZERS.values())
    schedule = build_regularizer("dropout_schedule", p=0.1, mode="step", start_fraction=0.5)
    assert isinstance(schedule, DropoutSchedule) and schedule.mode == "step"
    msd = build_regularizer("multi_sample_dropout", num_samples=4, p=0.2)
    assert isinstance(msd, MultiSampleDropout) and msd.num_samples == 4


def test_build_unknown_type_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'mixup'.*allowed: \['dropout_schedule', 'elr', 'glad', 'gradient_dropout'"):
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
        ({"p": 0.1, "mode": "linear", "end_fraction": 1.5}, "`end_fraction` must be None or a number in"),
        ({"p": 0.1, "mode": "step", "start_step": -1}, "`start_step` must be None or an integer >= 0"),
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


# ---- dropout types, hidden dropout, per-type and epoch schedules ----


@pytest.mark.parametrize(
    "name, path, owner, expected",
    [
        ("p", "base_model.model.model.layers.0.self_attn.q_proj.lora_dropout.default", "ModuleDict", "lora"),
        ("attention_dropout", "model.layers.0.self_attn.attention_dropout", "LlamaAttention", "attention"),
        ("attn_dropout", "transformer.h.0.attn.attn_dropout", "GPT2Attention", "attention"),
        ("resid_dropout", "transformer.h.0.attn.resid_dropout", "GPT2Attention", "hidden"),
        ("drop", "transformer.drop", "GPT2Model", "embedding"),
        ("dropout", "bert.embeddings.dropout", "BertEmbeddings", "embedding"),
        ("dropout", "bert.encoder.layer.0.attention.self.dropout", "BertSelfAttention", "attention"),
        ("dropout", "bert.encoder.layer.0.attention.output.dropout", "BertSelfOutput", "hidden"),
        ("dropout", "dropout", "BertForSequenceClassification", "classifier"),
        ("dropout", "encoder.block.0.layer.0.dropout", "T5LayerSelfAttention", "hidden"),
        ("dropout", "encoder.block.0.layer.0.SelfAttention.dropout", "T5Attention", "attention"),
        ("activation_dropout", "model.encoder.layers.0.activation_dropout", "BartEncoderLayer", "hidden"),
        ("embd_pdrop", "", None, "embedding"),
        ("attention_probs_dropout_prob", "", None, "attention"),
        ("classifier_dropout", "", None, "classifier"),
        ("hidden_dropout_prob", "", None, "hidden"),
        ("dropout_rate", "", None, "hidden"),
    ],
)
def test_dropout_type(name, path, owner, expected):
    assert dropout_type(name, path, owner) == expected


def test_dropout_sites_by_type_on_bert():
    model = tiny_bert(dropout=0.1, classifier_dropout=0.2)
    found = {type_ for _, _, type_ in typed_dropout_sites(model)}
    assert found == {"attention", "hidden", "embedding", "classifier"}
    set_dropout(model, 0.4, types=("attention",))
    assert model.config.attention_probs_dropout_prob == 0.4 and model.config.hidden_dropout_prob == 0.1
    assert model.bert.encoder.layer[0].attention.self.dropout.p == 0.4
    assert model.bert.encoder.layer[0].output.dropout.p == 0.1 and model.dropout.p == 0.2
    with pytest.raises(ValueError, match="`types` must be a non-empty subset of"):
        dropout_sites(model, types=("ffn",))


def test_add_hidden_dropout_to_llama():
    model = tiny_llama().train()
    keys = set(model.state_dict())
    assert not [s for s in typed_dropout_sites(model) if s[2] in ("hidden", "embedding")]
    handle = add_hidden_dropout(model, p=0.0)
    assert set(model.state_dict()) == keys  # nn.Dropout has no parameters or buffers
    types = [type_ for _, _, type_ in typed_dropout_sites(model, kinds=("modules",))]
    assert types.count("hidden") == 4 and types.count("embedding") == 1  # 2 layers x (self_attn, mlp) + embeddings
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, model(ids).logits)
    set_dropout(model, 0.3, types=("hidden",))
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)  # train mode only
    with pytest.raises(ValueError, match="already has hidden dropout"):
        add_hidden_dropout(model)
    handle.remove()
    model.train()
    assert torch.equal(model(ids).logits, model(ids).logits)
    assert not [s for s in typed_dropout_sites(model) if s[2] in ("hidden", "embedding")]
    with pytest.raises(ValueError, match="has no module named"):
        add_hidden_dropout(tiny_bert())
    with pytest.raises(ValueError, match="`p` must be a number in"):
        add_hidden_dropout(model, p=1.5)


def test_per_type_schedule_sets_only_its_types_including_lora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(attention_dropout=0.05), LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj"])
    )
    lora = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
    attention = model.base_model.model.model.layers[0].self_attn
    schedule = DropoutSchedule(p={"lora": 0.3}, mode="step", start_step=2)
    schedule.attach(model)
    assert len(schedule.sites("lora")) == len(lora) == 2 and schedule.sites("attention") == []
    assert schedule.apply(0, 10) == {"lora": 0.0} and all(m.p == 0.0 for m in lora)
    assert schedule.apply(2, 10) == {"lora": 0.3} and all(m.p == 0.3 for m in lora)
    assert attention.attention_dropout == 0.05  # not scheduled: left alone
    schedule.detach()
    assert all(m.p == 0.1 for m in lora)
    both = DropoutSchedule(p={"attention": 0.2, "lora": 0.4}, mode="linear", start_p={"lora": 0.2}, end_step=4)
    assert both.rates(2, 10) == pytest.approx({"attention": 0.1, "lora": 0.3})
    assert both.rate(4, 10, type="lora") == 0.4
    with pytest.raises(ValueError, match="one rate per type; pass `type`"):
        both.rate(0, 10)


def test_schedule_in_epochs():
    schedule = DropoutSchedule(p=0.2, mode="step", start_epoch=2)
    assert [schedule.rate(t, 12, steps_per_epoch=3) for t in (0, 5, 6, 11)] == [0.0, 0.0, 0.2, 0.2]
    ramp = DropoutSchedule(p=0.2, mode="linear", start_epoch=1, end_epoch=1.5)
    assert [ramp.rate(t, 40, steps_per_epoch=8) for t in (7, 8, 10, 12, 20)] == pytest.approx([0, 0, 0.1, 0.2, 0.2])
    with pytest.raises(ValueError, match="need the number of optimizer steps per epoch"):
        schedule.rate(0, 12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p": {"ffn": 0.1}}, r"unknown dropout type\(s\) \['ffn'\]"),
        ({"p": {"hidden": 1.2}}, r"`p.hidden` must be a number in \[0, 1\)"),
        ({"p": {}}, "must name at least one of"),
        ({"p": {"hidden": 0.1}, "mode": "step", "start_step": 1, "start_p": {"lora": 0.1}}, "that `p` does not"),
        ({"p": 0.1, "mode": "step", "start_step": 1, "start_epoch": 1}, "at most one of `start_step`"),
        ({"p": 0.1, "mode": "linear", "start_epoch": 2, "end_epoch": 2}, r"`end_epoch` \(2\) must be > `start_epoch`"),
        ({"p": 0.1, "mode": "step", "start_epoch": -1}, "`start_epoch` must be None or a finite number >= 0"),
        ({"p": 0.1, "mode": "constant", "start_epoch": 1}, "mode='constant' takes only `p`"),
    ],
)
def test_dropout_schedule_validation_of_types_and_epochs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DropoutSchedule(**kwargs)


def test_callback_takes_a_schedule_or_its_arguments():
    assert DropoutScheduleCallback(p=0.1, mode="step", start_epoch=1).schedule.start_epoch == 1
    with pytest.raises(ValueError, match="not both"):
        DropoutScheduleCallback(DropoutSchedule(p=0.1), p=0.2)
    with pytest.raises(ValueError, match="give a DropoutSchedule or its arguments"):
        DropoutScheduleCallback()


class _ConfigDropoutLM(nn.Module):
    """A model with an `nn.Dropout` module and a dropout read from its config in `forward` (measured by the test)."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig(hidden_dropout=0.0)
        self.dropout = nn.Dropout(0.0)
        self.weight = nn.Parameter(torch.ones(1))
        self.config_rates: list[float] = []

    def forward(self, x, labels=None):
        ones = torch.ones(50_000)
        self.dropout(ones)  # measured by a forward hook
        if self.training:
            dropped = F.dropout(ones, p=self.config.hidden_dropout, training=True)
            self.config_rates.append((dropped == 0).float().mean().item())
        return {"loss": (self.weight * x).pow(2).mean()}


def _zero_fraction_hook(record: list):
    def hook(module, args, output):
        if module.training:
            mask = args[0] != 0
            record.append((output[mask] == 0).float().mean().item())

    return hook


def _plain_trainer(model, data, tmp_path, callback, **overrides):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, learning_rate=1e-3, optim="sgd", save_strategy="no",
        lr_scheduler_type="constant", seed=0, disable_tqdm=True, **overrides,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])


def test_effective_rate_in_the_forward_matches_the_schedule(tmp_path):
    """A plain transformers.Trainer with the callback: the fraction of zeros each dropout produces, measured in the
    forward of every step, is the scheduled rate (nn.Dropout modules and config fields read in forward)."""
    import datasets

    model = _ConfigDropoutLM()
    module_rates: list[float] = []
    model.dropout.register_forward_hook(_zero_fraction_hook(module_rates))
    callback = DropoutScheduleCallback(p=0.4, mode="linear", start_step=1, end_step=5)
    data = datasets.Dataset.from_dict({"x": [[1.0]] * 28})
    _plain_trainer(model, data, tmp_path, callback, per_device_train_batch_size=4, num_train_epochs=1).train()
    expected = [callback.schedule.rate(t, 7) for t in range(7)]
    assert expected == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert module_rates == pytest.approx(expected, abs=0.015)
    assert model.config_rates == pytest.approx(expected, abs=0.015)
    assert model.dropout.p == 0.0 and model.config.hidden_dropout == 0.0  # restored after training


def test_the_rate_in_effect_is_logged(tmp_path):
    """Through the regtune trainers, every training log carries the rate the last optimizer step ran with."""
    import datasets
    from transformers import TrainingArguments

    from regtune import RegTrainer

    schedule = DropoutSchedule(p=0.4, mode="linear", start_step=1, end_step=5)
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, optim="sgd", save_strategy="no", logging_steps=1,
        per_device_train_batch_size=4, num_train_epochs=1, disable_tqdm=True,
    )  # fmt: skip
    data = datasets.Dataset.from_dict({"x": [[1.0]] * 28})
    trainer = RegTrainer(model=_ConfigDropoutLM(), args=args, train_dataset=data, regularizers=[schedule])
    trainer.train()
    logged = [(h["step"], h["dropout_schedule/p"]) for h in trainer.state.log_history if "dropout_schedule/p" in h]
    assert logged == [(step, pytest.approx(schedule.rate(step - 1, 7))) for step in range(1, 8)]
    assert [p for _, p in logged] == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.4])


def test_effective_per_type_rates_in_llama_switched_on_at_an_epoch(tmp_path, monkeypatch):
    """Llama with eager attention: attention dropout (an attribute read in forward) and the hidden dropout added by
    add_hidden_dropout, switched on after the first epoch with their own rates, measured in the forward."""
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    add_hidden_dropout(model, p=0.0)
    hidden_rates: list[list[float]] = []
    for layer in model.model.layers:
        layer.mlp.residual_dropout.register_forward_hook(_zero_fraction_hook(hidden_rates))
    attention_rates: list[float] = []
    original_dropout = F.dropout

    def recording_dropout(input, p=0.5, training=True, inplace=False):
        output = original_dropout(input, p=p, training=training, inplace=inplace)
        if training and input.dim() == 4:  # the attention probabilities
            attention_rates.append((output[input > 0] == 0).float().mean().item())
        return output

    monkeypatch.setattr(torch.nn.functional, "dropout", recording_dropout)
    ids = torch.randint(3, VOCAB, (16, 64), generator=torch.Generator().manual_seed(0))
    import datasets

    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    callback = DropoutScheduleCallback(p={"attention": 0.4, "hidden": 0.2}, mode="step", start_epoch=1)
    _plain_trainer(model, data, tmp_path, callback, per_device_train_batch_size=8, num_train_epochs=2).train()
    assert callback.steps_per_epoch == 2
    # 2 steps per epoch, 2 layers each: off during epoch 1, on during epoch 2
    assert hidden_rates == pytest.approx([0.0] * 4 + [0.2] * 4, abs=0.03)
    assert attention_rates == pytest.approx([0.0] * 4 + [0.4] * 4, abs=0.03)
    assert model.model.layers[0].self_attn.attention_dropout == 0.0  # restored


# ---- validation: every bad field, at once, with its allowed values ----


def test_multi_sample_dropout_reports_every_bad_field():
    with pytest.raises(ValueError) as err:
        MultiSampleDropout(num_samples="8", p=float("nan"), head=3, head_dropout="")
    message = str(err.value)
    assert message.startswith("MultiSampleDropout: 4 invalid arguments")
    for fragment in ("`num_samples` must be an integer >= 1, got '8'", "`p` must be None or a number in [0, 1), got nan",
                     "`head` must be None or a module path", "`head_dropout` must be 'auto', None or a module path"):  # fmt: skip
        assert fragment in message
    with pytest.raises(ValueError, match=r"`p` must be None or a number in \[0, 1\), got inf"):
        MultiSampleDropout(p=float("inf"))
    with pytest.raises(ValueError, match="`num_samples` must be an integer >= 1, got True"):
        MultiSampleDropout(num_samples=True)


def test_dropout_schedule_reports_every_bad_field_and_non_finite_values():
    with pytest.raises(ValueError) as err:
        DropoutSchedule(p=float("nan"), mode="x", kinds=5, start_epoch=float("inf"), end_step=2.5, start_fraction="a")
    message = str(err.value)
    for fragment in (
        "`mode` must be one of ['constant', 'linear', 'step'], got 'x'",
        "`p` must be a number in [0, 1) or a mapping of dropout types",
        "`kinds` must be a non-empty subset of ['modules', 'attributes', 'config'], got 5",
        "`start_epoch` must be None or a finite number >= 0, got inf",
        "`end_step` must be None or an integer >= 0, got 2.5",
        "`start_fraction` must be None or a number in [0, 1], got 'a'",
    ):
        assert fragment in message
    with pytest.raises(ValueError, match=r"`p.hidden` must be a number in \[0, 1\), got nan"):
        DropoutSchedule(p={"hidden": float("nan")})
    with pytest.raises(ValueError, match=r"`kinds` must be a non-empty subset .* got 'modules'"):
        DropoutSchedule(p=0.1, kinds="modules")  # a bare string is not a list of kinds
    with pytest.raises(ValueError, match="`schedule` must be a DropoutSchedule"):
        DropoutScheduleCallback(schedule=0.1)


def test_build_regularizer_turns_every_bad_input_into_a_value_error():
    with pytest.raises(ValueError, match=r"Unknown regularizer type \['dropout_schedule'\]"):
        build_regularizer(["dropout_schedule"])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rate'\]. Allowed fields: \['p', 'mode'"):
        build_regularizer("dropout_schedule", p=0.1, rate=0.2)
    with pytest.raises(ValueError, match=r"'dropout_schedule'.*missing 1 required .*'p'.*Allowed fields"):
        build_regularizer("dropout_schedule")
    with pytest.raises(ValueError, match="`num_samples` must be an integer >= 1"):
        build_regularizer("multi_sample_dropout", num_samples=0)


def test_functional_dropout_reports_every_bad_argument():
    with pytest.raises(ValueError) as err:
        scheduled_dropout_rate(-1, float("nan"), mode="linear", start_p=2.0, start_step=3, end_step=3)
    message = str(err.value)
    for fragment in ("`step` must be an integer >= 0, got -1", "`p` must be a number in [0, 1], got nan",
                     "`start_p` must be a number in [0, 1], got 2.0", "`end_step` must be given and > `start_step`"):  # fmt: skip
        assert fragment in message
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"`p` must be a number in \[0, 1\], got inf.*`kinds` must be a non-empty"):
        set_dropout(model, float("inf"), kinds=("weights",))
    with pytest.raises(ValueError, match=r"`types` must be a non-empty subset .* got 3"):
        dropout_sites(model, types=3)
    with pytest.raises(ValueError, match="`model` must be a torch.nn.Module, got str"):
        typed_dropout_sites("bert")
    with pytest.raises(ValueError, match=r"`p` must be a number.*`sublayers` must be a non-empty list.*`embedding`"):
        add_hidden_dropout(tiny_llama(), p=-0.1, sublayers="mlp", embedding="yes")
    with pytest.raises(ValueError, match="`name` must be a string, got None"):
        dropout_type(None)
