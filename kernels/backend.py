"""Which implementation runs an op: fastencoder's Triton kernels or the PyTorch reference.

One switch for the whole package: `set_backend("auto" | "triton" | "torch")`, or the environment
variable FASTENCODER_BACKEND. "auto" runs the Triton kernels on CUDA devices of compute
capability 8.0 or newer and the PyTorch reference everywhere else.
"""
import os

import torch

BACKENDS = ("auto", "triton", "torch")

# `@triton.jit` reads TRITON_INTERPRET when a kernel is defined, so what counts is its value when
# the kernel modules were imported (they import this module first), not its value now.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton  # noqa: F401
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    TRITON_AVAILABLE = False
else:
    TRITON_AVAILABLE = True

_backend = None


def _checked(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown fastencoder backend {name!r}; expected one of {BACKENDS}")
    return name


def set_backend(name):
    """Choose the backend for every fastencoder op: "auto", "triton" or "torch"."""
    global _backend
    _backend = _checked(name)


def get_backend():
    """The backend set with `set_backend`, else FASTENCODER_BACKEND, else "auto"."""
    return _backend or _checked(os.environ.get("FASTENCODER_BACKEND", "auto"))


def use_triton(device):
    """True when ops on tensors of `device` should launch Triton kernels.

    Raises when the backend is "triton" but the kernels cannot run on `device`.
    """
    backend = get_backend()
    if backend == "torch":
        return False
    device = torch.device(device)
    supported = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    if backend == "auto":
        return supported and TRITON_AVAILABLE and not INTERPRET
    if not TRITON_AVAILABLE:
        raise RuntimeError(
            "fastencoder backend 'triton' needs the triton package (Linux only); install it, "
            "or use set_backend('torch') / FASTENCODER_BACKEND=torch"
        )
    if device.type == "cpu":
        if INTERPRET:
            return True
        raise RuntimeError(
            "fastencoder backend 'triton' got CPU tensors: Triton kernels run on the CPU only in "
            "Triton's interpreter. Either set TRITON_INTERPRET=1 before importing fastencoder "
            "(slow; meant for tests), or use set_backend('torch') / FASTENCODER_BACKEND=torch"
        )
    if not supported:
        raise RuntimeError(
            f"fastencoder's Triton kernels need a CUDA device of compute capability 8.0 or newer; "
            f"got {device}. Use set_backend('torch') / FASTENCODER_BACKEND=torch"
        )
    return True
