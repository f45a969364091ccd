"""Which implementation runs an op: fastencoder's Triton kernels or its fast PyTorch path.

One switch for the whole package: `set_backend("auto" | "triton" | "torch")`, or the environment
variable FASTENCODER_BACKEND (read when fastencoder is imported). "torch" runs every op's fast
PyTorch path (cuBLAS / oneDNN GEMMs, `F.scaled_dot_product_attention`, `F.layer_norm`, index ops);
"triton" runs the kernels. "auto" picks the faster per op and device:
  * CUDA devices of compute capability 8.0 or newer: the kernels for 16-bit inputs, and for fp32
    when TF32 is allowed (`allows_tf32`: torch.backends.cuda.matmul.fp32_precision, else the
    global torch.backends.fp32_precision, as torch decides for cuBLAS; the legacy
    torch.backends.cuda.matmul.allow_tf32 sets the former). fp32 without TF32 would run the
    kernels' dot products on the FMA units, slower than cuBLAS and SDPA: the ops with dot products
    (linear, attention) then take the PyTorch path; the memory-bound ones (LayerNorm, pad, unpad)
    keep their kernels, which read and write no more than PyTorch does.
  * CPUs, older GPUs, and platforms without Triton: the PyTorch path.
The float32/float64 references the tests compare against (`*_reference` beside each op) are never
chosen by the switch.
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
# read once, when fastencoder is imported: every op asks for the backend on every call
_environment_backend = os.environ.get("FASTENCODER_BACKEND", "auto")


def _checked(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown fastencoder backend {name!r}; expected one of {BACKENDS}")
    return name


def set_backend(name):
    """Choose the backend for every fastencoder op: "auto", "triton" or "torch"."""
    global _backend
    _backend = _checked(name)


def get_backend():
    """The backend set with `set_backend`, else FASTENCODER_BACKEND as it was when fastencoder was
    imported, else "auto"."""
    return _backend or _checked(_environment_backend)


def use_triton(device, matmul_dtype=None):
    """True when an op on tensors of `device` should launch Triton kernels.

    matmul_dtype: the dtype of the op's dot products, for the ops that have them (linear,
    attention): under "auto", fp32 without TF32 runs on the PyTorch path.
    Raises when the backend is "triton" but the kernels cannot run on `device`.
    Called by every op on every call: per-device facts are looked up once.
    """
    backend = _backend or get_backend()
    if backend == "torch":
        return False
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if backend == "auto":
        if device.type != "cuda" or not _kernels_run_on(device):
            return False
        return matmul_dtype is not torch.float32 or allows_tf32()
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
    if not _compute_capability_8(device):
        raise RuntimeError(
            f"fastencoder's Triton kernels need a CUDA device of compute capability 8.0 or newer; "
            f"got {device}. Use set_backend('torch') / FASTENCODER_BACKEND=torch"
        )
    return True


# torch.compile cannot trace the settings' getters: a traced call takes the value at compile time
@torch.compiler.assume_constant_result
def allows_tf32():
    """Whether fp32 dot products may use TF32, as torch decides for cuBLAS matmuls: the per-backend
    torch.backends.cuda.matmul.fp32_precision, where it is "none" (unset) the global
    torch.backends.fp32_precision, "none" there too meaning IEEE fp32 (torch's default). The legacy
    flag torch.backends.cuda.matmul.allow_tf32 writes the per-backend value, but reading it raises
    once the new API was used, so it is read only on a torch without that API (before 2.9)."""
    try:
        precision = torch.backends.cuda.matmul.fp32_precision
    except AttributeError:
        return torch.backends.cuda.matmul.allow_tf32
    if precision == "none":
        precision = torch.backends.fp32_precision
    return precision == "tf32"


_capability_8 = {}  # CUDA device index → compute capability >= 8.0


def _compute_capability_8(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    supported = _capability_8.get(index)
    if supported is None:
        supported = _capability_8[index] = torch.cuda.get_device_capability(index) >= (8, 0)
    return supported


def _kernels_run_on(device):
    """Whether "auto" may launch the kernels on this CUDA device (compiled, not interpreted)."""
    return TRITON_AVAILABLE and not INTERPRET and _compute_capability_8(device)
