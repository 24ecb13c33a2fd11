"""ALLoRA cases for peft's own custom-model tests (run by /work/shared/tools/peft_suite).

Run:

    PEFT_SNAPSHOT=<peft git snapshot> PYTHONPATH=src <peft_suite>/run.sh .venv/bin/python \
        tests/peft_parity/cases_allora.py

Every peft case whose config class is exactly `LoraConfig` (peft's full LoRA list: `nn.Linear`, transformers'
`Conv1D`, `nn.Embedding`, `nn.Conv1d/2d/3d` incl. grouped, `nn.MultiheadAttention`, `target_parameters`, several
adapters, trainable tokens) becomes "ALLoRA <peft name>" with `regtune.ALLoRAConfig` and the same kwargs, plus a
non-default `eta` and `norm_squared=False`, so that ALLoRA's own fields go through every save/load/config round
trip. One case per layer type is repeated with `row_norm="factors"` ("ALLoRA factors <peft name>").

peft cases that ask for something ALLoRA refuses by design (see docs/allora.md, "Refusals") are kept in the list
and skipped through `EXCLUSIONS` with the reason; `derive_cases` fills `EXCLUSIONS` from each case's kwargs. The
refusal itself (a `ValueError` at construction naming the field) is tested in tests/test_allora.py.

Adapters with `coefficient_on="update"` are not run here: peft's training tests step them with a plain
`torch.optim.SGD`, which ALLoRA refuses at the first step by design (the optimizer guard, also in docs/allora.md).
Importing this file imports regtune, which registers ALLORA with peft.
"""

from peft import LoraConfig

import regtune  # noqa: F401  (registers ALLORA with peft)
from regtune import ALLoRAConfig


ALLORA_KWARGS = {"eta": 1.5, "norm_squared": False}  # non-default values of ALLoRA's own fields

# one peft case per layer type, repeated with the "factors" reading of the norm
FACTORS_CASES = (
    "Vanilla MLP 4 LoRA",
    "Embedding + transformers Conv1D 3 LoRA",
    "Conv1d LoRA",
    "Conv2d Groups2 LoRA",
    "Conv3d 2 LoRA",
    "MHA 2 LoRA",
    "MLP 2 using nn.Parameter LoRA",
)

_VARIANTS = (
    "use_dora",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "alora_invocation_tokens",
)

# filled by derive_cases (the plugin reads it after the test module, and so derive_cases, has been imported)
EXCLUSIONS: list[str] = []


def refusal(kwargs: dict) -> str | None:
    """Why ALLoRAConfig refuses these LoRA kwargs by design (None when it accepts them)."""
    reasons = []
    r = kwargs.get("r", 8)
    if kwargs.get("lora_alpha", r) != r:
        reasons.append("lora_alpha != r (ALLoRA is scaling-free: eta's row coefficient replaces alpha/r)")
    if kwargs.get("lora_dropout", 0.0):
        reasons.append("lora_dropout > 0 (ALLoRA is dropout-free)")
    if kwargs.get("use_rslora"):
        reasons.append("use_rslora (a scaling rule; ALLoRA has none)")
    if kwargs.get("lora_bias"):
        reasons.append("lora_bias (the row coefficient covers B A, not a bias of B)")
    variants = [name for name in _VARIANTS if kwargs.get(name)]
    if kwargs.get("init_lora_weights") == "mica":
        variants.append("MiCA")
    if variants:
        reasons.append(
            f"another LoRA variant ({', '.join(variants)}): ALLoRA is itself a LoRA variant and peft applies one per "
            "adapter; the paper defines no row coefficient for DoRA/KaSA/MiCA/VeLoRA/MonteCLoRA/BD-LoRA"
        )
    return "; ".join(reasons) or None


def derive_cases(list_name, peft_list):
    out = []
    for case in peft_list:
        if case[2] is not LoraConfig:
            continue
        if list_name == "TEST_CASES":
            name, model_id, _, kwargs = case
            new_name = f"ALLoRA {name}"
            out.append((new_name, model_id, ALLoRAConfig, {**kwargs, **ALLORA_KWARGS}))
            reason = refusal(kwargs)
            if reason:
                EXCLUSIONS.append(f"*:{new_name}- | ALLoRA refuses {reason}")
            elif name in FACTORS_CASES:
                out.append((f"ALLoRA factors {name}", model_id, ALLoRAConfig, {**kwargs, "row_norm": "factors"}))
        else:  # MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES: (name, tuner method, config class, kwargs 1, kwargs 2)
            name, tuner_method, _, kwargs_1, kwargs_2 = case
            new_name = f"ALLoRA {name}"
            out.append(
                (new_name, tuner_method, ALLoRAConfig, {**kwargs_1, **ALLORA_KWARGS}, {**kwargs_2, **ALLORA_KWARGS})
            )
            reason = refusal(kwargs_1) or refusal(kwargs_2)
            if reason:
                EXCLUSIONS.append(f"*:{new_name}- | ALLoRA refuses {reason}")
    return out
