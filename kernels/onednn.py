"""The CPU's fp32 linear layer in one oneDNN call: act(x · Wᵀ + b) (+ residual) with the activation
and the residual add as post-ops of the GEMM.

oneDNN's fp32 GEMM runs BERT-sized projections 5-15 % faster than the MKL `addmm` behind
`F.linear` on AVX-512 CPUs, and its post-ops apply GELU, ReLU and the residual add while the output
tile is still in cache instead of in a second pass over memory. It has no autograd formula, so it
serves inference only (no input requiring grad, or grad off); below MIN_MULTIPLY_ADDS its per-call
setup (~15 µs) costs more than it saves; under torch.compile Inductor plans the GEMMs itself.
Numerics: fp32 products and sums as `F.linear` (a different summation order: ~1e-6 relative),
GELU in fp32 to within a few ulps of PyTorch's.
"""
import torch

# activation -> (oneDNN post-op, its algorithm)
_POST_OPS = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}
MIN_MULTIPLY_ADDS = 1 << 25
_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_fp32(tensor):
    return tensor is None or (type(tensor) in _PLAIN and tensor.dtype == torch.float32)


def takes(x, weight, bias, residual):
    """True when `linear` below computes this call: fp32 on the CPU, inference, a large enough GEMM,
    oneDNN built in and enabled (torch.backends.mkldnn.enabled), outside torch.compile."""
    if not (_AVAILABLE and x.device.type == "cpu" and _plain_fp32(x) and _plain_fp32(weight) and _plain_fp32(bias)):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    if residual is not None and not (_plain_fp32(residual) and residual.shape == (*x.shape[:-1], weight.shape[0])):
        return False
    return (x.numel() * weight.shape[0] >= MIN_MULTIPLY_ADDS and torch.backends.mkldnn.enabled
            and not torch.compiler.is_compiling())


def linear(x, weight, bias=None, activation=None, residual=None):
    """act(x · weightᵀ + bias) + residual in one oneDNN call (where `takes` holds). A contiguous
    residual is added by the GEMM's binary post-op, which follows no activation: with both, or a
    strided residual, the residual is added in place on the output."""
    if residual is not None and activation is None and residual.is_contiguous():
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    post_op, algorithm = _POST_OPS[activation]
    y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op, [], algorithm)
    return y if residual is None else y.add_(residual)
