"""Wall time of calls: one timer for the benchmarks, ``protokern selfcheck`` and the demo."""

import statistics
import time
from collections.abc import Callable

import torch


def cuda_event_seconds(step: Callable[[], object]) -> float:
    """Seconds the GPU spent on one call of ``step``, between two CUDA events recorded on the
    current stream; the device is idle first (no earlier work counted) and the call has
    finished when this returns."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_calls(step: Callable[[], object], repeats: int, device: str = "cpu") -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step``: CUDA events on ``cuda``, else
    ``time.perf_counter`` (CPU ops are synchronous)."""
    if device == "cuda":
        return [cuda_event_seconds(step) for _ in range(repeats)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def median_milliseconds(step: Callable[[], object], repeats: int = 5, warmup: int = 1,
                        device: str = "cpu") -> float:
    """Median milliseconds of ``repeats`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    return 1e3 * statistics.median(time_calls(step, repeats, device))
