"""Worker of tests/test_fsdp2.py: regtune's trainer step and regularizers on FSDP2-sharded models, on CPU.

Run it as `torchrun --standalone --nproc_per_node 2 tests/fsdp2_worker.py OUT`. Accelerate does not enable FSDP on
CPU, so the worker shards the models itself with torch's FSDP2 (`torch.distributed.fsdp.fully_shard`, one group per
decoder block plus the root, gloo) and drives a real [`RegTrainer`] step by step the way the Trainer's loop does
under Accelerate's FSDP2 plugin: every micro-batch but the last of an optimizer step runs under
`set_requires_gradient_sync(False)` (Accelerate's `no_sync` for FSDP2), then the optimizer (SGD) steps on the sharded
parameters.

Every case also trains the same model unsharded on the whole global batch in this process (the 1-process reference:
it needs no communication, both processes compute it identically). Rank 0 writes `OUT/<case>.pt` with the sharded
run's gathered weights (`sharded`), the reference's (`reference`), the initial ones (`initial`) and case-specific
figures; every rank writes `OUT/report_<rank>.json` (world size, the types of the sharded parameters, refusals).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from distributed_worker import NoisyPenalty, training_args  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import regtune  # noqa: E402
from regtune.diffusion.functional import copy_adapter_weights  # noqa: E402
from regtune.diffusion.trainer import REF_ADAPTER, refuse_sharded_resume  # noqa: E402
from regtune.functional.glad import glad_combine_  # noqa: E402
from regtune.functional.sam import global_grad_norm, sam_perturbation  # noqa: E402
from regtune.regularizers import (  # noqa: E402
    DropoutSchedule,
    GLADRegularizer,
    LfURegularizer,
    MultiSampleDropout,
)
from regtune.regularizers.lfu import find_decoder_blocks  # noqa: E402
from regtune.regularizers.mask_tuning import GradientDropout, MaskScorePenalty  # noqa: E402
from regtune.trainers import RegTrainer  # noqa: E402
from regtune.tuners.allora import attach_allora_update  # noqa: E402


VOCAB = 64
SEQ = 8
MICRO = 2  # samples per process and micro-batch; the reference's micro-batch holds WORLD x MICRO


# ---- models, data, sharding ----


def llama() -> torch.nn.Module:
    return tiny_llama(vocab_size=VOCAB, max_position_embeddings=32).train()


def lora_llama() -> torch.nn.Module:
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(llama(), config)


def allora_llama() -> torch.nn.Module:
    return get_peft_model(llama(), regtune.ALLoRAConfig(r=4, eta=2.0, target_modules="all-linear"))


def allora_update_llama() -> torch.nn.Module:
    config = regtune.ALLoRAConfig(r=4, eta=2.0, target_modules="all-linear", coefficient_on="update")
    return get_peft_model(llama(), config)


def mask_llama() -> torch.nn.Module:
    config = regtune.MaskTuningConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)
    return get_peft_model(llama(), config)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 as Accelerate applies it with its transformer auto-wrap policy: each decoder block, then the root."""
    _, blocks = find_decoder_blocks(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def global_batches(steps: int, accumulation: int, world: int, seed: int = 0) -> list[list[dict]]:
    """`steps` optimizer steps of `accumulation` micro-batches of `world * MICRO` causal-LM sequences each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        micro = []
        for _ in range(accumulation):
            ids = torch.randint(3, VOCAB, (world * MICRO, SEQ), generator=g)
            micro.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        out.append(micro)
    return out


def local(batch: dict, rank: int) -> dict:
    return {k: v[rank * MICRO : (rank + 1) * MICRO] for k, v in batch.items()}


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, gathered to its full value (a collective on sharded models: all ranks call it)."""
    out = {}
    for name, p in model.named_parameters():
        value = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
        out[name] = value.clone()
    return out


def flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.float().flatten() for w in weights.values()])


# ---- the trainer harness ----


