"""LfU: the math against its formula, one trainer step against a hand reference, accumulation, resume, dataset
formats, adapters, errors, and 2-process DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from distributed_worker import tiny_llama
from lfu_worker import (
    lfu_config,
    lora_model,
    messages_dataset,
    prompt_completion_dataset,
    run,
    trainable_weights,
    word_tokenizer,
)
from peft import LoraConfig, get_peft_model
from torch.func import functional_call

import regtune
from regtune.functional.lfu import hidden_state_consistency, response_token_mask, steer_hidden
from regtune.regularizers.lfu import LfUSettings, block_hooks, find_decoder_blocks


# ---- layer 1: formulas on small tensors ----


def test_consistency_is_masked_mean_of_squared_differences_averaged_over_layers():
    torch.manual_seed(0)
    clean = [torch.randn(2, 3, 4) for _ in range(3)]
    perturbed = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(3)]
    labels = torch.tensor([[-100, 5, 6], [-100, -100, 7]])
    mask = response_token_mask(labels)
    expected = sum(((p - c)[mask] ** 2).mean() for p, c in zip(perturbed, clean)) / 3
    got = hidden_state_consistency(perturbed, clean, mask)
    torch.testing.assert_close(got, expected)
    # the gradient flows through the perturbed states only
    clean_leaf = [c.clone().requires_grad_() for c in clean]
    hidden_state_consistency(perturbed, clean_leaf, mask).backward()
    assert all(c.grad is None for c in clean_leaf)
    assert perturbed[0].grad[0, 0].abs().sum() == 0 and perturbed[0].grad[0, 1].abs().sum() > 0
    # nothing selected: a zero that backpropagates
    zero = hidden_state_consistency(perturbed, clean, torch.zeros(2, 3, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad


def test_steer_hidden_matches_formula_and_keeps_norm():
    torch.manual_seed(0)
    x, d = torch.randn(2, 5, 8), torch.randn(8)
    alpha = 0.3
    unit = x / x.norm(dim=-1, keepdim=True)
    mixed = unit + alpha * d / d.norm()
    expected = mixed / mixed.norm(dim=-1, keepdim=True) * x.norm(dim=-1, keepdim=True)
    got = steer_hidden(x, d, alpha)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))
    # pushed towards d
    assert (torch.nn.functional.cosine_similarity(got, d.expand_as(x), dim=-1) > 0).float().mean() >= (
        torch.nn.functional.cosine_similarity(x, d.expand_as(x), dim=-1) > 0
    ).float().mean()


def test_block_hooks_collect_transformers_hidden_states_and_clean_up():
    model = tiny_llama()
    x = torch.randint(5, 60, (2, 7))
    backbone, blocks = find_decoder_blocks(model)
    reference = model(input_ids=x, output_hidden_states=True)
    with block_hooks(backbone, blocks, range(0, 3)) as states:
        model(input_ids=x)
    assert len(states) == 3
    for got, want in zip(states, reference.hidden_states):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    directions = torch.randn(len(blocks), 16)
    with block_hooks(backbone, blocks, None, directions, 0.5):
        steered = model(input_ids=x).logits
    assert (steered - reference.logits).abs().max() > 1e-3
    torch.testing.assert_close(model(input_ids=x).logits, reference.logits, rtol=0, atol=0)  # hooks removed


# ---- one step against a hand reference ----


def _first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v for k, v in batch.items()}


def _token_loss_sum(model, batch, params=None):
    """Summed next-token negative log-likelihood and its token count (trl's SFT loss is sum / count)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = (functional_call(model, params, (), inputs) if params is not None else model(**inputs)).logits
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    mask = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum(), mask.sum()


def _hidden(model, batch, params=None):
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "output_hidden_states": True}
    out = functional_call(model, params, (), inputs) if params is not None else model(**inputs)
    return out.hidden_states


def _reference_perturb_grad(model, micro_batches, second_batches, alpha, beta):
    """grad of sum_k [ L_sft_k + beta / K * mean_l MSE(h_l(x_k; theta + delta_k), stopgrad h_l(x_k; theta)) ]"""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    grads = {n: torch.zeros_like(p) for n, p in named.items()}
    for batch, second in zip(micro_batches, second_batches):
        loss_sum, _ = _token_loss_sum(model, batch)
        for n, g in zip(named, torch.autograd.grad(loss_sum / total_tokens, list(named.values()))):
            grads[n] += g
        second_sum, second_count = _token_loss_sum(model, second)
        g_second = torch.autograd.grad(second_sum / second_count, list(named.values()))
        norm = torch.sqrt(sum((g**2).sum() for g in g_second))
        shifted = {n: p + alpha * g.detach() / norm for (n, p), g in zip(named.items(), g_second)}
        clean = [h.detach() for h in _hidden(model, batch)]
        perturbed = _hidden(model, batch, shifted)
        mask = (batch["labels"] != -100).unsqueeze(-1).float()
        cons = sum(((p - c) ** 2 * mask).sum() / (mask.sum() * p.shape[-1]) for p, c in zip(perturbed, clean))
        cons = cons / len(clean)
        for n, g in zip(named, torch.autograd.grad(beta * cons / len(micro_batches), list(named.values()))):
            grads[n] += g
    return torch.cat([grads[n].flatten() for n in named])


