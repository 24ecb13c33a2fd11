"""The adapter axis of the adapter test matrix: every regtune adapter joins by adding one `AdapterCase`.

A property that does not apply to an adapter is listed in `not_applicable` with the reason; the matrix then does
not generate that test (it is not skipped silently: `test_matrix_exclusions_have_reasons` checks every entry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from regtune import ALLoRAConfig, GLADConfig, MaskTuningConfig


@dataclass
class AdapterCase:
    name: str
    config_cls: type
    kwargs: dict
    # kwargs that make the adapter a non-identity at init, so merge/save/disable tests have signal
    non_identity_kwargs: dict
    # (kwargs, substring the ValueError must contain): bad input names the field
    invalid_kwargs: list[tuple[dict, str]] = field(default_factory=list)
    # property name -> reason why it does not apply
    not_applicable: dict[str, str] = field(default_factory=dict)
    # name of the trainable-parameter prefix (peft's tuner prefix)
    prefix: str = "lora_"
    # SGD learning rate of the short training runs in the matrix (the adapter must visibly change the outputs)
    train_lr: float = 0.5
    # what must survive save/load exactly: by default the whole state dict; an adapter that publishes a
    # compressed form (mask tuning: bit-packed masks) maps the state dict to what it keeps
    state_view: Callable[[dict], dict] = lambda state: state


ADAPTER_CASES = [
    AdapterCase(
        name="allora",
        config_cls=ALLoRAConfig,
        kwargs={"r": 4, "eta": 2.0},
        non_identity_kwargs={"init_lora_weights": False},
        invalid_kwargs=[
            ({"lora_dropout": 0.1}, "lora_dropout"),
            ({"lora_alpha": 16}, "lora_alpha"),
            ({"eta": 0.0}, "eta"),
            ({"eta": -1.0}, "eta"),
            ({"coefficient_on": "weights"}, "coefficient_on"),
            ({"use_rslora": True}, "use_rslora"),
            ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
            ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern"),
            ({"lora_bias": True}, "lora_bias"),
        ],
    ),
    AdapterCase(
        name="allora-update",
        config_cls=ALLoRAConfig,
        kwargs={"r": 4, "eta": 2.0, "coefficient_on": "update"},
        non_identity_kwargs={"init_lora_weights": False},
    ),
    AdapterCase(
        name="glad",
        config_cls=GLADConfig,
        kwargs={"r": 4, "lora_alpha": 8, "rho": 0.05, "glad_lambda": 0.5},
        non_identity_kwargs={"init_lora_weights": False},
        invalid_kwargs=[
            ({"rho": 0.0}, "rho"),
            ({"glad_lambda": 1.5}, "glad_lambda"),
            ({"glad_lambda": -0.1}, "glad_lambda"),
        ],
    ),
    AdapterCase(
        name="mask_tuning",
        config_cls=MaskTuningConfig,
        kwargs={},
        non_identity_kwargs={"init_weights": False},
        invalid_kwargs=[
            ({"threshold": 0.02}, "score_init"),
            ({"score_l2_weight": -1.0}, "score_l2_weight"),
            ({"graddrop_lambda": 2.0}, "graddrop_lambda"),
        ],
        not_applicable={
            "mixed_batch": "a mask changes the weight itself, so a mixed batch would need one weight matrix per "
            "sample; the layer raises a clear error instead (tested in test_mask_tuning.py)",
        },
        prefix="masktune_",
        train_lr=20.0,
        state_view=lambda state: {k: (v > 5e-3 if "masktune_scores" in k else v) for k, v in state.items()},
    ),
]
