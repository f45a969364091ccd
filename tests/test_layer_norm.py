"""LayerNorm(+residual) kernels against a float64 reference, forward and backward."""
import pytest
import torch

import fastencoder
from fastencoder.kernels import layer_norm
from fastencoder.kernels.layer_norm import layer_norm_reference
from helpers import assert_close, float64_leaves, leaf

# Inputs are rounded to the test dtype first; the reference then runs in fp64 on those values, so
# the kernel's error is its fp32 arithmetic plus one rounding of each output to the dtype:
# fp32 ~1e-6 relative; fp16 2^-11 ≈ 4.9e-4 relative; bf16 2^-8 ≈ 3.9e-3 relative. dweight/dbias are
# sums over rows (fp32 accumulation, then one rounding).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

# (rows, hidden): crossing the forward's row blocks (32 rows for N≤128, 4 rows for N=768/1024) and
# a non-power-of-two hidden size that leaves most of the column block masked.
SHAPES = [((37,), 100), ((3, 3), 768)]


def _inputs(lead, n, dtype, device, with_residual=True, with_bias=True):
    x = torch.randn(*lead, n, device=device).to(dtype)
    residual = torch.randn(*lead, n, device=device).to(dtype) if with_residual else None
    weight = (1 + 0.5 * torch.randn(n, device=device)).to(dtype)
    bias = (0.5 * torch.randn(n, device=device)).to(dtype) if with_bias else None
    return x, residual, weight, bias


def _check_forward_and_backward(x, residual, weight, bias, eps):
    atol, rtol = TOLERANCES[x.dtype]
    inputs = [leaf(t) if t is not None else None for t in (x, residual, weight, bias)]
    y = layer_norm(inputs[0], inputs[2], inputs[3], eps, residual=inputs[1])
    reference_inputs = float64_leaves(x, residual, weight, bias)
    expected = layer_norm_reference(reference_inputs[0], reference_inputs[2], reference_inputs[3], eps, reference_inputs[1])
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, expected, atol, rtol, "y")

    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy.double())
    for name, got, want in zip(("dx", "dresidual", "dweight", "dbias"), inputs, reference_inputs):
        if got is not None:
            # gradients sum many terms: scale the absolute tolerance by the reference's magnitude
            assert_close(got.grad, want.grad, atol * max(1.0, want.grad.abs().max().item()), rtol, name)


# bf16 too: LayerNorm has no tl.dot, the one bf16 operation the interpreter gets wrong
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead, n", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_matches_float64_reference(dtype, lead, n, with_residual, device, triton_backend,
                                   kernel_launches, poisoned_allocations):
    x, residual, weight, bias = _inputs(lead, n, dtype, device, with_residual)
    _check_forward_and_backward(x, residual, weight, bias, eps=1e-12)
    assert kernel_launches.count("_layer_norm_fwd_kernel") == 1
    assert kernel_launches.count("_layer_norm_bwd_kernel") == 1


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead, n", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_without_bias_matches_float64_reference(backend, dtype, lead, n, with_residual, device, request,
                                                kernel_launches, poisoned_allocations):
    """bias=None (nn.LayerNorm(bias=False), ModernBERT's norm_bias=False): y = LN(x + residual) · w,
    with the same tolerances (nothing is added, so nothing is lost), no bias gradient."""
    request.getfixturevalue(f"{backend}_backend")
    x, residual, weight, _ = _inputs(lead, n, dtype, device, with_residual, with_bias=False)
    _check_forward_and_backward(x, residual, weight, None, eps=1e-5)
    launched = 1 if backend == "triton" else 0
    assert kernel_launches.count("_layer_norm_fwd_kernel") == launched
    assert kernel_launches.count("_layer_norm_bwd_kernel") == launched


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_without_bias_is_torchs_bias_free_layer_norm(backend, device, request):
    """The module Hugging Face's ModernBERT holds: nn.LayerNorm(bias=False), in fp32, and in fp32 from
    a 16-bit input with fp32 weights (autocast's embeddings norm): the output in x's dtype."""
    request.getfixturevalue(f"{backend}_backend")
    norm = torch.nn.LayerNorm(100, eps=1e-5, bias=False, device=device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(100))
    assert norm.bias is None
    x = torch.randn(7, 100, device=device)
    torch.testing.assert_close(layer_norm(x, norm.weight, None, norm.eps), norm(x), atol=1e-5, rtol=1e-5)
    half = x.half()
    y = layer_norm(half, norm.weight, None, norm.eps)
    expected = layer_norm_reference(half.double(), norm.weight.double(), None, norm.eps)
    assert y.dtype == torch.float16
    assert_close(y, expected, *TOLERANCES[torch.float16], "fp16 x, fp32 weight")


