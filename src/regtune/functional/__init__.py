"""Layer 1: the math of every regtune method as pure torch functions (no peft, no Trainer)."""

from .allora import allora_lora_forward, allora_row_coefficient


__all__ = ["allora_lora_forward", "allora_row_coefficient"]
