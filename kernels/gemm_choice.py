"""Which implementation runs each GEMM on a GPU: fastencoder's fused kernel or cuBLAS followed by
the same epilogue in one elementwise pass, whichever is faster there.

A fused epilogue saves one pass over the output, but a GEMM a few percent slower than cuBLAS loses
more than that. So the first time a GEMM runs on a CUDA device (per key: the product, forward / dx
/ dW, its dtype, epilogue, operand layouts, N, and M and K through the autotuner's power-of-two
token buckets) both candidates are timed with CUDA events on the call's own operands, and the
faster is kept for that device and key. Nothing is timed while a CUDA graph captures or
torch.compile traces (events and a synchronize would break the capture): there the key's choice,
if one was made, runs, else the kernel. The CPU (Triton's interpreter) always runs the kernel.

On sm_90 the candidates are three: the classic kernel, the Hopper kernel (kernels/linear_hopper.py)
where its descriptors take the operands, and cuBLAS. `choices()` lists every choice made, with
every timing; `force("classic" | "hopper" | "cublas")` runs one candidate everywhere instead
(reproducible numerics, benchmarks), `force(None)` chooses again.
"""
import statistics
from collections import OrderedDict
from typing import NamedTuple

import torch

from ._checks import capturing_or_compiling
from ._launch import next_power_of_2

# fastencoder's classic (pointer-based) kernel, its Hopper kernel (tensor descriptors, persistent),
# cuBLAS followed by the same epilogue
CLASSIC, HOPPER, CUBLAS = "classic", "hopper", "cublas"
CANDIDATES = (CLASSIC, HOPPER, CUBLAS)
# Keys are bounded by the token buckets (11 per weight shape and product, as the autotuner's);
# the least recently used choice is dropped past this many (a model has a few dozen keys).
MAX_CHOICES = 1024
# timed calls per candidate, after one warm-up call (which compiles and autotunes a kernel)
TIMED_CALLS = 10


class GemmKey(NamedTuple):
    device: torch.device
    product: str        # "forward", "dx", "dW"
    dtype: torch.dtype
    tf32: bool          # fp32 products may use TF32 (torch's setting, honoured by both candidates)
    m_bucket: int
    n: int
    k_bucket: int
    epilogue: str       # e.g. "bias+gelu+act'" (forward), "act'" (dx), "dbias" (dW), "" (none)
    layout: str         # A and B each "N" (unit stride along K / N: rows contiguous) or "T"


class Choice(NamedTuple):
    winner: str         # one of CANDIDATES
    times_ms: dict      # {candidate: median ms} of every candidate timed


_choices = OrderedDict()  # GemmKey → Choice, least recently used first
_forced = None


def bucket(size):
    """The key of a size that depends on the data (the tokens): its power of two, within [16, 16384]."""
    return min(next_power_of_2(max(size, 16)), 16384)


def choices():
    """{GemmKey: Choice} of every GEMM timed so far, on every device."""
    return dict(_choices)


def clear():
    """Forget every choice (the next call of each GEMM times its candidates again)."""
    _choices.clear()


def force(candidate):
    """Run every GEMM on a GPU with `candidate` (one of CANDIDATES), untimed (a GEMM the Hopper
    kernel cannot take runs the classic one); None: choose by timing."""
    global _forced
    if candidate is not None and candidate not in CANDIDATES:
        raise ValueError(f"candidate must be None or one of {CANDIDATES}, got {candidate!r}")
    _forced = candidate


def forced():
    """The candidate set with `force`, or None."""
    return _forced


def _on_gpu(tensor):
    return tensor.is_cuda


def times(tensor):
    """Whether a GEMM on `tensor`'s device chooses between candidates at all (a CUDA device)."""
    return _on_gpu(tensor)


def _measure(run):
    """Median milliseconds of `run()` on the current CUDA stream, after one warm-up call."""
    run()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(TIMED_CALLS)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(TIMED_CALLS)]
    for start, end in zip(starts, ends):
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends))


def choose(key, tensor, candidates):
    """Which candidate GEMM `key` runs: the forced one; else the key's choice; else, on the key's
    first call, the fastest of `candidates()` ({name: function}; each writes the same outputs),
    timed now on the call's operands; while a CUDA graph captures or torch.compile traces, with no
    choice made yet, the classic kernel. The candidates are built only to be timed: a chosen GEMM
    costs one key lookup."""
    if _forced is not None:
        return _forced
    choice = _choices.get(key)
    if choice is not None:
        _choices.move_to_end(key)
        return choice.winner
    if capturing_or_compiling(tensor):
        return CLASSIC
    times = {name: _measure(run) for name, run in candidates().items()}
    choice = _choices[key] = Choice(min(times, key=times.get), times)
    while len(_choices) > MAX_CHOICES:
        _choices.popitem(last=False)
    return choice.winner


def describe(key, choice):
    """One line for the bench's output."""
    dtype = "tf32" if key.tf32 else str(key.dtype).split(".")[-1]
    times = ", ".join(f"{name} {ms:.3f} ms" for name, ms in choice.times_ms.items())
    return (f"{key.product} {dtype} M~{key.m_bucket} N{key.n} K~{key.k_bucket} "
            f"{key.epilogue or 'plain'} {key.layout}: {choice.winner} ({times})")
