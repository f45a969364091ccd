"""Eager calls of the ops run their implementations directly, not through the dispatcher's custom op
(a round trip of 10-80 µs of host time, kernels/_dispatch.py); traced calls (a dispatch mode, as
make_fx and FlopCounterMode use) see the custom op. Both give the same values and gradients."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastencoder
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


@pytest.mark.parametrize("case", [_layer_norm_case, _linear_case, _attention_case])
def test_a_double_backward_is_refused_not_silently_zero(device, triton_backend, case):
    """These kernels' backward has no derivative: a gradient penalty through it must fail loudly, as
    the custom op does, rather than come out without a graph (and so contribute nothing)."""
    torch.manual_seed(0)
    inputs, function, *_ = case()
    grads = torch.autograd.grad(function().square().sum(), inputs, create_graph=True)
    assert all(grad.requires_grad for grad in grads)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        sum(grad.square().sum() for grad in grads).backward()


def test_a_double_backward_through_pad_and_unpad_is_exact(device, triton_backend):
    """pad and unpad are each other's backward, so their gradients have gradients: a gradient penalty
    through them gets the same values as on the PyTorch path."""
    def penalty_gradient():
        torch.manual_seed(0)
        (hidden,), function, *_ = _padding_case()
        (grad,) = torch.autograd.grad(function().pow(3).sum(), hidden, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), hidden)[0]

    kernels = penalty_gradient()
    fastencoder.set_backend("torch")
    torch.testing.assert_close(kernels, penalty_gradient(), rtol=0, atol=0)  # copies and 2x: exact


def test_vmap_sees_the_op(device, triton_backend):
    """Under torch.func transforms the call goes through the custom op, whose batching works; the
    implementation itself cannot read a batched tensor's storage."""
    x, residual = torch.randn(3, 4, 32), torch.randn(3, 4, 32)
    weight, bias = torch.randn(32), torch.randn(32)
    with torch.no_grad():
        out = torch.vmap(lambda x, residual: layer_norm(x, weight, bias, 1e-5, residual=residual))(x, residual)
    expected = torch.nn.functional.layer_norm((x + residual).double(), (32,), weight.double(), bias.double(), 1e-5)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)  # fp32 kernel vs fp64: 1e-6 seen
