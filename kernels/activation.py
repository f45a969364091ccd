"""The activations the GEMM epilogues apply, with
their derivatives: shared by the fused GEMM and the elementwise epilogue that follows a cuBLAS GEMM."""
try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from ._no_triton import tl, triton

# the codes the kernels take for each activation of the ops
ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

@triton.jit
def tanh(u):
    # tl has no tanh; 1 - 2 / (e^{2u} + 1) is exact at both tails in fp32
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def activation_and_grad(h, ACT: tl.constexpr, WITH_GRAD: tl.constexpr):
    """act(h) and, when WITH_GRAD, act'(h) (else 0); the two share their erf / tanh."""
    grad = 0.0
    if ACT == 1:  # h·Φ(h), Φ(h) = (1 + erf(h / √2)) / 2;  derivative Φ(h) + h·φ(h)
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))  # 1/√2
        if WITH_GRAD:
            grad = cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)  # 1/√(2π)
        h = h * cdf
    elif ACT == 2:  # h·(1 + tanh(u)) / 2,  u = √(2/π)·(h + 0.044715·h³)
        t = tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))  # √(2/π)
        if WITH_GRAD:
            du = 0.7978845608028654 * (1.0 + 3 * 0.044715 * h * h)
            grad = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * du
        h = 0.5 * h * (1.0 + t)
    elif ACT == 3:
        if WITH_GRAD:
            grad = tl.where(h > 0.0, 1.0, 0.0)
        h = tl.maximum(h, 0.0)
    return h, grad
