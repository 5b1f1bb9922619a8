"""Measuring helpers for benchmarks/speed.py: machine description, interleaved timing, peak memory, profiles.

    interleaved_medians({name: fn}, ...)   rounds of every fn in rotating order until the time budget is spent
    peak_memory(forward, step, ...)         CUDA allocator peak, or on CPU static bytes + activations
    profile_pair(ts_fn, base_fn)            torch.profiler: the ops whose self CPU time the TS call adds
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
import warnings
from typing import Callable

import torch
from torch import nn

from provenance import code_commit


# ----- machine and timing ----------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else (platform.processor() or platform.machine()))
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": device.type, "device_name": name,
            "python": platform.python_version(), "commit": code_commit()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, budget_s: float,
                        min_repeats: int, max_repeats: int) -> tuple[dict[str, float], int]:
    """Warm every method up, then time rounds of all methods (rotating order) until the budget is spent."""
    names = list(fns)
    round_s = 0.0
    for _ in range(max(warmup, 1)):
        round_s = sum(timed(fns[n], device) for n in names)  # the last warm-up round estimates one round's cost
    repeats = int(min(max_repeats, max(min_repeats, budget_s // max(round_s, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            samples[n].append(timed(fns[n], device))
    return {n: statistics.median(v) for n, v in samples.items()}, repeats


# ----- memory --------------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes())
    except (RuntimeError, NotImplementedError):
        return None


def _live_tensors() -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        found = []
        for obj in objects:
            try:
                if isinstance(obj, torch.Tensor) and not obj.is_meta:
                    found.append(obj)
            except Exception:  # noqa: BLE001 - odd objects in gc
                continue
    return found


def _storages(tensors: list[torch.Tensor]) -> dict[tuple[int, int], int]:
    keys = (_storage_key(t) for t in tensors)
    return {k: k[1] for k in keys if k is not None and k[0] != 0}


def _static_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    params += sum(b.numel() * b.element_size() for b in model.buffers())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return params + grads + state


def peak_memory(forward: Callable[[], torch.Tensor], step: Callable[[], object], model: nn.Module,
                optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[int, int | None, str]:
    """(peak bytes, activation bytes or None, measure). Call after at least one step (optimizer state exists)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device), None, "cuda.max_memory_allocated over one train step"
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    # Hold the tensors alive before forward, so no storage freed during forward can be reused at the same address
    # and be mistaken for a pre-existing one.
    before_tensors = _live_tensors()
    before = _storages(before_tensors)
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None:
            saved[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    alive = _storages(_live_tensors())
    activations = {k: v for k, v in {**saved, **alive}.items() if k not in before}
    activation_bytes = sum(activations.values())
    loss.backward()  # finish the step so the next measurement starts clean
    optimizer.zero_grad(set_to_none=True)
    del loss, before_tensors
    return (_static_bytes(model, optimizer) + activation_bytes, activation_bytes,
            "cpu: params+buffers+grads+AdamW state + activations (saved_tensors_hooks ∪ tensors alive after forward)")


RULE_LABEL = "tspeft.update_thresholds"


def profile_pair(ts_run: Callable[[], object], base_run: Callable[[], object], steps: int = 2) -> dict:
    """One torch.profiler pass of `steps` calls each (train steps or forwards): per call, the TS call's and its
    twin's self CPU time (profiled, so inflated by the profiler's per-op cost), the time inside
    `update_thresholds()`, and the ops whose self CPU time grows most in the TS call (ms and calls per call)."""
    from torch.profiler import ProfilerActivity, profile

    def run(fn: Callable[[], object]) -> dict[str, tuple[float, float, float]]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
        return {e.key: (e.self_cpu_time_total / 1e3 / steps, e.cpu_time_total / 1e3 / steps, e.count / steps)
                for e in prof.key_averages()}

    ts_ops, base_ops = run(ts_run), run(base_run)
    none = (0.0, 0.0, 0.0)
    extra = {k: (v[0] - base_ops.get(k, none)[0], v[2] - base_ops.get(k, none)[2])
             for k, v in ts_ops.items() if k != RULE_LABEL}
    top = sorted(extra.items(), key=lambda kv: -kv[1][0])[:6]
    return {"ts_ms": round(sum(v[0] for v in ts_ops.values()), 3),
            "base_ms": round(sum(v[0] for v in base_ops.values()), 3),
            "rule_ms": round(ts_ops.get(RULE_LABEL, none)[1], 3),
            "extra_ops": [[name, round(ms, 3), round(calls, 1)] for name, (ms, calls) in top]}
