"""The CPU's fp32 linear layer in one oneDNN call: act(x · Wᵀ + b) (+ residual) with the activation
and the residual add as post-ops of the GEMM.

Its post-ops apply GELU, ReLU and the residual add while the output tile is still in cache instead
of in a second pass over memory. Whether that wins depends on the CPU: on one AVX-512 Xeon
oneDNN's GEMM ran BERT-sized projections 5-15 % faster than the MKL `addmm` behind `F.linear`, on
another 2-9 % slower, GELU fused included. So `fastest` times both once per shape on the first
call's inputs and keeps the faster. oneDNN has no autograd formula, so it serves inference only
(no input requiring grad, or grad off); below MIN_MULTIPLY_ADDS its per-call setup (~15 µs) costs
more than it saves; under torch.compile Inductor plans the GEMMs itself.
Numerics: fp32 products and sums as `F.linear` (a different summation order: ~1e-6 relative),
GELU in fp32 to within a few ulps of PyTorch's.
"""
import time

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
    # the size first: small calls (where host time is what counts) are answered by one product
    if x.numel() * weight.shape[0] < MIN_MULTIPLY_ADDS or not _AVAILABLE or x.device.type != "cpu":
        return False
    if not (_plain_fp32(x) and _plain_fp32(weight) and _plain_fp32(bias)):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    if residual is not None and not (_plain_fp32(residual) and residual.shape == (*x.shape[:-1], weight.shape[0])):
        return False
    return torch.backends.mkldnn.enabled and not torch.compiler.is_compiling()


def linear(x, weight, bias=None, activation=None, residual=None):
    """act(x · weightᵀ + bias) + residual in one oneDNN call (where `takes` holds). A contiguous
    residual is added by the GEMM's binary post-op, which follows no activation: with both, or a
    strided residual, the residual is added in place on the output."""
    if residual is not None and activation is None and residual.is_contiguous():
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    post_op, algorithm = _POST_OPS[activation]
    y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op, [], algorithm)
    return y if residual is None else y.add_(residual)


# (rows rounded up to a power of two, N, K, activation, residual layout, no bias) -> oneDNN was faster
_ONEDNN_FASTER = {}
TIMED_RUNS = 3


def fastest(plain, x, weight, bias=None, activation=None, residual=None):
    """linear(...) or plain(...) (the same result another way: F.linear and the epilogue in place),
    whichever ran faster at this shape on this CPU. A shape seen first is timed on its inputs, each
    way warmed up once and then the best of TIMED_RUNS kept; the last run's output is returned."""
    layout = None if residual is None else residual.is_contiguous()
    key = (1 << (x.numel() // x.shape[-1] - 1).bit_length(), *weight.shape, activation, layout, bias is None)
    if key in _ONEDNN_FASTER:
        run = linear if _ONEDNN_FASTER[key] else plain
        return run(x, weight, bias, activation, residual)
    seconds = {}
    for run in (linear, plain):
        out = run(x, weight, bias, activation, residual)
        for _ in range(TIMED_RUNS):
            start = time.perf_counter()
            out = run(x, weight, bias, activation, residual)
            seconds[run] = min(seconds.get(run, float("inf")), time.perf_counter() - start)
    _ONEDNN_FASTER[key] = seconds[linear] < seconds[plain]
    return out
