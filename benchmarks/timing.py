"""Timing. GPU: CUDA events, warm-up, then many timed calls, median and spread; each call runs on
the next of several input sets, whose total size exceeds the L2 cache, so that repeated calls
measure memory traffic rather than cache hits. CPU: the variants of a case are timed side by side,
interleaved round by round (a machine shared with other work slows them alike), and compared by
ratios of medians.
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


def time_interleaved(runs, rounds=7, budget_s=None, min_rounds=3):
    """{name: summary in ms} for the zero-argument callables in `runs`, each called once per round
    in turn after one warm-up call each; stops after `rounds`, or once `budget_s` seconds are spent
    and at least `min_rounds` are done. Beside the wall-clock median, `cpu_median_ms`: the CPU time
    the process spent (all its threads), which time spent waiting for a core does not inflate."""
    for run in runs.values():
        run()
    wall, cpu = {name: [] for name in runs}, {name: [] for name in runs}
    start = time.perf_counter()
    for done in range(rounds):
        for name, run in runs.items():
            began, began_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(1e3 * (time.perf_counter() - began))
            cpu[name].append(1e3 * (time.process_time() - began_cpu))
        if budget_s is not None and done + 1 >= min_rounds and time.perf_counter() - start > budget_s:
            break
    return {name: dict(_summary(sorted(wall[name])), cpu_median_ms=statistics.median(cpu[name]),
                       cpu_min_ms=min(cpu[name])) for name in runs}


def _time_on_host(run, input_sets, repeats):
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        run(input_sets[index % len(input_sets)])
        times.append(1e3 * (time.perf_counter() - start))
    return _summary(sorted(times))


def _summary(times):
    repeats = len(times)
    quartiles = statistics.quantiles(times, n=4) if repeats > 1 else times * 3
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
