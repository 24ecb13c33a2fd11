"""Learning with noisy labels: ELR, PS-KD, the per-example plumbing (index column, buffers, checkpoints), the noise
model and the memorization monitor.

The one-step checks recompute the step from the released code's formulas (shengliu66/ELR `ELR/model/loss.py`,
lgcnsai/PS-KD-Pytorch `main.py` + `loss/pskd_loss.py`), written out here with plain torch, not with regtune's
functions."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from regtune.data.noisy_labels import corrupt_labels, noisy_labels_task
from regtune.data.token_mlp import TokenMLPConfig, TokenMLPForSequenceClassification
from regtune.functional.noisy_labels import elr_sigmoid_rampup, pskd_alpha
from regtune.regularizers import ELR, PSKD, NoisyLabelMonitor, add_sample_index, build_regularizer
from regtune.trainers import RegTrainer


N, C, VOCAB, TOKENS = 12, 3, 16, 3
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "noisy_labels_worker.py")


def tiny_model(seed: int = 0) -> TokenMLPForSequenceClassification:
    torch.manual_seed(seed)
    config = TokenMLPConfig(vocab_size=VOCAB, num_tokens=TOKENS, embed_dim=4, hidden_sizes=[8], num_labels=C)
    return TokenMLPForSequenceClassification(config)


def tiny_dataset(n: int = N, index: bool = True, true_labels: bool = False) -> datasets.Dataset:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, TOKENS), generator=g)
    labels = torch.randint(0, C, (n,), generator=g)
    data = {"input_ids": ids.tolist(), "labels": labels.tolist()}
    if true_labels:
        data["true_label"] = [(int(y) + (i % 3 == 0)) % C for i, y in enumerate(labels)]  # every third is mislabeled
    ds = datasets.Dataset.from_dict(data)
    return add_sample_index(ds) if index else ds


def args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = {
        "output_dir": str(tmp_path),
        "report_to": "none",
        "use_cpu": True,
        "per_device_train_batch_size": N,
        "num_train_epochs": 1,
        "learning_rate": 0.5,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "weight_decay": 0.0,
        "seed": 0,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def batch_of(ds: datasets.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(ds["input_ids"]), torch.tensor(ds["labels"])


def sgd_step(model, loss_fn, lr: float = 0.5) -> dict[str, torch.Tensor]:
    """One plain SGD step of `loss_fn(model)` on a copy of `model`'s weights; returns the new weights."""
    model = copy.deepcopy(model)
    model.zero_grad()
    loss_fn(model).backward()
    return {n: (p - lr * p.grad).detach() for n, p in model.named_parameters()}


