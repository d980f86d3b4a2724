"""Timing, in one place: the decode loop's clock, the median timers of the profiler and the benchmarks,
and the device's measured copy bandwidth and matrix rate (the floors every benchmark ratio stands beside).

On CUDA a time is device time between two recorded events; elsewhere it is ``time.perf_counter``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch


class Clock:
    """Timing marks: CUDA events on GPU (read them after a synchronisation), perf_counter elsewhere.
    Marking never synchronises, so the decode loop can mark every stage of a round."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def sync(device) -> None:
    """Wait for the device's queued work (nothing to wait for off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device) -> float:
    """Time of one call in ms, from a drained queue: CUDA events on CUDA, perf_counter elsewhere."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def wall_ms(fn: Callable[[], Any], device) -> float:
    """Wall time of one call in ms, from a drained queue to a drained queue (host work included)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def samples_ms(fn, device, warmup: int = 3, repeats: int = 10, timer=None) -> list[float]:
    """``repeats`` timed calls after ``warmup`` untimed ones; ``timer`` is :func:`time_ms` (default) or
    :func:`wall_ms`."""
    for _ in range(warmup):
        fn()
    timer = timer or time_ms
    return [timer(fn, device) for _ in range(repeats)]


def median_ms(fn, device, warmup: int = 3, repeats: int = 10, timer=None) -> float:
    return statistics.median(samples_ms(fn, device, warmup, repeats, timer))


def events_ms(fn, warmup: int = 10, repeats: int = 25, inner: int = 1) -> float:
    """CUDA only: the median over ``repeats`` of the mean time of ``inner`` back-to-back calls, each
    bracketed by two CUDA events; all repeats are queued back to back and read after one synchronisation,
    so the GPU does not idle waiting for the host between calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) / inner for s, e in pairs)


def median_iqr(samples: Sequence[float]) -> tuple[float, float]:
    q1, q2, q3 = np.percentile(samples, [25, 50, 75])
    return float(q2), float(q3 - q1)


# -------------------------------------------------------------------------------------------------
# Device rates


BF16_UNIT_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}  # /proc/cpuinfo flag -> name


def cpu_bf16_units() -> list[str]:
    """The CPU's bf16 matrix units (AMX-BF16, AVX512-BF16) by its flags; [] where it has none (bf16 matmuls
    are then emulated in fp32 arithmetic, slower than fp32 itself) or the flags cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [name for flag, name in BF16_UNIT_FLAGS.items() if flag in flags]


def device_name(device) -> str:
    """The GPU's name, or the CPU's with its vector unit (torch's dispatch level) and bf16 matrix units,
    which decide what a verify of many rows costs on it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    units = ", ".join(cpu_bf16_units()) or "no bf16 matrix units"
    return (f"{device.type}: {platform.processor() or platform.machine()} "
            f"({torch.backends.cpu.get_cpu_capability()}; {units})")


def _cache_dir() -> Path:
    return Path(os.environ.get("DDTREE_CACHE_DIR") or Path.home() / ".cache" / "ddtree")


def measure_rates(device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """``{"bandwidth_gbs", "matmul_tflops"}`` measured now, uncached (the benchmarks' floors come from the
    same run): a 1 GiB device-to-device copy (read + write bytes) and an 8192^3 matmul in ``dtype`` on
    CUDA; 64 MiB and 512^3 elsewhere."""
    device = torch.device(device)
    big = device.type == "cuda"
    nbytes = (1 << 30) if big else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, warmup=2, repeats=5)
    m = 8192 if big else 512
    a = torch.randn(m, m, device=device).to(dtype)
    b = torch.randn(m, m, device=device).to(dtype)
    mm_ms = median_ms(lambda: torch.mm(a, b), device, warmup=2, repeats=5)
    return {"bandwidth_gbs": 2 * nbytes / (copy_ms * 1e-3) / 1e9, "matmul_tflops": 2 * m**3 / (mm_ms * 1e-3) / 1e12}


def device_rates(device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """``{"name", "bandwidth_gbs", "matmul_tflops"}`` of a device, measured once and cached in
    ``$DDTREE_CACHE_DIR`` (default ``~/.cache/ddtree``)/device_rates.json.

    Bandwidth from a large device-to-device copy (bytes read + written), matrix rate from a large
    square matmul in ``dtype`` (float32 on CPU, where bf16 matmuls are not representative).
    """
    device = torch.device(device)
    name = device_name(device)
    mm_dtype = dtype if device.type == "cuda" else torch.float32
    key = f"{name}|{str(mm_dtype).removeprefix('torch.')}"
    path = _cache_dir() / "device_rates.json"
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return cache[key]
    rates = {"name": name, **measure_rates(device, mm_dtype)}
    cache[key] = rates
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1) + "\n")
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return rates