@contextlib.contextmanager
def fsdp2_no_sync(model):
    """Accelerate's `no_sync` under FSDP2 (`Accelerator.no_sync` when `is_fsdp2`)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def make_trainer(model, out: str, regularizers: list, accumulation: int, sharded: bool) -> RegTrainer:
    args = training_args(
        out, per_device_train_batch_size=MICRO, gradient_accumulation_steps=accumulation, max_grad_norm=0.0
    )
    trainer = RegTrainer(model=model, args=args, regularizers=regularizers)
    if sharded:
        trainer.accelerator.no_sync = fsdp2_no_sync  # what Accelerate does for FSDP2 (it is MULTI_CPU here)
    trainer.model_wrapped = model
    trainer.current_gradient_accumulation_steps = accumulation  # set by the Trainer's loop
    trainer._regtune_setup()
    return trainer


def train_steps(trainer, model, optimizer, batches, rank: int | None, sharded: bool) -> list[float]:
    """The Trainer's inner loop: micro-batches (no_sync but the last), then one optimizer step."""
    losses = []
    for step_batches in batches:
        total = 0.0
        for index, batch in enumerate(step_batches):
            last = index == len(step_batches) - 1
            trainer.accelerator.gradient_state._set_sync_gradients(last)
            inputs = local(batch, rank) if rank is not None else batch
            context = trainer.accelerator.no_sync(model) if (sharded and not last) else contextlib.nullcontext()
            with context:
                total += float(trainer.training_step(model, inputs))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.state.global_step += 1
        losses.append(total)
    trainer.accelerator.gradient_state._set_sync_gradients(True)
    return losses


def run_pair(out, case, build, regularizers, steps=2, accumulation=2, lr=0.1, make_optimizer=None):
    """Train `build()` sharded (this rank's part of each batch) and unsharded (the whole batch); return both."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = global_batches(steps, accumulation, world)
    results = {}
    for sharded in (True, False):
        model = build()
        if sharded:
            model = shard(model)
        initial = full_weights(model)
        trainer = make_trainer(model, os.path.join(out, case), regularizers(), accumulation, sharded)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        if make_optimizer is not None:
            optimizer = make_optimizer(optimizer, model)
        losses = train_steps(trainer, model, optimizer, batches, rank if sharded else None, sharded)
        results["sharded" if sharded else "reference"] = full_weights(model)
        results["initial"] = initial
        results[f"losses_{'sharded' if sharded else 'reference'}"] = losses
        if sharded:
            results["param_types"] = sorted({type(p).__name__ for p in model.parameters()})
            results["trainable_dtensors"] = all(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)
            try:
                refuse_sharded_resume(model, "checkpoint.pt")
                results["resume_refused"] = ""
            except NotImplementedError as err:
                results["resume_refused"] = str(err)
    return results


def save(out: str, case: str, results: dict) -> None:
    if dist.get_rank() == 0:
        payload = {}
        for key, value in results.items():
            payload[key] = (
                flat(value) if isinstance(value, dict) and key in ("sharded", "reference", "initial") else value
            )
        torch.save(payload, os.path.join(out, f"{case}.pt"))


# ---- the cases ----


def case_glad(out: str, report: dict) -> None:
    """GLAD (full fine-tuning and LoRA): the sharded step equals the unsharded one; its norm is a DTensor's."""
    for name, build in (("glad_full", llama), ("glad_lora", lora_llama)):
        results = run_pair(out, name, build, lambda: [GLADRegularizer(glad_rho=0.5, glad_lambda=0.5)])
        save(out, name, results)


def case_glad_norm(out: str, report: dict) -> None:
    """The global gradient norm GLAD's ascent step divides by, on sharded gradients: a DTensor, equal to the full."""
    rank, world = dist.get_rank(), dist.get_world_size()
    (batch,) = global_batches(1, 1, world, seed=5)[0]
    figures = {}
    for sharded in (True, False):
        model = llama()
        if sharded:
            model = shard(model)
        loss = model(**(local(batch, rank) if sharded else batch)).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = global_grad_norm(grads)
        figures[f"is_dtensor_{'sharded' if sharded else 'reference'}"] = isinstance(norm, DTensor)
        full = norm.full_tensor() if isinstance(norm, DTensor) else norm
        figures["sharded" if sharded else "reference"] = float(full)
        if sharded:
            local_only = torch.linalg.vector_norm(torch.stack([g.to_local().float().norm() for g in grads]))
            figures["local_shard_norm"] = float(local_only)
            # perturb the sharded parameters by GLAD's ascent step, then restore them: bit for bit
            params = [p for p in model.parameters() if p.grad is not None]
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_add_(params, sam_perturbation(grads, 0.5))
            figures["perturbed_moved"] = max(float((p - q).abs().max().full_tensor()) for p, q in zip(params, saved))
            glad_combine_(params, saved, [], torch.ones(()), 0.5)  # the shipped restore: an exact copy
            exact = all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(params, saved))
            flags = torch.tensor([int(exact)])
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            figures["restored_exactly"] = bool(flags.item())
    report["glad_norm"] = figures


