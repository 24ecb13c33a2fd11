"""Peak memory of one optimizer step of one variant, measured in a fresh process (a child of a fork server that has
only imported the libraries), for `bench/perf.py`.

CPU: the process's resident-set high-water mark (`VmHWM`) during one step, reset right before it
(`/proc/self/clear_refs`), after freed memory is handed back to the system (`malloc_trim`); reported as the peak
above the process's resident memory after the imports (the libraries and the interpreter, the same for every
variant), i.e. the memory the training run itself holds at its peak: weights, optimizer state, activations, the
method's buffers and the allocator's slack. A second figure counts tensors only: the bytes of the parameters,
buffers and optimizer state live at the step start, plus the peak of the running sum of the CPU allocator's
allocation and free events during one step (`torch.profiler(profile_memory=True)`), i.e. what
`torch.cuda.max_memory_allocated` would report on a GPU. CUDA: `torch.cuda.max_memory_allocated()` over one step
(and the same tensor count is then not needed).
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import tempfile
import time

import torch
from transformers import TrainerCallback


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def persistent_bytes(model, optimizer) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return _tensor_bytes(tensors)


class _Profile:
    """Peak of (allocated - freed) CPU tensor bytes between `start()` and `stop()`."""

    def start(self):
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()

    def stop(self) -> int:
        self.prof.__exit__(None, None, None)
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in self.prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
        running = peak = 0
        for _, size in events:
            running += size
            peak = max(peak, running)
        return peak


def peak_tensor_bytes(fn) -> int:
    """Peak of (allocated - freed) CPU tensor bytes while `fn()` runs."""
    profile = _Profile()
    profile.start()
    fn()
    return profile.stop()


class MemoryProbe(TrainerCallback):
    """Measures step `warmup` (RSS high-water mark) and step `warmup + 1` (tensor peak) of a Trainer's run."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.result: dict = {}
        self._profile = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        cuda = torch.cuda.is_available()
        if step == self.warmup:
            trim()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.result["rss_before_step"] = rss_bytes()
            reset_hwm()
        elif step == self.warmup + 1:
            self.result["peak_rss"] = hwm_bytes()
            if cuda:
                torch.cuda.synchronize()
                self.result["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
                return
            self.result["persistent_tensor_bytes"] = persistent_bytes(model, optimizer)
            gc.collect()
            self._profile = _Profile()
            self._profile.start()
        elif step == self.warmup + 2 and self._profile is not None:
            self.result["step_tensor_peak"] = self._profile.stop()
            self._profile = None


def _finish(result: dict, base_rss: int) -> dict:
    result["base_rss"] = base_rss
    result["peak_rss_above_imports"] = result["peak_rss"] - base_rss
    if "cuda_max_allocated" in result:
        result["tensor_peak"] = result["cuda_max_allocated"]
    elif "step_tensor_peak" in result:
        result["tensor_peak"] = result["persistent_tensor_bytes"] + result["step_tensor_peak"]
    return result


def trainer_job(group: str, name: str, width: str, size: str, warmup: int = 1) -> dict:
    """Peak memory of variant `name` of `group` (see `perf_variants.GROUPS`), in this (fresh) process."""
    from bench.perf_variants import GROUPS, build_trainer

    base_rss = rss_bytes()
    variant = next(v for v in GROUPS[group] if v.name == name)
    batch, seq_len = (int(x) for x in size.split("x"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(variant, width, tmp, batch, seq_len, steps=warmup + 3)
        probe = MemoryProbe(warmup)
        trainer.add_callback(probe)
        trainer.train()
    result = _finish(probe.result, base_rss)
    result["trainable_bytes"] = sum(
        p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad
    )
    result["wall_s"] = time.perf_counter() - start
    return result


def gardo_job(mode: str, width: str, size: str, warmup: int = 1) -> dict:
    """Peak memory of one GARDO optimisation phase (`_train_on`) on a fixed rollout, in this (fresh) process."""
    from bench.perf_variants import build_gardo

    base_rss = rss_bytes()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_gardo(mode, width, size, tmp, {})
        batch = trainer._rollout(0)
        for _ in range(warmup):
            trainer._train_on(batch)
        result = {}
        trim()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        result["rss_before_step"] = rss_bytes()
        reset_hwm()
        trainer._train_on(batch)
        result["peak_rss"] = hwm_bytes()
        if cuda:
            torch.cuda.synchronize()
            result["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        else:
            result["persistent_tensor_bytes"] = persistent_bytes(trainer.model, trainer.optimizer)
            profile = _Profile()
            profile.start()
            trainer._train_on(batch)
            result["step_tensor_peak"] = profile.stop()
    result = _finish(result, base_rss)
    result["wall_s"] = time.perf_counter() - start
    return result


def run_job(kind: str, *args) -> dict:
    """Entry point of a memory child: never raises (the error is returned)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        return (trainer_job if kind == "trainer" else gardo_job)(*args)
    except Exception as err:  # noqa: BLE001 - reported in the table instead of ending the suite
        import traceback

        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}


def child(connection, job: tuple) -> None:
    """Target of a memory child process: sends `run_job(*job)` back through `connection`."""
    try:
        connection.send(run_job(*job))
    except EOFError:
        pass
    finally:
        connection.close()
