"""GPU timing with CUDA events: warm-up, then many timed calls, median and spread.

Each call runs on the next of several input sets, whose total size exceeds the L2 cache, so that
repeated calls measure memory traffic rather than cache hits.
"""
import statistics
import time

import torch

L2_BYTES = 64 * 2**20  # at least the L2 of any current GPU (H100/H200: 50 MiB)


def input_sets_needed(bytes_per_set):
    """How many distinct input sets rotate through the timed calls to defeat the L2 cache."""
    return max(1, min(64, -(-2 * L2_BYTES // max(bytes_per_set, 1))))


def time_calls(run, input_sets, warmup=10, repeats=50):
    """Median and inter-quartile range, in milliseconds, of `run(inputs)` over the rotating sets.

    CUDA events on a GPU. Without one (the CI smoke run) a host clock keeps the code path working;
    those numbers are CPU timings and are never reported as speed.
    """
    if not torch.cuda.is_available():
        return _time_on_host(run, input_sets, repeats=3)
    for index in range(warmup):
        run(input_sets[index % len(input_sets)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for index in range(repeats):
        inputs = input_sets[index % len(input_sets)]
        starts[index].record()
        run(inputs)
        ends[index].record()
    torch.cuda.synchronize()
    return _summary(sorted(start.elapsed_time(end) for start, end in zip(starts, ends)))


def _time_on_host(run, input_sets, repeats):
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        run(input_sets[index % len(input_sets)])
        times.append(1e3 * (time.perf_counter() - start))
    return _summary(sorted(times))


def _summary(times):
    repeats = len(times)
    quartiles = statistics.quantiles(times, n=4)
    return dict(median_ms=statistics.median(times), iqr_ms=quartiles[2] - quartiles[0],
                min_ms=times[0], repeats=repeats)


def peak_memory(run, inputs):
    """Peak bytes allocated during one call, above what was allocated before it (GPU only)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run(inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
