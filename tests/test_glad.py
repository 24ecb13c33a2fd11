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
from bench.perf_memory import peak_tensor_bytes
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
    kwargs.setdefault("logging_strategy", "no")
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
    glad = _train(_mlp(), _args(tmp_path / "b"), [GLADRegularizer(glad_rho=0.5, glad_lambda=0.0)])
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
    glad = _train(_mlp(), _args(tmp_path), [GLADRegularizer(glad_rho=0.3, glad_lambda=1.0)], data)
    reference = _reference_sam(_mlp(), data, rho=0.3, lr=0.1, steps=3)
    plain = _train(_mlp(), _args(tmp_path / "plain"), [], data)
    for name in reference:
        torch.testing.assert_close(glad[name], reference[name], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(plain[n], glad[n]) for n in plain)


def test_perturbation_uses_the_accumulated_gradient(tmp_path):
    """2 micro-batches of 4 (accumulated) = 1 batch of 8: the perturbation sees the whole optimizer step."""
    full = _train(_mlp(), _args(tmp_path / "a", batch=8), [GLADRegularizer(glad_rho=0.3, glad_lambda=0.5)])
    accumulated = _train(
        _mlp(), _args(tmp_path / "b", batch=4, accumulation=2), [GLADRegularizer(glad_rho=0.3, glad_lambda=0.5)]
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
    with pytest.raises(ValueError, match="`glad_rho`"):
        GLADRegularizer(glad_rho=-1.0)


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


# ---------------------------------------------------------------------------------------------- one settings object


def test_one_settings_object_for_adapter_trainer_and_regularizer(tmp_path):
    from dataclasses import fields

    from transformers import HfArgumentParser

    from regtune import GLADSettings
    from regtune.experiments import finetune

    config = regtune.GLADConfig(r=4, target_modules=["lin0"], rho=0.2, glad_lambda=0.7, share_dropout_masks=False)
    assert config.glad_settings == GLADSettings(rho=0.2, glad_lambda=0.7, share_dropout_masks=False)
    # defaults and help texts are defined once, in GLADSettings
    settings_fields = {f.name: f for f in fields(GLADSettings)}
    config_fields = {f.name: f for f in fields(regtune.GLADConfig)}
    args_fields = {f.name: f for f in fields(GLADTrainingArguments)}
    for name, source in settings_fields.items():
        assert config_fields[name].default == source.default
        assert config_fields[name].metadata["help"] == source.metadata["help"]
        arg = args_fields[name if name.startswith("glad_") else f"glad_{name}"]
        assert arg.default is None and arg.metadata["help"].startswith(source.metadata["help"])

    # the trainer's config class (what a recipe's `training:` section is validated against) carries the settings
    assert GLADTrainer.config_class is GLADTrainingArguments
    assert finetune.trainer_config_class(GLADTrainer) is GLADTrainingArguments
    (args,) = HfArgumentParser(GLADTrainingArguments).parse_dict(
        {"output_dir": str(tmp_path), "glad_lambda": 0.25, "use_cpu": True, "report_to": "none"}
    )
    assert args.glad_settings() == GLADSettings(glad_lambda=0.25)

    # the regularizer holds the model's settings with the trainer config's overrides applied
    model = get_peft_model(_mlp(), config)
    trainer = GLADTrainer(model=model, args=args, train_dataset=_data())
    glad = trainer.regularizers[0]
    assert glad.settings == GLADSettings(rho=0.2, glad_lambda=0.25, share_dropout_masks=False)
    assert (glad.rho, glad.glad_lambda, glad.share_dropout_masks) == (0.2, 0.25, False)
    assert GLADRegularizer(settings=GLADSettings(rho=0.3), glad_lambda=1.0).settings == GLADSettings(0.3, 1.0)
    # the recorded settings survive save/load of the adapter
    model.save_pretrained(tmp_path / "adapter")
    loaded = regtune.GLADConfig.from_pretrained(tmp_path / "adapter")
    assert loaded.glad_settings == config.glad_settings


@pytest.mark.parametrize(
    "build, fields",
    [
        (lambda: regtune.GLADConfig(rho=float("inf")), ["rho"]),
        (lambda: regtune.GLADConfig(rho=0.0, glad_lambda=float("nan"), share_dropout_masks="yes"), None),
        (lambda: regtune.GLADConfig(rho=True, glad_lambda=2, r=0, lora_dropout=1.5, target_modules=123), None),
        (lambda: regtune.GLADConfig(rho="0.1", r="8", lora_alpha=float("nan"), bias="some"), None),
        (lambda: regtune.GLADConfig(r=2.5, glad_lambda=-0.1), None),
        (lambda: GLADTrainingArguments("out", glad_rho=float("inf"), glad_lambda=2.0), None),
        (
            lambda: GLADTrainingArguments("out", glad_rho=-1, glad_share_dropout_masks=1, glad_log_diagnostics="no"),
            None,
        ),
        (lambda: GLADRegularizer(glad_rho=float("nan"), glad_lambda=1.5, log_diagnostics=None), None),
        (lambda: GLADRegularizer(glad_rho="a", glad_share_dropout_masks=0, settings={"rho": 1}), None),
        (lambda: regtune.GLADSettings(rho=-1e-3, glad_lambda=float("inf"), share_dropout_masks=None), None),
    ],
)
def test_every_bad_field_is_reported_at_construction(build, fields):
    """One ValueError names every bad field with its allowed values (the fields are read from the lambda's source)."""
    import inspect
    import re

    if fields is None:
        source = inspect.getsource(build).split("lambda:", 1)[1]
        fields = re.findall(r"(\w+)=", source.split("(", 1)[1])
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    for name in fields:
        assert f"`{name}`" in message, (name, message)
    assert message.count("allowed:") == len(fields), message


def test_good_values_build():
    assert regtune.GLADConfig(r=2, lora_alpha=4.0, rho=1, glad_lambda=0, target_modules="all-linear").rho == 1
    assert GLADRegularizer(glad_rho=10, glad_lambda=1).settings.rho == 10.0
    assert GLADRegularizer(0.3, 0.5).settings == regtune.GLADSettings(rho=0.3, glad_lambda=0.5)


# ------------------------------------------------------------------------------------------------- diagnostics


def _direct_g_and_gsam(model, data, rho):
    x, y = torch.tensor(data["x"]), torch.tensor(data["labels"])
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(x, labels=y)["loss"], params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(rho * g / norm)
    sam = torch.autograd.grad(model(x, labels=y)["loss"], params)
    g, g_sam = torch.cat([t.flatten() for t in grads]), torch.cat([t.flatten() for t in sam])
    return g, g_sam


@pytest.mark.parametrize("glad_lambda", [0.3, 1.0])
def test_diagnostics_are_logged_and_match_the_formula(tmp_path, glad_lambda):
    data = _data()
    g, g_sam = _direct_g_and_gsam(_mlp(), data, rho=0.3)
    expected_cos = torch.nn.functional.cosine_similarity(g, g_sam, dim=0)
    expected_rel = (g_sam - g).norm() / g.norm()
    assert expected_cos < 0.999  # the perturbation visibly turns the gradient: the check has signal

    reg = GLADRegularizer(glad_rho=0.3, glad_lambda=glad_lambda)
    args = _args(tmp_path, steps=1, logging_strategy="steps", logging_steps=1)
    trainer = RegTrainer(model=_mlp(), args=args, train_dataset=data, regularizers=[reg])
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert log["glad/cos_g_gsam"] == pytest.approx(expected_cos.item(), abs=1e-5)
    assert log["glad/rel_diff"] == pytest.approx(expected_rel.item(), rel=1e-4)
    assert reg.diagnostics() == {}  # reset by the log


def test_diagnostics_average_over_steps_and_can_be_turned_off(tmp_path):
    logs = {}
    for flag in (True, False):
        args = _args(tmp_path / str(flag), steps=4, logging_strategy="steps", logging_steps=2)
        reg = GLADRegularizer(glad_rho=0.3, glad_lambda=0.5, log_diagnostics=flag)
        trainer = RegTrainer(model=_mlp(), args=args, train_dataset=_data(), regularizers=[reg])
        trainer.train()
        logs[flag] = [entry for entry in trainer.state.log_history if "loss" in entry]
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        logs[f"weights{flag}"] = weights
    assert len(logs[True]) == 2 and all(0.0 < entry["glad/cos_g_gsam"] <= 1.0 for entry in logs[True])
    assert not any(key.startswith("glad/") for entry in logs[False] for key in entry)
    # the diagnostics use the perturbed parameters as scratch space: the training itself is unchanged by them
    for name, value in logs["weightsTrue"].items():
        torch.testing.assert_close(logs["weightsFalse"][name], value, atol=1e-6, rtol=1e-5)
    args = _args(tmp_path / "trainer", cls=GLADTrainingArguments, glad_log_diagnostics=False)
    assert not GLADTrainer(model=_mlp(), args=args, train_dataset=_data()).regularizers[0].log_diagnostics


def test_no_host_sync_inside_the_step(tmp_path, monkeypatch):
    """The GLAD step (perturbation, restore, diagnostics) never reads a tensor value on the host."""
    reg = GLADRegularizer(glad_rho=0.3, glad_lambda=0.5)
    trainer = RegTrainer(model=_mlp(), args=_args(tmp_path), train_dataset=_data(), regularizers=[reg])
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    inputs = next(iter(trainer.get_train_dataloader()))

    def refuse(*args, **kwargs):
        raise AssertionError("host sync inside the GLAD step")

    for method in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    trainer.training_step(trainer.model, inputs)
    monkeypatch.undo()
    assert set(reg.diagnostics()) == {"cos_g_gsam", "rel_diff"}


# ------------------------------------------------------------------------------------------------- dropout masks


class _DropoutMLP(MLP):
    def __init__(self, p=0.5):
        super().__init__()
        self.drop = torch.nn.Dropout(p)

    def forward(self, x, labels=None):
        hidden = self.drop(self.act(self.lin1(self.drop(self.act(self.lin0(x))))))
        logits = self.head(hidden)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _dropout_mlp():
    torch.manual_seed(0)
    return _DropoutMLP()


def test_shared_masks_and_vanishing_rho_give_the_plain_gradient_exactly(tmp_path):
    """With shared masks and a perturbation below float32 resolution, g_sam = g bit for bit, so SAM (lambda 1) is
    plain training; and the random stream after each step is plain training's. Independent masks differ."""
    plain = _train(_dropout_mlp(), _args(tmp_path / "plain", accumulation=2, batch=4), [])
    kwargs = {"rho": 1e-30, "glad_lambda": 1.0}
    shared = _train(_dropout_mlp(), _args(tmp_path / "s", accumulation=2, batch=4), [GLADRegularizer(**kwargs)])
    fresh = _train(
        _dropout_mlp(),
        _args(tmp_path / "i", accumulation=2, batch=4),
        [GLADRegularizer(**kwargs, share_dropout_masks=False)],
    )
    for name in plain:
        assert torch.equal(shared[name], plain[name]), name
    assert any(not torch.allclose(fresh[name], plain[name]) for name in plain)


def test_shared_masks_remove_the_dropout_noise_from_gsam(tmp_path):
    """With a small rho, g_sam - g is small with shared masks and dominated by dropout noise without them."""
    rel = {}
    for shared in (True, False):
        args = _args(tmp_path / str(shared), steps=4, logging_strategy="steps", logging_steps=4)
        reg = GLADRegularizer(glad_rho=1e-3, glad_lambda=0.5, share_dropout_masks=shared)
        trainer = RegTrainer(model=_dropout_mlp(), args=args, train_dataset=_data(), regularizers=[reg])
        trainer.train()
        (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
        rel[shared] = log["glad/rel_diff"]
        if shared:
            assert log["glad/cos_g_gsam"] > 0.99
    assert rel[True] < 0.05 < 0.3 < rel[False], rel


# ------------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("adapter, shared", [("lora", False), ("full", False), ("full", True)])
def test_peak_memory_is_plain_plus_one_copy_of_the_trainable_parameters(tmp_path, adapter, shared):
    """Around one optimizer step (2 accumulated micro-batches), GLAD's peak tensor memory exceeds plain training's by
    at most one copy of the trainable parameters (no copy of the gradients), and nothing is kept after the step."""

    def model():
        torch.manual_seed(0)
        base = MLP(hidden=256)  # wide enough that the parameters dominate the fixed costs
        if adapter == "full":
            return base
        return get_peft_model(base, LoraConfig(r=4, target_modules=["lin0", "lin1"]))

    peaks = {}
    glad = GLADRegularizer(glad_rho=0.3, glad_lambda=0.5, share_dropout_masks=shared)
    for name, regs in (("plain", []), ("glad", [glad])):
        trainer = RegTrainer(
            model=model(),
            args=_args(tmp_path / name, batch=4, accumulation=2),
            train_dataset=_data(),
            regularizers=regs,
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        trainer.current_gradient_accumulation_steps = 2  # set by the Trainer's loop
        batches = list(trainer.get_train_dataloader())
        assert len(batches) == 2

        def step(trainer=trainer, batches=batches):
            for index, batch in enumerate(batches):
                trainer.accelerator.gradient_state._set_sync_gradients(index == len(batches) - 1)
                trainer.training_step(trainer.model, batch)

        peaks[name] = peak_tensor_bytes(step)
        if regs:
            held = [v for v in vars(regs[0]).values() if isinstance(v, torch.Tensor) and v.numel() > 2]
            assert not held and not regs[0]._window
    trainable = sum(p.numel() * p.element_size() for p in model().parameters() if p.requires_grad)
    # besides: a few scalars, and with shared masks the random-number state replayed for each micro-batch (5 KB
    # each on CPU)
    rng_states = 3 * torch.get_rng_state().numel() if shared else 0
    assert peaks["glad"] - peaks["plain"] <= trainable + rng_states + 1024, (peaks, trainable)
    # the old step (a copy of the parameters and of the gradients, then out-of-place combination) needed 4 copies


def test_an_error_in_the_second_pass_leaves_the_weights_unperturbed(tmp_path):
    reg = GLADRegularizer(glad_rho=0.5, glad_lambda=0.5)
    trainer = RegTrainer(model=_mlp(), args=_args(tmp_path), train_dataset=_data(), regularizers=[reg])
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    inputs = next(iter(trainer.get_train_dataloader()))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    calls = []

    def fail_on_second_forward(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")

    trainer.model.register_forward_pre_hook(fail_on_second_forward)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.training_step(trainer.model, inputs)
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), name


class _Deep(torch.nn.Module):
    """Narrow and deep: at a large batch the activations dominate, so plain training peaks early in its backward,
    before most gradient buffers exist (as a language model does)."""

    def __init__(self, width=32, depth=6):
        super().__init__()
        self.inp = torch.nn.Linear(12, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x, labels=None):
        hidden = torch.tanh(self.inp(x))
        for block in self.blocks:
            hidden = torch.tanh(block(hidden))
        logits = self.head(hidden)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class _AccumulatingGLAD(GLADRegularizer):
    """The earlier step (the second backward accumulates on top of the rescaled g, theta saved): the contrast."""

    def training_step(self, trainer, model, inputs, num_items_in_batch=None):
        loss = self._loss_and_backward(trainer, model, inputs, num_items_in_batch)
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        grads = [p.grad for p in params]
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            scale = self.rho / torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            torch._foreach_add_(params, torch._foreach_mul(grads, scale))  # theta + eps
            torch._foreach_mul_(grads, (1.0 - self.glad_lambda) / self.glad_lambda)  # kept through the 2nd backward
        self._loss_and_backward(trainer, model, inputs, num_items_in_batch)  # accumulates g_sam on top
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
            torch._foreach_mul_(grads, self.glad_lambda)  # (1 - lambda) g + lambda g_sam
        return loss


def test_peak_memory_when_plain_training_peaks_in_its_backward(tmp_path):
    """GLAD's second backward fills fresh gradient buffers, as plain training's backward does, so its peak exceeds
    plain training's by the one saved copy of the parameters, even where plain training peaks before its gradients
    exist (where keeping g in the buffers through the second backward costs one more copy)."""

    def model():
        torch.manual_seed(0)
        return _Deep()

    peaks = {}
    regs = {
        "plain": [],
        "glad": [GLADRegularizer(glad_rho=0.3, glad_lambda=0.5, share_dropout_masks=False, log_diagnostics=False)],
        "accumulating": [
            _AccumulatingGLAD(rho=0.3, glad_lambda=0.5, share_dropout_masks=False, log_diagnostics=False)
        ],
    }
    for name, reg in regs.items():
        trainer = RegTrainer(
            model=model(), args=_args(tmp_path / name, batch=512), train_dataset=_data(512), regularizers=reg
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop
        (batch,) = list(trainer.get_train_dataloader())
        trainer.training_step(trainer.model, batch)  # warm-up (lazy allocations)
        trainer.model.zero_grad(set_to_none=True)
        peaks[name] = peak_tensor_bytes(lambda t=trainer, b=batch: t.training_step(t.model, b))
    trainable = sum(p.numel() * p.element_size() for p in model().parameters())
    assert peaks["glad"] - peaks["plain"] <= trainable + 1024, (peaks, trainable)
    assert peaks["accumulating"] - peaks["plain"] > 1.5 * trainable, (peaks, trainable)  # the check has signal
