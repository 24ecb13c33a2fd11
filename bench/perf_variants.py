"""The variants of the performance suite (`bench/perf.py`): every method and its baseline, built through regtune's
shipped trainers and regularizers on a Llama built from a config (random weights: step time and memory do not depend
on the values of the weights).

Each builder returns a ready `transformers.Trainer` (RegTrainer, GLADTrainer, MaskTuningTrainer, trl's SFTTrainer or
LfUTrainer) whose `train()` runs `max_steps` optimizer steps on a synthetic data set of fixed-length token rows, one
log every step (`logging_steps=1`, so the mechanism diagnostics, when on, are computed at every step: their worst
case). GARDO has its own trainer (not a `transformers.Trainer`): see `build_gardo`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import regtune
from regtune.data.char_tokenizer import build_char_tokenizer
from regtune.regularizers import GLADRegularizer, MultiSampleDropout


# Llama shapes. "real": the width of a released Llama-architecture model (SmolLM2-135M: hidden 576, MLP 1536, 9 heads,
# 3 key/value heads) with 2 of its 30 blocks and a 4096-token vocabulary, so that the full suite fits CPU time.
# "small": a quarter of that width.
WIDTHS = {
    "small": dict(hidden_size=144, intermediate_size=384, num_attention_heads=3, num_key_value_heads=1),
    "real": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
    # for --quick only
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1),
}
LAYERS = 2
VOCAB = 4096
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_REGEX = r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0)


def llama(width: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, num_hidden_layers=LAYERS, max_position_embeddings=256, pad_token_id=0, bos_token_id=2,
        eos_token_id=3, tie_word_embeddings=False, **WIDTHS[width],
    )  # fmt: skip
    return LlamaForCausalLM(config)


# the noisy-label regularizers (ELR, PS-KD): a sequence classifier with this many classes (CIFAR-100's, the larger of
# the released configs' class counts), trained on this many rows (CIFAR's training set); their per-example buffers are
# N x C float32 (N the training rows: 50,000 x 100 x 4 bytes = 20 MB), indexed by each batch's `sample_index`
NUM_LABELS = 100
NUM_EXAMPLES = 50_000


def llama_classifier(width: str) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, num_hidden_layers=LAYERS, max_position_embeddings=256, pad_token_id=0, bos_token_id=2,
        eos_token_id=3, tie_word_embeddings=False, num_labels=NUM_LABELS, **WIDTHS[width],
    )  # fmt: skip
    return LlamaForSequenceClassification(config)


def token_rows(n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n, seq_len), generator=g)


def lm_dataset(n: int, seq_len: int) -> Dataset:
    ids = token_rows(n, seq_len)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}
    )


def common_args(out: str, batch: int, steps: int) -> dict:
    return dict(
        output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4, report_to="none",
        save_strategy="no", logging_strategy="steps", logging_steps=1, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), lr_scheduler_type="constant",
    )  # fmt: skip


def set_diagnostics(trainer, on: bool) -> None:
    """Turn every regularizer's mechanism diagnostics on or off (`Regularizer.log_diagnostics`)."""
    for reg in getattr(trainer, "regularizers", []):
        reg.log_diagnostics = on


def full_ft_model(width: str):
    """The Llama with only the targeted linear weights trainable (the weights mask tuning masks)."""
    import re

    model = llama(width)
    pattern = re.compile(TARGET_REGEX)
    for name, param in model.named_parameters():
        param.requires_grad = bool(pattern.match(name.rsplit(".", 1)[0])) and name.endswith("weight")
    return model


def _reg_trainer(model, out, batch, seq_len, steps, cls=None, args_cls=TrainingArguments, regularizers=(), **extra):
    cls = cls or regtune.RegTrainer
    args = args_cls(**common_args(out, batch, steps), **extra)
    rows = batch * steps * args.gradient_accumulation_steps
    trainer = cls(model=model, args=args, train_dataset=lm_dataset(rows, seq_len), regularizers=list(regularizers))
    trainer.model_accepts_loss_kwargs = False
    return trainer


def b_lora(width, out, batch, seq_len, steps):
    model = get_peft_model(llama(width), LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **LORA))
    return _reg_trainer(model, out, batch, seq_len, steps)


def b_lora_two_passes(width, out, batch, seq_len, steps):
    """LoRA with two forward/backward passes per optimizer step (two micro-batches of the same size): GLAD's floor,
    the work of its two passes without its perturbation."""
    model = get_peft_model(llama(width), LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **LORA))
    return _reg_trainer(model, out, batch, seq_len, steps, gradient_accumulation_steps=2)