def assert_weights(model, expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=atol, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# one step against the released formulas


def test_elr_one_step_matches_released_formula(tmp_path):
    beta, lam = 0.7, 3.0
    ds = tiny_dataset()
    ids, labels = batch_of(ds)
    model = tiny_model()

    def released_loss(m):  # ELR/model/loss.py, elr_loss.forward, with target = zeros (first visit)
        output = m(input_ids=ids).logits
        y_pred = F.softmax(output, dim=1)
        y_pred = torch.clamp(y_pred, 1e-4, 1.0 - 1e-4)
        y_pred_ = y_pred.data.detach()
        target = beta * torch.zeros(N, C) + (1 - beta) * (y_pred_ / y_pred_.sum(dim=1, keepdim=True))
        ce_loss = F.cross_entropy(output, labels)
        elr_reg = ((1 - (target * y_pred).sum(dim=1)).log()).mean()
        return ce_loss + lam * elr_reg

    expected = sgd_step(model, released_loss)
    with torch.no_grad():
        probs = F.softmax(model(input_ids=ids).logits, 1).clamp(1e-4, 1 - 1e-4)
        expected_targets = (1 - beta) * probs / probs.sum(1, keepdim=True)
    reg = ELR(beta=beta, lambda_=lam)
    trainer = RegTrainer(model=model, args=args(tmp_path), train_dataset=ds, regularizers=[reg])
    trainer.train()
    assert_weights(model, expected)
    torch.testing.assert_close(reg.state_dict()["targets"], expected_targets, rtol=0, atol=1e-6)
    logged = next(h for h in trainer.state.log_history if "elr/penalty" in h)
    assert logged["elr/lambda"] == lam and logged["elr/penalty"] < 0


def test_pskd_two_epochs_match_released_formula(tmp_path):
    alpha_T, epochs = 0.8, 2
    ds = tiny_dataset()
    ids, labels = batch_of(ds)
    model = tiny_model()
    onehot = torch.eye(C)[labels]

    def released_loss(m, soft):  # loss/pskd_loss.py: (-targets * log_softmax(output)).mean(0).sum()
        return (-soft * F.log_softmax(m(input_ids=ids).logits, dim=1)).mean(0).sum()

    # epoch 0 (main.py: all_predictions[idx] = onehot at epoch 0, so the target is the one-hot label)
    alpha0 = alpha_T * (0 + 1) / epochs
    soft0 = (1 - alpha0) * onehot + alpha0 * onehot
    with torch.no_grad():
        recorded = F.softmax(model(input_ids=ids).logits, dim=1)  # softmax_output of the forward before the step
    after0 = sgd_step(model, lambda m: released_loss(m, soft0))
    model1 = copy.deepcopy(model)
    model1.load_state_dict(after0, strict=False)
    # epoch 1: alpha_t = alpha_T * 2 / 2, targets mix the one-hot label and the epoch-0 predictions
    alpha1 = alpha_T * (1 + 1) / epochs
    soft1 = (1 - alpha1) * onehot + alpha1 * recorded
    with torch.no_grad():
        recorded1 = F.softmax(model1(input_ids=ids).logits, dim=1)
    expected = sgd_step(model1, lambda m: released_loss(m, soft1))

    reg = PSKD(alpha_T=alpha_T)
    trainer = RegTrainer(
        model=model, args=args(tmp_path, num_train_epochs=epochs), train_dataset=ds, regularizers=[reg]
    )
    trainer.train()
    assert_weights(model, expected, atol=2e-6)
    torch.testing.assert_close(reg.state_dict()["predictions"], recorded1, rtol=0, atol=1e-6)
    alphas = [h["pskd/alpha"] for h in trainer.state.log_history if "pskd/alpha" in h]
    assert alphas == pytest.approx([alpha0, alpha1])
    # soft targets never reach the model: its loss stays the single-label cross-entropy, also in the saved config
    assert model.config.problem_type == "single_label_classification"
    trainer.save_model(str(tmp_path / "saved"))
    with open(tmp_path / "saved" / "config.json") as f:
        assert json.load(f)["problem_type"] == "single_label_classification"


def test_functional_schedules():
    assert pskd_alpha(0.8, 0, 300) == pytest.approx(0.8 / 300)
    assert pskd_alpha(0.8, 299, 300) == pytest.approx(0.8)
    assert elr_sigmoid_rampup(5, 0) == 1.0
    assert elr_sigmoid_rampup(0, 10) == pytest.approx(np.exp(-5.0))
    assert elr_sigmoid_rampup(10, 10) == 1.0 and elr_sigmoid_rampup(50, 10) == 1.0


# --------------------------------------------------------------------------------------------------------------------
# plumbing


def test_index_column_survives_remove_unused_columns_and_never_reaches_the_model(tmp_path):
    ds = tiny_dataset(true_labels=True)
    model = tiny_model()
    seen: list[set] = []
    model.register_forward_pre_hook(lambda module, a, kw: seen.append(set(kw)), with_kwargs=True)
    reg = ELR()
    trainer = RegTrainer(
        model=model,
        args=args(tmp_path, remove_unused_columns=True, per_device_train_batch_size=4),
        train_dataset=ds,
        eval_dataset=ds,
        regularizers=[reg],
    )
    trainer.train()
    trainer.evaluate()
    assert seen and all("sample_index" not in keys and "true_label" not in keys for keys in seen)
    assert (reg.state_dict()["targets"].sum(1) > 0).all()  # every example's row was written, by its own index


@pytest.mark.parametrize("cls", [ELR, PSKD])
def test_resume_is_bit_exact_with_buffers(tmp_path, cls):
    def make(out, **kw):
        model = tiny_model()
        reg = cls()
        a = args(out, per_device_train_batch_size=4, num_train_epochs=4, save_strategy="steps", save_steps=3, **kw)
        return model, reg, RegTrainer(model=model, args=a, train_dataset=tiny_dataset(), regularizers=[reg])

    model_a, reg_a, trainer_a = make(tmp_path / "a")  # 12 steps, a checkpoint every 3
    trainer_a.train()
    model_c, reg_c, trainer_c = make(tmp_path / "c")  # a new process's trainer, resumed at step 6 (mid-run)
    trainer_c.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    fresh = reg_c.state_dict()
    saved = torch.load(tmp_path / "a" / "checkpoint-6" / "regtune_regularizers.pt", weights_only=True)
    assert set(saved["regularizers"][cls.name]) >= set(fresh) - {"num_examples", "num_classes"}
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    state_a, state_c = reg_a.state_dict(), reg_c.state_dict()
    assert state_a.keys() == state_c.keys()
    for key, value in state_a.items():
        assert torch.equal(value, state_c[key]) if isinstance(value, torch.Tensor) else value == state_c[key]


@pytest.mark.parametrize("cls", [ELR, PSKD])
def test_gradient_accumulation_matches_the_full_batch(tmp_path, cls):
    """2 micro-batches of 6 (GA 2) give the step of one batch of 12: the term is a per-micro-batch mean, scaled."""
    weights = []
    for name, batch, accumulation in (("full", N, 1), ("ga", N // 2, 2)):
        model = tiny_model()
        training = args(tmp_path / name, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                        num_train_epochs=2)  # fmt: skip
        RegTrainer(model=model, args=training, train_dataset=tiny_dataset(), regularizers=[cls()]).train()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=1e-5)


def test_elr_plus_rampup_of_lambda(tmp_path):
    reg = ELR(lambda_=3.0, rampup_steps=4)
    trainer = RegTrainer(model=tiny_model(), args=args(tmp_path, per_device_train_batch_size=4, num_train_epochs=2),
                         train_dataset=tiny_dataset(), regularizers=[reg])  # fmt: skip
    trainer.train()
    lambdas = [h["elr/lambda"] for h in trainer.state.log_history if "elr/lambda" in h]
    expected = [3.0 * elr_sigmoid_rampup(step, 4) for step in range(6)]  # the step before each update
    assert lambdas == pytest.approx(expected, rel=1e-5)
    assert lambdas[0] == pytest.approx(3.0 * np.exp(-5.0)) and lambdas[-1] == 3.0


def test_buffer_on_cpu_gives_the_same_step(tmp_path):
    out = []
    for device in ("auto", "cpu"):
        model = tiny_model()
        reg = ELR(buffer_device=device)
        RegTrainer(model=model, args=args(tmp_path / device), train_dataset=tiny_dataset(), regularizers=[reg]).train()
        assert reg._buffers["targets"].device.type == "cpu"
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(out[0], out[1])


# --------------------------------------------------------------------------------------------------------------------
# bad inputs: one clear ValueError each, naming the field and the allowed values


def test_missing_index_column_names_the_fix(tmp_path):
    trainer = RegTrainer(model=tiny_model(), args=args(tmp_path), train_dataset=tiny_dataset(index=False),
                         regularizers=[ELR()])  # fmt: skip
    with pytest.raises(ValueError, match=r"sample_index.*add_sample_index"):
        trainer.train()


def test_index_out_of_range(tmp_path):
    ds = tiny_dataset().map(lambda row: {"sample_index": row["sample_index"] + 5})
    trainer = RegTrainer(model=tiny_model(), args=args(tmp_path), train_dataset=ds, regularizers=[PSKD()])
    with pytest.raises(ValueError, match=r"outside the allowed range \[0, 11\].*num_examples"):
        trainer.train()


def test_wrong_number_of_classes(tmp_path):
    trainer = RegTrainer(model=tiny_model(), args=args(tmp_path), train_dataset=tiny_dataset(),
                         regularizers=[ELR(num_classes=5)])  # fmt: skip
    with pytest.raises(ValueError, match=r"3 logits per example but `num_classes` is 5"):
        trainer.train()


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: ELR(beta=-0.1), "`beta` must be a number in \\[0, 1\\)"),
        (lambda: ELR(lambda_=-1.0), "`lambda_` must be a number >= 0"),
        (lambda: ELR(rampup_steps=-3), "`rampup_steps` must be an integer >= 0"),
        (lambda: PSKD(alpha_T=-0.5), "`alpha_T` must be a number in \\[0, 1\\]"),
        (lambda: PSKD(total_epochs=0), "`total_epochs` must be None"),
        (lambda: ELR(num_classes=1), "`num_classes` must be None"),
        (lambda: ELR(buffer_device="gpu"), "`buffer_device` must be one of \\['auto', 'cpu'\\]"),
        (lambda: corrupt_labels([0, 1], 2, rate=-0.1), "`rate` must be a number in \\[0, 1\\]"),
        (lambda: corrupt_labels([0, 1], 2, kind="flip"), "`kind` must be one of"),
        (lambda: corrupt_labels([0, 3], 2), "`labels` must lie in \\[0, 1\\]"),
        (lambda: build_regularizer("elr", lambda_=-2), "`lambda_` must be a number >= 0"),
    ],
)
def test_bad_arguments(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_label_smoothing_refused_with_pskd(tmp_path):
    trainer = RegTrainer(model=tiny_model(), args=args(tmp_path, label_smoothing_factor=0.1),
                         train_dataset=tiny_dataset(), regularizers=[PSKD()])  # fmt: skip
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0.1 would stack.*set `label_smoothing_factor` to 0"):
        trainer.train()


# --------------------------------------------------------------------------------------------------------------------
# the noise model, the task and the monitor


def test_corrupt_labels_symmetric_and_asymmetric():
    labels = np.repeat(np.arange(10), 20)
    noisy, mask = corrupt_labels(labels, 10, "symmetric", 0.4, seed=3)
    assert mask.sum() == 80 and (noisy[mask] != labels[mask]).all() and (noisy[~mask] == labels[~mask]).all()
    again, _ = corrupt_labels(labels, 10, "symmetric", 0.4, seed=3)
    assert (again == noisy).all()
    assert (corrupt_labels(labels, 10, "symmetric", 0.4, seed=4)[0] != noisy).any()
    noisy, mask = corrupt_labels(labels, 10, "asymmetric", 0.4, seed=0)
    assert (noisy[mask] == (labels[mask] + 1) % 10).all()
    assert all(mask[labels == c].sum() == 8 for c in range(10))
    noisy, mask = corrupt_labels(labels, 10, "asymmetric", 0.5, seed=0, pairs={2: 0})
    assert set(np.flatnonzero(mask)) <= set(np.flatnonzero(labels == 2)) and mask.sum() == 10
    assert not corrupt_labels(labels, 10, "none", 0.4)[1].any()


def test_noisy_labels_task_splits():
    splits = noisy_labels_task(dataset="modular", p=11, noise="symmetric", noise_rate=0.2, n_train=60, n_val=30)
    train, test = splits["train"], splits["test"]
    assert len(train) == 60 and len(splits["validation"]) == 30 and len(test) == 121 - 90
    wrong = np.array(train["label"]) != np.array(train["true_label"])
    assert wrong.sum() == 12
    assert (np.array(test["label"]) == np.array(test["true_label"])).all()  # the test split is clean
    assert len(splits["noisy_train"]) == 12
    assert splits["noisy_train"]["label"] != splits["noisy_train_true"]["label"]
    assert splits["noisy_train_true"]["label"] == splits["noisy_train_true"]["true_label"]
    a, b = map(int, test[0]["text"].split())
    assert test[0]["label"] == (a + b) % 11


def test_monitor_counts_memorization(tmp_path):
    ds = tiny_dataset(true_labels=True)
    monitor = NoisyLabelMonitor()
    trainer = RegTrainer(model=tiny_model(), args=args(tmp_path, learning_rate=0.0), train_dataset=ds,
                         regularizers=[monitor])  # fmt: skip
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "noisy_labels/memorized" in h)
    ids, given = batch_of(ds)
    true = torch.tensor(ds["true_label"])
    with torch.no_grad():
        pred = trainer.model(input_ids=ids).logits.argmax(-1)
    noisy = given != true
    assert logged["noisy_labels/noisy_fraction"] == pytest.approx(noisy.float().mean().item())
    assert logged["noisy_labels/memorized"] == pytest.approx((pred[noisy] == given[noisy]).float().mean().item())
    assert logged["noisy_labels/true_label"] == pytest.approx((pred[noisy] == true[noisy]).float().mean().item())
    assert logged["noisy_labels/clean_fit"] == pytest.approx((pred[~noisy] == given[~noisy]).float().mean().item())


