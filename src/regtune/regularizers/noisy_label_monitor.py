"""The memorization diagnostic of learning with noisy labels (the curves of the ELR paper's first figure)."""

from __future__ import annotations

from typing import Any

import torch

from .per_example import SAMPLE_INDEX_COLUMN, PerExampleRegularizer, _column


TRUE_LABEL_COLUMN = "true_label"


class NoisyLabelMonitor(PerExampleRegularizer):
    """
    Measures, over training, how the model treats the training examples whose label is wrong (it adds no loss).

    Liu et al. (2020, https://arxiv.org/abs/2007.00151, Figure 1) show that on mislabeled examples a network first
    predicts the *true* class ("early learning") and later the given wrong one ("memorization"). This monitor needs
    the true labels, which only an experiment has (its own noise model): it reads them at `setup` from the training
    data set's `true_label_column` (or takes them as `true_labels`), indexed by the `sample_index` column. The
    Trainer drops that column from the batches (`remove_unused_columns`), so the regularizers being measured never
    see it.

    From the training forward passes since the last log (no extra pass: the predictions are the argmax of the logits
    the step computes anyway, in train mode, before that step's update), it reports (as `noisy_labels/<key>`):

    - `memorized`: fraction of mislabeled examples predicted as their given (wrong) label,
    - `true_label`: fraction of mislabeled examples predicted as their true label,
    - `clean_fit`: fraction of correctly labeled examples predicted as their label,
    - `noisy_fraction`: fraction of the examples seen that are mislabeled.

    Under DDP each process counts the examples it sees (the logged values are process 0's, a sample of the batch).

    Args:
        true_labels (`list[int]` or `torch.Tensor`, *optional*): the true label of each training example, by index;
            default: read from `true_label_column`.
        true_label_column (`str`, defaults to `"true_label"`): the training data set's column of true labels.
        label_column (`str`, defaults to `"labels"`): the training data set's column of given labels (`"label"` is
            tried too).
        index_column (`str`, defaults to `"sample_index"`): see [`add_sample_index`].
    """

    name = "noisy_labels"
    buffers = ()

    def __init__(
        self,
        true_labels: list[int] | torch.Tensor | None = None,
        true_label_column: str = TRUE_LABEL_COLUMN,
        label_column: str = "labels",
        index_column: str = SAMPLE_INDEX_COLUMN,
    ):
        errors = []
        if not isinstance(true_label_column, str) or not true_label_column:
            errors.append(f"`true_label_column` must be a column name, got {true_label_column!r}")
        if not isinstance(label_column, str) or not label_column:
            errors.append(f"`label_column` must be a column name, got {label_column!r}")
        labels = None
        if true_labels is not None:
            try:
                labels = torch.as_tensor(true_labels)
            except (TypeError, ValueError, RuntimeError):
                labels = None
            if (
                labels is None
                or labels.dim() != 1
                or labels.numel() == 0
                or labels.is_floating_point()
                or labels.dtype == torch.bool
                or labels.is_complex()
                or bool((labels < 0).any())
            ):
                errors.append(
                    "`true_labels` must be None (read the `true_label_column`) or a non-empty 1-D sequence of "
                    f"integer class ids >= 0, indexed by the sample index; got {true_labels!r}"
                )
        super().__init__(None, None, index_column, "auto", _errors=errors)
        self.true_labels = None if labels is None else labels.long()
        self.true_label_column, self.label_column = true_label_column, label_column
        self._true: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def setup(self, trainer) -> None:
        dataset = trainer.train_dataset
        names = list(getattr(dataset, "column_names", None) or [])
        true = self.true_labels
        if true is None:
            if self.true_label_column not in names:
                raise ValueError(
                    f"NoisyLabelMonitor needs the true labels: a `{self.true_label_column}` column "
                    f"(`true_label_column`) in the training data set (columns: {names}), or `true_labels=`."
                )
            index, values = _column(dataset, self.index_column), _column(dataset, self.true_label_column)
            true = torch.empty(int(index.max()) + 1, dtype=torch.long)
            true[index] = values
        self.num_examples = len(true)
        super().setup(trainer)
        self._true = true.to(trainer.args.device)
        self._counts = torch.zeros(5, device=trainer.args.device)

    def loss_term(self, model, inputs: dict[str, Any], outputs: Any) -> None:
        labels = inputs.get("labels")
        logits = getattr(outputs, "logits", None)
        if logits is None or labels is None or logits.dim() != 2:
            return None
        index = self.batch_index(inputs).to(logits.device)
        with torch.no_grad():
            pred = logits.argmax(-1)
            given = labels.reshape(-1).long()
            true = self._true.index_select(0, index)
            noisy = given != true
            clean = ~noisy
            self._counts += torch.stack(
                [
                    noisy.sum(),
                    (noisy & (pred == given)).sum(),
                    (noisy & (pred == true)).sum(),
                    clean.sum(),
                    (clean & (pred == given)).sum(),
                ]
            ).float()
        return None

    def diagnostics(self) -> dict[str, float | torch.Tensor]:
        if self._counts is None or not self.log_diagnostics:
            return {}
        n_noisy, memorized, true_label, n_clean, clean_fit = self._counts
        out = {
            "memorized": memorized / n_noisy.clamp_min(1.0),
            "true_label": true_label / n_noisy.clamp_min(1.0),
            "clean_fit": clean_fit / n_clean.clamp_min(1.0),
            "noisy_fraction": n_noisy / (n_noisy + n_clean).clamp_min(1.0),
        }
        out = {k: v.clone() for k, v in out.items()}
        self._counts.zero_()
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"NoisyLabelMonitor(true_label_column={self.true_label_column!r})"
