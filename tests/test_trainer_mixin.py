"""RegularizedTrainerMixin with transformers.Trainer and trl.SFTTrainer: hook order, gradient accumulation, eval,
step ownership, checkpoint/resume, mixed precision."""

from __future__ import annotations

import contextlib
import glob
import math
import os
import pickle
import shutil

import datasets
import pytest
import torch
from distributed_worker import (
    VOCAB,
    LogitPenalty,
    NoisyPenalty,
    ParamL2,
    PlainClassifier,
    PlainStepOwner,
    causal_dataset,
    classification_dataset,
    flat_weights,
    tiny_bert,
    tiny_llama,
    training_args,
)
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_mlp
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Trainer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from regtune.regularizers import DropoutSchedule, MultiSampleDropout, Regularizer
from regtune.trainers import REGULARIZERS_STATE_NAME, RegTrainer, RegularizedTrainerMixin
from regtune.trainers.mixin import NonFiniteLossError, RegularizerStateError


class Recorder(Regularizer):
    """Records every hook call, in order, into a shared event list."""

    name = "recorder"

    def __init__(self, events: list, name: str = "recorder"):
        self.events = events
        self.name = name
        self.shapes: list[tuple] = []

    def setup(self, trainer):
        self.events.append(f"{self.name}.setup")

    @contextlib.contextmanager
    def _context(self):
        self.events.append(f"{self.name}.enter")
        yield
        self.events.append(f"{self.name}.exit")

    def forward_context(self, trainer, model, inputs):
        return self._context()

    def loss_term(self, model, inputs, outputs):
        self.events.append(f"{self.name}.loss_term")
        self.shapes.append((tuple(outputs["logits"].shape), tuple(inputs["labels"].shape)))
        return None

    def callbacks(self):
        self.events.append(f"{self.name}.callbacks")
        events, name = self.events, self.name

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                events.append(f"{name}.on_train_begin")

            def on_step_begin(self, args, state, control, **kwargs):
                events.append(f"{name}.on_step_begin")

            def on_step_end(self, args, state, control, **kwargs):
                events.append(f"{name}.on_step_end")

        return [_Callback()]

    def state_dict(self):
        self.events.append(f"{self.name}.state_dict")
        return {}


# ---- construction ----


class _Owner(PlainStepOwner):
    name = "owner_a"


class _OtherOwner(PlainStepOwner):
    name = "owner_b"


def test_two_step_owners_raise_naming_both(tmp_path):
    with pytest.raises(ValueError, match=r"got 2: 'owner_a' \(_Owner\) and 'owner_b' \(_OtherOwner\)"):
        RegTrainer(model=tiny_bert(), args=training_args(str(tmp_path)), regularizers=[_Owner(), _OtherOwner()])


def test_construction_checks(tmp_path):
    args = training_args(str(tmp_path))
    with pytest.raises(ValueError, match=r"share the name\(s\) \['logit_penalty'\]"):
        RegTrainer(model=tiny_bert(), args=args, regularizers=[LogitPenalty(), LogitPenalty()])
    with pytest.raises(TypeError, match="must hold regtune.Regularizer instances"):
        RegTrainer(model=tiny_bert(), args=args, regularizers=[object()])

    class NoStep(Regularizer):
        name = "no_step"
        owns_step = True

    with pytest.raises(ValueError, match="'no_step' sets `owns_step = True` but does not define `training_step`"):
        RegTrainer(model=tiny_bert(), args=args, regularizers=[NoStep()])
    trainer = RegTrainer(
        model=tiny_bert(), args=args, regularizers=[{"type": "dropout_schedule", "p": 0.1}, LogitPenalty()]
    )
    assert isinstance(trainer.regularizers[0], DropoutSchedule)
    with pytest.raises(ValueError, match="Unknown regularizer type 'nope'"):
        RegTrainer(model=tiny_bert(), args=args, regularizers=[{"type": "nope"}])


# ---- hook order, eval ----


