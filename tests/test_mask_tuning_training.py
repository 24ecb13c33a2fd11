"""R-AMT training: gradient dropout against its formula, the one-step gradient, accumulation, resume, DDP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser, TrainerCallback

import regtune
from bench.perf_memory import peak_tensor_bytes
from regtune.functional.masks import gradient_dropout, pack_mask, score_penalty, soft_cross_entropy
from regtune.regularizers.mask_tuning import GradientDropout, MaskScorePenalty, _uniform_seed
from regtune.trainers import RegTrainer
from regtune.trainers.mask_tuning_trainer import MaskTuningTrainer, MaskTuningTrainingArguments


def test_gradient_dropout_formula_elementwise():
    g_a = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    g_b = torch.tensor([2.0, -1.0, -0.5, -1.0, 3.0])
    U = torch.tensor([0.9, 0.2, 0.4, 0.6, 0.3])
    for lam in (0.0, 0.3, 1.0):
        out = gradient_dropout(g_a, g_b, lam, U)
        for i in range(5):
            a, b = g_a[i].item(), g_b[i].item()
            sign = 1.0 if a > 0 else -1.0
            P = (sign * (a + b) / (abs(a) + abs(b) + 1e-8) + 1) / 2
            expected = ((1 - lam) + lam * (1.0 if P > U[i].item() else 0.0)) * a
            assert out[i].item() == pytest.approx(expected, abs=1e-6), (lam, i)
    # agreeing signs always keep the task gradient; g_b alone is never applied
    assert torch.equal(gradient_dropout(g_a, g_a * 2, 1.0, torch.full((5,), 0.999)), g_a)
    assert torch.equal(gradient_dropout(torch.zeros(5), g_b, 1.0, U), torch.zeros(5))


def _base(dropout=0.0):
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=64,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def _model(lam=1.0, dropout=0.0):
    config = regtune.MaskTuningConfig(task_type="SEQ_CLS", init_weights=False, graddrop_lambda=lam)
    return get_peft_model(_base(dropout), config)


def _data(n=8):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 64, (n, 6), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
         "labels": torch.randint(0, 3, (n,), generator=g).tolist()}
    )  # fmt: skip


def _args(out, batch=4, accumulation=1, steps=2, **kwargs):
    defaults = dict(
        output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        report_to="none", save_strategy="no", use_cpu=True, seed=0, train_sampling_strategy="sequential",
        disable_tqdm=True,
    )  # fmt: skip
    return MaskTuningTrainingArguments(**{**defaults, **kwargs})


class GradCapture(TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})


def test_one_step_gradient_matches_reference(tmp_path):
    model, data = _model(), _data(4)
    capture = GradCapture(model)
    trainer = MaskTuningTrainer(model=model, args=_args(tmp_path, steps=1), train_dataset=data, callbacks=[capture])
    assert [type(r).__name__ for r in trainer.regularizers] == [
        "MaskScorePenalty",
        "GradientDropout",
        "MaskFlipMonitor",
    ]
    trainer.train()

    ref = _model()
    batch = {k: torch.tensor(data[k]) for k in data.column_names}
    scores = [p for n, p in ref.named_parameters() if "masktune_scores" in n]
    with torch.no_grad(), ref.disable_adapter():
        teacher = ref(**batch).logits
    out = ref(**batch)
    task = out.loss + 1e-4 * score_penalty(scores)
    g_b = torch.autograd.grad(soft_cross_entropy(out.logits, teacher), scores, retain_graph=True)
    g_a = torch.autograd.grad(task, scores)
    names = [n for n, _ in ref.named_parameters() if "masktune_scores" in n]
    dropped = 0
    for index, (name, a, b, s) in enumerate(zip(names, g_a, g_b, scores)):
        # U: one generator per score tensor, seeded with (seed 0, global_step 0, its index)
        generator = torch.Generator().manual_seed(_uniform_seed(0, 0, index))
        expected = gradient_dropout(a, b, 1.0, torch.rand(s.shape, generator=generator))
        torch.testing.assert_close(capture.grads[0][name], expected, atol=1e-7, rtol=1e-4)
        dropped += int(((expected == 0) & (a != 0)).sum())
    assert dropped > 0  # the test has signal: some task gradients were dropped


def _final_scores(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train_plain_loss_scaling(model, args, data):
    trainer = MaskTuningTrainer(model=model, args=args, train_dataset=data)
    # BERT's forward takes **kwargs, so the Trainer assumes its loss is summed over tokens and skips the division
    # by the accumulation steps -- but the classification loss is a mean. Use the Trainer's mean-loss rule here.
    trainer.model_accepts_loss_kwargs = False
    trainer.train()


def test_accumulated_step_equals_full_batch(tmp_path):
    full = _model()
    _train_plain_loss_scaling(full, _args(tmp_path / "a", batch=8), _data())
    acc = _model()
    _train_plain_loss_scaling(acc, _args(tmp_path / "b", batch=4, accumulation=2), _data())
    for (name, p), q in zip(_final_scores(full).items(), _final_scores(acc).values()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)


def test_lambda_zero_has_no_gradient_dropout(tmp_path):
    trainer = MaskTuningTrainer(model=_model(lam=0.0), args=_args(tmp_path), train_dataset=_data())
    assert [type(r).__name__ for r in trainer.regularizers] == ["MaskScorePenalty", "MaskFlipMonitor"]
    with pytest.raises(ValueError, match="graddrop_lambda"):
        GradientDropout(graddrop_lambda=1.5)


def test_resume_continues_exactly_with_real_valued_scores(tmp_path):
    straight = _model()
    MaskTuningTrainer(model=straight, args=_args(tmp_path / "a", steps=4), train_dataset=_data()).train()

    first = _model()
    args = _args(tmp_path / "b", steps=4, save_strategy="steps", save_steps=2)
    trainer = MaskTuningTrainer(model=first, args=args, train_dataset=_data())
    trainer.train()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "b" / "checkpoint-2" / "adapter_model.safetensors")
    assert any(k.endswith("masktune_scores") and v.dtype == torch.float32 for k, v in saved.items())

    resumed = _model()
    trainer = MaskTuningTrainer(model=resumed, args=args, train_dataset=_data())
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for (name, p), q in zip(_final_scores(straight).items(), _final_scores(resumed).values()):
        torch.testing.assert_close(q, p, atol=0, rtol=0, msg=name)
    # the flip monitor counts from the start of the run, not from the resumed step
    monitor = trainer.regularizers[-1]
    initial = {n.removeprefix("base_model.model."): pack_mask(m) for n, m in _masks(_model()).items()}
    assert type(monitor).__name__ == "MaskFlipMonitor" and set(monitor._reference) == set(initial)
    assert all(torch.equal(monitor._reference[n], initial[n]) for n in initial)


def test_scores_get_no_weight_decay(tmp_path):
    trainer = MaskTuningTrainer(model=_model(), args=_args(tmp_path, weight_decay=0.1), train_dataset=_data())
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decay = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert decay and not any("masktune_scores" in n for n in decay)  # the head is decayed, the scores are not


WORKER = """
import json, os, sys, torch
sys.path[:0] = [{tests!r}, {root!r}]
from test_mask_tuning_training import _model, _data, _args
from regtune.trainers.mask_tuning_trainer import MaskTuningTrainer
torch.set_num_threads(1)
out, batch = sys.argv[1], int(sys.argv[2])
model = _model()
args = _args(out, batch=batch, accumulation=2, steps=2)
trainer = MaskTuningTrainer(model=model, args=args, train_dataset=_data(16))
trainer.model_accepts_loss_kwargs = False
trainer.train()
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
json.dump({{"world_size": world}}, open(os.path.join(out, f"world_{{args.process_index}}.json"), "w"))
if args.process_index == 0:
    torch.save({{n: p.detach() for n, p in model.named_parameters() if p.requires_grad}}, os.path.join(out, "w.pt"))