# --------------------------------------------------------------------------------------------------------------------
# DDP


@pytest.mark.slow
@pytest.mark.parametrize("method", ["elr", "pskd"])
def test_ddp_two_processes_keep_identical_buffers(tmp_path, method):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
               str(tmp_path), method]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    states = [torch.load(tmp_path / f"state_{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [s["world_size"] for s in states] == [2, 2]
    name = "targets" if method == "elr" else "predictions"
    a, b = states[0][name], states[1][name]
    assert torch.equal(a, b)  # all-gathered: both processes hold every example's row
    assert (a.sum(1) > 0).all()  # ... and every example was written, though each process saw only half of them
    if method == "pskd":
        assert states[0]["visited"].all() and torch.equal(states[0]["visited"], states[1]["visited"])
    # and the checkpoint holds one (identical) copy per process
    ckpt = [torch.load(tmp_path / "checkpoint-3" / f"regtune_regularizers_{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(ckpt[0]["regularizers"][method][name], ckpt[1]["regularizers"][method][name])


# --------------------------------------------------------------------------------------------------------------------
# the engine: the evidence recipes, and a tiny one run end to end


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["noisy_labels", "noisy_labels_asym", "noisy_labels_sym20"])
def test_evidence_recipes_follow_the_protocol(name):
    from regtune.experiments import load_recipe

    rec = load_recipe(os.path.join(REPO, "recipes", "evidence", f"{name}.yaml"))
    assert rec.seeds is not None and len(rec.seeds) >= 5 and rec.selection.split == "validation"
    assert len(rec.selection.seeds) >= 3 and not set(rec.selection.seeds) & set(rec.seeds)
    assert all(r.sweep for r in rec.runs)  # every method's lr is chosen on the (noisy) validation split
    assert all(r.regularizers[0].type == "noisy_labels" for r in rec.runs)  # the diagnostic beside every result


def test_tiny_recipe_runs_end_to_end(tmp_path):
    from regtune.experiments import load_recipe, run_recipe

    raw = {
        "kind": "runs",
        "name": "tiny-noisy",
        "output_dir": str(tmp_path / "out"),
        "model": {
            "config": {"model_type": "regtune-token-mlp", "num_tokens": 4, "embed_dim": 4, "hidden_sizes": [16]},
            "tokenizer": "builtin:all-MiniLM-L6-v2",
        },
        "data": {"builtin": "noisy-labels", "options": {"dataset": "modular", "p": 7, "n_train": 30, "n_val": 9}},
        "regularizers": [{"type": "noisy_labels"}],
        "training": {"num_train_epochs": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                     "logging_steps": 2, "save_strategy": "no", "report_to": "none", "disable_tqdm": True},
        "evaluation": {"splits": ["test", "noisy_train", "noisy_train_true"], "metrics": ["accuracy"]},
        "runs": [
            {"name": "ce"},
            {"name": "elr", "regularizers": [{"type": "noisy_labels"}, {"type": "elr"}]},
            {"name": "pskd", "regularizers": [{"type": "noisy_labels"}, {"type": "pskd"}]},
        ],
    }  # fmt: skip
    run_recipe(load_recipe(raw), log=lambda *_: None)
    for run in ("ce", "elr", "pskd"):
        with open(tmp_path / "out" / run / "metrics.json") as f:
            result = json.load(f)
        assert set(result["metrics"]) == {"test", "noisy_train", "noisy_train_true"}
        assert 0.0 <= result["diagnostics"]["noisy_labels/memorized"] <= 1.0
        assert result["diagnostics"]["noisy_labels/noisy_fraction"] == pytest.approx(12 / 30, abs=0.15)  # per window
        with open(tmp_path / "out" / run / "model" / "config.json") as f:
            assert json.load(f)["problem_type"] == "single_label_classification"
    assert "elr/target_disagrees" in json.load(open(tmp_path / "out" / "elr" / "metrics.json"))["diagnostics"]
