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


# per index tensor already read back: {summarize: (the tensor's version then, the summary)}
_read_back = WeakTensorKeyDictionary()


def read_back(tensor, summarize):
    """summarize(tensor): facts about a small index tensor that need a device-to-host copy (which
    waits for the GPU), remembered while the tensor is unchanged. Every layer of a padding-free
    forward passes the same cu_seqlens and indices: they are read back once, not once per layer.
    Inference tensors track no version (they may change unseen), so they are read every time; so is
    everything under torch.compile, which cannot trace the cache."""
    if tensor.is_inference() or torch.compiler.is_compiling():
        return summarize(tensor)
    known = _read_back.setdefault(tensor, {})
    version, summary = known.get(summarize, (None, None))
    if version != tensor._version:
        summary = summarize(tensor)
        known[summarize] = (tensor._version, summary)
    return summary


def remember(tensor, summarize, summary):
    """Record summary as what summarize(tensor) returns, for a tensor whose caller knows it without
    a read back (it built the tensor and read what it needed in one copy)."""
    if not (tensor.is_inference() or torch.compiler.is_compiling()):
        _read_back.setdefault(tensor, {})[summarize] = (tensor._version, summary)
