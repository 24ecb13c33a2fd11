"""GLAD as a training-core regularizer: lambda=0 is plain training bit for bit, lambda=1 is SAM, accumulation."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tiny_models import MLP
from transformers import TrainingArguments

import regtune
from regtune.regularizers.glad import GLADRegularizer
from regtune.trainers import RegTrainer
from regtune.trainers.glad_trainer import GLADTrainer, GLADTrainingArguments


def _data(n=8):
    g = torch.Generator().manual_seed(3)
    return Dataset.from_dict(
        {"x": torch.randn(n, 12, generator=g).tolist(), "labels": torch.randint(0, 3, (n,), generator=g).tolist()}
    )


def _mlp():
    torch.manual_seed(0)
    return MLP()


def _args(tmp_path, batch=8, accumulation=1, steps=3, cls=TrainingArguments, **kwargs):
    return cls(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        **kwargs,
    )


def _train(model, args, regularizers, data=None):
    trainer = RegTrainer(model=model, args=args, train_dataset=data or _data(), regularizers=regularizers)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lambda_zero_is_plain_training_bit_for_bit(tmp_path):
    plain = _train(_mlp(), _args(tmp_path / "a"), [])
    glad = _train(_mlp(), _args(tmp_path / "b"), [GLADRegularizer(rho=0.5, glad_lambda=0.0)])
    for name in plain:
        assert torch.equal(plain[name], glad[name]), name


def _reference_sam(model, data, rho, lr, steps):
    """A straightforward SAM loop (two passes, perturb by rho * g/||g||, step with the perturbed gradient)."""
    x, y = torch.tensor(data["x"]), torch.tensor(data["labels"])
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        loss = model(x, labels=y)["loss"]
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        eps = [rho * g / (norm + 1e-12) for g in grads]
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        sam_grads = torch.autograd.grad(model(x, labels=y)["loss"], params)
        with torch.no_grad():
            for p, e, g in zip(params, eps, sam_grads):
                p.sub_(e)
                p.sub_(lr * g)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lambda_one_matches_reference_sam(tmp_path):
    data = _data()
    glad = _train(_mlp(), _args(tmp_path), [GLADRegularizer(rho=0.3, glad_lambda=1.0)], data)
    reference = _reference_sam(_mlp(), data, rho=0.3, lr=0.1, steps=3)
    plain = _train(_mlp(), _args(tmp_path / "plain"), [], data)
    for name in reference:
        torch.testing.assert_close(glad[name], reference[name], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(plain[n], glad[n]) for n in plain)


def test_perturbation_uses_the_accumulated_gradient(tmp_path):
    """2 micro-batches of 4 (accumulated) = 1 batch of 8: the perturbation sees the whole optimizer step."""
    full = _train(_mlp(), _args(tmp_path / "a", batch=8), [GLADRegularizer(rho=0.3, glad_lambda=0.5)])
    accumulated = _train(
        _mlp(), _args(tmp_path / "b", batch=4, accumulation=2), [GLADRegularizer(rho=0.3, glad_lambda=0.5)]
    )
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("config_cls", [LoraConfig, regtune.ALLoRAConfig, regtune.GLADConfig])
def test_glad_trainer_composes_with_adapters(tmp_path, config_cls):
    model = get_peft_model(_mlp(), config_cls(r=4, target_modules=["lin0", "lin1"], modules_to_save=["head"]))
    before = copy.deepcopy(model.state_dict())
    args = _args(tmp_path, cls=GLADTrainingArguments, glad_rho=0.1)
    trainer = GLADTrainer(model=model, args=args, train_dataset=_data())
    glad = trainer.regularizers[0]
    assert isinstance(glad, GLADRegularizer) and glad.rho == 0.1
    trainer.train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k or "modules_to_save" in k for k in changed), changed


def test_glad_trainer_reads_the_adapter_config(tmp_path):
    model = get_peft_model(_mlp(), regtune.GLADConfig(r=4, target_modules=["lin0"], rho=0.2, glad_lambda=0.7))
    trainer = GLADTrainer(model=model, args=_args(tmp_path, cls=GLADTrainingArguments), train_dataset=_data())
    assert (trainer.regularizers[0].rho, trainer.regularizers[0].glad_lambda) == (0.2, 0.7)
    with pytest.raises(ValueError, match="glad_lambda"):
        _args(tmp_path, cls=GLADTrainingArguments, glad_lambda=2.0)
    with pytest.raises(ValueError, match="rho"):
        GLADRegularizer(rho=-1.0)


def _run_worker(out, nproc, per_device_batch, accumulation):
    import os
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "glad_distributed_worker.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = (launcher if nproc > 1 else [sys.executable]) + [
        worker,
        str(out),
        str(per_device_batch),
        str(accumulation),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out / "weights.pt")


def test_ddp_two_processes_match_one_process(tmp_path):
    """Under DDP the perturbation uses the all-reduced gradient: 2 x (2 micro-batches of 2) = 1 x (2 of 4)."""
    import json

    two = _run_worker(tmp_path / "two", nproc=2, per_device_batch=2, accumulation=2)
    sizes = [json.loads((tmp_path / "two" / f"world_size_{r}.json").read_text())["world_size"] for r in (0, 1)]
    assert sizes == [2, 2]
    one = _run_worker(tmp_path / "one", nproc=1, per_device_batch=4, accumulation=2)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-5)