def case_dropout_hooks(out: str, report: dict) -> None:
    """Multi-sample dropout and the dropout schedule act on a sharded model (their hooks survive fully_shard)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = global_batches(1, 1, world, seed=7)
    losses = {}
    for name, regs in (("plain", []), ("msd", [MultiSampleDropout(num_samples=4, p=0.3), DropoutSchedule(p=0.1)])):
        torch.manual_seed(0)
        model = shard(llama())
        trainer = make_trainer(model, os.path.join(out, "dropout"), regs, 1, True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[name] = train_steps(trainer, model, optimizer, batches, rank, True)[0]
    report["dropout_hooks"] = {**losses, "finite": all(math.isfinite(v) for v in losses.values())}


def case_allora(out: str, report: dict) -> None:
    results = run_pair(out, "allora", allora_llama, lambda: [], steps=3, accumulation=2, lr=0.5)
    save(out, "allora", results)
    # the update-side coefficient: the optimizer rescales each row's update of the sharded A and B
    results = run_pair(
        out, "allora_update", allora_update_llama, lambda: [], steps=3, accumulation=2, lr=0.5,
        make_optimizer=attach_allora_update,
    )  # fmt: skip
    save(out, "allora_update", results)


def case_mask_tuning(out: str, report: dict) -> None:
    results = run_pair(
        out,
        "mask_tuning",
        mask_llama,
        lambda: [MaskScorePenalty(1e-2), GradientDropout(graddrop_lambda=0.5, seed=3)],
        steps=2,
        accumulation=2,
        lr=0.05,
    )
    save(out, "mask_tuning", results)


def gardo_policy() -> torch.nn.Module:
    """GARDO's adapter layout: a trainable policy adapter and a frozen reference adapter, one peft model."""
    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(llama(), config)
    model.add_adapter(REF_ADAPTER, config)
    copy_adapter_weights(model, "default", REF_ADAPTER)
    model.set_adapter("default")
    return model


def case_gardo_reference(out: str, report: dict) -> None:
    """
    GARDO's reference adapter under FSDP2: per micro-batch the reference forward (adapter switched to "ref" in
    inference mode, no grad, as `GARDOTrainer._adapter` does), then the policy's loss with a penalty towards the
    reference outputs; after the first step the reference is refreshed from the policy (`copy_adapter_weights` on
    the sharded parameters). The sharded run must equal the unsharded one on the whole batch.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = global_batches(3, 2, world, seed=13)
    results = {}
    for sharded in (True, False):
        model = gardo_policy()
        if sharded:
            model = shard(model)
        results["initial"] = full_weights(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)
        for step, step_batches in enumerate(batches):
            for index, batch in enumerate(step_batches):
                inputs = local(batch, rank) if sharded else batch
                with torch.no_grad():
                    model.set_adapter(REF_ADAPTER, inference_mode=True)
                    try:
                        reference = model(**inputs).logits
                    finally:
                        model.set_adapter("default")
                output = model(**inputs)
                loss = (output.loss + 5.0 * (output.logits - reference).pow(2).mean()) / len(step_batches)
                last = index == len(step_batches) - 1
                with fsdp2_no_sync(model) if (sharded and not last) else contextlib.nullcontext():
                    loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == 0:
                copy_adapter_weights(model, "default", REF_ADAPTER)  # GARDO's reference refresh
        results["sharded" if sharded else "reference"] = full_weights(model)
        if sharded:
            results["param_types"] = sorted({type(p).__name__ for p in model.parameters()})
            results["trainable_dtensors"] = all(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)
            try:
                refuse_sharded_resume(model, "checkpoint.pt")
                results["resume_refused"] = ""
            except NotImplementedError as err:
                results["resume_refused"] = str(err)
            weights = results["sharded"]
            names = [n for n in weights if ".default." in n]
            results["ref_moved"] = max(
                float((weights[n.replace(".default.", f".{REF_ADAPTER}.")] - results["initial"][n]).abs().max())
                for n in names
            )
    save(out, "gardo_reference", results)


def case_mask_publish(out: str, report: dict) -> None:
    """Mask scores shard like the weights they mask; publishing gathers them and bit-packs the masks."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank = dist.get_rank()
    model = shard(mask_llama())
    layers = [m for m in model.modules() if hasattr(m, "masktune_scores") and "default" in m.masktune_scores]
    same_layout = all(
        m.masktune_scores["default"].placements == m.get_base_layer().weight.placements
        and m.masktune_scores["default"].to_local().shape == m.get_base_layer().weight.to_local().shape
        for m in layers
    )
    figures = {"layers": len(layers), "scores_shard_like_weights": same_layout}
    # what Accelerate does for a full state dict: gather it, then publish from the main process
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    folder = os.path.join(out, "published_sharded")
    if rank == 0:
        model.save_pretrained(folder, state_dict=full)
    # saving the sharded model directly (every process, the main one writes)
    try:
        model.save_pretrained(os.path.join(out, "published_direct"), is_main_process=rank == 0)
        figures["direct_save"] = "ok"
    except Exception as error:
        figures["direct_save"] = f"{type(error).__name__}: {error}"
    if rank == 0:
        mask_llama().save_pretrained(os.path.join(out, "published_reference"))
        reference = load_file(os.path.join(out, "published_reference", "adapter_model.safetensors"))
        for name in ("published_sharded", "published_direct"):
            path = os.path.join(out, name, "adapter_model.safetensors")
            if os.path.isfile(path):
                got = load_file(path)
                figures[f"{name}_equal"] = got.keys() == reference.keys() and all(
                    torch.equal(got[k], reference[k]) for k in reference
                )
        figures["packed"] = all(v.dtype == torch.uint8 for k, v in reference.items() if "packed" in k) and any(
            "packed" in k for k in reference
        )
    report["mask_publish"] = figures


