"""Shared plumbing of the regularizers that keep a state per training example (ELR, PS-KD, the noisy-label monitor).

- [`add_sample_index`]: adds the per-example index column (`sample_index`) that they read. The Trainer's
  `remove_unused_columns` keeps it (the mixin adds every regularizer's `input_columns` to the columns it keeps) and
  the mixin never passes it to the model.
- [`PerExampleBuffer`]: an `(N, C)` float32 table indexed by that column, on the training device or on the CPU,
  written identically on every process under DDP (the rows written by each process are all-gathered), saved in every
  Trainer checkpoint through the regularizer's `state_dict` and restored exactly.
- [`PerExampleRegularizer`]: the base class that sizes the buffers at `setup`, validates the index column and the
  number of classes, and reads the batch's index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from regtune.functional._checks import is_int

from .base import Regularizer


if TYPE_CHECKING:
    from transformers import Trainer


SAMPLE_INDEX_COLUMN = "sample_index"
"""The default name of the per-example index column."""

BUFFER_DEVICES = ("auto", "cpu")


def add_sample_index(dataset, column: str = SAMPLE_INDEX_COLUMN):
    """
    Return `dataset` with a column `column` holding each row's position (0 .. len - 1): the index that ELR, PS-KD and
    the noisy-label monitor use to find an example's row in their per-example buffers.

    Add it to the training split *after* any `select`, `shuffle` or `filter`, so that the indices run over
    `range(len(dataset))`. The Trainer keeps the column (with `remove_unused_columns=True` too) when a regularizer
    of the trainer reads it, and never passes it to the model.

    ```py
    >>> from regtune.regularizers import ELR, add_sample_index
    >>> train = add_sample_index(train)
    >>> trainer = RegTrainer(model=model, args=args, train_dataset=train, regularizers=[ELR()])
    ```

    Args:
        dataset (`datasets.Dataset` or a map-style `torch.utils.data.Dataset` of dicts): the training data.
        column (`str`, defaults to `"sample_index"`): the column name.

    Returns:
        A `datasets.Dataset` (via `Dataset.map(..., with_indices=True)`), or for a torch data set a wrapper whose
        items are the original dicts plus `{column: index}`.
    """
    if not isinstance(column, str) or not column:
        raise ValueError(f"add_sample_index: `column` must be a non-empty string, got {column!r}.")
    if hasattr(dataset, "map") and hasattr(dataset, "column_names"):
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        return dataset.map(lambda _, i: {column: i}, with_indices=True, desc=f"Adding {column}")
    return _IndexedDataset(dataset, column)


class _IndexedDataset(torch.utils.data.Dataset):
    """A map-style data set of dicts, with each item's index added under `column`."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        if not isinstance(item, dict):
            raise ValueError(
                f"add_sample_index: the items of {type(self.dataset).__name__} must be dicts (the Trainer's format), "
                f"got {type(item).__name__}."
            )
        return {**item, self.column: index}


