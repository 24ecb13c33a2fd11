"""R-AMT training: gradient dropout against its formula, the one-step gradient, accumulation, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback

import regtune
from regtune.functional.masks import gradient_dropout, score_penalty, soft_cross_entropy
from regtune.regularizers.mask_tuning import GradientDropout
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


def _model(lam=1.0):
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=64,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    base = BertForSequenceClassification(config)
    return get_peft_model(base, regtune.MaskTuningConfig(task_type="SEQ_CLS", init_weights=False, graddrop_lambda=lam))


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
    assert [type(r).__name__ for r in trainer.regularizers] == ["MaskScorePenalty", "GradientDropout", "MaskFlipMonitor"]
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
    generator = torch.Generator().manual_seed(0 * 1_000_003 + 0)
    names = [n for n, _ in ref.named_parameters() if "masktune_scores" in n]
    dropped = 0
    for name, a, b, s in zip(names, g_a, g_b, scores):
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


WORKER = """
import json, os, sys, torch
sys.path.insert(0, {tests!r})
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
"""


def _launch(tmp_path, out, nproc, batch):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=os.path.dirname(__file__)))
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