def test_hook_order_and_eval_excluded(tmp_path):
    events: list[str] = []
    first, second = Recorder(events, "a"), Recorder(events, "b")
    args = training_args(
        str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=2,
    )
    data = classification_dataset(n=8)
    trainer = RegTrainer(
        model=tiny_bert(), args=args, train_dataset=data, eval_dataset=data, regularizers=[first, second]
    )
    assert events == ["a.callbacks", "b.callbacks"]
    events.clear()
    trainer.train()
    micro_batch = ["a.enter", "b.enter", "b.exit", "a.exit", "a.loss_term", "b.loss_term"]
    step = ["a.on_step_begin", "b.on_step_begin", *micro_batch, *micro_batch, "a.on_step_end", "b.on_step_end"]
    expected = ["a.setup", "b.setup", "a.on_train_begin", "b.on_train_begin", *step, *step]
    expected += ["a.state_dict", "b.state_dict"]  # checkpoint-2; the evals at steps 1 and 2 leave no trace
    assert events == expected
    # loss terms see one micro-batch, with labels, and the model's outputs
    assert first.shapes == [((2, 2), (2,))] * 4
    events.clear()
    trainer.evaluate()
    trainer.predict(data)
    assert events == []


def test_eval_loss_is_the_plain_models(tmp_path):
    """Multi-sample dropout and loss terms act in training only: eval loss equals a plain Trainer's."""
    data = classification_dataset(n=8)
    args = training_args(str(tmp_path))
    model = tiny_bert(classifier_dropout=0.3)
    reg_trainer = RegTrainer(
        model=model, args=args, eval_dataset=data, regularizers=[MultiSampleDropout(num_samples=4), LogitPenalty(10.0)]
    )
    plain = Trainer(model=model, args=args, eval_dataset=data)
    assert reg_trainer.evaluate()["eval_loss"] == plain.evaluate()["eval_loss"]


# ---- gradient accumulation ----


def _train(model, data, regularizers, tmp_path, trainer_cls=RegTrainer, **overrides):
    trainer = trainer_cls(
        model=model, args=training_args(str(tmp_path), **overrides), train_dataset=data, regularizers=regularizers
    )
    trainer.train()
    return flat_weights(model), trainer


@pytest.mark.parametrize("kind", ["scaled", "unscaled"])
def test_loss_term_added_once_under_gradient_accumulation(kind, tmp_path):
    """GA=2 x 2 samples gives the weights of GA=1 x 4 samples, with a batch-dependent loss term.

    "scaled": a causal LM whose loss is normalized by num_items_in_batch (the Trainer does not divide by the GA
    steps, so the mixin divides the term). "unscaled": a model without **kwargs (the Trainer divides loss + term).
    """
    if kind == "scaled":
        build, data = tiny_llama, causal_dataset(n=8)
    else:
        build, data = PlainClassifier, classification_dataset(n=8)
    big = LogitPenalty(weight=0.5)
    w_big, trainer = _train(build(), data, [big], tmp_path, per_device_train_batch_size=4, max_steps=2)
    assert trainer.loss_is_scaled_for_ga_now(torch.tensor(1)) == (kind == "scaled")
    accumulated = LogitPenalty(weight=0.5)
    w_acc, _ = _train(
        build(),
        data,
        [accumulated],
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
    )
    assert big.calls == 2 and accumulated.calls == 4  # once per micro-batch
    torch.testing.assert_close(w_acc, w_big, rtol=0, atol=2e-6)
    # the term matters: without it, the weights differ by far more than the tolerance
    w_none, _ = _train(build(), data, [], tmp_path, per_device_train_batch_size=4, max_steps=2)
    assert (w_none - w_big).abs().max() > 1e-3


def test_step_owner_matches_the_plain_step(tmp_path):
    """A regularizer owning the step through compute_loss + scaled_backward reproduces Trainer.training_step,
    including the other regularizers' loss terms, under gradient accumulation."""
    data = classification_dataset(n=8)
    common = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 2}
    w_plain, _ = _train(PlainClassifier(), data, [LogitPenalty(0.5)], tmp_path, **common)
    owner, term = PlainStepOwner(), LogitPenalty(0.5)
    w_owned, _ = _train(PlainClassifier(), data, [term, owner], tmp_path, **common)
    assert owner.calls == 4 and term.calls == 4
    torch.testing.assert_close(w_owned, w_plain, rtol=0, atol=1e-7)


# ---- the two regularizers in a Trainer ----


class _RateProbe(Regularizer):
    """Reads the dropout rates the model has while a micro-batch is computed."""

    name = "rate_probe"

    def __init__(self):
        self.rates: list[tuple[float, float]] = []

    def setup(self, trainer):
        self.model = trainer.model

    def loss_term(self, model, inputs, outputs):
        self.rates.append((self.model.dropout.p, self.model.config.hidden_dropout_prob))
        return None


