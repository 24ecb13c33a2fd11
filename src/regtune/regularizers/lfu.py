"""LfU's consistency regularization against undesirable updates, as a step-owning regularizer."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch import nn

from regtune.functional.lfu import hidden_state_consistency, response_token_mask, sam_perturbation, steer_hidden

from .base import Regularizer


logger = logging.getLogger(__name__)

LFU_MODES = ("perturb", "reps")
SECOND_BATCH_SOURCES = ("train", "dataset", "same")
DEFAULT_BETA = {"perturb": 5.0, "reps": 0.1}
"""The official run scripts' consistency weights (Llama-3.1-8B, LoRA r=8)."""

# inputs of a causal-LM batch that the backbone (the model without its LM head) does not take
_HEAD_ONLY_KEYS = ("labels", "shift_labels", "num_items_in_batch", "completion_mask", "assistant_masks")


def check_lfu_arguments(
    mode: str,
    alpha: float,
    beta: float | None,
    start_layer: int,
    end_layer: int | None,
    second_batch: str,
    reps_lr_weight: float,
    prefix: str = "",
) -> None:
    """Validate LfU's knobs; errors name the field (`prefix` + name, e.g. `lfu_mode`) and the allowed values."""
    if mode not in LFU_MODES:
        raise ValueError(f"`{prefix}mode` must be one of {list(LFU_MODES)}, got {mode!r}.")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"`{prefix}alpha` must be a number > 0, got {alpha!r}.")
    if beta is not None and not (isinstance(beta, (int, float)) and beta >= 0):
        raise ValueError(f"`{prefix}beta` must be a number >= 0 (or None for the mode's default), got {beta!r}.")
    if not (isinstance(start_layer, int) and start_layer >= 0):
        raise ValueError(f"`{prefix}start_layer` must be an int >= 0 (0 = the embedding output), got {start_layer!r}.")
    if end_layer is not None and not (isinstance(end_layer, int) and end_layer > start_layer):
        raise ValueError(
            f"`{prefix}end_layer` must be None (through the last block) or an int > `{prefix}start_layer` "
            f"({start_layer}), got {end_layer!r}."
        )
    if second_batch not in SECOND_BATCH_SOURCES:
        raise ValueError(f"`{prefix}second_batch` must be one of {list(SECOND_BATCH_SOURCES)}, got {second_batch!r}.")
    if not (isinstance(reps_lr_weight, (int, float)) and reps_lr_weight > 0):
        raise ValueError(f"`{prefix}reps_lr_weight` must be a number > 0, got {reps_lr_weight!r}.")


