"""The cuBLAS candidate of every GEMM kernels/linear.py launches: the same outputs as its fused
kernel, from cuBLAS (torch.mm / addmm, the bias added inside) and one elementwise pass for the rest.

  forward   h = x · Wᵀ + b (cuBLAS);  y = act(h) + r, act'(h) → ActGrad   (one pass, in place on h)
  GeGLU     h = x · Wᵀ + b = [u | gate];  y = act(u) · gate, [gate · act'(u) | act(u)] → ActGrad
  dx        dh = dy · act'(h) (one pass, written for dW);  dx = dh · W (cuBLAS)
  dW        dW = dhᵀ · x (cuBLAS);  db = Σ_rows dh (a reduction in fp32)

The numerics are Hugging Face's: the activation reads h rounded to the input dtype, as it does
after nn.Linear (the fused kernel reads the fp32 accumulator; both are within the error rule).
"""
import torch

try:
    import triton.language as tl
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from ._no_triton import tl

from ._launch import batch_generic, cdiv
from .activation import activation_and_grad


# C[M, N] ← act(H) + Residual, act'(H) → ActGrad; with GLU, H = [u | gate] holds 2·N columns:
# C ← act(u) · gate, [gate · act'(u) | act(u)] → ActGrad. C may be H itself (each program reads its
# elements before writing them).
@batch_generic("M")
def _epilogue_kernel(
    H, C, Residual, ActGrad, M, N, stride_hm, stride_cm, stride_rm, stride_gm,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_ACT_GRAD: tl.constexpr, GLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    h_ptrs = H + rm[:, None] * stride_hm + rn[None, :]
    g_ptrs = ActGrad + rm[:, None] * stride_gm + rn[None, :]
    y, grad = activation_and_grad(tl.load(h_ptrs, mask=mask).to(tl.float32), ACTIVATION, STORE_ACT_GRAD)
    if GLU:
        gate = tl.load(h_ptrs + N, mask=mask).to(tl.float32)
        if STORE_ACT_GRAD:
            tl.store(g_ptrs, (gate if ACTIVATION == 0 else gate * grad).to(ActGrad.dtype.element_ty), mask=mask)
            tl.store(g_ptrs + N, y.to(ActGrad.dtype.element_ty), mask=mask)
        y = y * gate
    else:
        if STORE_ACT_GRAD:
            tl.store(g_ptrs, grad.to(ActGrad.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:
            y += tl.load(Residual + rm[:, None] * stride_rm + rn[None, :], mask=mask).to(tl.float32)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], y.to(C.dtype.element_ty), mask=mask)


# 8 x 256 elements a program, 16 a thread: whole 512-byte rows of 16-bit values per warp
EPILOGUE_TILE = dict(BLOCK_M=8, BLOCK_N=256, num_warps=4)


def _epilogue(h, out, *, activation, residual, act_grad, glu):
    m, n = out.shape
    unused = out
    grid = (cdiv(m, EPILOGUE_TILE["BLOCK_M"]), cdiv(n, EPILOGUE_TILE["BLOCK_N"]))
    _epilogue_kernel[grid](
        h, out, unused if residual is None else residual, unused if act_grad is None else act_grad,
        m, n, h.stride(0), out.stride(0), 0 if residual is None else residual.stride(0),
        0 if act_grad is None else act_grad.stride(0),
        ACTIVATION=activation, HAS_RESIDUAL=residual is not None, STORE_ACT_GRAD=act_grad is not None, GLU=glu,
        **EPILOGUE_TILE,
    )


def cublas_matmul(a, b, out, *, bias=None, activation=0, residual=None, act_grad=None, scale_a=None,
                  store_a=None, row_sum=None, glu=False):
    """What kernels/linear.py's `_matmul` computes with the same arguments, through cuBLAS."""
    if scale_a is not None:  # dh = dy · act'(h), rounded once as the kernel's prologue rounds it
        a = torch.mul(a, scale_a, out=store_a) if store_a is not None else a * scale_a
    elif store_a is not None:
        a = store_a.copy_(a)
    if row_sum is not None:
        torch.sum(a, dim=1, dtype=torch.float32, out=row_sum)
    fused = glu or activation or residual is not None or act_grad is not None
    h = out.new_empty(a.shape[0], b.shape[1]) if glu else out
    if bias is None:
        torch.mm(a, b, out=h)
    else:
        torch.addmm(bias, a, b, out=h)
    if fused:
        _epilogue(h, out, activation=activation, residual=residual, act_grad=act_grad, glu=glu)


_VARIANTS = {
    "residual": dict(HAS_RESIDUAL=True),
    "gelu": dict(ACTIVATION=1),
    "gelu+grad": dict(ACTIVATION=1, STORE_ACT_GRAD=True),
    "gelu_tanh+grad": dict(ACTIVATION=2, STORE_ACT_GRAD=True),
    "geglu": dict(ACTIVATION=1, GLU=True),
    "geglu+grad": dict(ACTIVATION=1, GLU=True, STORE_ACT_GRAD=True),
}


def compile_cases():
    """The epilogue after a cuBLAS GEMM, each variant the candidates launch, for the static report
    (listed by kernels/linear.py's compile_cases). Feature sizes and row strides are multiples of
    16; M, the tokens, is never specialised on."""
    flags = dict(ACTIVATION=0, HAS_RESIDUAL=False, STORE_ACT_GRAD=False, GLU=False,
                 BLOCK_M=EPILOGUE_TILE["BLOCK_M"], BLOCK_N=EPILOGUE_TILE["BLOCK_N"])
    integers = ("M", "N", "stride_hm", "stride_cm", "stride_rm", "stride_gm")
    for dtype in ("fp16", "bf16", "fp32"):
        for variant, overrides in _VARIANTS.items():
            p = f"*{dtype}"
            signature = dict(H=p, C=p, Residual=p, ActGrad=p, **{name: "i32" for name in integers})
            yield dict(
                name=f"linear epilogue after cuBLAS {variant} {dtype}", fn=_epilogue_kernel, signature=signature,
                constexprs={**flags, **overrides}, divisible_by_16=[name for name in integers if name != "M"],
                num_warps=EPILOGUE_TILE["num_warps"], num_stages=1, matmul=False,
            )
