"""Input checks shared by the ops: every bad input is refused before a kernel launches."""
import torch
from torch.utils.weak import WeakTensorKeyDictionary

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_float(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {tensor.dtype}")


def check_like(name, tensor, reference, reference_name):
    """`tensor` is a floating tensor on the same device and of the same dtype as `reference`."""
    check_float(name, tensor)
    if tensor.device != reference.device:
        raise ValueError(f"{name} is on {tensor.device} but {reference_name} is on {reference.device}")
    if tensor.dtype != reference.dtype:
        raise TypeError(f"{name} is {tensor.dtype} but {reference_name} is {reference.dtype}")


def check_shape(name, tensor, shape):
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def rows_view(tensor):
    """`tensor` as a 2-D [rows, last dim] view with unit column stride (copying only if needed)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def capturing(tensor):
    """Whether a CUDA graph is being captured on the current stream of `tensor`'s device."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def capturing_or_compiling(tensor):
    """Whether work on `tensor` is being recorded rather than run: a CUDA graph capture on its
    device's current stream, or torch.compile tracing. Its values can then be neither read back
    (a capture fails on a device-to-host copy) nor branched on: value checks are skipped, and the
    kernels bound what they read and write on the device."""
    return torch.compiler.is_compiling() or capturing(tensor)


# per tensor: {(derive, *arguments): (the tensor's version then, what derive returned)}
_remembered = WeakTensorKeyDictionary()


def _untracked(tensor):
    # inference tensors track no version (they may change unseen); torch.compile cannot trace the
    # cache; a CUDA graph capture must record the computation, for replays on new contents
    return tensor.is_inference() or capturing_or_compiling(tensor)


def remembered(tensor, derive, *arguments):
    """derive(tensor, *arguments), remembered while the tensor is unchanged (its version counter),
    derived every time where that cannot be told (`_untracked`). Every layer of a forward passes the
    same masks, cu_seqlens and indices: what is derived from them (facts that need a device-to-host
    copy, which waits for the GPU, or device-side layouts) is derived once, not once per layer."""
    if _untracked(tensor):
        return derive(tensor, *arguments)
    known = _remembered.setdefault(tensor, {})
    key = (derive, *arguments)
    version, value = known.get(key, (None, None))
    if version != tensor._version:
        value = derive(tensor, *arguments)
        known[key] = (tensor._version, value)
    return value


def remember(tensor, derive, value):
    """Record value as what derive(tensor) returns, for a tensor whose caller knows it without
    deriving it (it built the tensor and read what it needed in one copy)."""
    if not _untracked(tensor):
        _remembered.setdefault(tensor, {})[(derive,)] = (tensor._version, value)
