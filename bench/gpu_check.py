"""The GPU check: regtune's adapters, trainers and distributed paths on one CUDA GPU, in under 8 minutes.

    python bench/gpu_check.py --out bench/out/gpu_check            # on a CUDA machine (bf16)
    python bench/gpu_check.py --out /tmp/gpu_check --smoke         # tiny sizes, runs on CPU too (fp32)

Sections (each one runs on its own: a failure is recorded in the report and the next section runs):

1. `adapter_matrix`: every adapter case of the test matrix (tests/adapter_cases.py) on every tiny model
   (tests/tiny_models.py), on the device in bf16: forward/backward (finite, fp32 adapter gradients), a few SGD
   steps under bf16 autocast change only the adapter's parameters, merge/unmerge and `disable_adapter` reproduce the
   outputs, and a `save_pretrained`/`from_pretrained` round trip gives identical outputs.
2. `step_time`: median optimizer-step time and peak memory (`torch.cuda.max_memory_allocated`) of each method
   against its baseline on a Llama built from a config (hidden size 2048, 4 layers; bf16): ALLoRA / LoRA,
   GLAD (LoRA) / LoRA, LfU perturb and RepS / SFT with LoRA, mask tuning (+ gradient dropout) / full fine-tuning of
   the same weights.
3. `gardo`: GARDO's step time with the KL on the gated samples only vs on all samples (testbed transformer).
4. `distributed`: `torchrun --nproc_per_node 1` children that train each method for 2 steps through Accelerate's
   FSDP2 plugin (`fsdp_version: 2`) and through DDP, and report what ran, what refused and why.

Writes `<out>/gpu_check.json` and `<out>/gpu_check.md` (rewritten after every section, so a run cut short still
leaves its results).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the adapter matrix's cases and tiny models
sys.path.insert(0, os.path.join(ROOT, "src"))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

import regtune  # noqa: E402
from regtune.regularizers import (  # noqa: E402
    DropoutSchedule,
    GLADRegularizer,
    LfURegularizer,
    MultiSampleDropout,
)


BUDGET_S = 7.5 * 60


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"hidden": 32, "layers": 2, "heads": 2, "inter": 64, "vocab": 128, "seq": 16, "batch": 2, "steps": 3}
    return {
        "hidden": 2048,
        "layers": 4,
        "heads": 16,
        "inter": 5632,
        "vocab": 32000,
        "seq": 512,
        "batch": 8,
        "steps": 8,
    }


def device_and_dtype() -> tuple[str, torch.dtype]:
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- 1. the adapter matrix ----


def adapter_matrix(report: dict, smoke: bool) -> None:
    from adapter_cases import ADAPTER_CASES
    from tiny_models import TINY_MODELS

    device, dtype = device_and_dtype()
    rows = []
    for case in ADAPTER_CASES:
        for model_case in TINY_MODELS.values():
            row = {"adapter": case.name, "model": model_case.name}
            for check in ("forward_backward", "train_only_adapter", "merge", "disable", "save_load"):
                try:
                    _matrix_check(check, case, model_case, device, dtype)
                    row[check] = "ok"
                except Exception as error:  # recorded, the matrix goes on
                    row[check] = f"FAIL: {type(error).__name__}: {str(error)[:300]}"
            rows.append(row)
            free()
    report["adapter_matrix"] = {"device": device, "dtype": str(dtype), "rows": rows}


def _matrix_peft(case, model_case, device, dtype):
    kwargs = dict(case.kwargs)
    kwargs["target_modules"] = model_case.target_modules
    if model_case.task_type:
        kwargs["task_type"] = model_case.task_type
    if model_case.modules_to_save:
        kwargs["modules_to_save"] = model_case.modules_to_save
    kwargs.update(case.non_identity_kwargs)
    torch.manual_seed(0)
    base = model_case.build().to(device=device, dtype=dtype)
    return get_peft_model(base, case.config_cls(**kwargs)).eval()


def _batch(model_case, device, dtype) -> dict:
    out = {}
    for key, value in model_case.batch().items():
        value = value.to(device)
        out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"})["logits"].float()


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float) -> None:
    error = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1.0)
    if not error <= tol * scale:
        raise AssertionError(f"{what}: max abs difference {error:.3g} > {tol} x {scale:.3g}")


def _matrix_check(check, case, model_case, device, dtype) -> None:
    peft_model = _matrix_peft(case, model_case, device, dtype)
    batch = _batch(model_case, device, dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    exact = 1e-3 if dtype == torch.bfloat16 else 0.0  # GPU kernels may pick another reduction order
    if check == "forward_backward":
        peft_model.train()
        out = peft_model(**batch)
        if not torch.isfinite(out["logits"].float()).all():
            raise AssertionError("non-finite logits")
        out["loss"].backward()
        grads = [(n, p) for n, p in peft_model.named_parameters() if case.prefix in n and p.requires_grad]
        if not grads or any(p.grad is None or not torch.isfinite(p.grad).all() for _, p in grads):
            raise AssertionError("missing or non-finite adapter gradients")
        if any(p.dtype != torch.float32 for _, p in grads):
            raise AssertionError("adapter parameters are not fp32 over the half-precision base")
    elif check == "train_only_adapter":
        before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        if case.kwargs.get("coefficient_on") == "update":  # ALLoRA's update-side coefficient lives in the optimizer
            optimizer = regtune.create_allora_optimizer(peft_model, torch.optim.SGD, lr=case.train_lr)
        else:
            optimizer = torch.optim.SGD(trainable, lr=case.train_lr)
        peft_model.train()
        autocast = (
            torch.autocast(device, dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
        )
        for _ in range(3):
            with autocast:
                loss = peft_model(**batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        for name, param in peft_model.named_parameters():
            changed = not torch.equal(before[name], param)
            expected = case.prefix in name or "modules_to_save" in name
            if changed != expected:
                raise AssertionError(f"{name}: changed={changed}, adapter={expected}")
    elif check == "merge":
        logits = _logits(peft_model, batch)
        peft_model.merge_adapter()
        _close(_logits(peft_model, batch), logits, "merged", tol)
        peft_model.unmerge_adapter()
        _close(_logits(peft_model, batch), logits, "unmerged", tol)
    elif check == "disable":
        base = model_case.build().to(device=device, dtype=dtype).eval()
        with peft_model.disable_adapter():
            _close(_logits(peft_model, batch), _logits(base, batch), "disabled", exact)
    elif check == "save_load":
        logits = _logits(peft_model, batch)
        with tempfile.TemporaryDirectory() as folder:
            peft_model.save_pretrained(folder)
            base = model_case.build().to(device=device, dtype=dtype)
            loaded = PeftModel.from_pretrained(base, folder).eval()
            _close(_logits(loaded, batch), logits, "reloaded", exact)


# ---- 2. step times and peak memory on a realistic width ----


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.times.append(time.perf_counter() - self._start)


def llama(s: dict, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        intermediate_size=s["inter"],
        vocab_size=s["vocab"],
        max_position_embeddings=max(2 * s["seq"], 64),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.device(device_and_dtype()[0]):  # initialize on the GPU: a 2048-wide model is slow to init on CPU
        model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    return model


def token_data(s: dict, rows: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, s["vocab"], (rows, s["seq"]), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}
    )


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_variant(name: str, s: dict, dtype: torch.dtype):
    """Return `(model, trainer class, regularizers, extra TrainingArguments)` of a variant."""
    lora = {"r": 16, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    if name == "lora":
        return get_peft_model(llama(s, dtype), LoraConfig(lora_alpha=32, **lora)), regtune.RegTrainer, [], {}
    if name == "allora":
        return get_peft_model(llama(s, dtype), regtune.ALLoRAConfig(eta=2.0, **lora)), regtune.RegTrainer, [], {}
    if name == "glad_lora":
        model = get_peft_model(llama(s, dtype), LoraConfig(lora_alpha=32, **lora))
        return model, regtune.RegTrainer, [GLADRegularizer(rho=0.05, glad_lambda=0.5)], {}
    if name.startswith("lfu_"):
        model = get_peft_model(llama(s, dtype), LoraConfig(lora_alpha=32, **lora))
        return model, regtune.RegTrainer, [LfURegularizer(mode=name.removeprefix("lfu_"), alpha=0.1)], {}
    if name == "full_ft_attention":  # fp32 master weights under bf16 autocast
        model = llama(s, torch.float32)
        for pname, param in model.named_parameters():
            param.requires_grad = any(f".{t}." in pname for t in ATTENTION)
        return model, regtune.RegTrainer, [], {}
    if name.startswith("mask_tuning"):
        lam = 1.0 if name == "mask_tuning_gd" else 0.0
        config = regtune.MaskTuningConfig(target_modules=ATTENTION, task_type="CAUSAL_LM", graddrop_lambda=lam)
        return get_peft_model(llama(s, torch.float32), config), regtune.MaskTuningTrainer, [], {}
    raise ValueError(name)


def time_variant(name: str, s: dict, out: str) -> dict:
    device, dtype = device_and_dtype()
    free()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, trainer_cls, regularizers, extra = build_variant(name, s, dtype)
    warmup = 2
    args = TrainingArguments(
        output_dir=os.path.join(out, "runs", name),
        per_device_train_batch_size=s["batch"],
        max_steps=warmup + s["steps"],
        learning_rate=1e-4,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
        **extra,
    )
    timer = StepTimer()
    data = token_data(s, s["batch"] * (warmup + s["steps"]))
    kwargs = {"regularizers": regularizers} if regularizers else {}
    trainer = trainer_cls(model=model, args=args, train_dataset=data, callbacks=[timer], **kwargs)
    loss = trainer.train().training_loss
    times = timer.times[warmup:]
    result = {
        "median_step_s": statistics.median(times),
        "steps_timed": len(times),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final_loss_finite": bool(torch.isfinite(torch.tensor(loss))),
    }
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model
    free()
    return result


PAIRS = [
    ("allora", "lora"),
    ("glad_lora", "lora"),
    ("lfu_perturb", "lora"),
    ("lfu_reps", "lora"),
    ("mask_tuning", "full_ft_attention"),
    ("mask_tuning_gd", "full_ft_attention"),
]


def step_time(report: dict, smoke: bool, out: str) -> None:
    s = sizes(smoke)
    section = {"sizes": s, "variants": {}, "ratios": {}}
    report["step_time"] = section
    names = list(dict.fromkeys(n for pair in PAIRS for n in pair))
    for name in names:
        try:
            section["variants"][name] = time_variant(name, s, out)
        except Exception as error:
            section["variants"][name] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
            free()
    for method, baseline in PAIRS:
        a, b = section["variants"].get(method, {}), section["variants"].get(baseline, {})
        if "median_step_s" in a and "median_step_s" in b:
            section["ratios"][f"{method}/{baseline}"] = a["median_step_s"] / b["median_step_s"]


# ---- 3. GARDO gated vs all ----


def gardo(report: dict, smoke: bool, out: str) -> None:
    import copy

    from accelerate import Accelerator

    from regtune.diffusion import GARDOConfig, GARDOTrainer
    from regtune.diffusion.testbed import TestbedConfig, build_testbed

    bed_config = TestbedConfig(
        pretrain_steps=5 if smoke else 100,
        classifier_steps=5 if smoke else 50,
        width=16 if smoke else 64,
        cache_dir=None,
    )
    bed = build_testbed(bed_config, log=lambda *a, **k: None)
    bed.pop("info")
    base = bed.pop("denoiser")
    gate = 0.1
    common = dict(
        prompts_per_epoch=2 if smoke else 8,
        num_generations=4 if smoke else 8,
        num_inference_steps=4 if smoke else 10,
        lora_r=4,
        lora_alpha=8,
        eval_every=0,
        resume=False,
        ref_kl_threshold=None,
        ref_refresh_every=None,
    )
    modes = {
        "gated": dict(kl_mode="gated", gate_init=gate, gate_min=gate, gate_max=gate, adaptive_gate=False),
        "all": dict(kl_mode="all"),
    }
    section = {"gate_fraction": gate, "modes": {}}
    report["gardo"] = section
    rounds = 2 if smoke else 8
    for mode, kw in modes.items():
        free()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        accelerator = Accelerator()  # the process's accelerate state, as the earlier sections left it
        precision = accelerator.mixed_precision  # GARDO refuses a precision other than the state's
        config = GARDOConfig(
            output_dir=os.path.join(out, "runs", f"gardo_{mode}"), mixed_precision=precision, **common, **kw
        )
        trainer = GARDOTrainer(config, denoiser=copy.deepcopy(base), accelerator=accelerator, **bed)
        batch = trainer._rollout(0)
        trainer._train_on(batch)  # warm-up
        times = []
        for _ in range(rounds):
            sync()
            start = time.perf_counter()
            trainer._train_on(batch)
            sync()
            times.append(time.perf_counter() - start)
        entry = {"median_step_s": statistics.median(times), "device": str(next(trainer.model.parameters()).device)}
        if torch.cuda.is_available():
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        section["modes"][mode] = entry
        del trainer
    section["ratio_gated_over_all"] = (
        section["modes"]["gated"]["median_step_s"] / section["modes"]["all"]["median_step_s"]
    )


# ---- 4. FSDP2 and DDP with one process (torchrun children) ----


CHILD_METHODS = [
    "glad_full",
    "allora",
    "allora_update",
    "mask_tuning_gd",
    "msd_dropout_schedule",
    "lfu_perturb",
    "gardo_gated",
]


def distributed(report: dict, smoke: bool, out: str) -> None:
    section = {}
    report["distributed"] = section
    for mode in ("ddp", "fsdp2"):
        child_out = os.path.join(out, f"child_{mode}")
        os.makedirs(child_out, exist_ok=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        command += [os.path.abspath(__file__), "--child", mode, "--out", child_out] + (["--smoke"] if smoke else [])
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        started = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        path = os.path.join(child_out, "child.json")
        entry = json.load(open(path)) if os.path.isfile(path) else {}
        entry["returncode"] = result.returncode
        entry["seconds"] = round(time.perf_counter() - started, 1)
        if result.returncode != 0:
            entry["stderr_tail"] = result.stderr[-2000:]
        section[mode] = entry


def child(mode: str, smoke: bool, out: str) -> None:
    """One torchrun process: train each method 2 steps under Accelerate's `mode` ("ddp" or "fsdp2")."""
    device, dtype = device_and_dtype()
    s = sizes(True) if smoke else {**sizes(False), "hidden": 512, "layers": 2, "heads": 8, "inter": 1408}
    results = {"device": device}
    for method in CHILD_METHODS:
        entry = {}
        if method == "gardo_gated":
            results[method] = _child_gardo(mode, smoke, out)
            continue
        try:
            extra = {}
            if mode == "fsdp2":
                extra = {
                    "fsdp": "full_shard",
                    "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
                }
            args = TrainingArguments(
                output_dir=os.path.join(out, method),
                per_device_train_batch_size=2,
                max_steps=2,
                learning_rate=1e-4,
                bf16=device == "cuda",
                use_cpu=device == "cpu",
                report_to="none",
                save_strategy="steps",
                save_steps=2,
                logging_steps=1,
                disable_tqdm=True,
                seed=0,
                **extra,
            )
            model, trainer_cls, regularizers = _child_method(method, s, dtype)
            kwargs = {"regularizers": regularizers} if regularizers else {}
            trainer = trainer_cls(model=model, args=args, train_dataset=token_data(s, 8), **kwargs)
            loss = trainer.train().training_loss
            entry.update(
                status="ok",
                loss=loss,
                distributed_type=str(trainer.accelerator.distributed_type),
                is_fsdp2=bool(getattr(trainer.accelerator, "is_fsdp2", False)),
                wrapped=type(trainer.model_wrapped).__name__,
                sharded_params=any(type(p).__name__ == "DTensor" for p in trainer.model_wrapped.parameters()),
            )
        except ValueError as error:  # a refusal names its reason
            entry.update(status="refused", message=str(error)[:500])
        except Exception as error:
            entry.update(status="error", message=f"{type(error).__name__}: {str(error)[:500]}")
            entry["traceback"] = traceback.format_exc()[-1500:]
        results[method] = entry
        free()
    with open(os.path.join(out, "child.json"), "w") as f:
        json.dump(results, f, indent=1)