@pytest.mark.parametrize("second_batch", ["same", "dataset"])
def test_perturb_step_matches_reference(tmp_path, second_batch):
    alpha, beta, lr = 0.5, 50.0, 1.0
    model = lora_model()
    before = trainable_weights(model)
    second = prompt_completion_dataset(n=1, seed=7)  # a one-row data set: x' is that row, repeated
    trainer = regtune.LfUTrainer(
        model=model,
        args=lfu_config(
            str(tmp_path), max_steps=1, learning_rate=lr, lfu_alpha=alpha, lfu_beta=beta, lfu_second_batch=second_batch
        ),
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
        lfu_dataset=second if second_batch == "dataset" else None,
    )
    batch = _first_batch(trainer)
    if second_batch == "same":
        second_batch_rows = batch
    else:
        lfu = trainer.regularizers[0]
        rows = [lfu.second_dataset[0]] * trainer.args.per_device_train_batch_size
        second_batch_rows = trainer.data_collator(rows)
    reference_model = lora_model()
    expected = _reference_perturb_grad(reference_model, [batch], [second_batch_rows], alpha, beta)
    # the consistency term matters at this beta: the reference without it differs
    plain = _reference_perturb_grad(reference_model, [batch], [second_batch_rows], alpha, 0.0)
    assert (expected - plain).abs().max() > 1e-3 * expected.abs().max()
    trainer.train()
    step = (before - trainable_weights(model)) / lr
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_sums_per_micro_batch_terms(tmp_path):
    alpha, beta = 0.5, 50.0
    model = lora_model()
    before = trainable_weights(model)
    trainer = regtune.LfUTrainer(
        model=model,
        args=lfu_config(
            str(tmp_path),
            max_steps=1,
            learning_rate=1.0,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            lfu_alpha=alpha,
            lfu_beta=beta,
            lfu_second_batch="same",
        ),  # fmt: skip
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
    )
    loader = iter(trainer.get_train_dataloader())
    micro = [next(loader), next(loader)]
    expected = _reference_perturb_grad(lora_model(), micro, micro, alpha, beta)
    trainer.train()
    torch.testing.assert_close(before - trainable_weights(model), expected, rtol=1e-4, atol=1e-5)


def test_reps_step_trains_directions_to_raise_the_loss_and_adds_consistency(tmp_path):
    model = lora_model()
    trainer = regtune.LfUTrainer(
        model=model,
        args=lfu_config(
            str(tmp_path),
            max_steps=1,
            learning_rate=1e-2,
            lfu_mode="reps",
            lfu_alpha=0.5,
            lfu_beta=1e3,
            lfu_second_batch="same",
            lfu_reps_lr_weight=50.0,
            lfu_reps_pairing="steered_x",
        ),  # fmt: skip
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
    )
    batch = _first_batch(trainer)
    lfu = trainer.regularizers[0]
    backbone, blocks = find_decoder_blocks(model)
    # the trainer creates the vectors at train start from the seed: rebuild them to measure before/after
    directions = torch.randn(len(blocks), 16, generator=torch.Generator().manual_seed(0))

    def steered_loss(d):
        with torch.no_grad(), block_hooks(backbone, blocks, None, d, 0.5):
            return model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss

    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_before = steered_loss(directions)
    # expected parameter step: SFT gradient + beta * consistency gradient through the steered branch (d fixed)
    named = dict(model.named_parameters())
    params = [named[n] for n in weights]
    total, count = _token_loss_sum(model, batch)
    clean = [h.detach() for h in _hidden(model, batch)]
    with block_hooks(backbone, blocks, range(0, 3), directions, 0.5) as states:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = response_token_mask(batch["labels"])
    expected = torch.autograd.grad(total / count + 1e3 * hidden_state_consistency(states, clean, mask), params)
    trainer.train()
    step = torch.cat([(weights[n] - named[n].detach()).flatten() for n in weights]) / 1e-2
    torch.testing.assert_close(step, torch.cat([g.flatten() for g in expected]), rtol=1e-4, atol=1e-6)
    # Adam moved the vectors so that the steered loss (at the old weights) went up
    for n, p in model.named_parameters():
        if n in weights:
            p.data.copy_(weights[n])
    assert not torch.equal(lfu.directions.detach(), directions)
    assert steered_loss(lfu.directions.detach()) > loss_before


# ---- training: resume, formats, adapters ----