def b_allora(site):
    def build(width, out, batch, seq_len, steps):
        config = regtune.ALLoRAConfig(r=8, eta=2.0, coefficient_on=site, target_modules=TARGETS, task_type="CAUSAL_LM")
        # the diagnostic with its per-layer metrics (the worst case, and the default when the suite was first run)
        diagnostics = regtune.regularizers.ALLoRADiagnostics(per_layer=True)
        model = get_peft_model(llama(width), config)
        return _reg_trainer(model, out, batch, seq_len, steps, regularizers=[diagnostics])

    return build


def b_glad(width, out, batch, seq_len, steps):
    config = regtune.GLADConfig(target_modules=TARGETS, task_type="CAUSAL_LM", rho=0.05, glad_lambda=0.5, **LORA)
    model = get_peft_model(llama(width), config)
    return _reg_trainer(
        model, out, batch, seq_len, steps, cls=regtune.GLADTrainer, args_cls=regtune.GLADTrainingArguments
    )


def b_msd(width, out, batch, seq_len, steps):
    model = get_peft_model(llama(width), LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **LORA))
    return _reg_trainer(model, out, batch, seq_len, steps, regularizers=[MultiSampleDropout(num_samples=8, p=0.1)])


def b_full(width, out, batch, seq_len, steps):
    return _reg_trainer(full_ft_model(width), out, batch, seq_len, steps)


def b_full_two_passes(width, out, batch, seq_len, steps):
    """Full fine-tuning with two forward/backward passes per optimizer step: GLAD's floor under full fine-tuning."""
    return _reg_trainer(full_ft_model(width), out, batch, seq_len, steps, gradient_accumulation_steps=2)


def b_full_glad(width, out, batch, seq_len, steps):
    reg = GLADRegularizer(rho=0.05, glad_lambda=0.5)
    return _reg_trainer(full_ft_model(width), out, batch, seq_len, steps, regularizers=[reg])


def b_mask(graddrop_lambda):
    def build(width, out, batch, seq_len, steps):
        config = regtune.MaskTuningConfig(
            target_modules=TARGET_REGEX, task_type="CAUSAL_LM", graddrop_lambda=graddrop_lambda
        )
        model = get_peft_model(llama(width), config)
        return _reg_trainer(
            model, out, batch, seq_len, steps, cls=regtune.MaskTuningTrainer,
            args_cls=regtune.MaskTuningTrainingArguments, mask_flips_per_layer=True,  # per layer: the worst case
        )  # fmt: skip

    return build


_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = build_char_tokenizer(chars="abcdefghijklmnopqrstuvwxyz ")
    return _TOKENIZER


_CLASSIFICATION_DATA: dict = {}