from worker_exit import run_and_exit  # tears the process group down and skips interpreter teardown
run_and_exit(lambda: None)
"""


def _launch(tmp_path, out, nproc, batch):
    script = tmp_path / "worker.py"
    tests = os.path.dirname(os.path.abspath(__file__))
    script.write_text(WORKER.format(tests=tests, root=os.path.dirname(tests)))
    os.makedirs(out, exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [str(script), str(out), str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out / "w.pt")


def test_ddp_two_processes_match_one_process(tmp_path):
    two = _launch(tmp_path, tmp_path / "two", nproc=2, batch=2)
    assert [json.loads((tmp_path / "two" / f"world_{r}.json").read_text())["world_size"] for r in (0, 1)] == [2, 2]
    one = _launch(tmp_path, tmp_path / "one", nproc=1, batch=4)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-5)


# ---- issue 12 item 1: the teacher is the pre-trained weights with the *current* head, in eval mode ----


def _head(model):
    return model.base_model.model.classifier.modules_to_save["default"]


def _train_head(model):
    """Stand-in for a trained classifier head: move the trainable copy of the head away from its initial weights."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in _head(model).parameters():
            p.add_(torch.randn(p.shape, generator=g))


def _reference_teacher(model, batch, dropout=0.0):
    """The pre-trained model (fresh weights, no masks) with the current head, in eval mode."""
    reference = _base(dropout).eval()
    reference.classifier.load_state_dict(_head(model).state_dict())
    with torch.no_grad():
        return reference(**batch).logits


