"""The adapter axis of the adapter test matrix: every regtune adapter joins by adding one `AdapterCase`.

A property that does not apply to an adapter is listed in `not_applicable` with the reason; the matrix then does
not generate that test (it is not skipped silently: `test_matrix_exclusions_have_reasons` checks every entry).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from regtune import ALLoRAConfig, GLADConfig


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
]
