"""Every kernel launches on the device of its tensors, on that device's current stream.

Triton launches on `torch.cuda.current_device()` and its current stream, whatever device the
tensors are on: a model on cuda:1 (without `torch.cuda.set_device`) or split over GPUs would launch
on the wrong device, or unordered against its own stream. Every op runs its launches inside
`on_device_of`, which makes the tensors' device current for them (the stream follows: Triton takes
the current stream of the current device).
"""
import functools
import threading

import torch

try:
    import triton
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from ._no_triton import triton

_guard = threading.local()


def launch_device():
    """The device the kernels launched now run on, or None outside `on_device_of` (which the tests
    use to prove that every launch goes through it)."""
    return getattr(_guard, "device", None)


class on_device_of:
    """Launches inside run on `tensor`'s device and that device's current stream. (A class rather
    than a generator-based context manager: it wraps every op call, and its cost is host time.)"""

    def __init__(self, tensor):
        self.device = tensor.device
        self.cuda_device = torch.cuda.device(self.device) if tensor.is_cuda else None

    def __enter__(self):
        self.previous = launch_device()
        _guard.device = self.device
        if self.cuda_device is not None:
            self.cuda_device.__enter__()

    def __exit__(self, *exception):
        try:
            if self.cuda_device is not None:
                self.cuda_device.__exit__(*exception)
        finally:
            _guard.device = self.previous


def launches_on_input_device(op):
    """Decorates an op's implementation: its launches run on the device of its first tensor
    argument (the public functions check that all of them share it)."""

    @functools.wraps(op)
    def on_input_device(*args, **kwargs):
        tensor = next(value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor))
        with on_device_of(tensor):
            return op(*args, **kwargs)

    return on_input_device


# The launch grids' arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are
# constexpr functions in recent Triton, whose calls from Python cost microseconds each.
def cdiv(a, b):
    return -(-a // b)


def next_power_of_2(n):
    return 1 << max(0, (n - 1).bit_length())


def batch_generic(*names):
    """`triton.jit` with the arguments `names`, which vary from batch to batch (token counts,
    sequence lengths, a seed), never specialised on. Triton would otherwise compile a variant for
    each value that is 1 or a multiple of 16, so which code a launch ran would depend on the batch;
    this way every launch of a config runs the one variant the static report compiles."""
    return triton.jit(do_not_specialize=list(names))


def unspecialised(kernel):
    """The argument names a kernel's launches never specialise on (`batch_generic`), compiled or
    interpreted (the interpreter keeps its jit options apart)."""
    options = kernel.kwargs if hasattr(kernel, "kwargs") else vars(kernel)
    return frozenset(options.get("do_not_specialize") or ())