def test_without_bias_traceable_by_torch_compile(device, triton_backend):
    x, residual, weight, _ = _inputs((4,), 100, torch.float32, device, with_bias=False)
    x, weight = x.requires_grad_(), weight.requires_grad_()
    compiled = torch.compile(lambda *a: layer_norm(*a[:2], None, 1e-5, residual=a[2]), fullgraph=True,
                             backend="aot_eager")
    y = compiled(x, weight, residual)
    expected = layer_norm_reference(x.double(), weight.double(), None, 1e-5, residual.double())
    assert_close(y, expected, 1e-5, 1e-5, "compiled")
    y.sum().backward()
    assert x.grad is not None and weight.grad is not None


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("branch_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stream_dtype", ["fp32", "branch"])
@pytest.mark.parametrize("lead, n", SHAPES)
def test_mixed_dtypes_compute_in_fp32(backend, branch_dtype, stream_dtype, lead, n, device, request,
                                      poisoned_allocations):
    """Autocast's add & norm: a 16-bit branch output x, the residual stream in fp32 (BERT) or in
    x's dtype (ALBERT's first layer on the CPU), fp32 weights. Every input is read in fp32: the
    output takes the dtype of x + residual, with the error of its one final rounding (none for fp32:
    fp32 tolerances, where casting the fp32 inputs to 16-bit would cost 16-bit errors), and each
    input's gradient comes back in that input's dtype, with that dtype's error."""
    request.getfixturevalue(f"{backend}_backend")
    stream = torch.float32 if stream_dtype == "fp32" else branch_dtype
    x = torch.randn(*lead, n, device=device).to(branch_dtype)
    _, residual, weight, bias = _inputs(lead, n, torch.float32, device)
    residual = residual.to(stream)
    inputs = [leaf(t) for t in (x, residual, weight, bias)]
    y = layer_norm(inputs[0], inputs[2], inputs[3], 1e-12, residual=inputs[1])
    reference_inputs = float64_leaves(x, residual, weight, bias)
    expected = layer_norm_reference(reference_inputs[0], reference_inputs[2], reference_inputs[3], 1e-12,
                                    reference_inputs[1])
    assert y.dtype == stream and y.shape == x.shape
    atol, rtol = TOLERANCES[stream]
    assert_close(y, expected, atol, rtol, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy.double())
    # the PyTorch path adds two 16-bit inputs in 16-bit, as Hugging Face does: 16-bit errors throughout
    rounded_sum = backend == "torch" and stream != torch.float32
    for name, got, want in zip(("dx", "dresidual", "dweight", "dbias"), inputs, reference_inputs):
        assert got.grad.dtype == got.dtype, name
        atol, rtol = TOLERANCES[stream if rounded_sum else got.dtype]
        assert_close(got.grad, want.grad, atol * max(1.0, want.grad.abs().max().item()), rtol, name)


def test_mixed_dtypes_traceable_by_torch_compile(device, triton_backend):
    """The custom ops' fake functions give the promoted output and each input's gradient dtype."""
    x = torch.randn(4, 100, device=device).to(torch.bfloat16).requires_grad_()
    _, residual, weight, bias = _inputs((4,), 100, torch.float32, device)
    residual, weight, bias = (t.requires_grad_() for t in (residual, weight, bias))
    compiled = torch.compile(lambda *a: layer_norm(*a[:3], 1e-12, residual=a[3]), fullgraph=True, backend="aot_eager")
    y = compiled(x, weight, bias, residual)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert [t.grad.dtype for t in (x, residual, weight, bias)] == [torch.bfloat16] + 3 * [torch.float32]
    expected = layer_norm_reference(x.double(), weight.double(), bias.double(), 1e-12, residual.double())
    assert_close(y, expected, 1e-5, 1e-5, "compiled")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [100, 768, 1024, 4096])