def test_teacher_is_base_weights_with_current_head_in_eval_mode():
    model, batch = _model(dropout=0.3), _batch(_data(4))
    _train_head(model)
    model.train()
    teacher = GradientDropout().teacher_logits(model, batch)
    torch.testing.assert_close(teacher, _reference_teacher(model, batch, dropout=0.3), rtol=0, atol=1e-6)
    # deterministic (eval mode: no dropout), and every module's train/eval flag is restored
    assert torch.equal(GradientDropout().teacher_logits(model, batch), teacher)
    assert all(m.training for m in model.modules())
    with torch.no_grad():
        students = model.eval()(**batch).logits  # masks on
        with model.disable_adapter():
            initial_head = model(**batch).logits  # peft's disable_adapter(): masks off AND the initial head
    assert not torch.allclose(teacher, students, atol=1e-3)
    assert not torch.allclose(teacher, initial_head, atol=1e-3)


def _batch(data):
    return {k: torch.tensor(data[k]) for k in data.column_names}


def test_one_step_gradient_with_a_trained_head_matches_reference(tmp_path):
    model, data = _model(), _data(4)
    _train_head(model)
    capture = GradCapture(model)
    trainer = MaskTuningTrainer(model=model, args=_args(tmp_path, steps=1), train_dataset=data, callbacks=[capture])
    trainer.train()

    ref = _model()
    _train_head(ref)
    batch = _batch(data)
    teacher = _reference_teacher(ref, batch)
    names = [n for n, _ in ref.named_parameters() if "masktune_scores" in n]
    scores = [p for n, p in ref.named_parameters() if "masktune_scores" in n]
    out = ref(**batch)
    g_b = torch.autograd.grad(soft_cross_entropy(out.logits, teacher), scores, retain_graph=True)
    g_a = torch.autograd.grad(out.loss + 1e-4 * score_penalty(scores), scores)
    for index, (name, a, b, s) in enumerate(zip(names, g_a, g_b, scores)):
        generator = torch.Generator().manual_seed(_uniform_seed(0, 0, index))
        expected = gradient_dropout(a, b, 1.0, torch.rand(s.shape, generator=generator))
        torch.testing.assert_close(capture.grads[0][name], expected, atol=1e-7, rtol=1e-4)


class NoLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return {"scores": self.lin(x)}


def test_gradient_dropout_refuses_where_no_meaningful_teacher_exists(tmp_path):
    with pytest.raises(ValueError, match="needs a peft model with a mask-tuning adapter"):
        GradientDropout.check_teacher(_base())
    model = _model()
    for name, param in model.named_parameters():
        if "base_layer.weight" in name:
            param.requires_grad_(True)
    with pytest.raises(ValueError, match="no meaningful teacher.*base weights under the masks"):
        MaskTuningTrainer(model=model, args=_args(tmp_path), train_dataset=_data()).train()
    no_logits = get_peft_model(NoLogits(), regtune.MaskTuningConfig(target_modules=["lin"]))
    with pytest.raises(ValueError, match="has no `logits`"):
        GradientDropout().teacher_logits(no_logits, {"x": torch.ones(2, 4)})
    merged = _model()
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        GradientDropout().teacher_logits(merged, _batch(_data(2)))


# ---- issues 13 and 14: one settings object, every field validated, all bad fields at once ----


