"""Distributed runs as users launch them: `accelerate launch` and `torchrun` give real data parallelism, or stop with a
message saying how."""

from __future__ import annotations

import os


class LaunchError(ValueError):
    """The launcher was asked for several processes, but this run would not be data-parallel; the message says how
    to launch it."""


def _parent_arguments() -> list[str]:
    """The command line of the process that started this one (Linux: `/proc`), or `[]`."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def requested_processes(arguments: list[str]) -> int | None:
    """The `--num_processes` (`--num-processes`) of an `accelerate launch` command line, or `None`."""
    for i, argument in enumerate(arguments):
        for flag in ("--num_processes", "--num-processes"):
            value = None
            if argument == flag and i + 1 < len(arguments):
                value = arguments[i + 1]
            elif argument.startswith(flag + "="):
                value = argument.split("=", 1)[1]
            if value is not None:
                try:
                    return int(value)
                except ValueError:
                    return None
    return None


def check_launch(command: str = "regtune run") -> None:
    """
    Refuse an `accelerate launch --num_processes N` (N > 1) that started a single process: on a machine without GPUs
    accelerate runs one process unless `--multi_gpu` is given, and the run would silently not be distributed.

    Raises:
        [`LaunchError`]: naming the command that starts N processes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return  # already several processes, or not started by `accelerate launch`
    arguments = _parent_arguments()
    if "launch" not in arguments:
        return
    requested = requested_processes(arguments)
    if requested is not None and requested > 1:
        raise LaunchError(
            f"`accelerate launch --num_processes {requested}` started 1 process (without GPUs, accelerate needs "
            f"--multi_gpu to start several): run `accelerate launch --multi_gpu --num_processes {requested} -m "
            f"{command} ...` (gloo on CPUs), or `torchrun --nproc_per_node {requested} -m {command} ...`"
        )


def distributed_training_defaults(training: dict) -> dict:
    """
    `training` (a recipe's TrainingArguments fields) with `use_cpu=True` added when several processes run on a
    machine without GPUs (torchrun, `accelerate launch --multi_gpu`): without it each process trains alone, all
    writing the same folder. An explicit `use_cpu` is kept.
    """
    from .io import has_accelerator

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "use_cpu" not in training and not has_accelerator():
        return {**training, "use_cpu": True}
    return training