def classification_dataset(n: int, seq_len: int) -> Dataset:
    """`n` token rows with a random class label each and the `sample_index` column (`regtune.add_sample_index`);
    made once per process and shape, shared by the variants (the Trainer does not change it)."""
    if (n, seq_len) not in _CLASSIFICATION_DATA:
        import datasets

        datasets.disable_progress_bars()  # the index column's `map`: no progress bar in the suite's log
        ids = token_rows(n, seq_len)
        labels = torch.randint(0, NUM_LABELS, (n,), generator=torch.Generator().manual_seed(1))
        data = Dataset.from_dict(
            {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
        )
        _CLASSIFICATION_DATA[n, seq_len] = regtune.add_sample_index(data)
    return _CLASSIFICATION_DATA[n, seq_len]


def b_classifier(regularizer=None):
    """The sequence classifier (full fine-tuning) in a RegTrainer with `regularizer()` (None: plain cross-entropy)."""

    def build(width, out, batch, seq_len, steps):
        args = TrainingArguments(**common_args(out, batch, steps))
        regularizers = [] if regularizer is None else [regularizer()]
        data = classification_dataset(max(NUM_EXAMPLES, batch * steps), seq_len)
        trainer = regtune.RegTrainer(
            model=llama_classifier(width), args=args, train_dataset=data, regularizers=regularizers
        )
        trainer.model_accepts_loss_kwargs = False
        return trainer

    return build


def b_sft(lfu: dict | None):
    def build(width, out, batch, seq_len, steps):
        from trl import SFTConfig, SFTTrainer

        ids = token_rows(batch * steps, seq_len)
        dataset = Dataset.from_dict({"input_ids": ids.tolist()})
        kwargs = dict(
            common_args(out, batch, steps), max_length=seq_len, packing=False, bf16=False, dataset_num_proc=None
        )
        peft_config = LoraConfig(target_modules=TARGETS, **LORA)
        if lfu is None:
            cls, args = SFTTrainer, SFTConfig(**kwargs)
        else:
            cls, args = regtune.LfUTrainer, regtune.LfUConfig(**kwargs, **lfu)
        trainer = cls(
            model=llama(width),
            args=args,
            train_dataset=dataset,
            processing_class=_tokenizer(),
            peft_config=peft_config,
        )
        return trainer

    return build


@dataclass
class Variant:
    name: str
    build: object
    baseline: str
    method: str  # the row label of the method (without the diagnostics suffix)
    diagnostics: bool | None = True  # None: the method has no mechanism diagnostics
    memory: bool = True  # measured in the memory pass
    notes: list = field(default_factory=list)
    floor: str | None = None  # the variant whose step time is this method's floor (the same passes, no method)


def _pair(name, build, baseline, method=None, diagnostics=True, floor=None):
    method = method or name
    out = [Variant(name, build, baseline, method, diagnostics=True if diagnostics else None, floor=floor)]
    if diagnostics:
        out.append(
            Variant(name + " [diag off]", build, baseline, method, diagnostics=False, memory=False, floor=floor)
        )
    return out


LORA_TWO_PASSES = "lora, two passes per step"
FULL_TWO_PASSES = "full-ft, two passes per step"


# One timing session per group: its variants are interleaved, round by round, in one process.
GROUPS: dict[str, list[Variant]] = {
    "lora": [
        Variant("lora", b_lora, "lora", "lora", diagnostics=None),
        *_pair("allora (gradient)", b_allora("gradient"), "lora"),
        *_pair("allora (update)", b_allora("update"), "lora"),
        *_pair("glad", b_glad, "lora", floor=LORA_TWO_PASSES),
        Variant("multi-sample dropout (K=8)", b_msd, "lora", "multi-sample dropout (K=8)", diagnostics=None),
        Variant(LORA_TWO_PASSES, b_lora_two_passes, "lora", LORA_TWO_PASSES, diagnostics=None, memory=False),
    ],
    "full": [
        Variant("full-ft", b_full, "full-ft", "full-ft", diagnostics=None),
        *_pair("mask tuning", b_mask(0.0), "full-ft"),
        *_pair("mask tuning + gradient dropout", b_mask(1.0), "full-ft"),
        *_pair("glad (full-ft)", b_full_glad, "full-ft", floor=FULL_TWO_PASSES),
        Variant(FULL_TWO_PASSES, b_full_two_passes, "full-ft", FULL_TWO_PASSES, diagnostics=None, memory=False),
    ],
    "sft": [
        Variant("sft", b_sft(None), "sft", "sft", diagnostics=None),
        *_pair("lfu (perturb)", b_sft({"lfu_mode": "perturb"}), "sft"),
        *_pair("lfu (perturb, same batch)", b_sft({"lfu_mode": "perturb", "lfu_second_batch": "same"}), "sft"),
        *_pair("lfu (reps)", b_sft({"lfu_mode": "reps"}), "sft"),
    ],
    # ELR and PS-KD (their released defaults) against the same RegTrainer without them: plain cross-entropy
    "noisy": [
        Variant("ce", b_classifier(), "ce", "ce", diagnostics=None),
        *_pair("elr", b_classifier(lambda: regtune.ELR(beta=0.7, lambda_=3.0)), "ce"),
        *_pair("pskd", b_classifier(lambda: regtune.PSKD(alpha_T=0.8)), "ce"),
        Variant(
            "elr (buffer on cpu)",
            b_classifier(lambda: regtune.ELR(buffer_device="cpu")),
            "ce",
            "elr (buffer on cpu)",
            diagnostics=None,
        ),
    ],
}


def buffer_bytes(trainer) -> dict:
    """The per-example buffers of the trainer's regularizers: {"<reg>/<buffer>": {"shape", "dtype", "bytes",
    "device"}} (created at the start of `train()`; empty before, or without a per-example regularizer)."""
    out = {}
    for reg in getattr(trainer, "regularizers", []):
        for name, buf in (getattr(reg, "_buffers", None) or {}).items():
            table = buf.table
            out[f"{getattr(reg, 'name', type(reg).__name__)}/{name}"] = {
                "shape": list(table.shape), "dtype": str(table.dtype).replace("torch.", ""),
                "bytes": table.numel() * table.element_size(), "device": str(buf.device),
            }  # fmt: skip
        visited = getattr(reg, "_visited", None)  # PS-KD's N "seen" flags
        if isinstance(visited, torch.Tensor):
            out[f"{reg.name}/visited"] = {
                "shape": list(visited.shape), "dtype": str(visited.dtype).replace("torch.", ""),
                "bytes": visited.numel() * visited.element_size(), "device": str(visited.device),
            }  # fmt: skip
    return out


def _time_diagnostics(trainer) -> None:
    """Record the wall time of every read-out of the regularizers' diagnostics (`trainer._perf_log_times`), net of
    ALLoRA's coefficient refresh when the read-out triggers it (the refresh is then not done in the next forward:
    moved, not added; it is timed by [`_time_allora_refresh`])."""
    import time

    read_out = trainer.regularizer_diagnostics
    trainer._perf_log_times = []
    trainer._perf_refresh_in_readout = None

    def timed():
        trainer._perf_refresh_in_readout = 0.0
        start = time.perf_counter()
        out = read_out()
        spent = time.perf_counter() - start - trainer._perf_refresh_in_readout
        trainer._perf_refresh_in_readout = None
        trainer._perf_log_times.append(spent)
        return out

    trainer.regularizer_diagnostics = timed


def _time_allora_refresh(trainer) -> None:
    """Record the wall time of ALLoRA's coefficient refresh (`ALLoRACoefficientGroup.refresh`, once per optimizer
    step) per step of `trainer` (`trainer._perf_refresh_times`: global step -> seconds); nothing without ALLoRA."""
    import time

    from regtune.tuners.allora.layer import _Registry

    group = next((g for m in trainer.model.modules() if (g := _Registry.groups.get(m)) is not None), None)
    if group is None:
        return
    refresh, spent = group.refresh, {}
    trainer._perf_refresh_times = spent

    def timed():
        start = time.perf_counter()
        refresh()
        elapsed = time.perf_counter() - start
        step = trainer.state.global_step
        spent[step] = spent.get(step, 0.0) + elapsed
        if getattr(trainer, "_perf_refresh_in_readout", None) is not None:
            trainer._perf_refresh_in_readout += elapsed

    group.refresh = timed


def build_trainer(variant: Variant, width: str, out: str, batch: int, seq_len: int, steps: int):
    trainer = variant.build(width, os.path.join(out, variant.name.replace(" ", "_")), batch, seq_len, steps)
    if variant.diagnostics is False:
        set_diagnostics(trainer, False)
    elif hasattr(trainer, "regularizer_diagnostics"):
        _time_diagnostics(trainer)
    _time_allora_refresh(trainer)
    # the logs are computed every step (with the diagnostics), but not printed: printing costs what the terminal costs
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


# ---- GARDO (its own trainer: an RL epoch is a rollout, then `_train_on`, the optimisation phase that is timed) ----

GARDO_WIDTHS = {"small": 8, "real": 16, "tiny": 4}  # the testbed's head dim (4 heads); 16 is the testbed's default
GARDO_SIZES = {"4x16": (2, 4), "16x64": (4, 8)}  # (prompts, generations): 8 and 32 images per batch
GARDO_GATE = 0.125  # fraction of the batch that gets the KL when gated: 1 of 8, 4 of 32


def build_gardo(mode: str, width: str, size: str, out: str, testbed_cache: dict):
    import copy

    from regtune.diffusion import GARDOConfig, GARDOTrainer
    from regtune.diffusion.testbed import TestbedConfig, build_testbed

    head_dim = GARDO_WIDTHS[width]
    if head_dim not in testbed_cache:  # random weights (no pretraining): the cost does not depend on them
        config = TestbedConfig(pretrain_steps=0, classifier_steps=0, width=head_dim, cache_dir=None)
        testbed_cache[head_dim] = build_testbed(config, log=lambda *a, **k: None)
    bed = dict(testbed_cache[head_dim])
    bed.pop("info", None)
    denoiser = copy.deepcopy(bed.pop("denoiser"))
    prompts, generations = GARDO_SIZES[size]
    kw = (
        dict(kl_mode="gated", gate_init=GARDO_GATE, gate_min=GARDO_GATE, gate_max=GARDO_GATE, adaptive_gate=False,
             gate_fraction_of="batch")
        if mode == "gated"
        else dict(kl_mode="all")
    )  # fmt: skip
    # the process's accelerate state (the Trainer variants made it before): GARDO refuses another precision
    from accelerate import Accelerator

    accelerator = Accelerator()
    config = GARDOConfig(
        output_dir=os.path.join(out, f"gardo_{mode}"), prompts_per_epoch=prompts, num_generations=generations,
        num_inference_steps=8, lora_r=4, lora_alpha=8, eval_every=0, resume=False, ref_kl_threshold=None,
        ref_refresh_every=None, mixed_precision=accelerator.mixed_precision, **kw,
    )  # fmt: skip
    return GARDOTrainer(config, denoiser=denoiser, accelerator=accelerator, **bed)
