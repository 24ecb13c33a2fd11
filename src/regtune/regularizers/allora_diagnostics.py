"""ALLoRA's mechanism diagnostic as Trainer metrics: how far the row coefficient `c` is below `eta`.

`c_i / eta = 1` while `||dW_i|| << 1/eta` (the adaptive term is not engaged: ALLoRA is then LoRA with its steps
multiplied by `eta`); it falls towards 0 as a row grows. [`ALLoRADiagnostics`] reports, at every logging step, the
minimum and the median of `c / eta` over all rows of the model (and, with `per_layer=True`, over the rows of each
ALLoRA layer).

regtune's trainers add it automatically when the model has ALLoRA adapters (see [`automatic_regularizers`]), so the
values reach every `report_to` integration as `allora/c_over_eta_min` and `allora/c_over_eta_median` (plus
`allora/c_over_eta_min/<layer>` and `allora/c_over_eta_median/<layer>` with `per_layer=True`).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from regtune.tuners.allora.layer import allora_adapters
from regtune.tuners.training_hooks import AdapterTrainingHooks, register_training_hooks

from .base import Regularizer


def _named_adapters(model: nn.Module) -> list[tuple[str, object, str]]:
    out = []
    for module_name, module, adapter_name in allora_adapters(model):
        name = module_name.split("base_model.model.", 1)[-1] or module_name
        out.append((name if adapter_name == "default" else f"{name}:{adapter_name}", module, adapter_name))
    return out


def _stats(model: nn.Module, adapters: list | None = None) -> tuple[list[str], torch.Tensor] | None:
    """
    `(layer names, tensor [min, median, min per layer..., median per layer...])` of `c / eta`, or None. The layers
    come in the order of the computation (the adapters computed together in one batch are next to each other).
    """
    adapters = _named_adapters(model) if adapters is None else adapters
    if not adapters:
        return None
    # the layers' cached coefficients (one batched refresh for all of them when stale); the adapters computed together
    # in one batch are reduced together: a few reductions per batch of equally shaped layers, not per layer
    blocks: list[list] = []  # [rows (n, k) of c, eta, positions of the adapters in `adapters`]
    by_batch: dict[int, list] = {}
    for position, (_, module, adapter_name) in enumerate(adapters):
        eta = module.allora_eta[adapter_name]
        if module.allora_row_norm[adapter_name] == "factors":
            c_a, c_b = module.allora_factor_coefficients(adapter_name)
            blocks.append([torch.cat([c_a.reshape(-1), c_b.reshape(-1)])[None], eta, [position]])
            continue
        _, value, batch, index = module._allora_entry(adapter_name, "rows", module._allora_compute_rows)
        if batch is None:
            blocks.append([value.reshape(1, -1), eta, [position]])
            continue
        block = by_batch.get(id(batch))
        if block is None:
            block = by_batch[id(batch)] = [batch.rows, eta, [None] * batch.rows.shape[0], batch]
            blocks.append(block)
        block[2][index] = position
    rows_of = []
    for block in blocks:
        if None in block[2]:  # a batch with adapters outside `adapters`: only the rows of those inside
            kept = [i for i, position in enumerate(block[2]) if position is not None]
            block[0], block[2] = block[0][kept], [block[2][i] for i in kept]
        rows_of.append(block[0])
    etas = {block[1] for block in blocks}
    if len(etas) > 1:  # c / eta per block; with one eta, the few statistics are divided at the end instead
        rows_of = [rows / block[1] for rows, block in zip(rows_of, blocks)]
    mins = [rows.amin(dim=1) for rows in rows_of]
    medians = [rows.median(dim=1).values for rows in rows_of]
    overall_median = torch.cat([rows.reshape(-1) for rows in rows_of]).median()
    mins_all = torch.cat(mins)
    vector = torch.cat([mins_all.min()[None], overall_median[None], mins_all, torch.cat(medians)])
    if len(etas) == 1:
        vector = vector / etas.pop()
    # the per-layer entries are in the blocks' order
    return [adapters[position][0] for block in blocks for position in block[2]], vector


def allora_coefficient_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """
    The min and median of `c / eta` per ALLoRA layer and over all of them, as 0-dim tensors on the model's device
    (no host synchronization; computed from the current weights, with the layers' cached coefficients).

    Args:
        model (`torch.nn.Module`): a model with ALLoRA adapters (a `PeftModel`, or wrapped by DDP).

    Returns:
        `dict[str, torch.Tensor]`: keys `c_over_eta_min`, `c_over_eta_median`, `c_over_eta_min/<layer>` and
        `c_over_eta_median/<layer>` (`<layer>` is the module path without peft's `base_model.model.` prefix, with
        `:<adapter>` appended for adapters other than `"default"`). Empty without ALLoRA adapters.
    """
    stats = _stats(model)
    if stats is None:
        return {}
    names, vector = stats
    return dict(zip(_keys(names), vector.unbind(0)))


def _keys(names: list[str]) -> list[str]:
    return [
        "c_over_eta_min",
        "c_over_eta_median",
        *(f"c_over_eta_min/{name}" for name in names),
        *(f"c_over_eta_median/{name}" for name in names),
    ]


class ALLoRADiagnostics(Regularizer):
    """
    Logs ALLoRA's coefficient diagnostic (min and median of `c / eta` per layer, and over the model) with the
    Trainer's training metrics. It changes nothing in training.

    The values are computed only when the Trainer logs (every `logging_steps`), from the weights at that moment, with
    one host synchronization for all of them; the training steps themselves pay nothing.

    Example:

        ```py
        >>> trainer = RegTrainer(model=allora_model, args=args, train_dataset=ds)  # added automatically
        >>> trainer = RegTrainer(..., regularizers=[ALLoRADiagnostics(per_layer=True)])  # also each layer's pair
        ```

    Args:
        per_layer (`bool`, defaults to `False`): also report each layer's min and median (two metrics per layer: off
            by default, so that the console logs stay readable; dashboards may want them).
    """

    name = "allora"

    def __init__(self, per_layer: bool = False):
        if not isinstance(per_layer, bool):
            raise ValueError(f"ALLoRADiagnostics: `per_layer` = {per_layer!r} (allowed: True or False).")
        self.per_layer = per_layer
        self._model: weakref.ref | None = None
        self._adapters: list | None = None

    def setup(self, trainer) -> None:
        self._model = weakref.ref(trainer.model)
        self._adapters = None

    def diagnostics(self) -> dict[str, float]:
        model = self._model() if self._model is not None else None
        if model is None or not self.log_diagnostics:
            return {}
        if self._adapters is None:  # the model's ALLoRA layers, found once per train() call
            self._adapters = _named_adapters(model)
        stats = _stats(model, self._adapters)
        if stats is None:
            return {}
        names, vector = stats
        values = vector.tolist()  # one host sync for all of them
        out = {"c_over_eta_min": values[0], "c_over_eta_median": values[1]}
        if self.per_layer:
            count = len(names)
            mins = dict(zip(names, values[2 : 2 + count]))
            medians = dict(zip(names, values[2 + count :]))
            for name, _, _ in self._adapters:  # in the model's order
                out[f"c_over_eta_min/{name}"] = mins[name]
            for name, _, _ in self._adapters:
                out[f"c_over_eta_median/{name}"] = medians[name]
        return out


def automatic_regularizers(model: nn.Module | None, regularizers: list[Regularizer]) -> list[Regularizer]:
    """
    The regularizers that regtune's trainers add on their own for `model`: [`ALLoRADiagnostics`] when the model has
    ALLoRA adapters and no regularizer named `"allora"` is given.
    """
    if model is None or any(reg.name == ALLoRADiagnostics.name for reg in regularizers):
        return []
    if next(allora_adapters(model), None) is None:
        return []
    return [ALLoRADiagnostics()]


register_training_hooks(AdapterTrainingHooks("allora_diagnostics", regularizers=automatic_regularizers))
