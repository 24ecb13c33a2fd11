"""LfU's consistency regularization against undesirable updates, as a step-owning regularizer."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch import nn

from regtune._rng import RNGState, capture_rng, replayed_rng
from regtune._sharding import has_sharded_parameters
from regtune.functional._checks import is_int, is_real, raise_field_errors
from regtune.functional.lfu import (
    hidden_state_consistency,
    released_reps_target,
    response_token_mask,
    sam_perturbation,
    steer_hidden,
)

from .base import Regularizer


logger = logging.getLogger(__name__)

LFU_MODES = ("perturb", "reps")
SECOND_BATCH_SOURCES = ("train", "dataset", "same")
REPS_SITES = ("mlp", "block")
REPS_PAIRINGS = ("released", "steered_x")
"""RepS consistency pairings: `"released"` (the clean states of x, with gradient, against the steered states of x',
detached: yunpal/LfU's trainer) or `"steered_x"` (the steered states of x, with gradient, against the clean states of
x, detached: perturb mode's pairing)."""
REPS_VECTOR_GRADS = ("last", "accumulate")
"""How the steering vectors' gradient is gathered over an accumulation cycle: `"last"` (each micro-batch replaces it,
so the last micro-batch's is the one Adam sees: the released code's `param.grad = grad`) or `"accumulate"` (summed,
scaled like the task loss: the mean over the micro-batches)."""
REPS_VECTOR_DTYPES = ("hidden", "float32")
"""The steering vectors' dtype: `"hidden"` (that of the hidden states, i.e. of the model's input embeddings: the
released code's `torch.randn_like(hidden_state)`; bf16 for a model loaded in bf16) or `"float32"`."""
DEFAULT_BETA = {"perturb": 5.0, "reps": 0.1}
"""The official run scripts' consistency weights (Llama-3.1-8B, LoRA r=8)."""

MLP_KEYWORDS = ("mlp", "feedforward", "feed_forward", "ffn")
"""A decoder block's MLP is its first submodule whose name contains one of these (and not "norm")."""

DIAGNOSTICS_BUDGET = 0.015
"""The ascent-gain diagnostic's extra forwards cost at most this fraction of the training passes, plus one measurement
(so under 2% over any run of more than ~70 micro-batches; gradient checkpointing makes the passes dearer still)."""

# inputs of a causal-LM batch that the backbone (the model without its LM head) does not take
_HEAD_ONLY_KEYS = ("labels", "shift_labels", "num_items_in_batch", "completion_mask", "assistant_masks")
# cost of a micro-batch's passes in forward-equivalents (a backward = 2 forwards), by (mode, second batch is x);
# reps with the released pairing: 2 forwards + 2 backwards, whatever x' is
_STEP_COST = {("perturb", False): 9.0, ("perturb", True): 6.0, ("reps", False): 9.0, ("reps", True): 8.0}
_RELEASED_REPS_COST = 6.0


def _real(value: Any) -> bool:
    """A finite real number (not a bool); an int too large for a float is not."""
    try:
        return is_real(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class LfUSettings:
    """
    LfU's knobs ([paper](https://huggingface.co/papers/2511.13052)), defined and validated once, at construction.
    [`LfUConfig`] holds them as `lfu_<field>` and [`LfURegularizer`] as attributes; docs/lfu.md describes what each
    does.

    Args:
        mode (`str`, defaults to `"perturb"`): `"perturb"` (a normalized gradient-ascent step on the trainable
            parameters, the paper's LoRA mode) or `"reps"` (learned steering vectors, one per decoder block).
        alpha (`float`, defaults to `0.1`): ascent step length (perturb) or steering strength (reps); finite, > 0.
        beta (`float`, *optional*): consistency weight, finite, >= 0; `None` takes the mode's default (5.0 perturb,
            0.1 reps: the paper's run scripts).
        start_layer (`int`, defaults to `0`), end_layer (`int`, *optional*): the hidden states compared, as a slice
            `[start, end)` of `(embeddings, block 1, ..., block L)`; the default is all of them.
        second_batch (`str`, defaults to `"train"`): where the ascent batch `x'` comes from: `"train"` (another batch
            of the train set), `"dataset"` (a separate data set) or `"same"` (`x' = x`).
        reps_lr_weight (`float`, defaults to `1.0`): the steering vectors' learning rate as a multiple of the
            trainer's (reps mode); finite, > 0.
        reps_site (`str`, defaults to `"mlp"`): where a steering vector acts (reps mode): `"mlp"`, the output of each
            block's MLP before it is added to the residual stream (the released code's site), or `"block"`, the
            output of each decoder block.
        reps_pairing (`str`, defaults to `"released"`): which hidden states `L_cons` compares in reps mode, and
            which side carries the gradient: `"released"` (the released trainer's: the clean states of `x`, with
            gradient, against the steered states of the ascent batch `x'`, detached, laid onto `x`'s positions by
            [`released_reps_target`]) or `"steered_x"` (the steered states of `x`, with gradient, against the clean
            states of `x`, detached: perturb mode's pairing).
        reps_vector_grad (`str`, defaults to `"last"`): how the steering vectors' gradient is gathered over the
            micro-batches of an optimizer step (reps mode): `"last"` (each micro-batch replaces it, so Adam steps on
            the last one's: the released code) or `"accumulate"` (the mean over the micro-batches).
        reps_vector_dtype (`str`, defaults to `"hidden"`): the steering vectors' dtype (reps mode): `"hidden"` (the
            hidden states' dtype, i.e. the input embeddings': the released code's; bf16 for a model loaded in bf16,
            where Adam's steps of ~lr mostly round away) or `"float32"`.
        share_dropout_masks (`bool`, defaults to `True`): whether the perturbed (steered) forward of `x` draws the
            same dropout masks as the clean forward, so that `L_cons` measures the undesirable update only and not
            dropout noise. `False` draws fresh masks (what the released code does; its models have no dropout).
        log_diagnostics (`bool`, defaults to `True`): log the mechanism's diagnostics (`lfu/cons_to_sft`,
            `lfu/ascent_gain`, ...) with the Trainer's metrics.

    Raises:
        `ValueError`: naming every invalid field and its allowed values.
    """

    mode: str = field(default="perturb", metadata={"help": "LfU mode: 'perturb' or 'reps'."})
    alpha: float = field(
        default=0.1, metadata={"help": "Ascent step (perturb) or steering strength (reps): a finite number > 0."}
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "Consistency weight, a finite number >= 0; default 5.0 (perturb) or 0.1 (reps)."},
    )
    start_layer: int = field(default=0, metadata={"help": "First hidden state compared (0 = embeddings)."})
    end_layer: int | None = field(
        default=None, metadata={"help": "End (exclusive) of the hidden states compared; default: all."}
    )
    second_batch: str = field(
        default="train", metadata={"help": "Source of the ascent batch x': 'train', 'dataset' or 'same'."}
    )
    reps_lr_weight: float = field(
        default=1.0, metadata={"help": "Steering vectors' learning rate as a multiple of learning_rate (reps)."}
    )
    reps_site: str = field(
        default="mlp",
        metadata={"help": "Where a steering vector acts (reps): 'mlp' (each block's MLP output) or 'block'."},
    )
    reps_pairing: str = field(
        default="released",
        metadata={
            "help": "RepS consistency pairing: 'released' (clean states of x, with gradient, against the detached "
            "steered states of x') or 'steered_x' (steered states of x, with gradient, against the clean ones)."
        },
    )
    reps_vector_grad: str = field(
        default="last",
        metadata={
            "help": "Steering vectors' gradient over an accumulation cycle (reps): 'last' (the last micro-batch's, "
            "as released) or 'accumulate' (the mean over the micro-batches)."
        },
    )
    reps_vector_dtype: str = field(
        default="hidden",
        metadata={"help": "Steering vectors' dtype (reps): 'hidden' (the hidden states', as released) or 'float32'."},
    )
    share_dropout_masks: bool = field(
        default=True,
        metadata={"help": "Whether the perturbed forward of x reuses the clean forward's dropout masks."},
    )
    log_diagnostics: bool = field(
        default=True, metadata={"help": "Log LfU's diagnostics (lfu/cons_to_sft, lfu/ascent_gain, ...)."}
    )

    def __post_init__(self):
        raise_field_errors("LfUSettings", self.field_errors(dataclasses.asdict(self)))
        for name in ("alpha", "beta", "reps_lr_weight"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))
        for name in ("start_layer", "end_layer"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int(value))

    @staticmethod
    def field_errors(values: dict[str, Any], prefix: str = "") -> list[str]:
        """
        The validation errors of `values` (a mapping field -> value; absent fields are not checked), each naming the
        field as `prefix + field` (e.g. `lfu_alpha` for [`LfUConfig`]) and its allowed values.
        """

        def choice(allowed):
            return lambda v: isinstance(v, str) and v in allowed, f"one of {list(allowed)}"

        checks = {
            "mode": choice(LFU_MODES),
            "alpha": (lambda v: _real(v) and v > 0, "a finite number > 0"),
            "beta": (
                lambda v: v is None or (_real(v) and v >= 0),
                "a finite number >= 0, or None for the mode's default (5.0 perturb, 0.1 reps)",
            ),
            "start_layer": (lambda v: is_int(v) and v >= 0, "an int >= 0 (0 = the embedding output)"),
            "end_layer": (
                lambda v: v is None or (is_int(v) and v >= 1),
                f"None (through the last hidden state) or an int > `{prefix}start_layer`",
            ),
            "second_batch": choice(SECOND_BATCH_SOURCES),
            "reps_lr_weight": (lambda v: _real(v) and v > 0, "a finite number > 0"),
            "reps_site": choice(REPS_SITES),
            "reps_pairing": choice(REPS_PAIRINGS),
            "reps_vector_grad": choice(REPS_VECTOR_GRADS),
            "reps_vector_dtype": choice(REPS_VECTOR_DTYPES),
            "share_dropout_masks": (lambda v: isinstance(v, bool), "True or False"),
            "log_diagnostics": (lambda v: isinstance(v, bool), "True or False"),
        }
        errors = []
        for key, (ok, allowed) in checks.items():
            if key in values and not ok(values[key]):
                errors.append(f"`{prefix}{key}` must be {allowed}, got {values[key]!r}")
        start, end = values.get("start_layer", 0), values.get("end_layer")
        if is_int(start) and start >= 0 and is_int(end) and end >= 1 and end <= start:
            errors.append(
                f"`{prefix}end_layer` must be None (through the last hidden state) or an int > `{prefix}start_layer` "
                f"({start}), got {end!r}"
            )
        return errors

    @property
    def effective_beta(self) -> float:
        """`beta`, or the mode's default when it is unset."""
        return DEFAULT_BETA[self.mode] if self.beta is None else self.beta