def find_decoder_blocks(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """
    Return `(backbone, blocks)` of a causal LM (a `PeftModel` or a `PreTrainedModel`): the model without its LM head
    (`model.base_model` in transformers' sense, e.g. `LlamaModel`) and its list of decoder blocks (the
    `nn.ModuleList` with `num_hidden_layers` entries, e.g. `model.layers` or GPT-2's `h`).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, "base_model", base)
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = getattr(text_config, "num_hidden_layers", None)
    candidates = [m for m in backbone.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    blocks = [m for m in candidates if num_layers is None or len(m) == num_layers]
    if not blocks:
        raise ValueError(
            f"LfU could not find the decoder blocks of {type(base).__name__}: no nn.ModuleList of "
            f"`num_hidden_layers` ({num_layers}) modules under {type(backbone).__name__}."
        )
    return backbone, blocks[0]


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_output(output: Any, fn) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    raise TypeError(f"LfU cannot read a decoder block's output of type {type(output).__name__}")


def _first(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@contextlib.contextmanager
def block_hooks(
    backbone: nn.Module,
    blocks: nn.ModuleList,
    layers: range | None = None,
    directions: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> Iterator[list[torch.Tensor]]:
    """
    Within the context, collect the hidden states `layers` of every forward of `backbone` into the yielded list, and,
    when `directions` (`(num_blocks, hidden)`) is given, steer every block's output with [`steer_hidden`] (the
    collected states are the steered ones). The hooks are removed on exit.

    The states are those of transformers' `output_hidden_states`: 0 = the input of the first block (the embeddings),
    l = the output of block l, and the last one the backbone's `last_hidden_state` (after the final norm).
    """
    states: list[torch.Tensor] = []
    handles = []
    wanted = set(layers) if layers is not None else set()
    try:
        if 0 in wanted:
            handles.append(
                blocks[0].register_forward_pre_hook(
                    lambda module, args, kwargs: states.append(_block_input(args, kwargs)), with_kwargs=True
                )
            )
        last = len(blocks)
        for index, block in enumerate(blocks):
            steer = directions is not None
            tap = index + 1 in wanted and index + 1 != last
            if not (steer or tap):
                continue

            def hook(module, args, output, index=index, steer=steer, tap=tap):
                if steer:
                    output = _replace_output(output, lambda h: steer_hidden(h, directions[index], alpha))
                if tap:
                    states.append(_first(output))
                return output

            handles.append(block.register_forward_hook(hook))
        if last in wanted:
            handles.append(
                backbone.register_forward_hook(
                    lambda module, args, output: states.append(
                        output.last_hidden_state if hasattr(output, "last_hidden_state") else _first(output)
                    )
                )
            )
        yield states
    finally:
        for handle in handles:
            handle.remove()


class LfURegularizer(Regularizer):
    """
    LfU, "Learning from the Undesirable: Robust Adaptation of Language Models without Forgetting"
    ([paper](https://huggingface.co/papers/2511.13052), [code](https://github.com/yunpal/LfU)): keep the hidden
    states of the training batch consistent under an update that *increases* the loss, so fine-tuning moves towards
    regions where such updates change little.

    Per training micro-batch `x` (`mode="perturb"`, the paper's LoRA mode):

    1. `L_sft(x)` and the clean hidden states `h_l(x)` (one forward; the task loss is the host trainer's own
       `compute_loss`, so trl's SFT loss, `num_items_in_batch` and metrics are unchanged); its gradient is taken.
    2. `g = grad L_sft(x')` for a second batch `x'` (another batch of the train set, a separate data set, or `x`
       itself), then `theta~ = theta + alpha * g / ||g||_2` on every trainable parameter (one global norm).
    3. `h~_l(x)` under `theta~` (the backbone only, no LM head), `L_cons = mean_l MSE(h~_l, stopgrad(h_l))` on the
       response tokens (labels != -100) of the layers in `[start_layer, end_layer)`, and its gradient -- taken while
       the parameters are perturbed, so the backward sees exactly the perturbed forward (also under gradient
       checkpointing).
    4. The parameters are restored from a copy (bit for bit), and `grad L_sft + beta * grad L_cons` is added to
       `.grad`.

    With `second_batch="same"` the gradient of step 1 is also `g`: 2 forwards + 2 backwards instead of 3 + 3.

    `mode="reps"` (RepS) replaces the parameter perturbation by one steering vector `d_l` per decoder block, applied
    to the block's output as `normalize(normalize(h) + alpha * normalize(d_l)) * ||h||`. The vectors are trained by
    their own Adam (lr = the trainer's learning rate x `reps_lr_weight`) to *maximize* `L_sft(x')`, one step per
    optimizer step; `L_cons` compares the steered and clean states of the *same* batch `x` (the paper's description;
    the released code pairs the clean states of `x` with the steered states of `x'`, which we treat as a quirk), with
    the gradient through the steered branch as in perturb mode.

    Semantics (tested):

    - **Gradient accumulation / DDP**: the perturbation (and RepS' ascent gradient) is per micro-batch and per
      process, as in the released code; the parameter gradient of every micro-batch is scaled like the Trainer's
      loss, and under DDP all-reduced (mean) once per optimizer step. So 2 processes x 1 micro-batch = 1 process x 2
      accumulated micro-batches, bit for bit up to float summation order. The steering vectors' gradient is
      all-reduced the same way, so every process holds the same vectors.
    - **Second batch**: `x'` is drawn (uniformly, with replacement) from a generator seeded by `(seed,
      global_step, micro-batch, process)`, so a resumed run draws the same batches.
    - **Resume**: the steering vectors and their optimizer state are in the checkpoint.

    Works with LoRA and ALLoRA adapters and full fine-tuning of a causal LM (the backbone must have a list of
    decoder blocks). Not supported: DeepSpeed, FSDP, DataParallel, reentrant gradient checkpointing (each raises a
    `ValueError` saying so).

    Args:
        mode (`str`, defaults to `"perturb"`): `"perturb"` or `"reps"`.
        alpha (`float`, defaults to `0.1`): ascent step size (perturb) or steering strength (reps).
        beta (`float`, *optional*): consistency weight; defaults to 5.0 (perturb) / 0.1 (reps), the paper's.
        start_layer (`int`, defaults to `0`), end_layer (`int`, *optional*): hidden states compared, as a slice of
            `(embeddings, block 1, ..., block L)`; the default is all of them.
        second_batch (`str`, defaults to `"train"`): `"train"` (another batch of the train set), `"dataset"` (from
            `second_dataset`) or `"same"` (x' = x).
        second_dataset (`datasets.Dataset`, *optional*): rows in the train set's processed format (required with
            `second_batch="dataset"`).
        reps_lr_weight (`float`, defaults to `1.0`): the steering optimizer's learning rate, as a multiple of the
            trainer's.
        seed (`int`, *optional*): seed of the second-batch draws and the steering vectors' init (default: the
            trainer's `args.seed`).
    """

    name = "lfu"
    owns_step = True

    def __init__(
        self,
        mode: str = "perturb",
        alpha: float = 0.1,
        beta: float | None = None,
        start_layer: int = 0,
        end_layer: int | None = None,
        second_batch: str = "train",
        second_dataset=None,
        reps_lr_weight: float = 1.0,
        seed: int | None = None,
    ):
        check_lfu_arguments(mode, alpha, beta, start_layer, end_layer, second_batch, reps_lr_weight)
        if second_batch == "dataset" and second_dataset is None:
            raise ValueError('`second_batch="dataset"` needs a `second_dataset`.')
        self.mode = mode
        self.alpha = float(alpha)
        self.beta = float(DEFAULT_BETA[mode] if beta is None else beta)
        self.start_layer = start_layer
        self.end_layer = end_layer
        self.second_batch = second_batch
        self.second_dataset = second_dataset
        self.reps_lr_weight = float(reps_lr_weight)
        self.seed = seed
        self.directions: torch.Tensor | None = None
        self.direction_optimizer: torch.optim.Optimizer | None = None
        self._micro_batch = 0
        self._pending_state: dict | None = None

    def __repr__(self) -> str:
        return (
            f"LfURegularizer(mode={self.mode!r}, alpha={self.alpha}, beta={self.beta}, "
            f"layers=[{self.start_layer}:{self.end_layer}], second_batch={self.second_batch!r})"
        )

    # ---- setup ----

    def setup(self, trainer) -> None:
        args = trainer.args
        kind = trainer.accelerator.distributed_type
        if kind in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
            raise ValueError(f"LfU does not support {kind.value}: it takes parameter gradients with torch.autograd.")
        if args.n_gpu > 1:
            raise ValueError("LfU does not support DataParallel (n_gpu > 1); launch one process per GPU instead.")
        checkpointing = getattr(args, "activation_checkpointing", None)  # transformers >= 5.x renamed the field
        if checkpointing is None:
            checkpointing = args.gradient_checkpointing
        checkpointing_kwargs = getattr(args, "activation_checkpointing_kwargs", None)
        if checkpointing_kwargs is None:
            checkpointing_kwargs = getattr(args, "gradient_checkpointing_kwargs", None)
        if checkpointing and (checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "LfU needs non-reentrant gradient checkpointing (it calls torch.autograd.grad): set "
                "`gradient_checkpointing_kwargs={'use_reentrant': False}`."
            )
        self._seed = args.seed if self.seed is None else self.seed
        self._world_size = trainer.accelerator.num_processes
        self._rank = trainer.accelerator.process_index
        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        self._model = model
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._backbone, self._blocks = find_decoder_blocks(model)
        num_states = len(self._blocks) + 1
        end = num_states if self.end_layer is None else self.end_layer
        if self.start_layer >= num_states or end > num_states:
            raise ValueError(
                f"LfU layer range [{self.start_layer}, {self.end_layer}) is outside the model's {num_states} hidden "
                f"states (0 = embeddings, 1..{num_states - 1} = blocks)."
            )
        self._layers = range(self.start_layer, end)
        self._micro_batch = 0

        if self.second_batch != "same":
            dataset = self.second_dataset if self.second_batch == "dataset" else trainer.train_dataset
            if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
                raise ValueError(
                    "LfU draws the second batch by index: the train / second dataset must be a map-style dataset "
                    f"(got {type(dataset).__name__}); use `second_batch='same'` with an IterableDataset."
                )
            if getattr(args, "remove_unused_columns", False) and hasattr(trainer, "_remove_unused_columns"):
                dataset = trainer._remove_unused_columns(dataset, description="LfU second batch")
            self._dataset = dataset

        if self.mode == "reps":
            hidden = self._blocks_hidden_size(model)
            generator = torch.Generator().manual_seed(self._seed)
            device = self._params[0].device if self._params else torch.device("cpu")
            directions = torch.randn(len(self._blocks), hidden, generator=generator).to(device)
            self.directions = nn.Parameter(directions)
            self.direction_optimizer = torch.optim.Adam([self.directions], lr=args.learning_rate * self.reps_lr_weight)

    @staticmethod
    def _blocks_hidden_size(model: nn.Module) -> int:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        for key in ("hidden_size", "n_embd", "d_model"):
            if getattr(config, key, None):
                return int(getattr(config, key))
        raise ValueError(f"LfU reps mode could not read the hidden size of {type(base).__name__}'s config.")

    # ---- pieces of a step ----

    def _draw_second_batch(self, trainer) -> dict[str, Any]:
        stream = self._micro_batch * self._world_size + self._rank
        generator = torch.Generator().manual_seed(hash((self._seed, trainer.state.global_step, stream)) % (2**62))
        size = trainer.args.per_device_train_batch_size
        indices = torch.randint(len(self._dataset), (size,), generator=generator).tolist()
        batch = trainer.data_collator([self._dataset[i] for i in indices])
        return trainer._prepare_inputs(batch)

    def _lm_loss(self, trainer, batch: dict[str, Any]) -> torch.Tensor:
        """The model's own mean token loss on `batch` (trl's fused LM head when the trainer installed it)."""
        model = self._model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        kwargs = {k: v for k, v in batch.items() if k not in ("completion_mask", "assistant_masks")}
        if getattr(getattr(base.forward, "__func__", None), "__name__", "") == "_fused_forward":
            kwargs["fused_lm_head"] = True
        with trainer.compute_loss_context_manager():
            return model(**kwargs, use_cache=False).loss

    def _backbone_states(self, trainer, inputs: dict[str, Any], directions=None) -> list[torch.Tensor]:
        kwargs = {k: v for k, v in inputs.items() if k not in _HEAD_ONLY_KEYS}
        hooks = block_hooks(self._backbone, self._blocks, self._layers, directions, self.alpha)
        with trainer.compute_loss_context_manager(), hooks as states:
            self._backbone(**kwargs, use_cache=False)
        return list(states)

    def _grads(self, loss: torch.Tensor, inputs: list[torch.Tensor], retain_graph: bool = False) -> list:
        return list(torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=retain_graph))

    def _scaled(self, trainer, loss: torch.Tensor) -> torch.Tensor:
        scaler = getattr(trainer.accelerator, "scaler", None)
        return scaler.scale(loss) if scaler is not None else loss

    # ---- the step ----

    def training_step(self, trainer, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        params = self._params
        ga_steps = trainer._regtune_ga_steps()
        task_scale = 1.0 if trainer.loss_is_scaled_for_ga_now(num_items_in_batch) else 1.0 / ga_steps
        term_scale = 1.0 / ga_steps
        if "labels" not in inputs:
            raise ValueError("LfU compares hidden states on the response tokens: the batch needs `labels`.")
        mask = response_token_mask(inputs["labels"])

        ascent_grads = None
        steer_loss = None
        if self.mode == "reps" and self.second_batch != "same":
            steer_loss = self._steering_step(trainer, self._draw_second_batch(trainer), task_scale)
        elif self.mode == "perturb" and self.second_batch != "same":
            ascent_grads = self._grads(self._lm_loss(trainer, self._draw_second_batch(trainer)), params)

        # 1. clean forward: the host's task loss (and the other regularizers' terms), and the clean hidden states
        with block_hooks(self._backbone, self._blocks, self._layers) as captured:
            with trainer.compute_loss_context_manager():
                task_loss = trainer.compute_loss(self._model, inputs, num_items_in_batch=num_items_in_batch)
        clean = [h.detach() for h in captured]
        del captured
        task_loss = task_loss * task_scale
        grads = self._grads(self._scaled(trainer, task_loss), params)
        if ascent_grads is None and self.mode == "perturb":
            ascent_grads = grads  # x' = x: the task gradient is the ascent direction (its scale is normalized away)

        if self.mode == "perturb":
            present = [i for i, g in enumerate(ascent_grads) if g is not None]
            moved = [params[i] for i in present]
            saved = [p.detach().clone() for p in moved]
            with torch.no_grad():
                torch._foreach_add_(moved, sam_perturbation([ascent_grads[i] for i in present], self.alpha))
            try:
                perturbed = self._backbone_states(trainer, inputs)
                consistency = hidden_state_consistency(perturbed, clean, mask)
                term = self.beta * term_scale * consistency
                cons_grads = self._grads(self._scaled(trainer, term), params)  # while perturbed: exact backward
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(moved, saved)
        else:
            if self.second_batch == "same":
                # x' = x: one steered forward through the LM head gives both the loss the vectors ascend and h~
                with block_hooks(self._backbone, self._blocks, self._layers, self.directions, self.alpha) as captured:
                    steered_loss = self._lm_loss(trainer, inputs)
                steered = list(captured)
                del captured
                steer_loss = self._ascend_directions(steered_loss, task_scale, retain_graph=True)
            else:
                steered = self._backbone_states(trainer, inputs, self.directions.detach())
            consistency = hidden_state_consistency(steered, clean, mask)
            term = self.beta * term_scale * consistency
            cons_grads = self._grads(self._scaled(trainer, term), params)

        self._accumulate(params, grads, cons_grads)
        self._log(trainer, consistency, steer_loss)
        self._micro_batch += 1
        if trainer.accelerator.sync_gradients:
            self._micro_batch = 0
            if self._world_size > 1:
                self._all_reduce_mean(params)
            if self.mode == "reps":
                self._step_directions()
        return (task_loss + term).detach()

    def _steering_step(self, trainer, batch: dict[str, Any], task_scale: float) -> torch.Tensor:
        """Accumulate the gradient that *raises* `L_sft(x'; d)` into the steering vectors (no parameter gradient)."""
        with block_hooks(self._backbone, self._blocks, None, self.directions, self.alpha):
            loss = self._lm_loss(trainer, batch)
        return self._ascend_directions(loss, task_scale)

    def _ascend_directions(self, loss: torch.Tensor, task_scale: float, retain_graph: bool = False) -> torch.Tensor:
        """Accumulate the gradient of `-loss` (scaled like the task loss) into the steering vectors."""
        (grad,) = torch.autograd.grad(-loss * task_scale, [self.directions], retain_graph=retain_graph)
        if self.directions.grad is None:
            self.directions.grad = grad
        else:
            self.directions.grad += grad
        return loss.detach()

    def _step_directions(self) -> None:
        if self.directions.grad is None:
            return
        if self._world_size > 1:
            dist.all_reduce(self.directions.grad)
            self.directions.grad /= self._world_size
        self.direction_optimizer.step()
        self.direction_optimizer.zero_grad(set_to_none=True)

    @staticmethod
    def _accumulate(params: list[torch.Tensor], grads: list, cons_grads: list) -> None:
        """Add `grads + cons_grads` (either may hold `None`s) to the parameters' `.grad`, with foreach ops."""
        totals = {i: g for i, g in enumerate(grads) if g is not None}
        both = [i for i, c in enumerate(cons_grads) if c is not None and i in totals]
        if both:
            torch._foreach_add_([totals[i] for i in both], [cons_grads[i] for i in both])
        totals.update({i: c for i, c in enumerate(cons_grads) if c is not None and i not in totals})
        existing = [i for i in totals if params[i].grad is not None]
        if existing:
            torch._foreach_add_([params[i].grad for i in existing], [totals[i] for i in existing])
        for i in totals.keys() - set(existing):
            params[i].grad = totals[i].to(params[i].dtype)

    def _all_reduce_mean(self, params: list[torch.Tensor]) -> None:
        # every process must reduce the same tensors: give the trainable parameters without a gradient a zero one
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self._world_size
        for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    def _log(self, trainer, consistency: torch.Tensor, steer_loss: torch.Tensor | None) -> None:
        metrics = getattr(trainer, "_metrics", None)  # trl trainers average and log these with the loss
        if metrics is None:
            return
        metrics["train"]["lfu/consistency"].append(consistency.detach().item())
        if steer_loss is not None:
            metrics["train"]["lfu/steered_loss"].append(steer_loss.item())

    # ---- checkpoints ----

    def state_dict(self) -> dict:
        state = {"mode": self.mode, "alpha": self.alpha, "beta": self.beta}
        if self.directions is not None:
            state["directions"] = self.directions.detach().cpu().clone()
            state["direction_optimizer"] = self.direction_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(
                f"The checkpoint was trained with LfU mode {state['mode']!r}, this run uses {self.mode!r}."
            )
        if "directions" in state and self.directions is not None:
            with torch.no_grad():
                self.directions.copy_(state["directions"].to(self.directions.device))
            self.direction_optimizer.load_state_dict(state["direction_optimizer"])