@pytest.mark.parametrize("mode", ["perturb", "reps"])
def test_resume_continues_exactly(tmp_path, mode):
    common = {"max_steps": 4, "learning_rate": 0.01, "lfu_mode": mode, "lfu_beta": 5.0, "save_steps": 2}

    def train(out, resume=None, max_steps=4):
        model = lora_model()
        trainer = regtune.LfUTrainer(
            model=model,
            args=lfu_config(out, **{**common, "max_steps": max_steps, "save_strategy": "steps"}),
            train_dataset=prompt_completion_dataset(),
            processing_class=word_tokenizer(),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainable_weights(model), trainer

    full, trainer_full = train(str(tmp_path / "full"))
    _, _ = train(str(tmp_path / "cut"), max_steps=2)
    resumed, trainer_resumed = train(str(tmp_path / "cut"), resume=str(tmp_path / "cut" / "checkpoint-2"))
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    if mode == "reps":
        torch.testing.assert_close(trainer_resumed.regularizers[0].directions, trainer_full.regularizers[0].directions)
        state = torch.load(tmp_path / "cut" / "checkpoint-2" / "regtune_regularizers.pt", weights_only=True)
        assert state["regularizers"]["lfu"]["directions"].shape == (2, 16)


@pytest.mark.parametrize("mode", ["perturb", "reps"])
def test_messages_dataset_trains_on_assistant_tokens_only(tmp_path, mode):
    model = lora_model()
    trainer = regtune.LfUTrainer(
        model=model,
        args=lfu_config(str(tmp_path), lfu_mode=mode, learning_rate=0.05, assistant_only_loss=True),
        train_dataset=messages_dataset(),
        processing_class=word_tokenizer(),
    )
    batch = _first_batch(trainer)
    # the consistency compares the assistant's tokens only: the labels mask the user turn
    tokens = word_tokenizer().convert_ids_to_tokens(batch["input_ids"][0][response_token_mask(batch["labels"][0])])
    assert "user" not in tokens and len(tokens) > 0
    before = trainable_weights(model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "lfu/consistency" in h]
    assert len(logs) == 3 and all(h["lfu/consistency"] > 0 and torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert (trainable_weights(model) - before).abs().max() > 1e-4


@pytest.mark.parametrize("adapter", ["lora-peft_config", "allora", "full"])
def test_trains_lora_allora_and_full_fine_tuning(tmp_path, adapter):
    kwargs = {}
    if adapter == "lora-peft_config":
        model = tiny_llama()
        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    elif adapter == "allora":
        model = get_peft_model(tiny_llama(), regtune.ALLoRAConfig(r=4, target_modules="all-linear"))
    else:
        model = tiny_llama()
    trainer = regtune.LfUTrainer(
        model=model,
        args=lfu_config(str(tmp_path), learning_rate=0.05, lfu_beta=10.0),
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
        **kwargs,
    )
    before = trainable_weights(trainer.model)
    trainer.train()
    after = trainable_weights(trainer.model)
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-4
    lfu = trainer.regularizers[0]
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in lfu._params) == n_trainable
    if adapter != "full":
        assert n_trainable < sum(p.numel() for p in trainer.model.parameters()) / 2


def test_layer_range_selects_hidden_states(tmp_path):
    trainer = regtune.LfUTrainer(
        model=lora_model(),
        args=lfu_config(str(tmp_path), max_steps=1, lfu_start_layer=1, lfu_end_layer=2),
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
    )
    trainer.train()
    assert trainer.regularizers[0]._layers == range(1, 2)
    bad = regtune.LfUTrainer(
        model=lora_model(),
        args=lfu_config(str(tmp_path), max_steps=1, lfu_end_layer=9),
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
    )
    with pytest.raises(ValueError, match=r"outside the model's 3 hidden states"):
        bad.train()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lfu_mode": "ascent"}, r"`lfu_mode` must be one of \['perturb', 'reps'\], got 'ascent'"),
        ({"lfu_alpha": 0.0}, r"`lfu_alpha` must be a finite number > 0, got 0.0"),
        ({"lfu_alpha": float("inf")}, r"`lfu_alpha` must be a finite number > 0, got inf"),
        ({"lfu_alpha": True}, r"`lfu_alpha` must be a finite number > 0, got True"),
        ({"lfu_beta": -1.0}, r"`lfu_beta` must be a finite number >= 0"),
        ({"lfu_beta": float("nan")}, r"`lfu_beta` must be a finite number >= 0"),
        ({"lfu_start_layer": 1.0}, r"`lfu_start_layer` must be an int >= 0"),
        ({"lfu_reps_lr_weight": "2"}, r"`lfu_reps_lr_weight` must be a finite number > 0"),
        ({"lfu_reps_site": "attn"}, r"`lfu_reps_site` must be one of \['mlp', 'block'\], got 'attn'"),
        (
            {"lfu_reps_pairing": "clean"},
            r"`lfu_reps_pairing` must be one of \['released', 'steered_x'\], got 'clean'",
        ),
        ({"lfu_reps_vector_grad": "sum"}, r"`lfu_reps_vector_grad` must be one of \['last', 'accumulate'\]"),
        ({"lfu_reps_vector_dtype": "bf16"}, r"`lfu_reps_vector_dtype` must be one of \['hidden', 'float32'\]"),
        ({"lfu_share_dropout_masks": "yes"}, r"`lfu_share_dropout_masks` must be True or False"),
        ({"lfu_log_diagnostics": 1}, r"`lfu_log_diagnostics` must be True or False"),
        ({"lfu_second_batch": "other"}, r"`lfu_second_batch` must be one of \['train', 'dataset', 'same'\]"),
        ({"lfu_start_layer": 2, "lfu_end_layer": 1}, r"`lfu_end_layer` must be None .* > `lfu_start_layer`"),
    ],
)
def test_config_errors_name_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        lfu_config(str(tmp_path), **overrides)


def test_dataset_source_needs_a_dataset_and_defaults_follow_the_paper(tmp_path):
    with pytest.raises(ValueError, match="needs `lfu_dataset="):
        regtune.LfUTrainer(
            model=lora_model(),
            args=lfu_config(str(tmp_path), lfu_second_batch="dataset"),
            train_dataset=prompt_completion_dataset(),
            processing_class=word_tokenizer(),
        )
    assert lfu_config(str(tmp_path)).lfu_effective_beta == 5.0
    assert lfu_config(str(tmp_path), lfu_mode="reps").lfu_effective_beta == 0.1
    assert regtune.regularizers.build_regularizer("lfu", mode="reps").beta == 0.1


# ---- DDP ----


def _launch(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["perturb", "reps"])
def test_ddp_two_processes_match_one_process_with_accumulation(tmp_path, mode):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    # 1 process: 2 micro-batches of 2 per step; 2 processes: 1 micro-batch of 2 each. Same batches, same x' draws.
    run(one, mode, per_device_batch=2, accumulation=2)
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lfu_worker.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _launch([*torchrun, worker, two, "--mode", mode, "--per-device-batch", "2", "--accumulation", "1"])
    reports = [json.load(open(os.path.join(two, f"world_size_{rank}.txt"))) for rank in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert {r["wrapped"] for r in reports} == {"DistributedDataParallel"}
    # the diagnostics are averaged over the processes: every process logs the same values
    assert reports[0]["diagnostics"] == reports[1]["diagnostics"]
    assert (
        all("lfu/cons_to_sft" in h for h in reports[0]["diagnostics"])
        and "lfu/ascent_gain" in reports[0]["diagnostics"][0]
    )
    w_one = torch.load(os.path.join(one, "weights.pt"), weights_only=True)
    w_two = torch.load(os.path.join(two, "weights.pt"), weights_only=True)
    assert (w_one - trainable_weights(lora_model())).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(w_two, w_one, rtol=0, atol=1e-5)
    if mode == "reps":
        single = json.load(open(os.path.join(one, "world_size_0.txt")))["directions"]
        torch.testing.assert_close(torch.tensor(reports[0]["directions"]), torch.tensor(reports[1]["directions"]))
        torch.testing.assert_close(torch.tensor(reports[0]["directions"]), torch.tensor(single), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["perturb", "reps"])
def test_gradient_checkpointing_gives_the_same_step(tmp_path, mode):
    """The perturbed (steered) forward is recomputed during its own backward, while the parameters are perturbed."""

    def step(**overrides):
        model = lora_model()
        before = trainable_weights(model)
        trainer = regtune.LfUTrainer(
            model=model,
            args=lfu_config(str(tmp_path), max_steps=1, learning_rate=1.0, lfu_mode=mode, lfu_beta=50.0, **overrides),
            train_dataset=prompt_completion_dataset(),
            processing_class=word_tokenizer(),
        )
        trainer.train()
        checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        assert checkpointing == overrides["activation_checkpointing"]
        return before - trainable_weights(model)

    # (trl's SFTConfig turns checkpointing on by default, non-reentrant)
    plain = step(activation_checkpointing=False)
    checkpointed = step(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="non-reentrant"):
        step(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})