def test_matches_float64_reference_on_gpu(dtype, n, device, triton_backend):
    x, residual, weight, bias = _inputs((4096,), n, dtype, device)
    _check_forward_and_backward(x, residual, weight, bias, eps=1e-12)


def test_eps_is_used_exactly_as_given(device, triton_backend):
    # rows whose variance (~1e-4) is comparable to eps: clamping or ignoring eps changes the result
    x = 1e-2 * torch.randn(5, 64, device=device)
    weight, bias = torch.ones(64, device=device), torch.zeros(64, device=device)
    for eps in (1e-4, 1e-12):
        expected = layer_norm_reference(x.double(), weight.double(), bias.double(), eps)
        assert_close(layer_norm(x, weight, bias, eps), expected, 1e-5, 1e-5, f"eps={eps}")
    assert not torch.allclose(layer_norm(x, weight, bias, 1e-4), layer_norm(x, weight, bias, 1e-12), atol=1e-3)


def test_constant_rows_give_bias_not_nan(device, triton_backend):
    x = torch.full((3, 100), 7.0, device=device)
    bias = torch.randn(100, device=device)
    y = layer_norm(x, torch.randn(100, device=device), bias, 1e-12)
    assert_close(y, bias.expand(3, 100), 0, 0, "constant rows")


def test_non_contiguous_input(device, triton_backend):
    base = torch.randn(100, 9, device=device)
    x = base.t()  # [9, 100] with column stride 9
    weight, bias = torch.randn(100, device=device), torch.randn(100, device=device)
    residual = torch.randn(18, 100, device=device)[::2]  # row stride 200
    expected = layer_norm_reference(x.double(), weight.double(), bias.double(), 1e-12, residual.double())
    assert_close(layer_norm(x, weight, bias, 1e-12, residual=residual), expected, 1e-5, 1e-5, "strided")


def test_wider_rows_than_the_kernel_holds_use_the_reference(device, triton_backend, kernel_launches):
    x, residual, weight, bias = _inputs((2,), 4097, torch.float32, device)
    expected = layer_norm_reference(x.double(), weight.double(), bias.double(), 1e-12, residual.double())
    assert_close(layer_norm(x, weight, bias, 1e-12, residual), expected, 1e-5, 1e-5, "wide")
    assert kernel_launches == []


def test_traceable_by_torch_compile(device, triton_backend):
    x, residual, weight, bias = _inputs((4,), 100, torch.float32, device)
    compiled = torch.compile(lambda *a: layer_norm(*a[:3], 1e-12, residual=a[3]), fullgraph=True, backend="aot_eager")
    expected = layer_norm_reference(x.double(), weight.double(), bias.double(), 1e-12, residual.double())
    assert_close(compiled(x, weight, bias, residual), expected, 1e-5, 1e-5, "compiled")


def test_torch_backend_runs_the_reference_without_kernels(torch_backend, kernel_launches):
    x, residual, weight, bias = _inputs((4,), 100, torch.float32, "cpu")
    y = layer_norm(x, weight, bias, 1e-12, residual=residual)
    torch.testing.assert_close(y, layer_norm_reference(x, weight, bias, 1e-12, residual))
    assert kernel_launches == []


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(weight=torch.ones(99)), ValueError, "weight must have shape"),
        (dict(bias=torch.ones(100, dtype=torch.float16)), TypeError, "bias is torch.float16"),
        (dict(x=torch.ones(4, 100, dtype=torch.int64)), TypeError, "x must be float16, bfloat16 or float32"),
        (dict(residual=torch.ones(4, 99)), ValueError, "residual must have shape"),
        (dict(weight=torch.ones(100, device="meta")), ValueError, "weight is on meta"),
        (dict(eps=-1.0), ValueError, "eps must be a non-negative number"),
        (dict(x=torch.ones(4, 0)), ValueError, "non-empty last dim"),
    ],
)
def test_bad_input_is_refused_before_launch(change, error, message, triton_backend, kernel_launches):
    args = dict(x=torch.ones(4, 100), weight=torch.ones(100), bias=torch.zeros(100), eps=1e-12, residual=None)
    args.update(change)
    with pytest.raises(error, match=message):
        layer_norm(**args)
    assert kernel_launches == []


def test_public_api_is_reexported():
    assert fastencoder.kernels.layer_norm is layer_norm
