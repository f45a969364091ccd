"""Shared test helpers: float64 references and per-dtype comparisons."""
import torch


def leaf(tensor):
    """A fresh leaf tensor with requires_grad, so gradients can be compared."""
    return tensor.detach().clone().requires_grad_()


def float64_leaves(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def assert_close(actual, expected, atol, rtol, what=""):
    """Compare with an fp64 reference; every element must be finite (poisoned outputs are NaN)."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten or overflowed)"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
