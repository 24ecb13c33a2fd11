"""PS-KD, progressive self-knowledge distillation (Kim et al., ICCV 2021, https://arxiv.org/abs/2006.12000)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from regtune.functional._checks import is_real
from regtune.functional.noisy_labels import pskd_alpha, pskd_soft_targets, soft_cross_entropy

from .per_example import SAMPLE_INDEX_COLUMN, PerExampleRegularizer


class PSKD(PerExampleRegularizer):
    """
    Progressive self-knowledge distillation (Kim, Ji, Yoon, Hwang, ICCV 2021, "Self-Knowledge Distillation with
    Progressive Refinement of Targets", https://arxiv.org/abs/2006.12000; code github.com/lgcnsai/PS-KD-Pytorch,
    `main.py` and `loss/pskd_loss.py`).

    The model is its own teacher: the target of example i is a mix of its one-hot label and the prediction the model
    made for i in the *previous epoch* (recorded from the training forward pass, no extra teacher pass), with a weight
    growing linearly over the epochs:

        alpha_t = alpha_T * (epoch + 1) / total_epochs                   (epoch counted from 0, as `main.py`)
        soft_i  = (1 - alpha_t) * onehot(y_i) + alpha_t * P_prev[i]      (P_prev[i] = onehot(y_i) before i's first visit)
        L       = mean_i sum_c -soft_ic * log_softmax(z_i)_c
        after the step: P_prev[i] = softmax(z_i).detach()

    How it is applied: the model still gets the integer `labels` and computes its own cross-entropy (so its
    `config.problem_type` stays `single_label_classification`: soft labels are never given to the model, which would
    switch it to BCE); PS-KD adds `L - CE(z, y)` as its loss term, so the step's loss is exactly PS-KD's. This assumes
    the task loss is the plain mean cross-entropy of the logits: `label_smoothing_factor` (which would stack on the
    soft targets) and a `compute_loss_func` are refused.

    The buffer `P_prev` is `(N, C)` float32 (on the CPU in the released code; here on the training device unless
    `buffer_device="cpu"`), indexed by the `sample_index` column (see [`add_sample_index`]), all-gathered under DDP
    (as `main.py` does with `dist.all_gather`), saved in every checkpoint with the per-example "visited" flags.
    `alpha_t` is recomputed from the Trainer's epoch, so a resumed run continues exactly.

    Diagnostics (as `pskd/<key>`): `alpha` (the alpha_t of the steps since the last log), `target_label_mass` (mean weight of the given label in the soft
    targets), `prev_disagrees` (fraction of visited examples whose previous prediction is not their given label) and
    `kd_minus_ce` (the term added to the CE).

    Args:
        alpha_T (`float`, defaults to `0.8`): the final weight of the self-teacher, in [0, 1] (`--alpha_T`, default 0.8
            in `main.py`).
        total_epochs (`float`, *optional*): the denominator of alpha_t (`--end_epoch` in `main.py`); default: the
            Trainer's number of epochs (`state.num_train_epochs`, `ceil(max_steps / steps_per_epoch)` with
            `max_steps`).
        num_classes, num_examples, index_column, buffer_device: see [`PerExampleRegularizer`].
    """

    name = "pskd"
    buffers = ("predictions",)
    soft_targets = True

    def __init__(
        self,
        alpha_T: float = 0.8,  # noqa: N803 - the paper's name
        total_epochs: float | None = None,
        num_classes: int | None = None,
        num_examples: int | None = None,
        index_column: str = SAMPLE_INDEX_COLUMN,
        buffer_device: str = "auto",
    ):
        errors = []
        if not is_real(alpha_T) or not 0.0 <= alpha_T <= 1.0:
            errors.append(f"`alpha_T` must be a number in [0, 1], got {alpha_T!r}")
        if total_epochs is not None and (not is_real(total_epochs) or total_epochs <= 0):
            errors.append(f"`total_epochs` must be None (the Trainer's epochs) or a number > 0, got {total_epochs!r}")
        super().__init__(num_classes, num_examples, index_column, buffer_device, _errors=errors)
        self.alpha_T = float(alpha_T)
        self.total_epochs = None if total_epochs is None else float(total_epochs)
        self._visited: torch.Tensor | None = None
        self._alpha = 0.0

    def setup(self, trainer) -> None:
        if getattr(trainer, "compute_loss_func", None) is not None:
            raise ValueError(
                "PSKD replaces the model's cross-entropy by the soft-target one and needs the task loss to be that "
                "cross-entropy: `compute_loss_func` must be None with PSKD."
            )
        super().setup(trainer)
        model = trainer.accelerator.unwrap_model(trainer.model)
        problem = getattr(getattr(model, "config", None), "problem_type", None)
        if problem not in (None, "single_label_classification"):
            raise ValueError(
                f"PSKD needs single-label classification; the model's config.problem_type is {problem!r} (allowed: "
                "None or 'single_label_classification')."
            )
        self._trainer_state = trainer.state

    def reset_state(self) -> None:
        n = self._buffers["predictions"].num_examples
        self._visited = torch.zeros(n, dtype=torch.bool, device=self._buffers["predictions"].device)

    def current_epoch(self) -> int:
        state = getattr(self, "_trainer_state", None)
        return int(math.floor((state.epoch or 0.0) + 1e-6)) if state is not None else 0

    def current_alpha(self) -> float:
        """alpha_t at the Trainer's current epoch."""
        state = getattr(self, "_trainer_state", None)
        total = self.total_epochs or (getattr(state, "num_train_epochs", 0) if state is not None else 0)
        if not total:
            return 0.0
        return pskd_alpha(self.alpha_T, self.current_epoch(), total)

    def loss_term(self, model, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        labels = inputs.get("labels")
        logits = self.check_logits(outputs, labels)
        index = self.batch_index(inputs)
        labels = labels.long().reshape(-1)
        buffer = self._buffers["predictions"]
        num_classes = buffer.num_classes
        previous = buffer.read(index, logits.device)
        visited = self._visited.index_select(0, index.to(self._visited.device)).to(logits.device)
        onehot = F.one_hot(labels, num_classes).float()
        previous = torch.where(visited.unsqueeze(-1), previous, onehot)  # the released code's epoch-0 one-hot
        alpha = self.current_alpha()
        self._alpha = alpha
        soft = pskd_soft_targets(labels, previous, alpha, num_classes)
        term = soft_cross_entropy(logits, soft) - F.cross_entropy(logits.float(), labels)
        written = self.write("predictions", index, F.softmax(logits.detach().float(), dim=-1))
        self._visited[written.to(self._visited.device)] = True
        if self.log_diagnostics:
            with torch.no_grad():
                mass = soft.gather(1, labels.unsqueeze(1)).mean()
                seen = visited.float()
                disagree = ((previous.argmax(-1) != labels).float() * seen).sum() / seen.sum().clamp_min(1.0)
                for key, value in (("target_label_mass", mass), ("prev_disagrees", disagree), ("kd_minus_ce", term)):
                    self.record_diagnostic(key, value)
                self.record_diagnostic("alpha", torch.tensor(alpha, dtype=torch.float32, device=logits.device))
        return term

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self._visited is not None:
            state["visited"] = self._visited.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "visited" in state and self._visited is not None:
            self._visited.copy_(state["visited"].to(self._visited.device))

    def __repr__(self) -> str:
        return f"PSKD(alpha_T={self.alpha_T}, total_epochs={self.total_epochs})"