def _child_method(method: str, s: dict, dtype: torch.dtype):
    lora = {"r": 8, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    if method == "glad_full":
        return llama(s, torch.float32), regtune.RegTrainer, [GLADRegularizer(rho=0.05, glad_lambda=0.5)]
    if method == "allora":
        return get_peft_model(llama(s, torch.float32), regtune.ALLoRAConfig(**lora)), regtune.RegTrainer, []
    if method == "allora_update":  # RegTrainer builds the optimizer with the update-side coefficient
        config = regtune.ALLoRAConfig(coefficient_on="update", **lora)
        return get_peft_model(llama(s, torch.float32), config), regtune.RegTrainer, []
    if method == "mask_tuning_gd":
        config = regtune.MaskTuningConfig(target_modules=ATTENTION, task_type="CAUSAL_LM", graddrop_lambda=1.0)
        return get_peft_model(llama(s, torch.float32), config), regtune.MaskTuningTrainer, []
    if method == "msd_dropout_schedule":
        regs = [MultiSampleDropout(num_samples=4, p=0.2), DropoutSchedule(p=0.1)]
        return llama(s, torch.float32), regtune.RegTrainer, regs
    if method == "lfu_perturb":
        model = get_peft_model(llama(s, torch.float32), LoraConfig(lora_alpha=16, **lora))
        return model, regtune.RegTrainer, [LfURegularizer(mode="perturb", second_batch="same")]
    raise ValueError(method)


def _child_gardo(mode: str, smoke: bool, out: str) -> dict:
    """GARDO (gated KL, reference adapter, one refresh) for 2 epochs, on its own Accelerator (FSDP2 plugin or not)."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    from regtune.diffusion import GARDOConfig, GARDOTrainer
    from regtune.diffusion.testbed import TestbedConfig, build_testbed

    try:
        bed = build_testbed(
            TestbedConfig(pretrain_steps=5, classifier_steps=5, width=16, cache_dir=None), log=lambda *a, **k: None
        )
        bed.pop("info")
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2) if mode == "fsdp2" else None
        accelerator = Accelerator(fsdp_plugin=plugin, mixed_precision="bf16" if torch.cuda.is_available() else "no")
        config = GARDOConfig(
            output_dir=os.path.join(out, "gardo"),
            num_epochs=2,
            prompts_per_epoch=2,
            num_generations=4,
            num_inference_steps=4,
            lora_r=4,
            lora_alpha=8,
            eval_every=0,
            resume=False,
            kl_mode="gated",
            ref_refresh_every=1,
            mixed_precision=accelerator.mixed_precision,
        )
        trainer = GARDOTrainer(config, accelerator=accelerator, **bed)
        history = trainer.train()
        return {
            "status": "ok",
            "epochs": len(history),
            "distributed_type": str(accelerator.distributed_type),
            "is_fsdp2": bool(getattr(accelerator, "is_fsdp2", False)),
            "wrapped": type(trainer.ddp_model).__name__,
            "sharded_params": any(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
            "refreshes": trainer.refreshes,
        }
    except ValueError as error:
        return {"status": "refused", "message": str(error)[:500]}
    except Exception as error:
        return {
            "status": "error",
            "message": f"{type(error).__name__}: {str(error)[:500]}",
            "traceback": traceback.format_exc()[-1500:],
        }


# ---- report ----


def write_report(report: dict, out: str) -> None:
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    md = [f"# regtune GPU check ({report['machine']['device_name']}, torch {report['machine']['torch']})", ""]
    md.append(f"Mode: {'smoke (tiny sizes)' if report['smoke'] else 'full'}; sections' seconds: {report['seconds']}")
    if report["errors"]:
        md += ["", "## Errors", ""] + [f"- `{k}`: {v.splitlines()[-1]}" for k, v in report["errors"].items()]
    matrix = report.get("adapter_matrix")
    if matrix:
        checks = ["forward_backward", "train_only_adapter", "merge", "disable", "save_load"]
        md += ["", f"## Adapter matrix ({matrix['device']}, {matrix['dtype']})", ""]
        md += ["| adapter | model | " + " | ".join(checks) + " |", "|---|---|" + "---|" * len(checks)]
        for row in matrix["rows"]:
            md.append(f"| {row['adapter']} | {row['model']} | " + " | ".join(row[c][:60] for c in checks) + " |")
    st = report.get("step_time")
    if st:
        md += ["", f"## Step time and peak memory (Llama {st['sizes']})", ""]
        md += ["| variant | median step (s) | peak memory (GiB) | trainable params |", "|---|---|---|---|"]
        for name, v in st["variants"].items():
            if "error" in v:
                md.append(f"| {name} | error: {v['error'][:120]} | | |")
            else:
                mem = f"{v['peak_memory_gib']:.2f}" if "peak_memory_gib" in v else "n/a (CPU)"
                md.append(f"| {name} | {v['median_step_s']:.4f} | {mem} | {v['trainable_params']:,} |")
        md += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in st["ratios"].items()]
    gd = report.get("gardo")
    if gd and "ratio_gated_over_all" in gd:
        md += ["", f"## GARDO (gate {gd['gate_fraction']:.0%})", ""]
        md += [f"- {m}: median step {v['median_step_s']:.4f} s" for m, v in gd["modes"].items()]
        md.append(f"- gated / all: **{gd['ratio_gated_over_all']:.3f}**")
    dist = report.get("distributed")
    if dist:
        md += ["", "## One-process DDP and FSDP2 (Accelerate)", "", "| method | ddp | fsdp2 |", "|---|---|---|"]
        for method in CHILD_METHODS:
            cells = []
            for mode in ("ddp", "fsdp2"):
                e = dist.get(mode, {}).get(method, {})
                text = e.get("status", "missing")
                if e.get("status") == "ok":
                    text += f" ({e['distributed_type']}, {e['wrapped']}, DTensor params={e['sharded_params']})"
                    if mode == "fsdp2" and not e["is_fsdp2"]:
                        text += " -- FSDP2 NOT active (Accelerate enables FSDP on GPUs only)"
                elif "message" in e:
                    text += f": {e['message'][:150]}"
                cells.append(text.replace("|", "/").replace("\n", " "))
            md.append(f"| {method} | " + " | ".join(cells) + " |")
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder of gpu_check.json / gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (runs on CPU in about a minute)")
    parser.add_argument("--sections", default="adapter_matrix,step_time,gardo,distributed")
    parser.add_argument("--child", choices=["ddp", "fsdp2"], help=argparse.SUPPRESS)
    cli = parser.parse_args()
    os.makedirs(cli.out, exist_ok=True)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    if cli.child:
        child(cli.child, cli.smoke, cli.out)
        return
    import transformers

    transformers.logging.set_verbosity_error()
    report = {
        "smoke": cli.smoke,
        "machine": {
            "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "seconds": {},
        "errors": {},
    }
    sections = {"adapter_matrix": adapter_matrix, "step_time": step_time, "gardo": gardo, "distributed": distributed}
    started = time.perf_counter()
    for name in cli.sections.split(","):
        if time.perf_counter() - started > BUDGET_S:
            report["errors"][name] = "skipped: the 7.5-minute budget is spent"
            continue
        t0 = time.perf_counter()
        try:
            fn = sections[name]
            fn(report, cli.smoke) if name == "adapter_matrix" else fn(report, cli.smoke, cli.out)
        except Exception:
            report["errors"][name] = traceback.format_exc()
        report["seconds"][name] = round(time.perf_counter() - t0, 1)
        write_report(report, cli.out)
        print(f"[gpu_check] {name}: {report['seconds'][name]} s", flush=True)
    print(open(os.path.join(cli.out, "gpu_check.md")).read())


if __name__ == "__main__":
    main()