class PerExampleBuffer:
    """
    An `(num_examples, num_classes)` float32 table of per-example vectors (ELR's targets, PS-KD's predictions).

    Under DDP (or any multi-process Accelerate run) each process sees other examples, so every [`write`] all-gathers
    the `(index, row)` pairs of all processes (padded to the longest batch) and every process writes all of them:
    the tables stay identical on every process, as PS-KD's released code does with `dist.all_gather`. An example that
    appears twice in one gathered step (the distributed sampler pads the last batches by repeating examples) keeps one
    of its rows. Each process saves its own (identical) copy in its `regtune_regularizers_{rank}.pt`. Under FSDP the
    same holds (the table is not a model parameter and is never sharded).

    With `device="cpu"` the table lives in host memory (ImageNet-1k at 1000 classes is 1.28M x 1000 x 4 B = 5.1 GB):
    each read and write then copies `B x C` values between host and device (a synchronization per step).
    """

    def __init__(self, num_examples: int, num_classes: int, device: torch.device | str = "cpu", fill: float = 0.0):
        self.num_examples, self.num_classes = int(num_examples), int(num_classes)
        self.table = torch.full((self.num_examples, self.num_classes), float(fill), device=device)

    @property
    def device(self) -> torch.device:
        return self.table.device

    def read(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The rows `index` (shape `(B,)`), as a `(B, C)` tensor on `device`."""
        rows = self.table.index_select(0, index.to(self.table.device, torch.long))
        return rows.to(device, non_blocking=True)

    def write(self, index: torch.Tensor, rows: torch.Tensor, accelerator=None) -> torch.Tensor:
        """
        Set the rows `index` to `rows` (detached), on every process (all-gathered when there are several); return the
        indices written (those of every process), on the table's device.
        """
        index, rows = index.detach().long(), rows.detach().float()
        if accelerator is not None and accelerator.num_processes > 1:
            index, rows = gather_rows(accelerator, index, rows)
        index = index.to(self.table.device)
        self.table.index_copy_(0, index, rows.to(self.table.device))
        return index

    def state(self) -> torch.Tensor:
        """A CPU copy of the table (for `state_dict`)."""
        return self.table.detach().cpu().clone()

    def load(self, table: torch.Tensor) -> None:
        """Restore the table saved by [`state`] (same shape), keeping this buffer's device."""
        self.table.copy_(table.to(self.table.device, self.table.dtype))


def gather_rows(accelerator, index: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    All-gather `(index, rows)` from every process, padded to the longest batch (index -1 marks the padding, dropped
    here): the pairs of all processes, on every process. A collective: every process must call it at the same step.
    """
    index = accelerator.pad_across_processes(index, dim=0, pad_index=-1)
    rows = accelerator.pad_across_processes(rows, dim=0, pad_index=0)
    index, rows = accelerator.gather(index), accelerator.gather(rows)
    keep = index >= 0
    return index[keep], rows[keep]


def _column(dataset, name: str) -> torch.Tensor:
    """A column of a `datasets.Dataset` as an int64 tensor."""
    import numpy as np

    return torch.as_tensor(np.asarray(dataset.with_format("numpy")[name]), dtype=torch.long)


class PerExampleRegularizer(Regularizer):
    """
    Base class of the regularizers that keep a state per training example, found through an index column.

    Subclasses set `buffers` (names of their `(N, C)` buffers) and use [`batch_index`], [`check_logits`] and
    `self._buffers[name]` in their hooks. At `setup` the buffers are sized `(num_examples, num_classes)`: by default
    `len(trainer.train_dataset)` and the model's `config.num_labels`; a run resumed from a checkpoint then gets them
    back from `load_state_dict` exactly.

    Args:
        num_classes (`int`, *optional*): C; default: the model's `config.num_labels`.
        num_examples (`int`, *optional*): N, the number of training examples (the index runs over `range(N)`);
            default: `len(trainer.train_dataset)`.
        index_column (`str`, defaults to `"sample_index"`): the index column (see [`add_sample_index`]).
        buffer_device (`str`, defaults to `"auto"`): `"auto"` keeps the buffers on the training device, `"cpu"` in
            host memory.
    """

    buffers: tuple[str, ...] = ()
    soft_targets: bool = False  # a method whose loss uses its own soft targets (refuses `label_smoothing_factor`)

    def __init__(
        self,
        num_classes: int | None = None,
        num_examples: int | None = None,
        index_column: str = SAMPLE_INDEX_COLUMN,
        buffer_device: str = "auto",
        _errors: list[str] | None = None,
    ):
        errors = list(_errors or [])
        if num_classes is not None and (not is_int(num_classes) or num_classes < 2):
            errors.append(
                f"`num_classes` must be None (the model's config.num_labels) or an integer >= 2, got {num_classes!r}"
            )
        if num_examples is not None and (not is_int(num_examples) or num_examples < 1):
            errors.append(f"`num_examples` must be None (len(train_dataset)) or an integer >= 1, got {num_examples!r}")
        if not isinstance(index_column, str) or not index_column:
            errors.append(f"`index_column` must be a non-empty column name, got {index_column!r}")
        if buffer_device not in BUFFER_DEVICES:
            errors.append(f"`buffer_device` must be one of {list(BUFFER_DEVICES)}, got {buffer_device!r}")
        from regtune.functional._checks import raise_field_errors

        raise_field_errors(type(self).__name__, errors)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.num_examples = None if num_examples is None else int(num_examples)
        self.index_column = index_column
        self.input_columns = (index_column,)
        self.buffer_device = buffer_device
        self._buffers: dict[str, PerExampleBuffer] = {}
        self._accelerator = None
        self._sizes: tuple[int, int] | None = None
        self._index_checked = False
        self._diag: dict[str, list[torch.Tensor]] = {}  # device-side values since the last log

    # ---- diagnostics ----

    def record_diagnostic(self, key: str, value: torch.Tensor) -> None:
        """Keep a micro-batch's value of diagnostic `key` (a 0-d tensor, on the device: no host sync per step)."""
        self._diag.setdefault(key, []).append(value.detach())

    def diagnostics(self) -> dict[str, float | torch.Tensor]:
        """The mean of every recorded diagnostic since the last call (then reset)."""
        if not self.log_diagnostics:
            return {}
        out: dict[str, float | torch.Tensor] = {k: torch.stack(v).mean() for k, v in self._diag.items() if v}
        self._diag = {}
        return out

    # ---- setup ----

    def setup(self, trainer: Trainer) -> None:
        owner = type(self).__name__
        if self.soft_targets and getattr(trainer.args, "label_smoothing_factor", 0.0):
            raise ValueError(
                f"{owner}: TrainingArguments.label_smoothing_factor={trainer.args.label_smoothing_factor} would stack "
                f"label smoothing on {owner}'s own soft targets; set `label_smoothing_factor` to 0 (the only value "
                f"allowed with {owner})."
            )
        model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
        config = getattr(model, "config", None)
        num_classes = self.num_classes or getattr(config, "num_labels", None)
        if num_classes is None or num_classes < 2:
            raise ValueError(
                f"{owner}: cannot tell the number of classes (the model has no `config.num_labels`); pass "
                "`num_classes` (an integer >= 2)."
            )
        dataset = trainer.train_dataset
        num_examples = self.num_examples
        if num_examples is None:
            try:
                num_examples = len(dataset)
            except TypeError:
                raise ValueError(
                    f"{owner}: the training data set has no length (an iterable data set); pass `num_examples` "
                    f"(the number of distinct `{self.index_column}` values)."
                ) from None
        self._check_index_column(dataset, num_examples)
        self._accelerator = getattr(trainer, "accelerator", None)
        device = torch.device("cpu") if self.buffer_device == "cpu" else trainer.args.device
        if self._sizes != (num_examples, num_classes) or not self._buffers:
            self._buffers = {name: PerExampleBuffer(num_examples, num_classes, device) for name in self.buffers}
            self.reset_state()
        self._sizes = (num_examples, num_classes)
        self._index_checked = False

    def reset_state(self) -> None:
        """Called when the buffers are (re)allocated: initialize them and any other per-example state."""

    def _check_index_column(self, dataset, num_examples: int) -> None:
        owner = type(self).__name__
        fix = (
            f"add it to the training data with `regtune.regularizers.add_sample_index(train_dataset, "
            f"column={self.index_column!r})` after any select/shuffle/filter"
        )
        names = getattr(dataset, "column_names", None)
        if names is None:
            return  # a torch data set: checked at the first step
        if self.index_column not in names:
            raise ValueError(
                f"{owner} needs the per-example index column `{self.index_column}` (`index_column`) in the training "
                f"data set, which has the columns {list(names)}: {fix}."
            )
        values = _column(dataset, self.index_column)
        if len(values) and (int(values.min()) < 0 or int(values.max()) >= num_examples):
            raise ValueError(
                f"{owner}: the index column `{self.index_column}` holds values in [{int(values.min())}, "
                f"{int(values.max())}], outside the allowed range [0, {num_examples - 1}] (`num_examples`={num_examples}"
                f"): {fix}, or pass `num_examples`."
            )

    # ---- per step ----

    def batch_index(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The batch's index column, checked once (the first step) to lie in `[0, num_examples)`."""
        owner = type(self).__name__
        index = inputs.get(self.index_column)
        if index is None:
            raise ValueError(
                f"{owner}: the training batch has no `{self.index_column}` column (`index_column`; keys: "
                f"{sorted(inputs)}): add it with `regtune.regularizers.add_sample_index(train_dataset)`, and keep it "
                "in the batch (a custom data collator must pass it through)."
            )
        index = torch.as_tensor(index).reshape(-1)
        if not self._index_checked:
            low, high = int(index.min()), int(index.max())  # one host read, at the first step only
            n = self._sizes[0]
            if low < 0 or high >= n:
                raise ValueError(
                    f"{owner}: the batch's `{self.index_column}` values [{low}, {high}] are outside the allowed range "
                    f"[0, {n - 1}] (`num_examples`={n}): add the index with `add_sample_index` after any "
                    "select/shuffle/filter, or pass `num_examples`."
                )
            self._index_checked = True
        return index

    def check_logits(self, outputs: Any, labels: torch.Tensor | None) -> torch.Tensor:
        """The `(B, C)` logits of `outputs`, checked against `num_classes`."""
        owner = type(self).__name__
        logits = getattr(outputs, "logits", None)
        if logits is None and isinstance(outputs, dict):
            logits = outputs.get("logits")
        if logits is None and isinstance(outputs, (tuple, list)) and outputs:
            logits = outputs[1] if len(outputs) > 1 and outputs[0].dim() == 0 else outputs[0]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError(
                f"{owner} works on classification logits of shape (batch, num_classes), got "
                f"{None if logits is None else tuple(logits.shape)}."
            )
        n_classes = self._sizes[1]
        if logits.shape[-1] != n_classes:
            raise ValueError(
                f"{owner}: the model gives {logits.shape[-1]} logits per example but `num_classes` is {n_classes}; "
                f"set `num_classes` to {logits.shape[-1]} (or None, to take the model's config.num_labels)."
            )
        if labels is None:
            raise ValueError(f"{owner} needs the batch's integer class `labels`.")
        if labels.is_floating_point():
            raise ValueError(
                f"{owner} needs integer class labels; got {labels.dtype} labels of shape {tuple(labels.shape)} (soft "
                "labels would also switch the model's loss to BCE)."
            )
        return logits

    def write(self, name: str, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Write `rows` at `index` into buffer `name`, on every process; return the indices written (all processes)."""
        return self._buffers[name].write(index, rows, self._accelerator)

    # ---- state ----

    def state_dict(self) -> dict:
        state: dict[str, Any] = {name: buffer.state() for name, buffer in self._buffers.items()}
        if self._sizes is not None:
            state["num_examples"], state["num_classes"] = self._sizes
        return state

    def load_state_dict(self, state: dict) -> None:
        sizes = (state.get("num_examples"), state.get("num_classes"))
        if self._sizes is not None and sizes != self._sizes:
            raise ValueError(
                f"the checkpoint's buffers are for {sizes[0]} examples x {sizes[1]} classes, this run has "
                f"{self._sizes[0]} x {self._sizes[1]}"
            )
        for name, buffer in self._buffers.items():
            if name in state:
                buffer.load(state[name])
