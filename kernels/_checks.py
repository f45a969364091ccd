"""Input checks shared by the ops: every bad input is refused before a kernel launches."""
import torch

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