SETTINGS_FIELDS = tuple(f.name for f in dataclasses.fields(LfUSettings))


def settings_field(name: str):
    """A `dataclasses.field` for `LfUSettings.<name>` in another config class (default and help defined once)."""
    source = next(f for f in dataclasses.fields(LfUSettings) if f.name == name)
    return field(default=source.default, metadata={"help": source.metadata["help"]})


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


def find_mlp(block: nn.Module) -> nn.Module:
    """
    The MLP of a decoder block, as the released code finds it: the first submodule (in `named_modules` order) whose
    name contains one of [`MLP_KEYWORDS`] -- skipping names with "norm", so that e.g. an `ffn_norm` is not taken.
    """
    for name, module in block.named_modules():
        lowered = name.lower()
        if name and "norm" not in lowered and any(key in lowered for key in MLP_KEYWORDS):
            return module
    raise ValueError(
        f"LfU reps mode could not find the MLP of a {type(block).__name__} (no submodule named like {list(MLP_KEYWORDS)})"
        "; set `reps_site='block'` (`lfu_reps_site='block'`) to steer each block's output instead."
    )


def steering_sites(blocks: nn.ModuleList, site: str) -> list[nn.Module]:
    """The module whose output each steering vector acts on: every block's MLP (`"mlp"`) or every block (`"block"`)."""
    if site not in REPS_SITES:
        raise ValueError(f"`site` must be one of {list(REPS_SITES)}, got {site!r}")
    return list(blocks) if site == "block" else [find_mlp(block) for block in blocks]


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_output(output: Any, fn) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    raise TypeError(f"LfU cannot read a module output of type {type(output).__name__}")