def test_regularizers_and_training_arguments_report_every_bad_field(tmp_path):
    with pytest.raises(ValueError) as info:
        GradientDropout(graddrop_lambda="x", graddrop_temperature=float("nan"), seed=-1)
    for field in (
        "`graddrop_lambda` must be a number in [0, 1]",
        "`graddrop_temperature` must be a finite number > 0",
        "`seed`",
    ):
        assert field in str(info.value)
    with pytest.raises(ValueError, match="`score_l2_weight` must be a finite number >= 0, got nan"):
        MaskScorePenalty(float("nan"))
    with pytest.raises(ValueError) as info:
        MaskTuningTrainingArguments(
            str(tmp_path), graddrop_lambda="x", score_l2_weight=-1.0, graddrop_temperature=0.0, mask_flips_per_layer=1
        )
    for field in ("graddrop_lambda", "score_l2_weight", "graddrop_temperature", "mask_flips_per_layer"):
        assert f"`{field}`" in str(info.value)


def test_defaults_and_validation_come_from_one_place(tmp_path):
    from regtune.tuners.mask_tuning.settings import DEFAULTS

    config, args = regtune.MaskTuningConfig(), MaskTuningTrainingArguments(str(tmp_path))
    assert GradientDropout().graddrop_lambda == config.graddrop_lambda == DEFAULTS["graddrop_lambda"]
    assert GradientDropout().graddrop_temperature == args.graddrop_temperature == DEFAULTS["graddrop_temperature"]
    assert MaskScorePenalty().score_l2_weight == config.score_l2_weight == DEFAULTS["score_l2_weight"]
    messages = set()
    for build in (
        lambda: regtune.MaskTuningConfig(graddrop_lambda=2.0),
        lambda: GradientDropout(graddrop_lambda=2.0),
        lambda: MaskTuningTrainingArguments(str(tmp_path), graddrop_lambda=2.0),
    ):
        with pytest.raises(ValueError) as info:
            build()
        messages.add(re.search(r"`graddrop_lambda` must be a number in \[0, 1\]", str(info.value)).group(0))
    assert len(messages) == 1  # one allowed range, one message (the trainer's field may also be None)


def test_trainer_config_class_carries_the_knobs(tmp_path):
    assert MaskTuningTrainer.config_class is MaskTuningTrainingArguments
    from regtune.experiments.finetune import trainer_config_class

    assert trainer_config_class(MaskTuningTrainer) is MaskTuningTrainingArguments
    # what a recipe's `training:` section becomes: the config class built from a dict of fields
    (args,) = HfArgumentParser(MaskTuningTrainer.config_class).parse_dict(
        {"output_dir": str(tmp_path), "graddrop_lambda": 0.3, "score_l2_weight": 0.0, "use_cpu": True}
    )
    trainer = MaskTuningTrainer(model=_model(lam=1.0), args=args, train_dataset=_data())
    by_type = {type(r).__name__: r for r in trainer.regularizers}
    assert by_type["GradientDropout"].graddrop_lambda == 0.3  # the args win over the adapter config's 1.0
    assert by_type["MaskScorePenalty"].score_l2_weight == 0.0


# ---- issue 15: diagnostics of the mechanism, as Trainer metrics ----


