"""ALLoRA layers: peft's LoRA layers (Linear / GPT-2 Conv1D, Embedding, Conv1d/2d/3d, MultiheadAttention and the
`target_parameters` wrapper) without scaling, whose A/B gradients (or updates) are scaled per output row.

What an "output row" of `dW` is, per layer type (the row coefficient is `c_i = 1 / sqrt(||dW_i||^2 + 1/eta^2)`):

- `nn.Linear`, GPT-2 `Conv1D`: an output feature (a row of `B A`, out x in).
- `nn.Embedding`: an output feature, i.e. one embedding dimension across the whole vocabulary (a row of `B A`,
  embedding_dim x num_embeddings; a column of the embedding matrix). Viewed as a linear map from one-hot tokens, this
  is the same definition as for `nn.Linear`.
- `nn.Conv1d/2d/3d`: an output channel (all `in_channels x kernel` entries of the composed kernel that produce that
  channel). With grouped convolutions, `B` is block diagonal and a channel only sees its group's rank components.
- `nn.MultiheadAttention`: a row of the packed `in_proj_weight` (one output feature of the query, key or value
  projection) and a row of `out_proj.weight`.
- `target_parameters`: a row of the targeted 2-d parameter (its first dimension, peft's `out_features`); for a 3-d
  expert stack, a row of each expert's `B_e A_e` (one coefficient per expert and output feature).

The coefficient depends only on `A` and `B`, so it is computed once after every change of the weights (in practice
once per optimizer step, whatever the number of forwards and micro-batches) and cached; see [`ALLoRALayer`].
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import ALLOWED_COMPUTE_DTYPES, LoraVariant, _LoraParameterProxy
from peft.tuners.lora.layer import Conv1d as LoraConv1d
from peft.tuners.lora.layer import Conv2d as LoraConv2d
from peft.tuners.lora.layer import Conv3d as LoraConv3d
from peft.tuners.lora.layer import Embedding as LoraEmbedding
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention
from peft.tuners.lora.layer import ParamWrapper as LoraParamWrapper
from peft.utils.other import transpose
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from regtune._sharding import DTensor
from regtune.functional.allora import (
    _ALLoRAProduct,
    allora_conv_forward,
    allora_factor_coefficient,
    allora_row_coefficient,
    allora_row_coefficients_from_norms_,
    allora_row_norms_squared,
    scale_grad,
)


_ALLORA_PARAM_NAMES = (
    "allora_eta",
    "allora_norm_squared",
    "allora_scale_gradients",
    "allora_row_norm",
    "allora_cache",
)


class _Registry:
    """Process-wide state: the optimizer-step generation (part of every cache key) and the update-mode layers."""

    generation = 0  # bumped after every torch optimizer step (any optimizer), once the hooks are installed
    update_layers: weakref.WeakSet = weakref.WeakSet()  # layers with >= 1 adapter of coefficient_on="update"
    update_layers_version = 0  # bumped when a layer is added, so the optimizer guard re-checks
    hooks_installed = False
    # checks run before every torch optimizer step; optimizer.py adds the update-mode guard when it is imported
    step_pre_checks: list = []
    # layer -> its model's ALLoRACoefficientGroup (kept outside the modules: they stay deep-copyable and picklable);
    # the group holds its layers weakly, and the tuner model holds the group (through `models`)
    groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bump_generation(optimizer, args, kwargs) -> None:
    _Registry.generation += 1


def _run_step_pre_checks(optimizer, args, kwargs) -> None:
    for check in _Registry.step_pre_checks:
        check(optimizer, args, kwargs)


def _install_global_hooks() -> None:
    if _Registry.hooks_installed:
        return
    register_optimizer_step_pre_hook(_run_step_pre_checks)
    register_optimizer_step_post_hook(_bump_generation)
    _Registry.hooks_installed = True


def _needs_grad(*weights: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(w.requires_grad for w in weights)


class ALLoRALayer:
    """
    The ALLoRA part shared by every ALLoRA layer type: per-adapter settings and the cached coefficients.

    The coefficients are a function of `A` and `B` only. They are cached per adapter, keyed on the identity
    (`data_ptr`), dtype and autograd version counter of `A` and `B` and on a process-wide counter bumped after every
    `torch.optim` optimizer step: any optimizer step and any in-place change of the weights through autograd-visible
    ops (`copy_`, `add_` under `torch.no_grad()`, `load_state_dict`, ...) recomputes them, so the cache gives exactly
    the coefficients a per-forward computation would give. Under gradient accumulation the micro-batches of one
    optimizer step share one computation. (An in-place edit through `.data`, which autograd does not see, is not
    detected; call [`ALLoRALayer.allora_clear_cache`] after one.)
    """

    # the row coefficients of this layer type can be computed in the model's batched refresh (2-d `A`/`B`, one output
    # row per row of `B`); conv and expert-stack layers compute theirs on their own
    _allora_batched = True
    # its gradient-site forward is `_ALLoRAProduct` (which takes the precomputed `[B | c B]`)
    _allora_product_forward = False

    def _allora_init(self) -> None:
        self.allora_eta: dict[str, float] = {}
        self.allora_norm_squared: dict[str, bool] = {}
        self.allora_scale_gradients: dict[str, bool] = {}
        self.allora_row_norm: dict[str, str] = {}
        # adapter -> (key, value, batch, index in the batch); batch is a _CoefficientBatch or None
        self.allora_cache: dict[str, tuple] = {}

    def _allora_record(self, adapter_name: str, config) -> None:
        self.scaling[adapter_name] = 1.0
        self.allora_eta[adapter_name] = float(config.eta)
        self.allora_norm_squared[adapter_name] = bool(config.norm_squared)
        self.allora_scale_gradients[adapter_name] = config.coefficient_on == "gradient"
        self.allora_row_norm[adapter_name] = config.row_norm
        self.allora_cache.pop(adapter_name, None)
        _install_global_hooks()
        if config.coefficient_on == "update":
            _Registry.update_layers.add(self)
            _Registry.update_layers_version += 1

    def allora_clear_cache(self) -> None:
        """Forget the cached coefficients (only needed after editing `A` or `B` in place through `.data`)."""
        self.allora_cache.clear()

    # ---- per layer type: where A and B are and how their rows map to dW's output rows ----

    def allora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The `(A, B)` parameters of `adapter_name`."""
        try:  # the registered parameters, by plain dict lookups (this runs several times per step and layer)
            return (
                self._modules["lora_A"]._modules[adapter_name]._parameters["weight"],
                self._modules["lora_B"]._modules[adapter_name]._parameters["weight"],
            )
        except KeyError:  # no such adapter (KeyError again), or a weight that is not a plain parameter (parametrized)
            return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def _allora_views(self, weight_A: torch.Tensor, weight_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(a, b)` with `dW = b @ a` per output row: `a (..., r, in)`, `b (..., out, r)` (leading dims: experts)."""
        return weight_A, weight_B

    def _allora_to_B(self, rows: torch.Tensor, weight_B: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-output-row tensor `(..., out)` to the layout of `B`'s parameter."""
        return rows.reshape(rows.shape[-1], *([1] * (weight_B.dim() - 1)))

    def _allora_to_A(self, rank_rows: torch.Tensor, weight_A: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-rank-row tensor `(..., r)` to the layout of `A`'s parameter."""
        return rank_rows.reshape(-1, *([1] * (weight_A.dim() - 1)))

    # ---- the coefficients ----

    def _allora_entry(self, adapter_name: str, kind: str, compute, weights=None) -> tuple:
        """The cache entry `(key, value, batch, index)` of `adapter_name`, recomputed when stale."""
        if weights is None:
            weights = self.allora_weights(adapter_name)
        key = _cache_key(kind, weights)
        cached = self.allora_cache.get(adapter_name)
        if cached is not None and cached[0] == key:
            return cached
        if kind == "rows":
            group = _Registry.groups.get(self)
            if group is not None:
                # one batched computation for every stale adapter of the model (once per optimizer step)
                group.refresh()
                cached = self.allora_cache.get(adapter_name)
                if cached is not None and cached[0] == key:
                    return cached
        with torch.no_grad():
            entry = (key, compute(*weights, adapter_name), None, 0)
        self.allora_cache[adapter_name] = entry
        return entry

    def _allora_cached(self, adapter_name: str, kind: str, compute, weights=None):
        return self._allora_entry(adapter_name, kind, compute, weights)[1]

    def allora_row_coefficients(self, adapter_name: str, weights=None) -> torch.Tensor:
        """
        The row coefficient `c` of every output row of `dW` (float32, shape `(..., out)`), computed from the current
        `A` and `B` (cached between changes of the weights).
        """
        return self._allora_cached(adapter_name, "rows", self._allora_compute_rows, weights)

    def _allora_compute_rows(self, weight_A, weight_B, adapter_name):
        eta, squared = self.allora_eta[adapter_name], self.allora_norm_squared[adapter_name]
        return allora_row_coefficient(*self._allora_views(weight_A, weight_B), eta, squared)

    def allora_factor_coefficients(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The "factors" reading: the coefficient of every row of `A` (shape `(..., r)`) and of `B` (shape
        `(..., out)`), each from that row's own norm (cached between changes of the weights).
        """
        eta, squared = self.allora_eta[adapter_name], self.allora_norm_squared[adapter_name]

        def compute(weight_A, weight_B, _):
            a, b = self._allora_views(weight_A, weight_B)
            c_a = allora_factor_coefficient(a.reshape(-1, a.shape[-1]), eta, squared).reshape(a.shape[:-1])
            c_b = allora_factor_coefficient(b.reshape(-1, b.shape[-1]), eta, squared).reshape(b.shape[:-1])
            return c_a, c_b

        return self._allora_cached(adapter_name, "factors", compute)

    def allora_param_scales(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The per-row scales of `A` and `B` in their parameters' layouts, as applied to the update by
        [`create_allora_optimizer`] (and to the gradient in the "factors" reading):

        - `row_norm="product"`: `B`'s row `i` gets `c_i`; `A` (whose rows mix all output rows) gets the mean of `c`
          (per expert for an expert stack).
        - `row_norm="factors"`: every row of `A` and of `B` gets its own coefficient.
        """
        weight_A, weight_B = self.allora_weights(adapter_name)
        if self.allora_row_norm[adapter_name] == "factors":
            c_a, c_b = self.allora_factor_coefficients(adapter_name)
        else:
            _, c_b, batch, index = self._allora_entry(
                adapter_name, "rows", self._allora_compute_rows, (weight_A, weight_B)
            )
            if batch is not None:  # computed with its batch: its scales too, once for the whole batch
                scales_A, scales_B = batch.param_scales()
                return scales_A[index], scales_B[index]
            r = self._allora_views(weight_A, weight_B)[0].shape[-2]
            c_a = c_b.mean(dim=-1, keepdim=True).expand(*c_b.shape[:-1], r)
        return self._allora_to_A(c_a, weight_A), self._allora_to_B(c_b, weight_B)

    def allora_coefficient_over_eta(self, adapter_name: str) -> torch.Tensor:
        """All coefficients that this adapter applies, divided by `eta` (flat, float32; for diagnostics)."""
        eta = self.allora_eta[adapter_name]
        if self.allora_row_norm[adapter_name] == "factors":
            c_a, c_b = self.allora_factor_coefficients(adapter_name)
            return torch.cat([c_a.reshape(-1), c_b.reshape(-1)]) / eta
        return self.allora_row_coefficients(adapter_name).reshape(-1) / eta

    def _allora_scaled_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(A, B)` whose gradients are scaled row-wise by the factor coefficients ("factors" reading)."""
        weight_A, weight_B = self.allora_weights(adapter_name)
        scale_A, scale_B = self.allora_param_scales(adapter_name)
        return scale_grad(weight_A, scale_A), scale_grad(weight_B, scale_B)

    def _allora_delta_weight(self, adapter_name: str) -> torch.Tensor | None:
        """
        `dW = B A` (out x in) whose gradient reaches `A` and `B` by ALLoRA's rule, for the layers that run the adapter
        in weight space (`nn.MultiheadAttention`, and merging); `None` when this call needs no rule (inference,
        frozen adapter, update mode): the caller then uses peft's plain delta.
        """
        rule = self._allora_gradient_rule(adapter_name)
        if rule is None:
            return None
        if rule == "factors":
            weight_A, weight_B = self._allora_scaled_factors(adapter_name)
            return weight_B @ weight_A
        weight_A, weight_B = self.allora_weights(adapter_name)
        coefficient = self.allora_row_coefficients(adapter_name, (weight_A, weight_B))
        return scale_grad(weight_B @ weight_A, coefficient[:, None])

    def _allora_gradient_rule(self, adapter_name: str) -> str | None:
        """`"product"` / `"factors"` when this forward must apply the coefficient to the gradients, else `None`."""
        if not self.allora_scale_gradients.get(adapter_name, False):
            return None
        if not _needs_grad(*self.allora_weights(adapter_name)):
            return None  # inference, frozen adapter or update mode: plain B A
        return self.allora_row_norm[adapter_name]


class _ALLoRAVariantBase(LoraVariant):
    """Merging is vanilla LoRA's: the adapter's delta is exactly `B A` (scaling 1)."""

    @staticmethod
    def init(module, adapter_name: str, config=None, **kwargs) -> None:
        module._allora_record(adapter_name, config)

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)


class ALLoRALinearVariant(_ALLoRAVariantBase):
    """The ALLoRA forward of a linear layer: `result + B A x` with ALLoRA's backward for A and B."""

    @staticmethod
    def forward(module: ALLoRALinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        # the hot path of training: few Python operations (every forward of every adapted layer)
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        weight_A, weight_B = lora_A.weight, lora_B.weight
        if (
            module.allora_scale_gradients[active_adapter]
            and torch.is_grad_enabled()
            and (weight_A.requires_grad or weight_B.requires_grad)
        ):
            if module.allora_row_norm[active_adapter] == "product":
                _, coefficient, batch, index = module._allora_entry(
                    active_adapter, "rows", module._allora_compute_rows, (weight_A, weight_B)
                )
                factors = None if batch is None or batch.factors is None else batch.factors[index]
                return result + _ALLoRAProduct.apply(x, weight_A, weight_B, coefficient, factors)
            weight_A, weight_B = module._allora_scaled_factors(active_adapter)
            return result + F.linear(F.linear(x, weight_A), weight_B)
        return result + lora_B(lora_A(x))  # inference, frozen adapter or update mode: plain B A x


class ALLoRAEmbeddingVariant(_ALLoRAVariantBase):
    """The ALLoRA forward of an embedding: the token ids have no gradient, so scaling the output gradient per
    embedding dimension by `c` is exactly ALLoRA's rule for A and B."""

    @staticmethod
    def forward(module: ALLoRAEmbedding, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        rule = module._allora_gradient_rule(active_adapter)
        if rule == "factors":
            weight_A, weight_B = module._allora_scaled_factors(active_adapter)
        else:
            weight_A, weight_B = module.allora_weights(active_adapter)
        after_A = module._embed(
            x,
            weight_A.T,
            input_fn=module.input_fns.get(active_adapter, None),
            output_fn=module.output_fns.get(active_adapter, None),
        )
        delta = after_A @ weight_B.T
        if rule == "product":
            delta = scale_grad(delta, module.allora_row_coefficients(active_adapter))
        embed_scale = module._get_embed_scale()
        if embed_scale is not None:
            delta = delta * embed_scale.to(delta.dtype)
        return result + delta


class ALLoRAConvVariant(_ALLoRAVariantBase):
    """The ALLoRA forward of a convolution: `result + B * (A * x)`, output rows = output channels."""

    @staticmethod
    def forward(module: _ALLoRAConvNd, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        rule = module._allora_gradient_rule(active_adapter)
        if rule == "product":
            delta = allora_conv_forward(
                x,
                lambda inp, w: lora_A._conv_forward(inp, w, None),
                lora_A.weight,
                lora_B.weight,
                module.allora_row_coefficients(active_adapter),
                groups=lora_B.groups,
            )
        elif rule == "factors":
            weight_A, weight_B = module._allora_scaled_factors(active_adapter)
            delta = lora_B._conv_forward(lora_A._conv_forward(x, weight_A, None), weight_B, lora_B.bias)
        else:
            delta = lora_B(lora_A(x))
        return result + delta


class ALLoRALinear(ALLoRALayer, LoraLinear):
    """peft's `lora.Linear` (also wraps GPT-2 `Conv1D` with `fan_in_fan_out`) whose only variant is ALLoRA.

    Any other LoRA variant requested in the config (DoRA, ...) is rejected by peft's variant resolution.
    """

    other_param_names = LoraLinear.other_param_names + _ALLORA_PARAM_NAMES
    _allora_product_forward = True

    def __init__(self, base_layer, adapter_name: str, config, **kwargs) -> None:
        self._allora_init()  # must exist before LoraLinear.__init__ calls update_layer -> variant.init
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def lora_variants(self):
        return {(): ALLoRALinearVariant}

    def get_delta_weight(self, adapter) -> torch.Tensor:
        # Used by merging and, for the out_proj of nn.MultiheadAttention, inside the forward (its weights are merged
        # for the call). In the latter case the gradient reaching A and B must follow ALLoRA's rule too.
        delta = self._allora_delta_weight(adapter)
        if delta is None:
            return super().get_delta_weight(adapter)
        return transpose(delta, self.fan_in_fan_out)

    def __repr__(self) -> str:
        return "allora." + super().__repr__().removeprefix("lora.")


class ALLoRAEmbedding(ALLoRALayer, LoraEmbedding):
    """peft's `lora.Embedding` with ALLoRA: an output row is one embedding dimension (a row of `B A`)."""

    other_param_names = LoraEmbedding.other_param_names + _ALLORA_PARAM_NAMES

    def __init__(self, base_layer, adapter_name: str, config, **kwargs) -> None:
        self._allora_init()
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def lora_variants(self):
        return {(): ALLoRAEmbeddingVariant}

    def allora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def __repr__(self) -> str:
        return "allora." + super().__repr__().removeprefix("lora.")


class _ALLoRAConvNd(ALLoRALayer):
    """Conv specifics: an output row is an output channel; `B` (a 1x1 conv, maybe grouped) is block diagonal."""

    _allora_batched = False

    def _allora_views(self, weight_A, weight_B):
        r = weight_A.shape[0]
        out = weight_B.shape[0]
        groups = r // weight_B.shape[1]
        b = weight_B.reshape(out, r // groups)
        if groups > 1:
            b = torch.block_diag(*b.reshape(groups, out // groups, r // groups))
        return weight_A.reshape(r, -1), b

    def _allora_to_A(self, rank_rows, weight_A):
        return rank_rows.reshape(-1, *([1] * (weight_A.dim() - 1)))

    def allora_factor_coefficients(self, adapter_name: str):
        # rows of the stored factors (a grouped B's zero blocks do not count)
        eta, squared = self.allora_eta[adapter_name], self.allora_norm_squared[adapter_name]
        return self._allora_cached(
            adapter_name,
            "factors",
            lambda a, b, _: (allora_factor_coefficient(a, eta, squared), allora_factor_coefficient(b, eta, squared)),
        )


def _conv_class(peft_cls, name):
    def __init__(self, base_layer, adapter_name: str, config, **kwargs) -> None:
        self._allora_init()
        peft_cls.__init__(self, base_layer, adapter_name, config=config, **kwargs)

    def lora_variants(self):
        return {(): ALLoRAConvVariant}

    def __repr__(self) -> str:
        return "allora." + peft_cls.__repr__(self).removeprefix("lora.")

    return type(
        name,
        (_ALLoRAConvNd, peft_cls),
        {
            "__init__": __init__,
            "lora_variants": property(lora_variants),
            "__repr__": __repr__,
            "other_param_names": peft_cls.other_param_names + _ALLORA_PARAM_NAMES,
            "__doc__": f"peft's `lora.{peft_cls.__name__}` with ALLoRA: an output row is an output channel.",
            "__module__": __name__,
        },
    )


ALLoRAConv1d = _conv_class(LoraConv1d, "ALLoRAConv1d")
ALLoRAConv2d = _conv_class(LoraConv2d, "ALLoRAConv2d")
ALLoRAConv3d = _conv_class(LoraConv3d, "ALLoRAConv3d")


class ALLoRAMultiheadAttention(ALLoRALayer, LoraMultiheadAttention):
    """peft's `lora.MultiheadAttention` with ALLoRA on `in_proj_weight` and `out_proj` (an [`ALLoRALinear`]).

    peft runs this layer by merging the adapter into the weights for the call, so the row rule is applied in weight
    space: the gradient of `dW = B A` is scaled per row before it reaches `A` and `B`, which is the same rule.
    """

    other_param_names = LoraMultiheadAttention.other_param_names + _ALLORA_PARAM_NAMES

    def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs) -> None:
        self._allora_init()
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)
        plain_out_proj = self.base_layer.out_proj  # a peft lora.Linear: replace it by ALLoRA's, same weights
        out_proj = ALLoRALinear(
            plain_out_proj.get_base_layer(), adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs
        )
        # keep peft's initialization (and device: meta under low_cpu_mem_usage): move its A/B modules over
        out_proj.lora_A[adapter_name] = plain_out_proj.lora_A[adapter_name]
        out_proj.lora_B[adapter_name] = plain_out_proj.lora_B[adapter_name]
        self.base_layer.out_proj = out_proj

    def update_layer(self, adapter_name, *args, config=None, **kwargs) -> None:
        super().update_layer(adapter_name, *args, config=config, **kwargs)
        self._allora_record(adapter_name, config)

    def get_delta_weight(self, adapter) -> torch.Tensor:
        delta = self._allora_delta_weight(adapter)
        return super().get_delta_weight(adapter) if delta is None else delta

    def __repr__(self) -> str:
        return "allora." + super().__repr__().removeprefix("lora.")


class ALLoRAParamWrapper(ALLoRALayer, LoraParamWrapper):
    """peft's `lora.ParamWrapper` (`target_parameters`) with ALLoRA, applied in weight space.

    An output row is a row of the targeted parameter's `dW` (peft's `out_features`), per expert for a 3-d expert
    stack. peft folds a single adapter of an expert stack into one `baddbmm` of the factors; ALLoRA always
    materializes `dW` (the size of the parameter) during the forward, because the row rule applies to `dW`'s gradient.
    """

    other_param_names = LoraParamWrapper.other_param_names + _ALLORA_PARAM_NAMES
    _allora_batched = False

    def __init__(self, base_layer, adapter_name: str, parameter_name: str, config, **kwargs) -> None:
        self._allora_init()
        super().__init__(base_layer, adapter_name, parameter_name=parameter_name, config=config, **kwargs)

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs) -> None:
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        self._allora_record(adapter_name, config)

    def _allora_views(self, weight_A, weight_B):
        experts = self.num_experts
        a = weight_A.reshape(experts, -1, weight_A.shape[-1])  # (experts, r, in)
        b = weight_B.reshape(weight_B.shape[0], -1, experts).permute(2, 0, 1)  # (experts, out, r)
        return a, b

    def _allora_to_B(self, rows, weight_B):
        # rows (experts, out) -> B's layout (out, r * experts) with column k * experts + e
        experts, out = rows.shape[-2], rows.shape[-1]
        r = weight_B.shape[1] // experts
        return rows.mT[:, None, :].expand(out, r, experts).reshape(out, r * experts)

    def _allora_to_A(self, rank_rows, weight_A):
        return rank_rows.reshape(-1, 1)  # (experts, r) -> rows e * r + k of A

    def _allora_delta_layout(self, rows: torch.Tensor) -> torch.Tensor:
        """Broadcast per-row coefficients `(experts, out)` to the layout of `get_delta_weight`."""
        if self.num_experts == 1:
            return rows[0][:, None]  # (out, in)
        return rows[:, :, None] if self._did_swap_in_out_features else rows[:, None, :]

    def get_delta_weight(self, adapter_name, *args, **kwargs):
        rule = self._allora_gradient_rule(adapter_name)
        if rule is None:
            return super().get_delta_weight(adapter_name, *args, **kwargs)
        if rule == "factors":
            weight_A, weight_B = self._allora_scaled_factors(adapter_name)
        else:
            weight_A, weight_B = self.allora_weights(adapter_name)
        if self.num_experts == 1:
            delta = weight_B @ weight_A
        else:
            a = weight_A.reshape(self.num_experts, -1, weight_A.shape[-1])
            b = weight_B.reshape(weight_B.shape[0], -1, self.num_experts)
            pattern = "o r e, e r i -> e o i" if self._did_swap_in_out_features else "o r e, e r i -> e i o"
            delta = torch.einsum(pattern, b, a)
        if rule == "product":
            delta = scale_grad(delta, self._allora_delta_layout(self.allora_row_coefficients(adapter_name)))
        param = self.get_param()
        if param.dtype in ALLOWED_COMPUTE_DTYPES:
            return delta.to(param.device, param.dtype)
        return delta.to(param.device)

    @contextmanager
    def _activate_lora(self, active_adapters: list[str]):
        # peft's, without the factor-folding shortcut (ALLoRA's rule needs the gradient of dW itself)
        adapters = [a for a in (active_adapters or []) if a in self.lora_A]
        if not adapters:
            yield
            return
        delta_weight = None
        for active_adapter in adapters:
            delta = self.get_delta_weight(active_adapter)
            delta_weight = delta if delta_weight is None else delta_weight + delta
        proxy = _LoraParameterProxy(delta_weight)
        base_layer = self.get_base_layer()
        param = self.get_param()
        requires_grad_before = param.requires_grad
        nn.utils.parametrize.register_parametrization(base_layer, self.parameter_name, proxy)
        base_layer.parametrizations[self.parameter_name].original.requires_grad_(requires_grad_before)
        try:
            with nn.utils.parametrize.cached():
                yield
        finally:
            self._remove_parametrizations()

    def __repr__(self) -> str:
        return "allora." + super().__repr__().removeprefix("lora.")


def _cache_key(kind: str, weights: tuple[torch.Tensor, torch.Tensor]) -> tuple:
    """What the cached coefficients of `(A, B)` are valid for: the optimizer-step generation, and the storage, dtype
    and autograd version counter of `A` and `B` (an in-place change through autograd bumps the version)."""
    weight_A, weight_B = weights
    return (
        kind,
        _Registry.generation,
        weight_A.data_ptr(),
        weight_A._version,
        weight_B.data_ptr(),
        weight_B._version,
        weight_A.dtype,
        weight_B.dtype,
    )


class _CoefficientBatch:
    """
    The row coefficients of equally shaped adapters computed together: `rows[i]` (float32, `(out,)`) belongs to the
    batch's `i`-th adapter. Each adapter's cache entry refers to its batch, so that the per-parameter scales of the
    update-side optimizer and the diagnostics' statistics are computed once for the batch, not once per layer.
    """

    __slots__ = ("rows", "eta", "rank", "factors", "_param_scales")

    def __init__(self, rows: torch.Tensor, eta: float, rank: int, factors: tuple | None = None):
        self.rows = rows  # (n, out)
        self.eta = eta
        self.rank = rank
        self.factors = factors  # gradient site: [B | c[:, None] * B] (out x 2r) per adapter, for its backward
        self._param_scales = None

    def param_scales(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The scales of every adapter's `A` (`(r, 1)`: the mean of its `c`) and `B` (`(out, 1)`: its `c`)."""
        if self._param_scales is None:
            rows = self.rows
            mean = rows.mean(dim=-1, keepdim=True)  # (n, 1)
            scales_A = mean[:, None, :].expand(rows.shape[0], self.rank, 1).unbind(0)
            self._param_scales = (scales_A, rows[:, :, None].unbind(0))
        return self._param_scales


class ALLoRACoefficientGroup:
    """
    The ALLoRA layers of one model, whose row coefficients are computed together: when a layer finds its cached
    coefficient stale (the first forward after an optimizer step), the coefficients of every stale adapter of the
    model are computed at once, in one batched product per group of equally shaped layers (`torch.stack` + `bmm`,
    then one `torch._foreach_*` pass for the elementwise tail of all of them), instead of a handful of small kernels
    per layer. The values are those of the per-layer computation (up to the rounding of the batched matmul).
    """

    def __init__(self, layers):
        self.layers = weakref.WeakSet(layers)

    def refresh(self) -> None:
        batches: dict[tuple, list] = {}
        for layer in self.layers:
            if not layer._allora_batched:
                continue  # conv / expert stacks: their own (reshaped) computation, on demand
            cache = layer.allora_cache
            for adapter_name, row_norm in layer.allora_row_norm.items():
                if row_norm != "product":
                    continue
                try:
                    weights = layer.allora_weights(adapter_name)
                except KeyError:
                    continue
                weight_A, weight_B = weights
                if not (weight_A.requires_grad or weight_B.requires_grad):
                    continue
                if DTensor is not None and (isinstance(weight_A, DTensor) or isinstance(weight_B, DTensor)):
                    continue  # FSDP2: resharded outside its block's forward; computed there, on demand
                key = _cache_key("rows", weights)
                cached = cache.get(adapter_name)
                if cached is not None and cached[0] == key:
                    continue
                group_key = (
                    weight_A.shape,
                    weight_B.shape,
                    weight_A.device,
                    weight_B.dtype,
                    layer.allora_eta[adapter_name],
                    layer.allora_norm_squared[adapter_name],
                    layer._allora_product_forward and layer.allora_scale_gradients[adapter_name],
                )
                batches.setdefault(group_key, []).append((cache, adapter_name, key, weight_A, weight_B))
        if not batches:
            return
        with torch.no_grad():
            norms, stacks_B = [], []
            for members in batches.values():
                if len(members) == 1:
                    stacked_A, stacked_B = members[0][3][None], members[0][4][None]
                else:
                    stacked_A = torch.stack([m[3] for m in members])
                    stacked_B = torch.stack([m[4] for m in members])
                norms.append(allora_row_norms_squared(stacked_A, stacked_B))
                stacks_B.append(stacked_B)
            etas = [group_key[4] for group_key in batches]
            coefficients = allora_row_coefficients_from_norms_(norms, etas, [group_key[5] for group_key in batches])
            for group_key, members, rows, eta, stacked_B in zip(
                batches, batches.values(), coefficients, etas, stacks_B
            ):
                factors = None
                if group_key[6]:  # the gradient site's backward: [B | c B], in B's dtype
                    scaled_B = stacked_B * rows.unsqueeze(-1)
                    if scaled_B.dtype != stacked_B.dtype:
                        scaled_B = scaled_B.to(stacked_B.dtype)
                    factors = torch.cat([stacked_B, scaled_B], dim=-1).unbind(0)
                batch = _CoefficientBatch(rows, eta, group_key[0][-2], factors)
                for index, ((cache, adapter_name, key, _, _), value) in enumerate(zip(members, rows.unbind(0))):
                    cache[adapter_name] = (key, value, batch, index)


ALLORA_LAYER_TYPES = (
    ALLoRALinear,
    ALLoRAEmbedding,
    ALLoRAConv1d,
    ALLoRAConv2d,
    ALLoRAConv3d,
    ALLoRAMultiheadAttention,
    ALLoRAParamWrapper,
)


def allora_adapters(model: nn.Module):
    """Yield `(module_name, module, adapter_name)` for every ALLoRA adapter of `model` (each layer once)."""
    for module_name, module in model.named_modules():
        if isinstance(module, ALLoRALayer):
            for adapter_name in module.allora_eta:
                if adapter_name in module.lora_A or adapter_name in getattr(module, "lora_embedding_A", {}):
                    yield module_name, module, adapter_name