def test_dropout_schedule_in_training_and_restored_after(tmp_path):
    probe = _RateProbe()
    model = tiny_bert(dropout=0.05)
    schedule = DropoutSchedule(p=0.3, mode="linear", start_step=0, end_step=2)
    _train(model, classification_dataset(n=16), [schedule, probe], tmp_path, max_steps=4)
    head_rates, config_rates = zip(*probe.rates)
    assert head_rates == pytest.approx((0.0, 0.15, 0.3, 0.3)) and config_rates == pytest.approx(head_rates)
    assert model.dropout.p == 0.05 and model.config.hidden_dropout_prob == 0.05


def test_msd_trains_with_schedule_and_label_smoothing(tmp_path):
    """The schedule sets the head dropout that multi-sample dropout reads; the label smoother path is wrapped."""
    probe = LogitPenalty(weight=0.0)
    msd = MultiSampleDropout(num_samples=4)
    schedule = DropoutSchedule(p=0.2, mode="step", start_step=1)
    _, trainer = _train(
        tiny_bert(), classification_dataset(n=16), [schedule, msd, probe], tmp_path, max_steps=3,
        label_smoothing_factor=0.1,
    )  # fmt: skip
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert probe.batch_sizes == [4, 4, 4]  # loss terms see one sample of the logits


def test_bf16_mixed_precision(tmp_path):
    term = LogitPenalty(weight=0.1)
    _, trainer = _train(
        tiny_bert(), classification_dataset(n=8), [MultiSampleDropout(num_samples=2), term], tmp_path, bf16=True
    )
    assert trainer.accelerator.mixed_precision == "bf16"
    assert term.calls == 2
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)


class _LoraDropoutProbe(Regularizer):
    name = "lora_dropout_probe"

    def __init__(self):
        self.rates: list[float] = []

    def setup(self, trainer):
        self.module = next(m for n, m in trainer.model.named_modules() if n.endswith("lora_dropout.default"))

    def loss_term(self, model, inputs, outputs):
        self.rates.append(self.module.p)
        return None


def test_peft_model_with_both_regularizers(tmp_path):
    """On a peft model: the head is peft's ModulesToSaveWrapper, the schedule reaches LoRA's dropout."""
    config = LoraConfig(
        r=2, target_modules=["query", "value"], lora_dropout=0.1, modules_to_save=["classifier"], task_type="SEQ_CLS"
    )
    model = get_peft_model(tiny_bert(classifier_dropout=0.2), config)
    msd, probe = MultiSampleDropout(num_samples=3), _LoraDropoutProbe()
    assert msd.resolve(model)[1] == "classifier" and type(msd.resolve(model)[2]).__name__ == "ModulesToSaveWrapper"
    term = LogitPenalty(weight=0.1)
    _train(
        model, classification_dataset(n=8), [msd, DropoutSchedule(p=0.3), probe, term], tmp_path, learning_rate=0.01
    )
    assert probe.rates == [0.3, 0.3] and probe.module.p == 0.1
    assert term.batch_sizes == [4, 4]


# ---- checkpoints ----


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _resume_run(output_dir, stop_at=None, resume=None, drop_state=False):
    model = tiny_bert(dropout=0.1)
    noisy = NoisyPenalty(weight=0.5)
    regularizers = [noisy, MultiSampleDropout(num_samples=2), DropoutSchedule(p=0.2, mode="linear", end_step=4)]
    args = training_args(
        str(output_dir), max_steps=6, save_strategy="steps", save_steps=3, learning_rate=0.1, optim="adamw_torch",
        lr_scheduler_type="linear", train_sampling_strategy="random",
    )  # fmt: skip
    trainer = RegTrainer(
        model=model,
        args=args,
        train_dataset=classification_dataset(n=16),
        regularizers=regularizers,
        callbacks=[_StopAt(stop_at)] if stop_at else None,
    )
    if drop_state:
        os.remove(os.path.join(resume, REGULARIZERS_STATE_NAME))
    trainer.train(resume_from_checkpoint=resume)
    return flat_weights(model), noisy


