"""FSDP2 (torch's `fully_shard`) in 2 CPU processes (torchrun, gloo): regtune's sharded steps equal the 1-process ones.

One torchrun launch runs every case of tests/fsdp2_worker.py (the imports dominate its cost); the tests below read
its files. Accelerate does not enable FSDP on CPU, so the worker shards the models itself and drives `RegTrainer`
the way the Trainer's loop does under Accelerate's FSDP2 plugin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp2_worker.py")
# saved result -> the worker case that writes it
STEP_CASES = {
    "glad_full": "glad",
    "glad_lora": "glad",
    "allora": "allora",
    "allora_update": "allora",
    "mask_tuning": "mask_tuning",
    "gardo_reference": "gardo_reference",
}


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        WORKER,
        str(out),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    reports = []
    for rank in (0, 1):
        with open(out / f"report_{rank}.json") as f:
            reports.append(json.load(f))
    return out, reports


def _no_error(reports, case: str) -> None:
    for report in reports:
        assert case not in report["errors"], report["errors"][case]


@pytest.mark.slow
def test_two_processes_in_one_group(fsdp2_run):
    _, reports = fsdp2_run
    assert [r["world_size"] for r in reports] == [2, 2]


@pytest.mark.slow
@pytest.mark.parametrize("case", STEP_CASES)
def test_sharded_step_equals_one_process_step(fsdp2_run, case):
    out, reports = fsdp2_run
    _no_error(reports, STEP_CASES[case])
    result = torch.load(out / f"{case}.pt", weights_only=True)
    # the trainable parameters were sharded DTensors, and the runs trained
    assert result["param_types"] == ["DTensor"] and result["trainable_dtensors"]
    assert (result["reference"] - result["initial"]).abs().max() > 1e-4
    # each process saw half of every micro-batch, yet the gathered weights are the 1-process run's
    torch.testing.assert_close(result["sharded"], result["reference"], rtol=0, atol=2e-6)
    if case == "gardo_reference":  # the reference adapter was refreshed from the sharded policy
        assert result["ref_moved"] > 1e-3
        # resuming a GARDO checkpoint (full tensors) onto sharded parameters is refused, naming the reason
        assert "FSDP2-sharded parameters" in result["resume_refused"]


@pytest.mark.slow
def test_ascent_norm_is_global_and_restore_is_exact(fsdp2_run):
    _, reports = fsdp2_run
    _no_error(reports, "glad_norm")
    for figures in (r["glad_norm"] for r in reports):
        # torch's DTensor reduction: the norm of the sharded gradients is a DTensor whose value is the full model's
        assert figures["is_dtensor_sharded"] and not figures["is_dtensor_reference"]
        assert figures["sharded"] == pytest.approx(figures["reference"], rel=1e-6)
        assert figures["local_shard_norm"] < 0.99 * figures["reference"]  # a shard alone would give less
        assert figures["perturbed_moved"] > 1e-3
        assert figures["restored_exactly"]


@pytest.mark.slow
def test_lfu_refuses_fsdp2_naming_the_reason(fsdp2_run):
    _, reports = fsdp2_run
    _no_error(reports, "lfu_refusal")
    for report in reports:
        for mode in ("perturb", "reps"):
            message = report[f"lfu_{mode}_refusal"]
            assert message is not None and "FSDP2" in message and "torch.autograd.grad" in message


@pytest.mark.slow
def test_multi_sample_dropout_and_schedule_survive_sharding(fsdp2_run):
    _, reports = fsdp2_run
    _no_error(reports, "dropout_hooks")
    for figures in (r["dropout_hooks"] for r in reports):
        assert figures["finite"]
        assert figures["msd"] != figures["plain"]  # the head's dropout samples changed the loss


@pytest.mark.slow
def test_mask_scores_shard_like_weights_and_publishing_gathers_them(fsdp2_run):
    _, reports = fsdp2_run
    _no_error(reports, "mask_publish")
    for figures in (r["mask_publish"] for r in reports):
        assert figures["layers"] == 6 and figures["scores_shard_like_weights"]
        assert figures["direct_save"] == "ok"
    # the gathered state dict and a direct save_pretrained of the sharded model publish the unsharded model's bytes
    figures = reports[0]["mask_publish"]
    assert figures["packed"] and figures["published_sharded_equal"] and figures["published_direct_equal"]


@pytest.mark.slow
def test_sharded_checkpoint_resumes_exactly(fsdp2_run):
    out, reports = fsdp2_run
    _no_error(reports, "resume")
    # one regularizer-state file per process (each process's NoisyPenalty has its own generator)
    assert [r["resume_files"] for r in reports] == [["regtune_regularizers_0.pt", "regtune_regularizers_1.pt"]] * 2
    result = torch.load(out / "resume.pt", weights_only=True)
    torch.testing.assert_close(result["resumed"], result["straight"], rtol=0, atol=0)


# ---- DeepSpeed: what cannot run refuses before training (DeepSpeed itself is not installed in CI) ----


def _stub_trainer(stage, regularizers, model=None):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    kind = DistributedType.DEEPSPEED if stage is not None else DistributedType.MULTI_GPU
    plugin = SimpleNamespace(zero_stage=stage)
    accelerator = SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))
    return SimpleNamespace(accelerator=accelerator, regularizers=regularizers, model=model)


def test_deepspeed_refusals_name_every_problem():
    from peft import get_peft_model
    from tiny_models import tiny_llama

    import regtune
    from regtune._sharding import check_distributed_support
    from regtune.regularizers import GLADRegularizer, GradientDropout, MaskScorePenalty

    # ZeRO-2: GLAD rewrites .grad between two backward passes; the score penalty is fine
    with pytest.raises(ValueError, match=r"ZeRO-2") as error:
        check_distributed_support(_stub_trainer(2, [GLADRegularizer(), MaskScorePenalty()]))
    assert "GLADRegularizer" in str(error.value) and "MaskScorePenalty" not in str(error.value)
    # ZeRO-3: every problem at once, the adapter's too
    allora = get_peft_model(tiny_llama(), regtune.ALLoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"ZeRO-3") as error:
        check_distributed_support(_stub_trainer(3, [GradientDropout(), MaskScorePenalty()], allora))
    for name in ("GradientDropout", "MaskScorePenalty", "coefficient_on='gradient'", "docs/distributed.md"):
        assert name in str(error.value)
    # ALLoRA's update-side optimizer: refused at every stage; its gradient mode runs under ZeRO-2
    update = get_peft_model(
        tiny_llama(), regtune.ALLoRAConfig(r=2, target_modules=["q_proj"], coefficient_on="update")
    )
    with pytest.raises(ValueError, match=r"coefficient_on='update'"):
        check_distributed_support(_stub_trainer(2, [], update))
    check_distributed_support(_stub_trainer(2, [], allora))


def test_deepspeed_runs_loss_terms_and_dropout_hooks():
    from regtune._sharding import check_distributed_support
    from regtune.regularizers import DropoutSchedule, MaskScorePenalty, MultiSampleDropout

    regs = [MultiSampleDropout(num_samples=2, p=0.1), DropoutSchedule(p=0.1)]
    for stage in (None, 0, 1, 2, 3):
        check_distributed_support(_stub_trainer(stage, regs))  # nothing to refuse
    check_distributed_support(_stub_trainer(2, [MaskScorePenalty()]))


def test_trainer_refuses_before_training_under_deepspeed(tmp_path, monkeypatch):
    from distributed_worker import causal_dataset, tiny_llama, training_args

    import regtune._sharding as sharding
    from regtune.regularizers import GLADRegularizer
    from regtune.trainers import RegTrainer

    monkeypatch.setattr(sharding, "deepspeed_zero_stage", lambda trainer: 2)
    trainer = RegTrainer(
        model=tiny_llama(),
        args=training_args(str(tmp_path), max_steps=1),
        train_dataset=causal_dataset(n=4),
        regularizers=[GLADRegularizer()],
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO-2: GLADRegularizer"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # refused before any step
