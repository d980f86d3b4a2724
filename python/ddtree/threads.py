"""CPU threads for a decode call: one thread for a small model, torch's choice otherwise.

A small model's matrices are too small to share out: each of torch's parallel regions then costs a
thread hand-off, and when another process holds one of the cores a region waits for that core's
scheduler time slice. On the shipped pair (0.6M parameters, 2 cores) torch's default of 2 threads ran
every method 10-60x slower than 1 thread once a busy loop held one core (bench/bench_cpu_threads.py).
So ``generate`` runs a CPU target under :data:`SMALL_MODEL_PARAMS` parameters on one thread for the
duration of the call (``threads="auto"``, its default) and restores torch's setting afterwards.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional, Union

import torch

SMALL_MODEL_PARAMS = 50_000_000  # below this on CPU, one thread beats sharing out (see the module doc)

Threads = Union[int, str, None]  # a count, "auto", or None (leave torch's setting alone)


def _params_and_device(target) -> tuple[Optional[int], Optional[torch.device]]:
    """A target's parameter count and device: a torch module, or a runner holding one as ``model``."""
    model = target if isinstance(target, torch.nn.Module) else getattr(target, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None, getattr(target, "device", None)
    params = list(model.parameters())
    return sum(p.numel() for p in params), (params[0].device if params else None)


def auto_threads(target) -> Optional[int]:
    """1 for a target under :data:`SMALL_MODEL_PARAMS` parameters on CPU; ``None`` (torch's own choice)
    for a larger one, one on another device, or one whose size is unknown."""
    params, device = _params_and_device(target)
    if params is None or device is None or torch.device(device).type != "cpu":
        return None
    return 1 if params < SMALL_MODEL_PARAMS else None


def resolve(threads: Threads, target) -> Optional[int]:
    """``threads`` as a count, or ``None`` for torch's current setting; a clear error for anything else."""
    if threads == "auto":
        return auto_threads(target)
    if threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
        return threads
    raise ValueError(f"threads must be a positive int, 'auto' or None, got {threads!r}")


@contextlib.contextmanager
def cpu_threads(n: Optional[int]):
    """torch's intra-op threads set to ``n`` inside the block and restored after it (``None``: untouched)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def with_cpu_threads(fn):
    """Give ``fn(target, ...)`` a keyword ``threads`` (default ``"auto"``) and run it under :func:`cpu_threads`."""
    @functools.wraps(fn)
    def wrapper(target, *args, threads: Threads = "auto", **kwargs):
        with cpu_threads(resolve(threads, target)):
            return fn(target, *args, **kwargs)

    sig = inspect.signature(fn)
    extra = inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation="Threads")
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])
    return wrapper