def _first(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@contextlib.contextmanager
def block_hooks(
    backbone: nn.Module,
    blocks: nn.ModuleList,
    layers: range | None = None,
    directions: torch.Tensor | None = None,
    alpha: float = 0.0,
    site: str = "mlp",
) -> Iterator[list[torch.Tensor]]:
    """
    Within the context, collect the hidden states `layers` of every forward of `backbone` into the yielded list, and,
    when `directions` (`(num_blocks, hidden)`) is given, steer the output of every block's MLP (`site="mlp"`) or of
    every block (`site="block"`) with [`steer_hidden`] (the collected states are then the steered ones). The hooks
    are removed on exit.

    The states are those of transformers' `output_hidden_states`: 0 = the input of the first block (the embeddings),
    l = the output of block l, and the last one the backbone's `last_hidden_state` (after the final norm).
    """
    states: list[torch.Tensor] = []
    handles = []
    wanted = set(layers) if layers is not None else set()
    try:
        if directions is not None:
            for index, module in enumerate(steering_sites(blocks, site)):

                def steer(module, args, output, index=index):
                    return _replace_output(output, lambda h: steer_hidden(h, directions[index], alpha))

                handles.append(module.register_forward_hook(steer))
        if 0 in wanted:
            handles.append(
                blocks[0].register_forward_pre_hook(
                    lambda module, args, kwargs: states.append(_block_input(args, kwargs)), with_kwargs=True
                )
            )
        last = len(blocks)
        for index, block in enumerate(blocks):
            if index + 1 in wanted and index + 1 != last:
                # registered after a block-site steering hook, so it sees the steered output
                handles.append(block.register_forward_hook(lambda module, args, output: states.append(_first(output))))
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
    regions where such updates change little. docs/lfu.md describes the method, its knobs and its cost.

    Per training micro-batch `x` (`mode="perturb"`, the paper's LoRA mode):

    1. `L_sft(x)` and the clean hidden states `h_l(x)` (one forward; the task loss is the host trainer's own
       `compute_loss`, so trl's SFT loss, `num_items_in_batch` and metrics are unchanged); its gradient is taken.
    2. `g = grad L_sft(x')` for a second batch `x'` (another batch of the train set, a separate data set, or `x`
       itself), then `theta~ = theta + alpha * g / ||g||_2` on every trainable parameter (one global norm).
    3. `h~_l(x)` under `theta~` (the backbone only, no LM head, under the same Accelerate autocast as the clean
       forward and, with `share_dropout_masks`, with the clean forward's dropout masks), `L_cons = mean_l
       MSE(h~_l, stopgrad(h_l))` on the response tokens (labels != -100) of the layers in `[start_layer,
       end_layer)`, and its gradient -- taken while the parameters are perturbed, so the backward sees exactly the
       perturbed forward (also under gradient checkpointing).
    4. The parameters are restored from a copy (bit for bit), and `grad L_sft + beta * grad L_cons` is added to
       `.grad`.

    With `second_batch="same"` the gradient of step 1 is also `g`: 2 forwards + 2 backwards instead of 3 + 3.

    `mode="reps"` (RepS) replaces the parameter perturbation by one steering vector `d_l` per decoder block, applied
    to the output of the block's MLP (`reps_site="mlp"`, the released code's site) or of the whole block
    (`reps_site="block"`) as `normalize(normalize(h) + alpha * normalize(d_l)) * ||h||`. The vectors are trained by
    their own Adam (lr = the trainer's learning rate x `reps_lr_weight`) to *maximize* `L_sft(x')`, one step per
    optimizer step, on the last micro-batch's gradient (`reps_vector_grad="last"`, as released; `"accumulate"` for
    the mean), in the hidden states' dtype (`reps_vector_dtype="hidden"`, as released; or `"float32"`). By default
    (`reps_pairing="released"`, the released trainer's pairing) `L_cons` pulls the clean states of `x`, which carry the
    gradient, towards the detached steered states of `x'` from the vectors' forward (2 forwards + 2 backwards);
    `reps_pairing="steered_x"` compares the steered and clean states of the same batch `x`, with the gradient through
    the steered branch as in perturb mode.

    Diagnostics (with `log_diagnostics`, as `lfu/<key>` in the Trainer's logs; means since the last log, over all
    processes): `consistency` (`L_cons`), `cons_to_sft` (`beta * L_cons / L_sft`), `steered_loss` (reps:
    `L_sft(x'; d)`), and `ascent_gain` / `ascent_gain_abs`, how much the undesirable update raises the loss of `x'`
    (relative / in nats), measured with extra no-grad forwards that are budgeted to 1.5% of the training passes plus
    one measurement, i.e. under 2% (so not on every logging step when logging is frequent).

    Semantics (tested):

    - **Gradient accumulation / DDP**: the perturbation (and RepS' ascent gradient) is per micro-batch and per
      process, as in the released code; the parameter gradient of every micro-batch is scaled like the Trainer's
      loss, and under DDP all-reduced (mean) once per optimizer step. So 2 processes x 1 micro-batch = 1 process x 2
      accumulated micro-batches, bit for bit up to float summation order. The steering vectors' gradient is
      all-reduced the same way, so every process holds the same vectors (with `reps_vector_grad="last"` each
      process contributes its last micro-batch's, so the equality above needs `"accumulate"`).
    - **Second batch**: `x'` is drawn (uniformly, with replacement) from a generator seeded by `(seed,
      global_step, micro-batch, process)`, so a resumed run draws the same batches.
    - **Resume**: the steering vectors and their optimizer state are in the checkpoint.
    - **Diagnostics do not change training**: their forwards replay the random state, so the weights are the same
      with `log_diagnostics` on or off.

    Works with LoRA and ALLoRA adapters and full fine-tuning of a causal LM (the backbone must have a list of
    decoder blocks). Not supported: DeepSpeed, FSDP, DataParallel, reentrant gradient checkpointing (each raises a
    `ValueError` saying so).

    Args:
        settings ([`LfUSettings`], *optional*): all the knobs at once.
        **knobs: or the knobs one by one, as keyword arguments named as the fields of [`LfUSettings`] (`mode`,
            `alpha`, `beta`, `start_layer`, `end_layer`, `second_batch`, `reps_lr_weight`, `reps_site`,
            `reps_pairing`, `reps_vector_grad`, `reps_vector_dtype`, `share_dropout_masks`, `log_diagnostics`);
            validated there, every bad value reported at once.
        second_dataset (`datasets.Dataset`, *optional*): rows in the train set's processed format (required with
            `second_batch="dataset"`).
        seed (`int`, *optional*): seed of the second-batch draws and the steering vectors' init (default: the
            trainer's `args.seed`).
    """

    name = "lfu"
    owns_step = True

    def __init__(self, settings: LfUSettings | None = None, *, second_dataset=None, seed: int | None = None, **knobs):
        given = {key: value for key, value in knobs.items() if value is not None}
        unknown = sorted(set(knobs) - {f.name for f in dataclasses.fields(LfUSettings)})
        known = ", ".join(f.name for f in dataclasses.fields(LfUSettings))
        errors = [f"unknown LfU setting `{key}`; the settings are: {known}" for key in unknown]
        if settings is not None and not isinstance(settings, LfUSettings):
            errors.append(f"`settings` must be an LfUSettings or None, got {type(settings).__name__}")
        elif settings is not None and given:
            errors.append(f"pass either `settings` or individual knobs, not both (got {sorted(given)})")
        if seed is not None and not is_int(seed):
            errors.append(f"`seed` must be None or an int, got {seed!r}")
        if settings is None:
            errors += LfUSettings.field_errors({k: v for k, v in given.items() if k not in unknown})
        raise_field_errors("LfURegularizer", errors)
        settings = settings if settings is not None else LfUSettings(**given)
        if settings.second_batch == "dataset" and second_dataset is None:
            raise ValueError('LfURegularizer: `second_batch="dataset"` needs a `second_dataset`.')
        self.settings = settings
        self.mode = settings.mode
        self.alpha = settings.alpha
        self.beta = float(settings.effective_beta)
        self.start_layer = settings.start_layer
        self.end_layer = settings.end_layer
        self.second_batch = settings.second_batch
        self.reps_lr_weight = settings.reps_lr_weight
        self.reps_site = settings.reps_site
        self.reps_pairing = settings.reps_pairing
        self.reps_vector_grad = settings.reps_vector_grad
        self.reps_vector_dtype = settings.reps_vector_dtype
        self.share_dropout_masks = settings.share_dropout_masks
        self.log_diagnostics = settings.log_diagnostics
        self.second_dataset = second_dataset
        self.seed = seed
        self.directions: torch.Tensor | None = None
        self.direction_optimizer: torch.optim.Optimizer | None = None
        self._micro_batch = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._gain_budget = 0.0

    def __repr__(self) -> str:
        site = (
            f", reps_site={self.reps_site!r}, reps_pairing={self.reps_pairing!r}, "
            f"reps_vector_grad={self.reps_vector_grad!r}, reps_vector_dtype={self.reps_vector_dtype!r}"
            if self.mode == "reps"
            else ""
        )
        return (
            f"LfURegularizer(mode={self.mode!r}, alpha={self.alpha}, beta={self.beta}, "
            f"layers=[{self.start_layer}:{self.end_layer}], second_batch={self.second_batch!r}{site}, "
            f"share_dropout_masks={self.share_dropout_masks})"
        )

    # ---- setup ----

    def setup(self, trainer) -> None:
        args = trainer.args
        kind = trainer.accelerator.distributed_type
        sharded = has_sharded_parameters(trainer.accelerator.unwrap_model(trainer.model_wrapped))
        if kind in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM) or sharded:
            what = kind.value if not sharded else "FSDP2 (the model's parameters are sharded DTensors)"
            raise ValueError(
                f"LfU does not support {what}: each process perturbs the trainable parameters by its own ascent step "
                "and takes their gradients with torch.autograd.grad, so every process must hold the whole parameters "
                "and their gradients (FSDP and ZeRO-3 shard the parameters, the DeepSpeed engine owns the gradients). "
                "Use DDP (configs/accelerate/ddp.yaml); see docs/distributed.md."
            )
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
        self._device = self._params[0].device if self._params else trainer.args.device
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
        self._sums = {}
        self._reset_gain_budget()

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
            steering_sites(self._blocks, self.reps_site)  # fails early when a block has no MLP to steer
            hidden = self._blocks_hidden_size(model)
            generator = torch.Generator().manual_seed(self._seed)
            dtype = self._hidden_dtype(model) if self.reps_vector_dtype == "hidden" else torch.float32
            directions = torch.randn(len(self._blocks), hidden, generator=generator).to(self._device, dtype)
            self.directions = nn.Parameter(directions)
            if dtype != torch.float32:
                logger.info(
                    "LfU reps: the steering vectors are %s, the hidden states' dtype (as in the released code); "
                    "Adam's steps smaller than their rounding step are lost. `reps_vector_dtype='float32'` keeps "
                    "them in float32.",
                    dtype,
                )
            self.direction_optimizer = torch.optim.Adam([self.directions], lr=args.learning_rate * self.reps_lr_weight)

    @staticmethod
    def _hidden_dtype(model: nn.Module) -> torch.dtype:
        """The hidden states' dtype: that of the input embeddings (the residual stream starts there)."""
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight.dtype
        return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

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
        with trainer.accelerator.autocast(), trainer.compute_loss_context_manager():
            return model(**kwargs, use_cache=False).loss

    def _steered(self, directions: torch.Tensor | None = None, layers: range | None = None):
        """The hooks that steer with `directions` (the trained vectors by default) and collect the states `layers`."""
        directions = self.directions if directions is None else directions
        return block_hooks(self._backbone, self._blocks, layers, directions, self.alpha, self.reps_site)

    @contextlib.contextmanager
    def _backbone_pass(self, trainer, inputs: dict[str, Any], directions=None) -> Iterator[list[torch.Tensor]]:
        """
        Yield the hidden states of `inputs` from the backbone alone (no LM head), steered when `directions` is given.

        The backbone is called directly, so Accelerate's autocast (which wraps only the model's own `forward`) is
        entered here: the states are computed in the same precision as the host's clean forward. Take the gradient
        inside the context: a steering hook on an MLP runs inside a checkpointed block, so it must still be there
        when gradient checkpointing recomputes the block during the backward.
        """
        kwargs = {k: v for k, v in inputs.items() if k not in _HEAD_ONLY_KEYS}
        hooks = block_hooks(self._backbone, self._blocks, self._layers, directions, self.alpha, self.reps_site)
        with hooks as states:
            with trainer.accelerator.autocast(), trainer.compute_loss_context_manager():
                self._backbone(**kwargs, use_cache=False)
            yield list(states)

    def _grads(self, loss: torch.Tensor, inputs: list[torch.Tensor], retain_graph: bool = False) -> list:
        return list(torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=retain_graph))

    def _scaled(self, trainer, loss: torch.Tensor) -> torch.Tensor:
        scaler = getattr(trainer.accelerator, "scaler", None)
        return scaler.scale(loss) if scaler is not None else loss

    def _rng(self) -> RNGState:
        return capture_rng(self._device)

    # ---- diagnostics ----

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float().reshape(())
        if key in self._sums:
            self._sums[key] += value
        else:
            self._sums[key] = value.clone()

    def _step_cost(self) -> float:
        """A micro-batch's training passes, in forward-equivalents (a backward = 2 forwards)."""
        if self.mode == "reps" and self.reps_pairing == "released":
            return _RELEASED_REPS_COST
        return _STEP_COST[(self.mode, self.second_batch == "same")]

    def _gain_cost(self) -> float:
        """Extra no-grad forwards of one ascent-gain measurement (2 with perturb and `x' = x`, else 1)."""
        return 2.0 if (self.mode == "perturb" and self.second_batch == "same") else 1.0

    def _reset_gain_budget(self) -> None:
        # one measurement is free, so that the first logged step has one
        self._gain_budget = self._gain_cost()

    def _measure_gain_now(self, trainer) -> bool:
        """
        Whether this micro-batch measures the ascent gain: the last micro-batch of an optimizer step that will be
        logged (any, when logging is not per step), while the budget ([`DIAGNOSTICS_BUDGET`] of the training passes'
        cost, in forward-equivalents, plus one free measurement) allows.
        """
        if not self.log_diagnostics:
            return False
        self._gain_budget += DIAGNOSTICS_BUDGET * self._step_cost()
        cost = self._gain_cost()
        if not trainer.accelerator.sync_gradients or self._gain_budget < cost:
            return False
        args, state = trainer.args, trainer.state
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        if strategy == "no":
            return False
        if strategy == "steps":
            step = state.global_step + 1
            interval = state.logging_steps or args.logging_steps
            logs = (args.logging_first_step and step == 1) or (interval and step % int(max(interval, 1)) == 0)
            if not logs:
                return False
        self._gain_budget -= cost
        return True

    def _record_gain(self, clean: torch.Tensor, undesirable: torch.Tensor) -> None:
        clean, undesirable = clean.detach().float(), undesirable.detach().float()
        self._add("gain_abs", undesirable - clean)
        self._add("gain_rel", (undesirable - clean) / clean)
        self._add("gain_count", torch.ones((), device=clean.device))

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """
        The mechanism's diagnostics since the last call (then reset), averaged over the processes:

        - `consistency`: `L_cons`, the mean over the micro-batches;
        - `cons_to_sft`: `beta * L_cons / L_sft` (sums over the micro-batches of what each adds to the loss);
        - `steered_loss` (reps): `L_sft(x'; d)`, the loss the steering vectors raise;
        - `ascent_gain`, `ascent_gain_abs`: `(L(x'; undesirable) - L(x')) / L(x')` and the difference in nats, on
          the micro-batches that measured it (absent when none did since the last call).
        """
        if not self.log_diagnostics:
            return {}
        keys = ("task", "term", "consistency", "count", "steered_loss", "gain_abs", "gain_rel", "gain_count")
        device = getattr(self, "_device", torch.device("cpu"))
        zero = torch.zeros((), device=device)
        values = torch.stack([self._sums.get(key, zero).to(device) for key in keys])
        self._sums = {}
        if getattr(self, "_world_size", 1) > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)  # every process logs at the same steps, so every process gets here
        sums = dict(zip(keys, values.unbind()))
        if sums["count"] == 0:
            return {}
        out = {
            "consistency": sums["consistency"] / sums["count"],
            "cons_to_sft": sums["term"] / sums["task"],
        }
        if self.mode == "reps":
            out["steered_loss"] = sums["steered_loss"] / sums["count"]
        if sums["gain_count"] > 0:
            out["ascent_gain"] = sums["gain_rel"] / sums["gain_count"]
            out["ascent_gain_abs"] = sums["gain_abs"] / sums["gain_count"]
        return out

    # ---- the step ----

    def training_step(self, trainer, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        params = self._params
        ga_steps = trainer._regtune_ga_steps()
        task_scale = 1.0 if trainer.loss_is_scaled_for_ga_now(num_items_in_batch) else 1.0 / ga_steps
        term_scale = 1.0 / ga_steps
        if "labels" not in inputs:
            raise ValueError("LfU compares hidden states on the response tokens: the batch needs `labels`.")
        mask = response_token_mask(inputs["labels"])
        measure = self._measure_gain_now(trainer)
        if self.mode == "reps" and self.reps_pairing == "released":
            task_loss, term, consistency, steer_loss = self._released_reps_passes(
                trainer, inputs, num_items_in_batch, mask, measure, task_scale, term_scale
            )
            return self._finish_micro_batch(trainer, task_loss, term, consistency, steer_loss)
        same = self.second_batch == "same"

        # 0. the ascent batch x': its loss, and the gradient (perturb) or the vectors' ascent gradient (reps)
        second = None if same else self._draw_second_batch(trainer)
        second_rng = self._rng() if (measure and not same) else None
        ascent_grads = steer_loss = second_loss = None
        if not same and self.mode == "reps":
            steer_loss = self._steering_step(trainer, second, task_scale)
        elif not same:
            second_loss = self._lm_loss(trainer, second)
            ascent_grads = self._grads(second_loss, params)

        # 1. clean forward: the host's task loss (and the other regularizers' terms), and the clean hidden states
        clean_rng = self._rng() if (self.share_dropout_masks or (measure and same)) else None
        shared_rng = clean_rng if self.share_dropout_masks else None
        with block_hooks(self._backbone, self._blocks, self._layers) as captured:
            with trainer.compute_loss_context_manager():
                task_loss = trainer.compute_loss(self._model, inputs, num_items_in_batch=num_items_in_batch)
        clean = [h.detach() for h in captured]
        del captured
        task_loss = task_loss * task_scale
        grads = self._grads(self._scaled(trainer, task_loss), params)
        if ascent_grads is None and self.mode == "perturb":
            ascent_grads = grads  # x' = x: the task gradient is the ascent direction (its scale is normalized away)

        # 2. the undesirable forward of x, L_cons and its gradient
        undesirable = None
        if self.mode == "perturb":
            present = [i for i, g in enumerate(ascent_grads) if g is not None]
            moved = [params[i] for i in present]
            saved = [p.detach().clone() for p in moved]
            with torch.no_grad():
                torch._foreach_add_(moved, sam_perturbation([ascent_grads[i] for i in present], self.alpha))
            try:
                with replayed_rng(shared_rng), self._backbone_pass(trainer, inputs) as perturbed:
                    consistency = hidden_state_consistency(perturbed, clean, mask)
                    term = self.beta * term_scale * consistency
                    cons_grads = self._grads(self._scaled(trainer, term), params)  # while perturbed: exact backward
                del perturbed
                if measure:  # L(x'; theta~), with the masks of the pass it is compared to
                    with torch.no_grad(), replayed_rng(clean_rng if same else second_rng):
                        undesirable = self._lm_loss(trainer, inputs if same else second)
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(moved, saved)
            if measure:
                if same:
                    with torch.no_grad(), replayed_rng(clean_rng):
                        second_loss = self._lm_loss(trainer, inputs)
                self._record_gain(second_loss, undesirable)
        else:
            if same:
                # x' = x: one steered forward through the LM head gives both the loss the vectors ascend and h~
                steer_rng = shared_rng if shared_rng is not None else (self._rng() if measure else None)
                with replayed_rng(shared_rng), self._steered(layers=self._layers) as steered:
                    steered_loss = self._lm_loss(trainer, inputs)
                    steer_loss = self._ascend_directions(steered_loss, task_scale, retain_graph=True)
                    consistency = hidden_state_consistency(steered, clean, mask)
                    term = self.beta * term_scale * consistency
                    cons_grads = self._grads(self._scaled(trainer, term), params)
                del steered, steered_loss
            else:
                directions = self.directions.detach()
                with replayed_rng(shared_rng), self._backbone_pass(trainer, inputs, directions) as steered:
                    consistency = hidden_state_consistency(steered, clean, mask)
                    term = self.beta * term_scale * consistency
                    cons_grads = self._grads(self._scaled(trainer, term), params)
                del steered
            if measure:  # L(x') without steering, with the masks of the steered pass it is compared to
                with torch.no_grad(), replayed_rng(steer_rng if same else second_rng):
                    unsteered = self._lm_loss(trainer, inputs if same else second)
                self._record_gain(unsteered, steer_loss)

        self._accumulate(params, grads, cons_grads)
        return self._finish_micro_batch(trainer, task_loss, term, consistency, steer_loss)

    def _finish_micro_batch(self, trainer, task_loss, term, consistency, steer_loss) -> torch.Tensor:
        """Record the diagnostics; at the end of an accumulation cycle, reduce (DDP) and step the vectors (reps)."""
        params = self._params
        if self.log_diagnostics:
            self._add("task", task_loss)
            self._add("term", term)
            self._add("consistency", consistency)
            self._add("count", torch.ones((), device=consistency.device))
            if steer_loss is not None:
                self._add("steered_loss", steer_loss)
        self._micro_batch += 1
        if trainer.accelerator.sync_gradients:
            self._micro_batch = 0
            if self._world_size > 1:
                self._all_reduce_mean(params)
            if self.mode == "reps":
                self._step_directions()
        return (task_loss + term).detach()

    def _released_reps_passes(self, trainer, inputs, num_items_in_batch, mask, measure, task_scale, term_scale):
        """
        RepS with the released pairing (yunpal/LfU `Lfu_consistency_asc_rep_adv_train_rep_add.training_step`): the
        clean forward of `x` gives `L_sft` and `h_l(x)` *with* their graph; the steered forward of `x'` gives the
        vectors' ascent gradient and the steered states, which (detached, laid onto `x`'s positions by
        [`released_reps_target`]) are the target of `L_cons = mean_l MSE(h_l(x), stopgrad h~_l(x'))`. One backward of
        `L_sft + beta * L_cons` through the clean graph gives the parameters' gradient: 2 forwards + 2 backwards.
        With `second_batch="same"` (`x' = x`) and shared dropout masks, the steered pass replays the clean pass's.
        """
        params = self._params
        same = self.second_batch == "same"
        second = inputs if same else self._draw_second_batch(trainer)
        clean_rng = self._rng() if (same and (self.share_dropout_masks or measure)) else None
        with block_hooks(self._backbone, self._blocks, self._layers) as captured:
            with trainer.compute_loss_context_manager():
                task_loss = trainer.compute_loss(self._model, inputs, num_items_in_batch=num_items_in_batch)
        clean = list(captured)
        del captured
        task_loss = task_loss * task_scale
        replay = clean_rng if (same and self.share_dropout_masks) else None
        steer_rng = replay if replay is not None else (self._rng() if measure else None)
        with replayed_rng(replay), self._steered(layers=self._layers) as steered:
            steer_loss = self._ascend_directions(self._lm_loss(trainer, second), task_scale)
        batch_size, seq_len = clean[0].shape[:2]
        target = [released_reps_target(h, batch_size, seq_len) for h in steered]
        del steered
        consistency = hidden_state_consistency(clean, target, mask)
        term = self.beta * term_scale * consistency
        grads = self._grads(self._scaled(trainer, task_loss + term), params)
        del clean, target
        if measure:  # L(x') without steering, with the masks of the steered pass it is compared to
            with torch.no_grad(), replayed_rng(steer_rng):
                unsteered = self._lm_loss(trainer, second)
            self._record_gain(unsteered, steer_loss)
        self._accumulate(params, grads, [])
        return task_loss, term, consistency, steer_loss

    def _steering_step(self, trainer, batch: dict[str, Any], task_scale: float) -> torch.Tensor:
        """Accumulate the gradient that *raises* `L_sft(x'; d)` into the steering vectors (no parameter gradient)."""
        with self._steered():  # the hooks stay for the backward (see `_backbone_pass`)
            loss = self._lm_loss(trainer, batch)
            return self._ascend_directions(loss, task_scale)

    def _ascend_directions(self, loss: torch.Tensor, task_scale: float, retain_graph: bool = False) -> torch.Tensor:
        """
        Put the gradient of `-loss` (scaled like the task loss) into the steering vectors: added to what the earlier
        micro-batches of the step left there (`reps_vector_grad="accumulate"`), or replacing it (`"last"`).
        """
        (grad,) = torch.autograd.grad(-loss * task_scale, [self.directions], retain_graph=retain_graph)
        if self.directions.grad is None or self.reps_vector_grad == "last":
            self.directions.grad = grad  # "last": each micro-batch replaces it, as the released `param.grad = grad`
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

    # ---- checkpoints ----

    def state_dict(self) -> dict:
        state = {"mode": self.mode, "alpha": self.alpha, "beta": self.beta, "reps_site": self.reps_site}
        if self.directions is not None:
            state["directions"] = self.directions.detach().cpu().clone()
            state["direction_optimizer"] = self.direction_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        changed = [key for key in ("mode", "reps_site") if key in state and state[key] != getattr(self, key)]
        if self.mode != "reps" and changed == ["reps_site"]:
            changed = []  # the site does not matter in perturb mode
        if changed:
            described = ", ".join(f"{key} {state[key]!r} (this run: {getattr(self, key)!r})" for key in changed)
            raise ValueError(f"The checkpoint was trained with LfU {described}; resume with the same settings.")
        if "directions" in state and self.directions is not None:
            with torch.no_grad():
                self.directions.copy_(state["directions"].to(self.directions.device))
            self.direction_optimizer.load_state_dict(state["direction_optimizer"])
