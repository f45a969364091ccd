"""Eager calls of the ops run their implementations directly, not through the dispatcher's custom op
(a round trip of 10-80 µs of host time, kernels/_dispatch.py); traced calls (a dispatch mode, as
make_fx and FlopCounterMode use) see the custom op. Both give the same values and gradients."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastencoder.kernels import attention, layer_norm, linear, padding


class RecordedOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _layer_norm_case():
    x, residual = torch.randn(5, 40, requires_grad=True), torch.randn(5, 40, requires_grad=True)
    weight, bias = torch.randn(40, requires_grad=True), torch.randn(40, requires_grad=True)
    return (x, residual, weight, bias), lambda: layer_norm(x, weight, bias, 1e-12, residual=residual), \
        "fastencoder.layer_norm_fwd", "fastencoder.layer_norm_bwd"


def _linear_case():
    x, weight, bias = (torch.randn(*shape, requires_grad=True) for shape in ((5, 24), (40, 24), (40,)))
    return (x, weight, bias), lambda: linear(x, weight, bias, activation="gelu"), \
        "fastencoder.linear_fwd", "fastencoder.linear_bwd"


def _attention_case():
    q, k, v = (torch.randn(2, 20, 2, 16, requires_grad=True) for _ in range(3))
    mask = torch.arange(20) < torch.tensor([[20], [13]])
    return (q, k, v), lambda: attention(q, k, v, key_padding_mask=mask), \
        "fastencoder.attention_fwd", "fastencoder.attention_bwd"


def _padding_case():
    hidden = torch.randn(3, 4, 24, requires_grad=True)
    indices = torch.tensor([0, 1, 2, 4, 8, 9, 11])
    return (hidden,), lambda: padding.pad(padding.unpad(hidden, indices) * 2, indices, 3, 4), \
        "fastencoder.unpad", "fastencoder.pad"


def _ops_seen(run):
    """(names of the custom ops profiled in a forward and backward, the output, the gradients)."""
    inputs, function, *_ = run
    with torch.profiler.profile() as profile:
        out = function()
        grads = torch.autograd.grad(out.square().sum(), inputs)
    return {event.name for event in profile.events() if event.name.startswith("fastencoder::")}, out, grads


@pytest.mark.parametrize("case", [_layer_norm_case, _linear_case, _attention_case, _padding_case])
def test_eager_calls_skip_the_dispatcher_and_traced_calls_see_the_op(device, triton_backend, case):
    torch.manual_seed(0)
    run = case()
    inputs, function, forward_op, backward_op = run
    seen, out, grads = _ops_seen(run)
    assert not seen, f"eager forward and backward went through the custom ops {seen}"

    with RecordedOps() as recorded:
        traced_out = function()
        traced_grads = torch.autograd.grad(traced_out.square().sum(), inputs)
    assert forward_op in recorded.names and backward_op in recorded.names, recorded.names
    torch.testing.assert_close(traced_out, out, rtol=0, atol=0)  # the same kernels, the same order
    for traced, eager in zip(traced_grads, grads):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)