def test_resume_continues_exactly(tmp_path):
    w_full, noisy_full = _resume_run(tmp_path / "full")
    _, noisy_first = _resume_run(tmp_path / "cut", stop_at=3)
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    state_file = checkpoint / REGULARIZERS_STATE_NAME
    assert state_file.is_file() and not glob.glob(str(checkpoint / "*.tmp*"))  # written atomically
    payload = torch.load(state_file, weights_only=True)
    assert set(payload["regularizers"]) == {"noisy_penalty", "multi_sample_dropout", "dropout_schedule"}
    assert payload["regularizers"]["noisy_penalty"]["calls"] == noisy_first.calls == 3
    w_resumed, noisy_resumed = _resume_run(tmp_path / "cut", resume=str(checkpoint))
    assert noisy_resumed.calls == noisy_full.calls == 6
    torch.testing.assert_close(w_resumed, w_full, rtol=0, atol=1e-6)
    # the regularizer state really comes from the checkpoint: without the file the resumed run diverges
    w_fresh, _ = _resume_run(tmp_path / "cut", resume=str(checkpoint), drop_state=True)
    assert (w_fresh - w_full).abs().max() > 1e-4


# ---- trl.SFTTrainer ----


class RegSFTTrainer(RegularizedTrainerMixin, SFTTrainer):
    pass


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _text_dataset(n: int = 16) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(n):
        length = int(torch.randint(4, 9, (1,), generator=g))
        texts.append(" ".join(f"w{i}" for i in torch.randint(3, VOCAB, (length,), generator=g).tolist()))
    return datasets.Dataset.from_dict({"text": texts})


def _sft(tmp_path, regularizers, **overrides):
    kwargs = {
        "output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "per_device_train_batch_size": 4,
        "max_steps": 2, "learning_rate": 0.5, "optim": "sgd", "lr_scheduler_type": "constant", "logging_steps": 1,
        "save_strategy": "no", "disable_tqdm": True, "train_sampling_strategy": "sequential", "max_length": 16,
        "seed": 0, "bf16": False,
    }  # fmt: skip
    kwargs.update(overrides)
    model = tiny_llama(attention_dropout=0.0)
    trainer = RegSFTTrainer(
        model=model,
        args=SFTConfig(**kwargs),
        train_dataset=_text_dataset(),
        processing_class=_tokenizer(),
        regularizers=regularizers,
    )
    trainer.train()
    return flat_weights(model), trainer


class _AttentionRateProbe(Regularizer):
    name = "attention_rate_probe"

    def __init__(self):
        self.rates: list[float] = []
        self.output_fields: set[str] = set()

    def setup(self, trainer):
        self.attention = trainer.model.model.layers[0].self_attn

    def loss_term(self, model, inputs, outputs):
        self.rates.append(self.attention.attention_dropout)
        self.output_fields = set(outputs.keys())
        return None