class LogCapture(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _masks(model):
    return {
        n: (m.masktune_scores["default"] > m.masktune_threshold["default"]).clone()
        for n, m in model.named_modules()
        if hasattr(m, "masktune_scores")
    }


def test_mask_flips_and_gradient_dropout_are_logged_as_metrics(tmp_path):
    model = _model()
    before = _masks(model)
    capture = LogCapture()
    args = _args(
        tmp_path, steps=3, optim="adamw_torch", learning_rate=3e-3, logging_steps=3, mask_flips_per_layer=True
    )
    MaskTuningTrainer(model=model, args=args, train_dataset=_data(), callbacks=[capture]).train()
    logs = next(log for log in capture.logs if "loss" in log)
    after = _masks(model)
    flipped = {n.removeprefix("base_model.model."): (after[n] != before[n]) for n in before}
    total = sum(int(f.sum()) for f in flipped.values()) / sum(f.numel() for f in flipped.values())
    assert total > 0  # the test has signal: masks did flip
    assert logs["mask_tuning/flipped"] == pytest.approx(total)
    for name, f in flipped.items():
        assert logs[f"mask_tuning/flipped/{name}"] == pytest.approx(float(f.float().mean()))
    assert logs["mask_tuning/zero_fraction"] == pytest.approx(model.base_model.mask_sparsity()["total"])
    assert 0.0 < logs["gradient_dropout/drop_fraction"] < 1.0
    assert logs["gradient_dropout/knowledge_loss"] > 0.0


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = torch.nn.Linear(6, 8)
        self.drop = torch.nn.Dropout(0.2)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x, labels=None):
        logits = self.head(self.drop(torch.relu(self.lin0(x))))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def test_no_host_sync_inside_the_step(tmp_path, monkeypatch):
    """The R-AMT step (teacher, knowledge gradient, dropout, diagnostics bookkeeping) never reads a value on the host."""
    config = regtune.MaskTuningConfig(target_modules=["lin0"], modules_to_save=["head"], init_weights=False)
    model = get_peft_model(TinyClassifier(), config)
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {"x": torch.randn(8, 6, generator=g).tolist(), "labels": torch.randint(0, 3, (8,), generator=g).tolist()}
    )
    trainer = MaskTuningTrainer(model=model, args=_args(tmp_path, remove_unused_columns=False), train_dataset=data)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    for reg in trainer.regularizers:
        reg.setup(trainer)
    inputs = next(iter(trainer.get_train_dataloader()))

    def refuse(*args, **kwargs):
        raise AssertionError("host sync inside the mask-tuning step")

    for method in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    trainer.training_step(trainer.model, inputs)
    monkeypatch.undo()
    logs = trainer.regularizer_diagnostics()
    assert {"gradient_dropout/drop_fraction", "gradient_dropout/knowledge_loss", "mask_tuning/flipped"} <= set(logs)
    assert not any(key.startswith("mask_tuning/flipped/") for key in logs)  # per layer only when asked for


# ------------------------------------------------------------------------------------------------- cost


def test_knowledge_logit_grad_matches_autograd_of_the_soft_cross_entropy():
    from regtune.functional.masks import knowledge_logit_grad

    gen = torch.Generator().manual_seed(2)
    student = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64).float().requires_grad_(True)
    teacher = torch.randn(3, 5, 7, generator=gen)
    for temperature, scale in ((1.0, 1.0), (2.0, 0.5)):
        loss = soft_cross_entropy(student, teacher, temperature)
        (expected,) = torch.autograd.grad(loss * scale, student)
        grad, value = knowledge_logit_grad(student.detach(), teacher.clone(), temperature, scale)
        torch.testing.assert_close(grad, expected, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(value, loss.detach(), atol=1e-6, rtol=1e-5)
    # in place in the teacher's buffer when dtypes match; chunks of rows give the same result
    buffer = teacher.clone()
    grad, _ = knowledge_logit_grad(student.detach(), buffer, 1.0, 1.0, with_loss=False)
    assert grad.data_ptr() == buffer.data_ptr()


def test_in_place_keep_is_the_formula_bit_for_bit():
    from regtune.functional.masks import gradient_dropout_keep, gradient_dropout_keep_

    gen = torch.Generator().manual_seed(4)
    g_a, g_b, uniform = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen), torch.rand(1000)
    g_a[:10] = 0.0
    keep = gradient_dropout_keep_(g_a, g_b.clone(), uniform)
    assert keep.dtype == torch.bool
    assert torch.equal(keep, gradient_dropout_keep(g_a, g_b, uniform).bool())


def test_count_flips_matches_the_unpacked_reference():
    from regtune.regularizers.mask_tuning import count_flips

    gen = torch.Generator().manual_seed(6)
    for shape in [(7,), (8,), (13, 5), (64, 33), (3, 4, 5)]:
        reference = torch.rand(shape, generator=gen) > 0.4
        current = torch.rand(shape, generator=gen) > 0.4
        expected = int((current != reference).sum())
        assert int(count_flips(current, pack_mask(reference))) == expected, shape
        assert int(count_flips(reference, pack_mask(reference))) == 0


