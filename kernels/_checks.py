"""Input checks shared by the ops: every bad input is refused before a kernel launches."""
from collections import OrderedDict

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


# Derivations remembered per tensor: its latest uses (sizes of a reused buffer, streams). A
# long-lived buffer refilled with batches of varying sizes keeps no more than these.
MAX_REMEMBERED = 4

# per tensor: {(derive, *arguments, stream): (the tensor's version then, what derive returned)},
# least recently used first; an entry goes with its tensor (weak keys)
_remembered = WeakTensorKeyDictionary()


def _untracked(tensor):
    # inference tensors track no version (they may change unseen); torch.compile cannot trace the
    # cache; a CUDA graph capture must record the computation, for replays on new contents
    return tensor.is_inference() or capturing_or_compiling(tensor)


def _stream_of(tensor):
    """The stream that work on `tensor` runs on now (None on the CPU). A derived device tensor is
    reused on the stream that computed it only: another stream could read it before it is ready
    (nothing orders the two), and free it while the other still reads it (the allocator orders a
    free after the work of the allocating stream only)."""
    return torch.cuda.current_stream(tensor.device).cuda_stream if tensor.is_cuda else None


def _keep(tensor, key, value):
    known = _remembered.get(tensor)
    if known is None:
        known = _remembered[tensor] = OrderedDict()
    known[key] = (tensor._version, value)
    known.move_to_end(key)
    while len(known) > MAX_REMEMBERED:
        known.popitem(last=False)


def remembered(tensor, derive, *arguments):
    """derive(tensor, *arguments), remembered while the tensor is unchanged (its version counter),
    derived every time where that cannot be told (`_untracked`). Every layer of a forward passes the
    same masks, cu_seqlens and indices: what is derived from them (facts that need a device-to-host
    copy, which waits for the GPU, or device-side layouts) is derived once, not once per layer.
    Remembered per stream (see `_stream_of`), for the MAX_REMEMBERED latest uses of the tensor."""
    if _untracked(tensor):
        return derive(tensor, *arguments)
    key = (derive, *arguments, _stream_of(tensor))
    known = _remembered.get(tensor)
    entry = None if known is None else known.get(key)
    if entry is not None and entry[0] == tensor._version:
        known.move_to_end(key)
        return entry[1]
    value = derive(tensor, *arguments)
    _keep(tensor, key, value)
    return value


def remember(tensor, derive, value):
    """Record value as what derive(tensor) returns, for a tensor whose caller knows it without
    deriving it (it built the tensor and read what it needed in one copy)."""
    if not _untracked(tensor):
        _keep(tensor, (derive, _stream_of(tensor)), value)