def test_sft_trainer_loss_term_under_gradient_accumulation_and_schedule(tmp_path):
    big = ParamL2(weight=0.05)
    w_big, _ = _sft(tmp_path, [big])
    accumulated = ParamL2(weight=0.05)
    w_acc, trainer = _sft(tmp_path, [accumulated], per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert (big.calls, accumulated.calls) == (2, 4)
    torch.testing.assert_close(w_acc, w_big, rtol=0, atol=2e-6)
    w_none, _ = _sft(tmp_path, [])
    assert (w_none - w_big).abs().max() > 1e-3

    probe = _AttentionRateProbe()
    _, trainer = _sft(tmp_path, [DropoutSchedule(p=0.1, mode="step", start_step=1), probe], max_steps=3)
    assert probe.rates == [0.0, 0.1, 0.1]
    assert "log_probs" in probe.output_fields  # trl's fused LM head output reaches loss terms
    assert probe.attention.attention_dropout == 0.0  # restored after training


def test_sft_fused_head_rejects_multi_sample_dropout(tmp_path):
    with pytest.raises(ValueError, match="trl's fused LM head"):
        _sft(tmp_path, [MultiSampleDropout(num_samples=2, p=0.1)], max_steps=1)


# ---- non-finite guard ----


def _float_dataset(n: int = 24, nan_rows: range | None = None) -> datasets.Dataset:
    """Features for tiny_models.MLP; `nan_rows` get a NaN feature (batch 3 of 4-row batches: rows 8-11)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    if nan_rows is not None:
        x[list(nan_rows), 0] = float("nan")
    return datasets.Dataset.from_dict({"x": x.tolist(), "labels": torch.randint(0, 3, (n,), generator=g).tolist()})


def _guarded_run(tmp_path, data, regularizers=(), max_steps=5, **kwargs):
    model = tiny_mlp().train()
    trainer = RegTrainer(
        model=model,
        args=training_args(str(tmp_path), max_steps=max_steps, learning_rate=0.1, **kwargs.pop("args", {})),
        train_dataset=data,
        regularizers=list(regularizers),
        **kwargs,
    )
    return model, trainer


def test_nonfinite_guard_off_reproduces_the_silent_nan(tmp_path):
    """Without the guard the Trainer hides the NaN: weights become NaN while the logged loss reads 0.0."""
    model, trainer = _guarded_run(tmp_path, _float_dataset(nan_rows=range(8, 12)), on_nonfinite="ignore")
    trainer.train()
    assert torch.isnan(flat_weights(model)).all()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[2] == 0.0 and all(math.isfinite(loss) for loss in losses)


def test_nonfinite_guard_stops_at_the_step_naming_the_term(tmp_path):
    model, trainer = _guarded_run(tmp_path, _float_dataset(nan_rows=range(8, 12)))
    assert trainer.on_nonfinite == "error"  # on by default
    with pytest.raises(NonFiniteLossError, match=r"at optimizer step 3 \(global_step 2 -> 3\): task loss = nan") as e:
        trainer.train()
    assert "gradient norm = nan" in str(e.value) and "on_nonfinite='skip'" in str(e.value)
    assert trainer.state.global_step == 2 and torch.isfinite(flat_weights(model)).all()
    # stopped before the update: the weights are those after 2 clean steps
    clean, clean_trainer = _guarded_run(tmp_path, _float_dataset(), max_steps=2)
    clean_trainer.train()
    torch.testing.assert_close(flat_weights(model), flat_weights(clean), rtol=0, atol=0)


def test_nonfinite_guard_names_the_micro_batch_under_gradient_accumulation(tmp_path):
    _, trainer = _guarded_run(
        tmp_path,
        _float_dataset(nan_rows=range(10, 12)),
        args={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
    )
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 3 .*task loss = nan \(micro-batch 2 of 2\)"):
        trainer.train()


def test_nonfinite_guard_skip_counts_and_leaves_the_weights(tmp_path):
    model, trainer = _guarded_run(tmp_path, _float_dataset(nan_rows=range(8, 12)), max_steps=3, on_nonfinite="skip")
    trainer.train()
    assert trainer.nonfinite_skipped_steps == 1 and trainer.state.global_step == 3
    assert [log["regtune/nonfinite_skipped_steps"] for log in trainer.state.log_history if "loss" in log] == [0, 0, 1]
    clean, clean_trainer = _guarded_run(tmp_path, _float_dataset(), max_steps=2)
    clean_trainer.train()
    torch.testing.assert_close(flat_weights(model), flat_weights(clean), rtol=0, atol=0)  # step 3 changed nothing
    # with AdamW too: the skipped step leaves the moments and the step count untouched, and training continues
    model, trainer = _guarded_run(
        tmp_path, _float_dataset(nan_rows=range(8, 12)), on_nonfinite="skip", args={"optim": "adamw_torch"}
    )
    trainer.train()
    assert trainer.nonfinite_skipped_steps == 1 and torch.isfinite(flat_weights(model)).all()
    steps = {int(state["step"]) for state in trainer.optimizer.state.values()}
    assert steps == {4}  # 5 optimizer steps, one skipped


class _NaNTermAt(Regularizer):
    """A loss term that is NaN at one optimizer step (the task loss stays finite)."""

    name = "nan_term"

    def __init__(self, step: int):
        self.step, self.calls = step, 0

    def loss_term(self, model, inputs, outputs):
        self.calls += 1
        value = float("nan") if self.calls == self.step else 0.0
        return outputs["logits"].sum() * 0.0 + value


class _InfiniteGradient(Regularizer):
    """A finite term (0) whose gradient is NaN: d sqrt(u)/du at u = 0 times du/dw = 0."""

    name = "sqrt_at_zero"

    def loss_term(self, model, inputs, outputs):
        return (outputs["logits"] * 0.0).pow(2).sum().sqrt()


def test_nonfinite_guard_names_a_regularizer_term_and_the_gradient_norm(tmp_path):
    _, trainer = _guarded_run(tmp_path, _float_dataset(), regularizers=[_NaNTermAt(step=2)])
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 2 .*: loss term of regularizer 'nan_term' = nan"):
        trainer.train()
    _, trainer = _guarded_run(tmp_path, _float_dataset(), regularizers=[_InfiniteGradient()])
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 1 .*: gradient norm = nan\.") as err:
        trainer.train()
    assert "task loss" not in str(err.value)  # the losses were finite


def test_nonfinite_guard_checks_step_owners_and_validates_its_argument(tmp_path):
    _, trainer = _guarded_run(tmp_path, _float_dataset(nan_rows=range(4, 8)), regularizers=[PlainStepOwner()])
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 2 .*task loss = nan.*'plain_step_owner'"):
        trainer.train()
    with pytest.raises(ValueError, match=r"`on_nonfinite` must be one of \['error', 'skip', 'ignore'\], got 'stop'"):
        _guarded_run(tmp_path, _float_dataset(), on_nonfinite="stop")


def test_nonfinite_guard_reads_the_device_once_per_optimizer_step(tmp_path, monkeypatch):
    """Micro-batches only keep tensors; the guard's single transfer happens in the check before each step."""
    _, trainer = _guarded_run(
        tmp_path,
        _float_dataset(),
        max_steps=3,
        args={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3},
    )
    checks, sizes = [], []
    original = trainer._regtune_check_finite

    def spy(state):
        sizes.append(len(trainer._regtune_watched))
        checks.append(state.global_step)
        return original(state)

    monkeypatch.setattr(trainer, "_regtune_check_finite", spy)
    trainer.train()
    assert checks == [0, 1, 2]  # once per optimizer step
    assert sizes == [6, 6, 6]  # task loss and training loss of each of the 3 micro-batches


# ---- damaged regularizer state ----


class _EmaState(Regularizer):
    """A stateful regularizer with a float tensor and a float in its state (no effect on the loss)."""

    name = "ema_state"

    def __init__(self):
        self.ema, self.scale = torch.zeros(4), 1.0

    def loss_term(self, model, inputs, outputs):
        self.ema = 0.9 * self.ema + 0.1 * outputs["logits"].detach().float().mean()
        return None

    def state_dict(self):
        return {"ema": self.ema.clone(), "scale": self.scale}

    def load_state_dict(self, state):
        self.ema, self.scale = state["ema"].clone(), float(state["scale"])


def _state_trainer(output_dir, max_steps):
    args = training_args(str(output_dir), max_steps=max_steps, save_strategy="steps", save_steps=1)
    return RegTrainer(
        model=tiny_bert(),
        args=args,
        train_dataset=classification_dataset(n=8),
        regularizers=[NoisyPenalty(), _EmaState()],
    )


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    _state_trainer(root, max_steps=1).train()
    return root / "checkpoint-1"


class _Exploit:
    """Unpickling it would run a shell command."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _payload(checkpoint):
    return torch.load(checkpoint / REGULARIZERS_STATE_NAME, weights_only=True)


def _damage(kind, checkpoint, path):
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not a torch file\n" * 4)
    elif kind == "truncated":
        data = (checkpoint / REGULARIZERS_STATE_NAME).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickle":  # a crafted checkpoint
        torch.save({"format": 1, "regularizers": {"ema_state": {"ema": _Exploit()}}}, path)
    elif kind == "raw_pickle":
        path.write_bytes(pickle.dumps({"format": 1, "regularizers": {"ema_state": _Exploit()}}))
    elif kind == "not_a_payload":
        torch.save([1, 2, 3], path)
    else:
        payload = _payload(checkpoint)
        state = payload["regularizers"]["ema_state"]
        if kind == "shape":
            state["ema"] = torch.zeros(3)
        elif kind == "nan":
            state["ema"] = torch.tensor([0.0, float("nan"), 0.0, 0.0])
        elif kind == "inf_float":
            state["scale"] = float("inf")
        elif kind == "bad_value":
            payload["regularizers"]["noisy_penalty"]["generator"] = torch.zeros(3, dtype=torch.uint8)
        torch.save(payload, path)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("empty", r"is empty \(0 bytes\)"),
        ("garbage", r"is damaged: it is not a readable torch file"),
        ("truncated", r"is damaged: it is not a readable torch file"),
        ("pickle", r"cannot be read safely: it holds an object that is not a tensor or a Python primitive \(posix"),
        ("raw_pickle", r"cannot be read safely: it is not a torch.save file holding only tensors"),
        ("not_a_payload", r"does not hold regtune regularizer state .* got list"),
        (
            "shape",
            r"does not fit regularizer 'ema_state' \(_EmaState\): `ema` has shape \(3,\), this run expects \(4,\)",
        ),
        ("nan", r"does not fit regularizer 'ema_state' .*`ema` holds 1 NaN/infinite value\(s\) of 4"),
        ("inf_float", r"does not fit regularizer 'ema_state' .*`scale` is inf"),
        ("bad_value", r"does not fit regularizer 'noisy_penalty' .*`generator` has shape \(3,\)"),
    ],
)
def test_damaged_regularizer_state_is_refused_with_the_file_and_the_regularizer(
    kind, match, saved_checkpoint, tmp_path, monkeypatch
):
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(saved_checkpoint, checkpoint)
    path = checkpoint / REGULARIZERS_STATE_NAME
    _damage(kind, saved_checkpoint, path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RegularizerStateError, match=match) as err:
        _state_trainer(tmp_path, max_steps=2).train(resume_from_checkpoint=str(checkpoint))
    message = str(err.value)
    assert str(path) in message
    if kind in ("empty", "garbage", "truncated", "pickle", "raw_pickle", "not_a_payload"):
        assert "['noisy_penalty', 'ema_state']" in message  # the regularizers whose state the file holds
    assert "weights_only=False" not in message and "weights_only = False" not in message
    assert err.value.__cause__ is None or "weights_only=False" not in str(err.value.__cause__)
    assert not (tmp_path / "pwned").exists()


def test_undamaged_state_resumes_and_a_regularizer_loader_error_is_named(saved_checkpoint, tmp_path):
    trainer = _state_trainer(tmp_path, max_steps=2)
    trainer.train(resume_from_checkpoint=str(saved_checkpoint))
    assert trainer.state.global_step == 2 and trainer.regularizers[0].calls == 2  # NoisyPenalty resumed at 1 call

    class _Picky(_EmaState):
        def load_state_dict(self, state):
            raise KeyError("momentum")

    args = training_args(str(tmp_path), max_steps=2)
    trainer = RegTrainer(
        model=tiny_bert(),
        args=args,
        train_dataset=classification_dataset(n=8),
        regularizers=[NoisyPenalty(), _Picky()],
    )
    with pytest.raises(
        RegularizerStateError, match=r"regularizer 'ema_state' \(_Picky\) could not load its state: KeyError"
    ):
        trainer.train(resume_from_checkpoint=str(saved_checkpoint))


def test_nonfinite_guard_follows_the_other_processes(tmp_path, monkeypatch):
    """Under DDP the flag is all-reduced: a NaN on another process stops (or skips) this one too, at the same step."""
    _, trainer = _guarded_run(tmp_path, _float_dataset())
    reduced = []

    def reduce(tensor, reduction):
        reduced.append(reduction)
        return tensor + 1.0  # another process saw a non-finite value

    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    monkeypatch.setattr(trainer.accelerator, "reduce", reduce)
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 1 .* on another process"):
        trainer.train()
    assert reduced == ["sum"]
    model, trainer = _guarded_run(tmp_path, _float_dataset(), max_steps=2, on_nonfinite="skip")
    monkeypatch.setattr(trainer.accelerator, "reduce", reduce)
    before = flat_weights(model)
    trainer.train()
    assert trainer.nonfinite_skipped_steps == 2
    torch.testing.assert_close(flat_weights(model), before, rtol=0, atol=0)


def test_each_loss_term_and_the_task_loss_are_logged(tmp_path):
    """Each log holds `<name>/loss` (the mean of the term over the micro-batches since the last log) and
    `regtune/task_loss`; with the term they add up to the Trainer's `loss`."""
    terms: list[float] = []

    class RecordedPenalty(LogitPenalty):
        def loss_term(self, model, inputs, outputs):
            term = super().loss_term(model, inputs, outputs)
            terms.append(term.item())
            return term

    args = training_args(
        str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, logging_steps=2
    )
    trainer = RegTrainer(
        model=tiny_bert(), args=args, train_dataset=classification_dataset(n=16), regularizers=[RecordedPenalty(2.0)]
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and len(terms) == 8
    for k, log in enumerate(logs):  # 2 optimizer steps x 2 micro-batches per log
        assert log["logit_penalty/loss"] == pytest.approx(sum(terms[4 * k : 4 * k + 4]) / 4, rel=1e-6)
        assert log["regtune/task_loss"] + log["logit_penalty/loss"] == pytest.approx(log["loss"], abs=2e-4)
        assert log["regtune/task_loss"] > 0
