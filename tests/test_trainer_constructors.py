"""Every regtune trainer takes trl's constructor conventions: a model id or path, `peft_config=`, explicit keywords."""

from __future__ import annotations

import importlib.resources
import inspect

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_bert
from transformers import Trainer, TrainingArguments

import regtune
from regtune import GLADTrainer, MaskTuningTrainer, RegTrainer, RegularizedTrainerMixin
from regtune.regularizers import MultiSampleDropout


def _data(n: int = 8) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (n, 6), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * 6] * n, "labels": torch.randint(0, 3, (n,)).tolist()}
    )


def _args(tmp_path, cls=TrainingArguments, **kwargs):
    return cls(
        str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, report_to="none", save_strategy="no",
        use_cpu=True, disable_tqdm=True, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    tiny_bert().save_pretrained(path)
    return str(path)


CASES = {
    "RegTrainer": (RegTrainer, TrainingArguments, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")),
    "GLADTrainer": (
        GLADTrainer,
        regtune.GLADTrainingArguments,
        regtune.GLADConfig(r=2, target_modules=["query"], task_type="SEQ_CLS", glad_lambda=0.25),
    ),
    "MaskTuningTrainer": (
        MaskTuningTrainer,
        regtune.MaskTuningTrainingArguments,
        regtune.MaskTuningConfig(target_modules=["query", "value"], task_type="SEQ_CLS"),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_model_path_and_peft_config_train(name, bert_path, tmp_path):
    trainer_cls, args_cls, peft_config = CASES[name]
    trainer = trainer_cls(
        model=bert_path, args=_args(tmp_path, args_cls), train_dataset=_data(), peft_config=peft_config
    )
    assert isinstance(trainer.model, PeftModel)
    assert trainer.model.peft_config["default"].peft_type == peft_config.peft_type
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "two steps must change the trainable parameters"
    if name == "GLADTrainer":  # the adapter config's settings reach the method's regularizer
        assert trainer.regularizers[0].settings.glad_lambda == 0.25


def test_model_init_kwargs_reach_from_pretrained(bert_path, tmp_path):
    trainer = RegTrainer(model=bert_path, model_init_kwargs={"hidden_dropout_prob": 0.3}, args=_args(tmp_path))
    assert trainer.model.config.hidden_dropout_prob == 0.3


def test_peft_config_on_a_peft_model_and_bad_configs_are_refused(bert_path, tmp_path):
    peft_model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="already a peft model"):
        RegTrainer(model=peft_model, args=_args(tmp_path), peft_config=LoraConfig(r=2, target_modules=["key"]))
    with pytest.raises(ValueError, match=r"`peft_config` = dict \(allowed: a peft config"):
        RegTrainer(model=bert_path, args=_args(tmp_path), peft_config={"r": 2})
    with pytest.raises(ValueError, match="`model_init_kwargs` is only used when `model` is a model id"):
        RegTrainer(model=tiny_bert(), args=_args(tmp_path), model_init_kwargs={"num_labels": 2})


def test_signatures_are_explicit_and_the_package_is_typed():
    for trainer_cls in (RegTrainer, GLADTrainer, MaskTuningTrainer, regtune.LfUTrainer):
        parameters = inspect.signature(trainer_cls.__init__).parameters
        kinds = {p.kind for p in parameters.values()}
        assert inspect.Parameter.VAR_POSITIONAL not in kinds and inspect.Parameter.VAR_KEYWORD not in kinds
        for name in ("model", "args", "processing_class", "peft_config", "regularizers", "callbacks"):
            assert name in parameters, (trainer_cls.__name__, name)
    assert importlib.resources.files("regtune").joinpath("py.typed").is_file()


def test_mixin_after_the_host_is_a_clear_error_and_first_takes_peft_config(bert_path, tmp_path):
    with pytest.raises(TypeError, match=r"RegularizedTrainerMixin must come before Trainer.*class Wrong\("):

        class Wrong(Trainer, RegularizedTrainerMixin):
            pass

    class MyTrainer(RegularizedTrainerMixin, Trainer):  # a user's host without trl's conventions
        pass

    trainer = MyTrainer(
        model=bert_path,
        args=_args(tmp_path),
        peft_config=LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"),
        regularizers=[MultiSampleDropout(num_samples=2)],
        train_dataset=_data(),
    )
    assert isinstance(trainer.model, PeftModel)
    trainer.train()


def test_the_peft_task_type_picks_the_head_of_a_headless_checkpoint(tmp_path):
    from transformers import BertModel

    encoder = tmp_path / "encoder"
    BertModel(tiny_bert().config).save_pretrained(encoder)  # `architectures`: BertModel (a sentence encoder)
    config = LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")
    trainer = RegTrainer(
        model=str(encoder), peft_config=config, model_init_kwargs={"num_labels": 4}, args=_args(tmp_path)
    )
    head = trainer.model.base_model.model
    assert type(head).__name__ == "BertForSequenceClassification" and head.config.num_labels == 4
    with pytest.raises(ValueError, match=r"is a BertModel .* no classification head for `num_labels`"):
        RegTrainer(model=str(encoder), model_init_kwargs={"num_labels": 4}, args=_args(tmp_path))