def test_bf16_autocast_trains(tmp_path):
    model = lora_model()
    before = trainable_weights(model)
    trainer = regtune.LfUTrainer(
        model=model,
        args=lfu_config(str(tmp_path), learning_rate=0.05, lfu_beta=10.0, bf16=True),
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
    )
    trainer.train()
    after = trainable_weights(model)
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-4
    assert all(h["lfu/consistency"] > 0 for h in trainer.state.log_history if "lfu/consistency" in h)


# ---- recipes ----


@pytest.mark.slow
def test_recipe_runs_lfu_on_prompt_completion_files(tmp_path, capsys):
    """`trainer: LfUTrainer` in a recipe gets the raw prompt/completion rows (SFTTrainer tokenizes them)."""
    import yaml

    from regtune.cli import main

    tokenizer_dir = tmp_path / "tokenizer"
    word_tokenizer().save_pretrained(tokenizer_dir)
    data = prompt_completion_dataset(n=24)
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    data.select(range(16)).to_json(train)
    data.select(range(16, 24)).to_json(validation)
    llama = {
        "model_type": "llama", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 32, "vocab_size": 64, "max_position_embeddings": 32,
    }  # fmt: skip
    recipe = {
        "name": "lfu-tiny",
        "output_dir": str(tmp_path / "out"),
        "model": {"config": llama, "tokenizer": str(tokenizer_dir), "task": "causal-lm"},
        "data": {"path": "json", "data_files": {"train": str(train), "validation": str(validation)}},
        "adapter": {"type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "trainer": "LfUTrainer",
        "training": {
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "report_to": "none",
            "use_cpu": True,
            "save_strategy": "no",
            "max_length": 16,
            "lfu_mode": "reps",
            "lfu_beta": 1.0,
        },  # fmt: skip
        "runs": [{"name": "lfu"}, {"name": "lfu-perturb", "training": {"lfu_mode": "perturb"}}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    runs = {r["run"]: r for r in json.load(open(tmp_path / "out" / "results.json"))["results"]}
    assert set(runs) == {"lfu", "lfu-perturb"}
    for result in runs.values():
        assert result["task"] == "causal-lm" and math.isfinite(result["metrics"]["validation"]["loss"])
    assert os.path.isfile(tmp_path / "out" / "lfu" / "adapter" / "adapter_config.json")

    recipe["training"]["lfu_mode"] = "ascent"
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["validate", str(path)]) != 0
    assert "lfu_mode" in capsys.readouterr().err


def test_packed_padding_free_batches_train(tmp_path):
    model = lora_model()
    trainer = regtune.LfUTrainer(
        model=model,
        args=lfu_config(str(tmp_path), packing=True, max_length=32, learning_rate=0.01, lfu_mode="perturb"),
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
    )
    batch = _first_batch(trainer)
    assert "position_ids" in batch and "attention_mask" not in batch  # trl's padding-free packed rows
    before = trainable_weights(model)
    trainer.train()
    logs = [h["lfu/consistency"] for h in trainer.state.log_history if "lfu/consistency" in h]
    assert len(logs) == 3 and all(v > 0 for v in logs)
    assert (trainable_weights(model) - before).abs().max() > 1e-5


# ---- settings: every field validated at construction, all bad ones at once ----


def test_config_reports_every_bad_lfu_field_at_once(tmp_path):
    bad = {
        "lfu_mode": "ascent", "lfu_alpha": float("inf"), "lfu_beta": float("nan"), "lfu_start_layer": -1,
        "lfu_end_layer": "2", "lfu_second_batch": 3, "lfu_reps_lr_weight": 0, "lfu_reps_site": "attn",
        "lfu_share_dropout_masks": "yes", "lfu_log_diagnostics": None,
    }  # fmt: skip
    with pytest.raises(ValueError) as error:
        lfu_config(str(tmp_path), **bad)
    message = str(error.value)
    assert all(f"`{name}`" in message for name in bad), message
    # the regularizer validates the same settings, under their own names
    with pytest.raises(ValueError) as error:
        regtune.regularizers.LfURegularizer(alpha=-1.0, reps_site="attn", start_layer=2, end_layer=2, seed="0")
    message = str(error.value)
    assert all(f"`{name}`" in message for name in ("alpha", "reps_site", "end_layer", "seed")), message
    # good values build, and the trainer config hands its settings to the regularizer unchanged
    args = lfu_config(str(tmp_path), lfu_mode="reps", lfu_alpha=1, lfu_reps_site="block")
    assert args.lfu_settings == regtune.regularizers.lfu.LfUSettings(
        mode="reps", alpha=1.0, reps_site="block", log_diagnostics=True
    )
    assert isinstance(args.lfu_settings.alpha, float)
    assert regtune.regularizers.LfURegularizer(settings=args.lfu_settings).reps_site == "block"


def test_config_bf16_default_follows_trl_where_it_can_run_else_fp32(tmp_path, monkeypatch):
    """trl's SFTConfig turns bf16 on, which transformers refuses on a machine without a bf16 accelerator (unless
    `use_cpu=True`); LfUConfig keeps trl's default wherever it runs and trains in fp32 where it would raise."""
    import regtune.trainers.lfu_trainer as lfu_trainer

    monkeypatch.setattr(lfu_trainer, "_bf16_trainable", lambda: False)
    assert regtune.LfUConfig(str(tmp_path)).bf16 is False
    assert regtune.LfUConfig(str(tmp_path), use_cpu=True).bf16 is True  # trl's default on an explicit CPU run
    assert regtune.LfUConfig(str(tmp_path), use_cpu=True, bf16=False).bf16 is False
    # with a bf16 accelerator the unset field is left to trl, which turns it on (here, where the hardware is only
    # pretended, transformers' own check may then refuse it: the resolution is the same either way)
    monkeypatch.setattr(lfu_trainer, "_bf16_trainable", lambda: True)
    try:
        assert regtune.LfUConfig(str(tmp_path)).bf16 is True
    except ValueError as error:
        assert "bf16" in str(error)


@pytest.mark.parametrize("mode", ["perturb", "reps"])
def test_readme_style_config_trains_on_cpu_without_precision_arguments(tmp_path, mode):
    """The documented snippet's config (no bf16 / use_cpu arguments) builds and trains on a CPU-only machine."""
    from transformers.utils import is_torch_bf16_gpu_available

    args = regtune.LfUConfig(
        str(tmp_path), lfu_mode=mode, lfu_alpha=0.1, lfu_beta=5.0, max_steps=1, report_to="none", max_length=16
    )
    assert args.bf16 is is_torch_bf16_gpu_available()
    trainer = regtune.LfUTrainer(
        model=lora_model(), args=args, train_dataset=prompt_completion_dataset(), processing_class=word_tokenizer()
    )
    trainer.train()
    assert trainer.state.global_step == 1


# ---- precision: the undesirable pass runs under the host's autocast ----


def _lfu_logs(tmp_path, model=None, second_dataset=None, **overrides):
    trainer = regtune.LfUTrainer(
        model=model if model is not None else lora_model(),
        args=lfu_config(str(tmp_path), **{"max_steps": 1, **overrides}),
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
        lfu_dataset=second_dataset,
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], trainer


@pytest.mark.parametrize("second_batch", ["train", "dataset", "same"])
@pytest.mark.parametrize("mode", ["perturb", "reps"])
def test_bf16_consistency_vanishes_at_zero_alpha(tmp_path, mode, second_batch):
    """Under bf16 autocast the clean states come from the host's autocast forward; the undesirable pass must run in
    the same precision, or L_cons measures bf16-vs-fp32 rounding instead of the update (it was ~3e-5 at alpha 1e-6).
    RepS with another batch x' runs with the `steered_x` pairing: the released pairing compares x with x', which
    differ whatever alpha is."""
    second = prompt_completion_dataset(n=4, seed=3) if second_batch == "dataset" else None
    pairing = {"lfu_reps_pairing": "steered_x"} if (mode, second_batch) != ("reps", "same") else {}
    logs, _ = _lfu_logs(
        tmp_path,
        second_dataset=second,
        bf16=True,
        lfu_mode=mode,
        lfu_alpha=1e-6,
        lfu_second_batch=second_batch,
        **pairing,
    )
    assert logs[0]["lfu/consistency"] <= 1e-10
    assert logs[0]["lfu/ascent_gain_abs"] == pytest.approx(0.0, abs=1e-4)


def test_bf16_step_at_zero_alpha_equals_the_sft_step(tmp_path):
    """At alpha -> 0 the consistency gradient vanishes, so LfU's step is SFTTrainer's step (bf16, lr 0.5, beta 5)."""
    from trl import SFTTrainer

    def step(trainer_class, **overrides):
        model = lora_model()
        before = trainable_weights(model)
        args = lfu_config(str(tmp_path), max_steps=1, bf16=True, lfu_alpha=1e-6, lfu_beta=5.0, **overrides)
        trainer_class(
            model=model, args=args, train_dataset=prompt_completion_dataset(), processing_class=word_tokenizer()
        ).train()
        return before - trainable_weights(model)

    sft = step(SFTTrainer)
    lfu = step(regtune.LfUTrainer)
    assert sft.abs().max() > 1e-3  # it trained
    torch.testing.assert_close(lfu, sft, rtol=0, atol=1e-6)


# ---- dropout masks: shared by the clean and the undesirable pass (default), or not ----


@pytest.mark.parametrize("mode", ["perturb", "reps"])
def test_shared_dropout_masks_leave_only_the_update_in_the_consistency(tmp_path, mode):
    """With dropout on, L_cons at alpha -> 0 is zero when both passes drop the same units, and dropout noise when
    they draw fresh masks (the option). RepS, whose released pairing compares x with x', runs with x' = x."""
    knobs = {"lfu_mode": mode, "lfu_alpha": 1e-6, **({"lfu_second_batch": "same"} if mode == "reps" else {})}
    shared, _ = _lfu_logs(tmp_path, model=lora_model(dropout=0.3), **knobs)
    fresh, _ = _lfu_logs(tmp_path, model=lora_model(dropout=0.3), lfu_share_dropout_masks=False, **knobs)
    assert shared[0]["lfu/consistency"] <= 1e-10
    assert fresh[0]["lfu/consistency"] > 1e-4


@pytest.mark.parametrize("mode", ["perturb", "reps"])
def test_diagnostics_off_remove_the_metrics_and_change_no_weight(tmp_path, mode):
    """The diagnostics' extra forwards replay the random state: with dropout on, training is bit for bit the same
    with `lfu_log_diagnostics` on or off; off, no `lfu/` metric is logged."""

    def train(log_diagnostics):
        model = lora_model(dropout=0.2)
        logs, _ = _lfu_logs(
            tmp_path, model=model, max_steps=3, lfu_mode=mode, lfu_alpha=0.5, lfu_log_diagnostics=log_diagnostics
        )
        return trainable_weights(model), logs

    on, logs_on = train(True)
    off, logs_off = train(False)
    torch.testing.assert_close(on, off, rtol=0, atol=0)
    assert all("lfu/cons_to_sft" in h for h in logs_on) and "lfu/ascent_gain" in logs_on[0]
    assert not any(key.startswith("lfu/") for h in logs_off for key in h)


# ---- diagnostics ----


def test_diagnostics_match_their_definitions(tmp_path):
    """`cons_to_sft` = beta * L_cons / L_sft of the logged step; `ascent_gain` = the relative raise of the x' loss by
    the ascent step, against a hand computation (perturb mode, x' = x, first step)."""
    alpha, beta = 0.5, 50.0
    logs, trainer = _lfu_logs(
        tmp_path, lfu_alpha=alpha, lfu_beta=beta, lfu_second_batch="same", max_steps=1, logging_steps=1
    )
    term = beta * logs[0]["lfu/consistency"]  # the logged loss is L_sft + beta * L_cons
    assert term > 0.1 * logs[0]["loss"]
    assert logs[0]["lfu/cons_to_sft"] == pytest.approx(term / (logs[0]["loss"] - term), rel=1e-4)
    batch = _first_batch(trainer)
    model = lora_model()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total, count = _token_loss_sum(model, batch)
    grads = torch.autograd.grad(total / count, list(named.values()))
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        shifted = {n: p + alpha * g / norm for (n, p), g in zip(named.items(), grads)}
        raised, _ = _token_loss_sum(model, batch, shifted)
        clean = total / count
    expected = ((raised / count - clean) / clean).item()
    assert expected > 1e-3  # the ascent step raises the loss
    assert logs[0]["lfu/ascent_gain"] == pytest.approx(expected, rel=1e-3)
    assert logs[0]["lfu/ascent_gain_abs"] == pytest.approx(expected * clean.item(), rel=1e-3)


@pytest.mark.parametrize(("mode", "second_batch"), [("perturb", "train"), ("perturb", "same"), ("reps", "same")])
def test_ascent_gain_measurements_stay_within_two_percent_of_the_training_passes(mode, second_batch):
    """Over any run, the extra forwards of the ascent-gain diagnostic cost <= 1.5% of the training passes (in
    forward-equivalents, a backward = 2 forwards) plus one measurement, so under 2% for runs of more than ~70
    micro-batches, even when every step is logged."""
    from types import SimpleNamespace

    from regtune.regularizers.lfu import _STEP_COST, DIAGNOSTICS_BUDGET

    lfu = regtune.regularizers.LfURegularizer(mode=mode, second_batch=second_batch)
    lfu._reset_gain_budget()  # as `setup` does
    args = SimpleNamespace(logging_strategy="steps", logging_steps=1, logging_first_step=False)
    trainer = SimpleNamespace(args=args, state=SimpleNamespace(global_step=0, logging_steps=1))
    trainer.accelerator = SimpleNamespace(sync_gradients=True)
    cost = 2.0 if (mode, second_batch) == ("perturb", "same") else 1.0
    measured = []
    for step in range(1000):
        trainer.state.global_step = step
        measured.append(lfu._measure_gain_now(trainer))
    passes = 1000 * _STEP_COST[(mode, second_batch == "same")]
    assert measured[0] and sum(measured) > 5
    assert DIAGNOSTICS_BUDGET <= 0.015 and sum(measured) * cost <= DIAGNOSTICS_BUDGET * passes + cost
    # not logged: never measured
    lfu._gain_budget = 100.0
    trainer.state.global_step, args.logging_steps, trainer.state.logging_steps = 3, 10, 10
    assert not lfu._measure_gain_now(trainer)
    lfu.log_diagnostics = False
    trainer.state.global_step = 9
    assert not lfu._measure_gain_now(trainer)


# ---- RepS steering site, against the released code's construction ----


class _ReleasedREPLayer(torch.nn.Module):
    """The released code's steering layer (yunpal/LfU `REPLayer`), written out independently of regtune."""

    def __init__(self, direction, lam):
        super().__init__()
        self.direction, self.lam = direction, lam

    def forward(self, x):
        norm = torch.norm(x, dim=-1, keepdim=True)
        direction = torch.nn.functional.normalize(self.direction, dim=-1).expand(x.size(0), x.size(1), -1)
        x = torch.nn.functional.normalize(x.float(), dim=-1) + self.lam * direction
        return torch.nn.functional.normalize(x, dim=-1) * norm


class _released_steering:
    """Steer a tiny Llama as the released code does (`layer.mlp = nn.Sequential(original_mlp, repe)`) for
    `site="mlp"`, or by wrapping each decoder layer's `forward` for `site="block"`; undone on exit."""

    def __init__(self, model, directions, alpha, site):
        self.layers = model.get_base_model().model.layers
        self.directions, self.alpha, self.site = directions, alpha, site

    def __enter__(self):
        for layer, direction in zip(self.layers, self.directions):
            steer = _ReleasedREPLayer(direction, self.alpha)
            if self.site == "mlp":
                layer.mlp = torch.nn.Sequential(layer.mlp, steer)
            else:

                def forward(*args, _forward=layer.forward, _steer=steer, **kwargs):
                    out = _forward(*args, **kwargs)
                    return _steer(out) if isinstance(out, torch.Tensor) else (_steer(out[0]), *out[1:])

                layer.forward = forward

    def __exit__(self, *exc):
        for layer in self.layers:
            if self.site == "mlp":
                layer.mlp = layer.mlp[0]
            else:
                del layer.forward


@pytest.mark.parametrize("site", ["mlp", "block"])
def test_reps_step_matches_the_released_steering_construction(tmp_path, site):
    """One RepS step (x' = x) against a reference built like the released code: the parameter step is
    grad(L_sft + beta * L_cons(steered, clean)), the vectors take Adam's first step up the steered loss, and the
    logged ascent gain is the relative raise of the loss by the steering."""
    alpha, beta, lr, weight = 0.5, 1e3, 1e-2, 50.0
    model = lora_model()
    trainer = regtune.LfUTrainer(
        model=model,
        args=lfu_config(
            str(tmp_path),
            max_steps=1,
            learning_rate=lr,
            lfu_mode="reps",
            lfu_alpha=alpha,
            lfu_beta=beta,
            lfu_second_batch="same",
            lfu_reps_lr_weight=weight,
            lfu_reps_site=site,
            lfu_reps_pairing="steered_x",
        ),  # fmt: skip
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
    )
    batch = _first_batch(trainer)
    reference = lora_model()
    named = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    directions = torch.randn(2, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    total, count = _token_loss_sum(reference, batch)
    clean = [h.detach() for h in _hidden(reference, batch)]
    with _released_steering(reference, directions, alpha, site):
        steered = _hidden(reference, batch)
        steered_sum, _ = _token_loss_sum(reference, batch)
    mask = (batch["labels"] != -100).unsqueeze(-1).float()
    cons = sum(((s - c) ** 2 * mask).sum() / (mask.sum() * s.shape[-1]) for s, c in zip(steered, clean)) / len(clean)
    expected = torch.autograd.grad(total / count + beta * cons, list(named.values()), retain_graph=True)
    plain_step = torch.cat(
        [g.flatten() for g in torch.autograd.grad(total / count, list(named.values()), retain_graph=True)]
    )
    (up,) = torch.autograd.grad(steered_sum / count, [directions])
    expected_directions = directions.detach() + lr * weight * up / (up.abs() + 1e-8)  # Adam's first step, ascending
    gain = ((steered_sum - total) / total).item()

    before = trainable_weights(model)
    trainer.train()
    step = (before - trainable_weights(model)) / lr
    expected = torch.cat([g.flatten() for g in expected])
    assert (expected - plain_step).abs().max() > 1e-2 * expected.abs().max()  # the consistency term matters
    torch.testing.assert_close(step, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())
    lfu = trainer.regularizers[0]
    torch.testing.assert_close(lfu.directions.detach(), expected_directions, rtol=0, atol=1e-4)
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["lfu/ascent_gain"] == pytest.approx(gain, rel=1e-3, abs=1e-7)
    assert log["lfu/consistency"] == pytest.approx(cons.item(), rel=1e-4)


def test_reps_sites_steer_different_tensors():
    """`mlp` steers the MLP's output before the residual add; `block` the block's output: different states, and both
    as the released-style reference computes them (here on a plain forward, without training)."""
    model = lora_model()
    x = torch.randint(5, 60, (2, 7))
    backbone, blocks = find_decoder_blocks(model)
    directions = torch.randn(len(blocks), 16)
    got = {}
    for site in ("mlp", "block"):
        with torch.no_grad(), block_hooks(backbone, blocks, range(0, 3), directions, 0.5, site=site) as states:
            model(input_ids=x)
        got[site] = list(states)
        with torch.no_grad(), _released_steering(model, directions, 0.5, site):
            want = model(input_ids=x, output_hidden_states=True).hidden_states
        for g, w in zip(got[site], want):
            torch.testing.assert_close(g, w)
    assert (got["mlp"][1] - got["block"][1]).abs().max() > 1e-3


def test_find_mlp_follows_the_released_keywords_and_refuses_blocks_without_one():
    from regtune.regularizers.lfu import find_mlp

    class Block(torch.nn.Module):
        def __init__(self, **children):
            super().__init__()
            for name, child in children.items():
                self.add_module(name, child)

    ffn = torch.nn.Linear(2, 2)
    assert find_mlp(Block(attention=torch.nn.Linear(2, 2), ffn_norm=torch.nn.LayerNorm(2), ffn=ffn)) is ffn
    _, blocks = find_decoder_blocks(tiny_llama())
    assert find_mlp(blocks[0]) is blocks[0].mlp
    with pytest.raises(ValueError, match=r"reps_site='block'"):
        find_mlp(Block(attention=torch.nn.Linear(2, 2), experts=torch.nn.Linear(2, 2)))


def test_regularizer_knobs_are_the_settings_fields_and_unknown_ones_are_named():
    lfu = regtune.regularizers.LfURegularizer(mode="reps", alpha=0.2, beta=None)
    assert lfu.settings == LfUSettings(mode="reps", alpha=0.2)
    with pytest.raises(ValueError, match=r"unknown LfU setting `alpah`.*alpha") as e:
        regtune.regularizers.LfURegularizer(alpah=0.1, mode="nope")
    assert "mode" in str(e.value)  # every bad field at once


# ---- the released code's RepS choices (issue 23): pairing, the vectors' gradient and dtype, the prompt mask ----


def _released_target(steered, batch_size, seq_len):
    """yunpal/LfU `compute_mse_consistency_loss_perturb_detach`, written out: x' states of another length are replaced
    by their last position, broadcast over x's positions; the same length pairs position by position."""
    out = []
    for p in steered:
        if p.shape[1] == 1 or p.shape[1] != seq_len:
            p = p[:, -1:, :].expand(batch_size, seq_len, p.shape[-1])
        out.append(p.detach())
    return out


@pytest.mark.parametrize("second_batch", ["dataset", "same"])
def test_reps_released_pairing_matches_reference(tmp_path, second_batch):
    """The default RepS step pairs as the released trainer: the clean states of x keep their gradient and are pulled
    towards the detached steered states of x' (the last position of x' broadcast when the lengths differ, here with
    a one-row `lfu_dataset`; position by position with x' = x). Parameter step, vectors and logged consistency
    against a reference built with the released steering layer and `output_hidden_states`."""
    alpha, beta, lr, weight = 0.5, 1e3, 1e-2, 50.0
    model = lora_model()
    second = prompt_completion_dataset(n=1, seed=7)
    trainer = regtune.LfUTrainer(
        model=model,
        args=lfu_config(
            str(tmp_path),
            max_steps=1,
            learning_rate=lr,
            lfu_mode="reps",
            lfu_alpha=alpha,
            lfu_beta=beta,
            lfu_second_batch=second_batch,
            lfu_reps_lr_weight=weight,
        ),  # fmt: skip
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
        lfu_dataset=second if second_batch == "dataset" else None,
    )
    batch = _first_batch(trainer)
    if second_batch == "same":
        x2 = batch
    else:
        x2 = trainer.data_collator(
            [trainer.regularizers[0].second_dataset[0]] * trainer.args.per_device_train_batch_size
        )
        assert x2["input_ids"].shape[1] != batch["input_ids"].shape[1]  # the broadcast branch is exercised
    reference = lora_model()
    named = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    directions = torch.randn(2, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    total, count = _token_loss_sum(reference, batch)
    clean = _hidden(reference, batch)  # with gradient
    with _released_steering(reference, directions, alpha, "mlp"):
        steered = _hidden(reference, x2)
        steered_sum, steered_count = _token_loss_sum(reference, x2)
    target = _released_target(steered, *batch["input_ids"].shape)
    mask = (batch["labels"] != -100).unsqueeze(-1).float()
    cons = sum(((c - t) ** 2 * mask).sum() / (mask.sum() * c.shape[-1]) for c, t in zip(clean, target)) / len(clean)
    expected = torch.autograd.grad(total / count + beta * cons, list(named.values()), retain_graph=True)
    expected = torch.cat([g.flatten() for g in expected])
    # the other pairing (steered x with gradient against clean x) would give another step
    with _released_steering(reference, directions.detach(), alpha, "mlp"):
        steered_x = _hidden(reference, batch)
    other = sum(
        ((s - c.detach()) ** 2 * mask).sum() / (mask.sum() * s.shape[-1]) for s, c in zip(steered_x, clean)
    ) / len(clean)
    other = torch.cat([g.flatten() for g in torch.autograd.grad(total / count + beta * other, list(named.values()))])
    (up,) = torch.autograd.grad(steered_sum / steered_count, [directions])
    expected_directions = directions.detach() + lr * weight * up / (up.abs() + 1e-8)  # Adam's first step, ascending

    before = trainable_weights(model)
    trainer.train()
    step = (before - trainable_weights(model)) / lr
    assert (expected - other).abs().max() > 1e-2 * expected.abs().max()  # the pairings differ here
    torch.testing.assert_close(step, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())
    lfu = trainer.regularizers[0]
    torch.testing.assert_close(lfu.directions.detach(), expected_directions, rtol=0, atol=1e-4)
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["lfu/consistency"] == pytest.approx(cons.item(), rel=1e-4)


def test_released_reps_target_broadcasts_the_last_position_of_another_length():
    from regtune.functional.lfu import released_reps_target

    steered = torch.randn(4, 5, 3)
    same = released_reps_target(steered, 3, 5)  # same length: position by position, first rows
    torch.testing.assert_close(same, steered[:3])
    other = released_reps_target(steered, 2, 7)
    for t in range(7):
        torch.testing.assert_close(other[:, t], steered[:2, 4])
    with pytest.raises(ValueError, match="fewer than the training batch"):
        released_reps_target(steered, 5, 5)


@pytest.mark.parametrize("rule", [None, "accumulate"])
def test_reps_vector_gradient_is_the_last_micro_batch_by_default(tmp_path, rule):
    """With gradient accumulation, the released code sets the vectors' `.grad` per micro-batch, so Adam's step
    follows the last micro-batch only (the default); `lfu_reps_vector_grad="accumulate"` steps on their mean. Against
    Adam's first step (lr * g / (|g| + eps)) on the gradient of the steered loss, computed by hand per micro-batch."""
    alpha, lr, weight = 0.5, 1e-2, 10.0
    model = lora_model()
    knobs = {} if rule is None else {"lfu_reps_vector_grad": rule}
    trainer = regtune.LfUTrainer(
        model=model,
        args=lfu_config(
            str(tmp_path),
            max_steps=1,
            learning_rate=lr,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            lfu_mode="reps",
            lfu_alpha=alpha,
            lfu_second_batch="same",
            lfu_reps_lr_weight=weight,
            **knobs,
        ),  # fmt: skip
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
    )
    loader = iter(trainer.get_train_dataloader())
    micro = [next(loader), next(loader)]
    reference = lora_model()
    directions = torch.randn(2, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    ups = []
    for batch in micro:
        with _released_steering(reference, directions, alpha, "mlp"):
            total, count = _token_loss_sum(reference, batch)
        ups.append(torch.autograd.grad(total / count, [directions])[0])
    assert (ups[0] - ups[1]).abs().max() > 1e-3
    up = ups[-1] if rule is None else ups[0] + ups[1]
    expected = directions.detach() + lr * weight * up / (up.abs() + 1e-8)
    trainer.train()
    torch.testing.assert_close(trainer.regularizers[0].directions.detach(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_reps_vectors_take_the_hidden_states_dtype_by_default(tmp_path, dtype):
    """The released code makes the vectors with `torch.randn_like(hidden_state)`: bf16 for a model loaded in bf16,
    where Adam's first step (about lr = 1e-4 per element) is below half the rounding step of every element with
    |d| > 2^-6 and leaves it unchanged. `lfu_reps_vector_dtype="float32"` keeps float32 vectors, and every element
    moves. The expected change per element is computed from bf16's spacing, independently of the optimizer."""
    base = tiny_llama().to(torch.bfloat16)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    knobs = {} if dtype is None else {"lfu_reps_vector_dtype": dtype}
    trainer = regtune.LfUTrainer(
        model=model,
        args=lfu_config(
            str(tmp_path), max_steps=1, learning_rate=1e-4, lfu_mode="reps", lfu_second_batch="same", **knobs
        ),
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
    )
    trainer.train()
    after = trainer.regularizers[0].directions.detach()
    init = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    if dtype is None:
        assert after.dtype == torch.bfloat16
        start = init.to(torch.bfloat16)
        ulp = torch.pow(2.0, torch.floor(torch.log2(start.float().abs())) - 7)
        movable = 1e-4 >= ulp / 2  # a step of ~1e-4 changes a bf16 number only where its spacing is small enough
        changed = after != start
        assert movable.float().mean() < 0.2
        assert not (changed & ~movable).any()  # nothing moved that bf16 could not move
    else:
        assert after.dtype == torch.float32
        assert ((after - init).abs() > 0.5e-4).all()


def test_conversational_data_with_prompt_tokens_in_the_mask_warns(tmp_path, caplog):
    """A `messages` data set without `assistant_only_loss` puts the user turn into the labels, hence into the
    consistency mask: LfUTrainer warns, and the batch shows that the warning is true. With `assistant_only_loss=True`,
    or prompt/completion rows (completion-only loss), there is no warning."""

    def build(data, **overrides):
        caplog.clear()
        with caplog.at_level("WARNING", logger="regtune.trainers.lfu_trainer"):
            trainer = regtune.LfUTrainer(
                model=lora_model(),
                args=lfu_config(str(tmp_path), **overrides),
                train_dataset=data,
                processing_class=word_tokenizer(),
            )
        warned = [r for r in caplog.records if "consistency mask" in r.getMessage()]
        return trainer, warned

    trainer, warned = build(messages_dataset(), assistant_only_loss=False)
    assert len(warned) == 1 and "assistant_only_loss=True" in warned[0].getMessage()
    batch = _first_batch(trainer)
    tokens = word_tokenizer().convert_ids_to_tokens(batch["input_ids"][0][response_token_mask(batch["labels"][0])])
    assert "user" in tokens  # the prompt is in the mask indeed
    _, warned = build(messages_dataset(), assistant_only_loss=True)
    assert not warned
    _, warned = build(prompt_completion_dataset())
    assert not warned


def test_lfu_recipe_masks_the_prompt_of_its_conversational_data():
    """recipes/lfu_sft.yaml trains on conversational rows: its consistency mask must hold the assistant's tokens only
    (as the released code's labels), i.e. `assistant_only_loss: true`, with a chat template trl can mark."""
    import yaml
    from trl.chat_template_utils import has_generation_markers, qwen2_5_training_chat_template

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "recipes", "lfu_sft.yaml")) as f:
        recipe = yaml.safe_load(f)
    assert recipe["training"].get("assistant_only_loss") is True
    assert recipe["model"]["name_or_path"].startswith("Qwen/Qwen2.5-")  # trl swaps in its marked Qwen2.5 template
    assert has_generation_markers(qwen2_5_training_chat_template)