def test_masked_weight_keeps_no_weight_sized_tensor_and_gives_the_straight_through_gradient():
    """The graph keeps references to the weights and scores only (the masked weight is rebuilt in the backward), and
    the gradients equal the straight-through formula's bit for bit, the score penalty's included."""
    import gc

    from regtune.functional.masks import straight_through_mask
    from regtune.tuners.mask_tuning.layer import MaskTuningLayer

    def run(track_norms):
        model = _model()
        layers = [m for m in model.modules() if isinstance(m, MaskTuningLayer)]
        for layer in layers:
            layer.masktune_track_norms = track_norms
        batch = _batch(_data(4))
        out = model(**batch)
        shapes = {tuple(layer.get_base_layer().weight.shape) for layer in layers}
        gc.collect()
        held = [
            o
            for o in gc.get_objects()
            if isinstance(o, torch.Tensor) and not isinstance(o, torch.nn.Parameter) and tuple(o.shape) in shapes
        ]
        loss = out.loss
        if track_norms:
            loss = loss + MaskScorePenalty(1e-2).loss_term(model, batch, out)
        scores = [p for n, p in model.named_parameters() if "masktune_scores" in n]
        return held, torch.autograd.grad(loss, scores), model, batch

    held, grads, model, batch = run(track_norms=True)
    assert not held, [tuple(t.shape) for t in held]
    _, plain_grads, _, _ = run(track_norms=False)

    # the reference: W * straight_through_mask(S) in every layer, the penalty through the parameters' norms
    reference = _model()
    originals = {}
    for module in reference.modules():
        if isinstance(module, MaskTuningLayer):

            def forward(x, *args, module=module, **kwargs):
                weight = module.get_base_layer().weight
                for name in module.active_adapters:
                    mask = straight_through_mask(module.masktune_scores[name], module.masktune_threshold[name])
                    weight = weight * mask.to(weight.dtype)
                return module._forward_with_weight(x, weight)

            originals[module] = forward
            module.forward = forward
    out = reference(**batch)
    scores = [p for n, p in reference.named_parameters() if "masktune_scores" in n]
    (expected_plain,) = [torch.autograd.grad(out.loss, scores, retain_graph=True)]
    expected = torch.autograd.grad(out.loss + 1e-2 * score_penalty(scores), scores)
    for a, b in zip(plain_grads, expected_plain):
        assert torch.equal(a, b)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-6)


def test_gradient_dropout_step_peak_is_near_full_fine_tuning(tmp_path):
    """A gradient-dropout step allocates at its peak what a full fine-tuning step of the same weights does plus
    about one copy of the scores (the knowledge gradients, full while the task backward starts with every
    activation alive) and per-layer temporaries: not the masked weights, not the score penalty's gradient of every
    layer, not the knowledge and task gradients of every layer at once (about three copies more before)."""
    from regtune.tuners.mask_tuning.layer import MaskTuningLayer

    def base():
        torch.manual_seed(0)
        config = BertConfig(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, vocab_size=64,
            max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return BertForSequenceClassification(config)

    masked = get_peft_model(base(), regtune.MaskTuningConfig(task_type="SEQ_CLS", init_weights=False))
    layers = {
        name.removeprefix("base_model.model.") + ".weight": module
        for name, module in masked.named_modules()
        if isinstance(module, MaskTuningLayer)
    }
    scores_bytes = sum(m.masktune_scores["default"].numel() * 4 for m in layers.values())
    full = base()
    for name, param in full.named_parameters():
        param.requires_grad = name.replace(".base_layer", "") in layers or name in layers
    assert sum(p.numel() * 4 for p in full.parameters() if p.requires_grad) == scores_bytes

    data, peaks = _data(8), {}
    for name, model in (("full", full), ("graddrop", masked)):
        cls = RegTrainer if name == "full" else MaskTuningTrainer
        trainer = cls(model=model, args=_args(tmp_path / name, batch=8, steps=1), train_dataset=data)
        trainer.model_accepts_loss_kwargs = False
        trainer._regtune_setup()
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        trainer.current_gradient_accumulation_steps = 1
        (batch,) = list(trainer.get_train_dataloader())
        trainer.training_step(trainer.model, batch)  # warm-up
        trainer.model.zero_grad(set_to_none=True)
        peaks[name] = peak_tensor_bytes(lambda t=trainer, b=batch: t.training_step(t.model, b))
    assert peaks["graddrop"] - peaks["full"] <= 1.3 * scores_bytes + 64 * 1024, (peaks, scores_bytes)
