"""Timing: competing cases take turns in one process and report medians, so that the ratios between them hold
on a shared, noisy machine even when absolute times drift; and the peak memory of a call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from gptlab.device import synchronize


def interleaved_medians(
    cases: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    statistic=statistics.median,
    prepare: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each case, the cases taking turns in every round (`statistic=min`: the
    fastest call, for a machine's peak, which noise can only hide). `prepare[name]`, where given, runs untimed
    before each call of that case: to put the process back in the state the case is timed in."""
    prepare = prepare or {}
    for _ in range(warmup):
        for name, run in cases.items():
            if name in prepare:
                prepare[name]()
            run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            if name in prepare:
                prepare[name]()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistic(ts) for name, ts in times.items()}


def time_per_call(
    cases: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    calls: int | None = None,
    statistic=statistics.median,
    min_region_s: float = 0.01,
) -> dict[str, float]:
    """Seconds per call of each short kernel-launching case (a matmul, a matrix-vector product), the cases taking turns:
    after one warm-up call each, `repeats` rounds in which each case runs `calls` times back to back as one timed
    region, its time / `calls`; the `statistic` of the rounds (`min`: as in `interleaved_medians`).

    On CUDA a region is timed by two CUDA events recorded on the device's stream around the calls, with no sync
    in between: the GPU's time for the queued kernels, not one launch and one sync per call (longer than a short
    kernel itself). `calls=None` there: doubled from 1 until a region lasts `min_region_s`. On the CPU the calls are
    synchronous and perf_counter times the region; `calls=None` is 1."""
    for run in cases.values():
        run()
    synchronize(device)
    per_case = {name: calls or 1 for name in cases}
    if calls is None and device.type == "cuda":
        for name, run in cases.items():
            while _region_seconds(run, device, per_case[name]) < min_region_s:
                per_case[name] *= 2
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            times[name].append(_region_seconds(run, device, per_case[name]) / per_case[name])
    return {name: statistic(ts) for name, ts in times.items()}


def _region_seconds(run: Callable[[], object], device: torch.device, calls: int) -> float:
    """Seconds that `calls` back-to-back calls of `run` take on `device` (CUDA: between two events; see
    `time_per_call`)."""
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(calls):
            run()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # milliseconds
    start_s = time.perf_counter()
    for _ in range(calls):
        run()
    return time.perf_counter() - start_s


def peak_memory(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by tensors while `run` runs, above what was allocated before it (the train suite's
    "peak MiB"). On CUDA the allocator's own statistics; on the CPU the profiler's record of every allocation and
    free, replayed in order."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # CPU: the profiler records every allocation and free; replay them in order and keep the high-water mark.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = prof.profiler.kineto_results.events()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")  # +alloc, -free
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak
