"""Capturing and replaying the random state a forward pass draws its dropout masks from, so that a second pass of a
multi-pass method (GLAD's perturbed pass, LfU's consistency passes) can reuse the first pass's masks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


RNGState = dict[str, Any]
"""`{"cpu": state}` plus `{device_type: (index, state)}` for the model's accelerator."""


def capture_rng(device: torch.device | None) -> RNGState:
    """The state of the random generators a forward pass draws from: the CPU one and `device`'s accelerator's."""
    state: RNGState = {"cpu": torch.get_rng_state()}
    if device is not None and device.type not in ("cpu", "meta"):
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "get_rng_state"):
            index = device.index if device.index is not None else module.current_device()
            state[device.type] = (index, module.get_rng_state(index))
    return state


def same_rng(a: RNGState, b: RNGState) -> bool:
    """Whether two captured random states are equal (host tensors: no device synchronisation)."""
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if key == "cpu":
            if not torch.equal(value, other):
                return False
        elif value[0] != other[0] or not torch.equal(value[1], other[1]):
            return False
    return True


def restore_rng(state: RNGState) -> None:
    """Set the generators captured in `state` back to it."""
    for key, value in state.items():
        if key == "cpu":
            torch.set_rng_state(value)
        else:
            index, device_state = value
            getattr(torch, key).set_rng_state(device_state, index)


def _capture_like(state: RNGState) -> RNGState:
    """The current state of the generators `state` holds."""
    now: RNGState = {"cpu": torch.get_rng_state()}
    for key, value in state.items():
        if key != "cpu":
            now[key] = (value[0], getattr(torch, key).get_rng_state(value[0]))
    return now


@contextlib.contextmanager
def replayed_rng(state: RNGState | None) -> Iterator[None]:
    """
    Within the context the random state is `state` (a forward draws the same dropout masks as the forward that
    started from it); on exit the state from before the context is back. `None`: do nothing.
    """
    if state is None:
        yield
        return
    before = _capture_like(state)
    restore_rng(state)
    try:
        yield
    finally:
        restore_rng(before)