def case_lfu_refusal(out: str, report: dict) -> None:
    model = shard(lora_llama())
    for mode in ("perturb", "reps"):
        try:
            make_trainer(model, os.path.join(out, "lfu"), [LfURegularizer(mode=mode, second_batch="same")], 1, True)
        except ValueError as error:
            report[f"lfu_{mode}_refusal"] = str(error)
        else:
            report[f"lfu_{mode}_refusal"] = None


def case_resume(out: str, report: dict) -> None:
    """A sharded checkpoint (DCP model + optimizer, regularizer state per rank) resumes exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rank, world = dist.get_rank(), dist.get_world_size()
    batches = global_batches(4, 2, world, seed=11)
    folder = os.path.join(out, "resume")
    checkpoint = os.path.join(folder, "checkpoint-2")

    def regs():  # per-rank stateful regularizer: a wrong rank's state would change the run
        return [NoisyPenalty(weight=0.5, seed=100 + rank), GLADRegularizer(glad_rho=0.3, glad_lambda=0.5)]

    def fresh():
        model = shard(llama())
        trainer = make_trainer(model, folder, regs(), 2, True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, trainer, optimizer

    model, trainer, optimizer = fresh()
    train_steps(trainer, model, optimizer, batches[:2], rank, True)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint)
    trainer._regtune_save_state(checkpoint)
    train_steps(trainer, model, optimizer, batches[2:], rank, True)
    straight = full_weights(model)

    model, trainer, optimizer = fresh()
    train_steps(trainer, model, optimizer, batches[:1], rank, True)  # diverge first: the load must overwrite it
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer._regtune_apply_state(trainer._regtune_read_state(checkpoint))
    trainer.state.global_step = 2
    train_steps(trainer, model, optimizer, batches[2:], rank, True)
    resumed = full_weights(model)
    report["resume_files"] = sorted(f for f in os.listdir(checkpoint) if f.startswith("regtune_"))
    if rank == 0:
        torch.save({"straight": flat(straight), "resumed": flat(resumed)}, os.path.join(out, "resume.pt"))


CASES = {
    "glad": case_glad,
    "glad_norm": case_glad_norm,
    "allora": case_allora,
    "mask_tuning": case_mask_tuning,
    "lfu_refusal": case_lfu_refusal,
    "dropout_hooks": case_dropout_hooks,
    "gardo_reference": case_gardo_reference,
    "mask_publish": case_mask_publish,
    "resume": case_resume,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--cases", default=",".join(CASES))
    cli = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {"world_size": dist.get_world_size(), "errors": {}, "seconds": {}}
    for name in cli.cases.split(","):
        start = time.perf_counter()
        try:
            CASES[name](cli.out, report)
        except Exception:  # report it; the test names the failing case
            report["errors"][name] = traceback.format_exc()
        report["seconds"][name] = round(time.perf_counter() - start, 2)
    with open(os.path.join(cli.out, f"report_{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    from worker_exit import run_and_exit

    run_and_exit(main)
