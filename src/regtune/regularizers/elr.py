"""ELR, early-learning regularization (Liu et al., NeurIPS 2020, https://arxiv.org/abs/2007.00151)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from regtune.functional._checks import is_real
from regtune.functional.noisy_labels import clamped_softmax, elr_ema_update, elr_penalty, elr_sigmoid_rampup

from .per_example import SAMPLE_INDEX_COLUMN, PerExampleRegularizer


ELR_PRESETS = {
    "cifar10": {"beta": 0.7, "lambda_": 3.0},
    "cifar100": {"beta": 0.9, "lambda_": 7.0},
    "cifar10_asym": {"beta": 0.9, "lambda_": 1.0},
}
"""`(beta, lambda)` of the released configs (shengliu66/ELR, `ELR/config_cifar10.json`, `config_cifar100.json`,
`config_cifar10_asym.json`): CIFAR-10 with symmetric noise, CIFAR-100, CIFAR-10 with asymmetric noise."""


class ELR(PerExampleRegularizer):
    """
    Early-learning regularization (Liu, Niles-Weed, Razavian, Fernandez-Granda, NeurIPS 2020, "Early-Learning
    Regularization Prevents Memorization of Noisy Labels", https://arxiv.org/abs/2007.00151; code
    github.com/shengliu66/ELR, `ELR/model/loss.py`).

    Early in training a network fits the clean examples and predicts the *true* class of many mislabeled ones; later
    it memorizes the wrong labels. ELR keeps, for every training example i, a running average `t_i` of the model's
    own (clamped, renormalized) softmax predictions and adds a term that keeps the prediction `p_i` aligned with it:

        p_i  = clamp(softmax(z_i), 1e-4, 1 - 1e-4)
        t_i <- beta * t_i + (1 - beta) * p_i.detach() / sum_c p_ic.detach()        (t starts at 0)
        L    = CE(z, y) + lambda * mean_i log(1 - <t_i, p_i>)

    The cross-entropy is the model's own loss (the Trainer's task loss, computed with the integer labels); ELR adds
    the second term through [`Regularizer.loss_term`]. The buffer `t` is `(N, C)` float32, indexed by the
    `sample_index` column (see [`add_sample_index`]), all-gathered under DDP, saved in every checkpoint.

    Defaults: `beta=0.7, lambda_=3.0`, the released CIFAR-10 (symmetric noise) config `ELR/config_cifar10.json`
    (CIFAR-100: 0.9 / 7, CIFAR-10 asymmetric: 0.9 / 1; see `ELR_PRESETS`). The loss class's own default is beta 0.3,
    which every shipped config overrides.

    Diagnostics (as `elr/<key>`): `penalty` (the term without lambda, mean log(1 - <t, p>)), `lambda` (its weight in the steps since the last
    log, with the ramp-up), `term_to_ce` (lambda * |penalty| / CE), `target_agreement` (mean <t_i, p_i>), and
    `target_disagrees` (the fraction of examples whose target's argmax is not their given label: on mislabeled
    examples this is ELR correcting the label).

    Args:
        beta (`float`, defaults to `0.7`): the EMA momentum, in [0, 1).
        lambda_ (`float`, defaults to `3.0`): the weight lambda of the term, >= 0.
        rampup_steps (`int`, defaults to `0`): ELR+'s sigmoid ramp-up of lambda over this many optimizer steps
            (`lambda * exp(-5 (1 - step / rampup_steps)^2)`, `ELR_plus/model/loss.py`); 0 (the released configs'
            `coef_step: 0`) is no ramp. ELR+'s other parts (mixup of the targets, two networks with weight
            averaging) are not included.
        num_classes, num_examples, index_column, buffer_device: see [`PerExampleRegularizer`].
    """

    name = "elr"
    buffers = ("targets",)

    def __init__(
        self,
        beta: float = 0.7,
        lambda_: float = 3.0,
        rampup_steps: int = 0,
        num_classes: int | None = None,
        num_examples: int | None = None,
        index_column: str = SAMPLE_INDEX_COLUMN,
        buffer_device: str = "auto",
    ):
        errors = []
        if not is_real(beta) or not 0.0 <= beta < 1.0:
            errors.append(f"`beta` must be a number in [0, 1), got {beta!r}")
        if not is_real(lambda_) or lambda_ < 0:
            errors.append(f"`lambda_` must be a number >= 0, got {lambda_!r}")
        if not is_real(rampup_steps) or rampup_steps < 0 or int(rampup_steps) != rampup_steps:
            errors.append(f"`rampup_steps` must be an integer >= 0, got {rampup_steps!r}")
        super().__init__(num_classes, num_examples, index_column, buffer_device, _errors=errors)
        self.beta, self.lambda_, self.rampup_steps = float(beta), float(lambda_), int(rampup_steps)
        self._step = 0

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self._trainer_state = trainer.state

    def current_lambda(self) -> float:
        """lambda times the ramp-up factor at the current optimizer step."""
        state = getattr(self, "_trainer_state", None)
        step = state.global_step if state is not None else 0
        return self.lambda_ * elr_sigmoid_rampup(step, self.rampup_steps)

    def loss_term(self, model, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        labels = inputs.get("labels")
        logits = self.check_logits(outputs, labels)
        index = self.batch_index(inputs)
        probs = clamped_softmax(logits)
        targets = elr_ema_update(self._buffers["targets"].read(index, probs.device), probs, self.beta)
        self.write("targets", index, targets)
        penalty = elr_penalty(probs, targets)
        weight = self.current_lambda()
        if self.log_diagnostics:
            with torch.no_grad():
                ce = F.cross_entropy(logits.float(), labels.long())
                agreement = (targets * probs).sum(-1).mean()
                disagrees = (targets.argmax(-1) != labels).float().mean()
                for key, value in (
                    ("penalty", penalty.detach()),
                    ("term_to_ce", weight * penalty.detach().abs() / ce.clamp_min(1e-12)),
                    ("target_agreement", agreement),
                    ("target_disagrees", disagrees),
                    ("lambda", torch.tensor(weight, dtype=torch.float32, device=probs.device)),
                ):
                    self.record_diagnostic(key, value)
        return weight * penalty

    def __repr__(self) -> str:
        return f"ELR(beta={self.beta}, lambda_={self.lambda_}, rampup_steps={self.rampup_steps})"
