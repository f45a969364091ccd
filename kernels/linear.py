"""Linear layer with its epilogue fused: y = act(x · Wᵀ + b) + residual.

One Triton matmul serves the forward and both backward products:
  forward   y  = act(h) + r,  h = x · Wᵀ + b   (act'(h) is stored when a gradient will need it)
  backward  dh = dy · act'(h)                   (fused into the load of dy, written once for reuse)
            dx = dh · W,   dW = dhᵀ · x,   db = Σ_rows dh   (db reduced inside the dW product)
            dr = dy
act is erf GELU (BERT "gelu"), tanh GELU (ALBERT "gelu_new"), ReLU, or none.
Accumulation is fp32; fp32 inputs use TF32 only when torch's settings allow it for cuBLAS matmuls
(`backend.allows_tf32`).
"""
import torch
try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from ._no_triton import tl, triton

from . import backend
from ._checks import FLOAT_DTYPES, check_float, check_like, check_shape, rows_view
from ._dispatch import direct_when_eager
from ._launch import batch_generic, cdiv, launches_on_input_device, next_power_of_2

ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


@triton.jit
def _tanh(u):
    # tl has no tanh; 1 - 2 / (e^{2u} + 1) is exact at both tails in fp32
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _activation(h, ACT: tl.constexpr, WITH_GRAD: tl.constexpr):
    """act(h) and, when WITH_GRAD, act'(h) (else 0); the two share their erf / tanh."""
    grad = 0.0
    if ACT == 1:  # h·Φ(h), Φ(h) = (1 + erf(h / √2)) / 2;  derivative Φ(h) + h·φ(h)
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))  # 1/√2
        if WITH_GRAD:
            grad = cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)  # 1/√(2π)
        h = h * cdf
    elif ACT == 2:  # h·(1 + tanh(u)) / 2,  u = √(2/π)·(h + 0.044715·h³)
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))  # √(2/π)
        if WITH_GRAD:
            du = 0.7978845608028654 * (1.0 + 3 * 0.044715 * h * h)
            grad = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * du
        h = 0.5 * h * (1.0 + t)
    elif ACT == 3:
        if WITH_GRAD:
            grad = tl.where(h > 0.0, 1.0, 0.0)
        h = tl.maximum(h, 0.0)
    return h, grad


# C[M, N] = epilogue(prologue(A)[M, K] · B[K, N]), fp32 accumulation, tiles ordered in groups of
# GROUP_M rows so that neighbouring programs share B tiles in L2.
#   epilogue (forward):   C ← act(C + bias) + residual;  act'(C + bias) → ActGrad (STORE_ACT_GRAD)
#   prologue (backward):  A ← A · ActGrad (SCALE_A), written once to DA (STORE_A);
#                         Σ_k A → RowSum (ROWSUM_A: the bias gradient, reduced in the dW product)
@batch_generic("M", "M_BUCKET", "K_BUCKET")  # M: the tokens (K too in the dW product, see compile_cases)
def _linear_kernel(
    A, B, C, Bias, Residual, ActGrad, DA, RowSum,
    M, N, K, M_BUCKET, K_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_rm, stride_gm,
    stride_dam,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_ACT_GRAD: tl.constexpr, SCALE_A: tl.constexpr, STORE_A: tl.constexpr,
    ROWSUM_A: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * blocks_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    # Rows and columns past the edge load a wrapped-around valid row instead of being masked: only
    # the K edge needs a mask in the loop, and the extra results are never stored. (The hints below
    # are false on a ragged edge tile: _matmul keeps unit strides off a ragged M or N.)
    rm_load = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    rn_load = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    a_ptrs = A + rm_load[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + rn_load[None, :] * stride_bn
    if SCALE_A:
        g_ptrs = ActGrad + rm_load[:, None] * stride_gm + rk[None, :]
    if STORE_A:
        da_ptrs = DA + rm[:, None] * stride_dam + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ROWSUM_A:
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if SCALE_A:
            g = tl.load(g_ptrs, mask=k_ok[None, :], other=0.0)
            a = (a.to(tl.float32) * g.to(tl.float32)).to(b.dtype)
            g_ptrs += BLOCK_K
        if STORE_A:
            if pid_n == 0:
                tl.store(da_ptrs, a, mask=m_ok[:, None] & k_ok[None, :])
            da_ptrs += BLOCK_K
        if ROWSUM_A:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        if ALLOW_TF32:
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if ROWSUM_A:
        if pid_n == 0:
            tl.store(RowSum + rm, row_sum, mask=m_ok)
    c_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc, act_grad = _activation(acc, ACTIVATION, STORE_ACT_GRAD)
    if STORE_ACT_GRAD:
        tl.store(ActGrad + rm[:, None] * stride_gm + rn[None, :], act_grad.to(ActGrad.dtype.element_ty),
                 mask=c_mask)
    if HAS_RESIDUAL:
        acc += tl.load(Residual + rm[:, None] * stride_rm + rn[None, :], mask=c_mask, other=0.0).to(tl.float32)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(C.dtype.element_ty), mask=c_mask)


def _config(block_m, block_n, block_k, stages, warps):
    return triton.Config(
        dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8),
        num_stages=stages, num_warps=warps,
    )


# The 128×128 tile at 4 stages takes 129 KB of shared memory on sm_90a: one CTA per SM (of 228 KB).
# At 3 stages it takes 97 KB, and two CTAs share an SM where registers allow it (≤ 128 per thread
# at 8 warps): four tiles in flight per SM instead of three, and one CTA's epilogue running while
# the other's main loop does. The variants within 128 registers there are the forward that stores
# no act' (bias, any activation, residual: 110–128) and the dx and dW products without act' or
# bias gradient (118, 122). They try this config besides the 4-stage one and the autotuner keeps
# the faster (on sm_80 the tile holds one CTA per SM at either depth, 184 registers, where 4 stages
# should stay ahead). Storing act', applying it and reducing the bias gradient take 145–188
# registers: one CTA whatever the stages, so 3 stages would only shorten their pipeline; they keep
# 4 (and find two CTAs per SM in the smaller tiles). The report checks the two CTAs per SM.
TWO_CTAS_128X128 = _config(128, 128, 64, 3, 8)
# Tiles for Hopper and Ampere at BERT shapes (M = tokens, N and K in 384…4096): large tiles for
# thousands of tokens, small ones so that a 128-token batch still fills the SMs.
CONFIGS_16BIT = [
    _config(128, 128, 64, 4, 8),
    TWO_CTAS_128X128,
    _config(64, 128, 64, 4, 4),
    _config(128, 64, 64, 4, 8),
    _config(64, 64, 64, 4, 4),
]
# fp32 tiles take twice the shared memory and, without TF32, run on the FMA units: smaller tiles.
# (64x64 tiles keep 8-16 B of stack on sm_90a under Triton 3.6 or 3.9 in some product whatever
# their K depth, stages or warps: the dW product of a token count that is not a multiple of 16,
# the dx product, or the forward.)
CONFIGS_FP32 = [
    _config(32, 64, 32, 3, 4),
]
# The interpreter runs one program at a time, ~1.5 ms each: one small tile keeps tests quick while
# still crossing block edges at small shapes.
INTERPRETER_CONFIGS = [_config(32, 32, 32, 1, 4)]


def _configs_for_variant(configs, named_args, **kwargs):
    """The configs the autotuner tries for one variant: TWO_CTAS_128X128 only where the epilogue
    leaves registers for two CTAs per SM (see above). The flags are among the launch's arguments."""
    flags = {**named_args, **kwargs}
    two_ctas = not (flags["STORE_ACT_GRAD"] or flags["SCALE_A"] or flags["ROWSUM_A"])
    return [config for config in configs if two_ctas or config is not TWO_CTAS_128X128]


def _autotuned(configs):
    return triton.autotune(
        configs=INTERPRETER_CONFIGS if backend.INTERPRET else configs,
        # M and K (the token count in the dW product) only through power-of-two buckets: a new batch
        # size or padded length must not trigger a new tuning run. The kernel bounds with exact M, K.
        key=["M_BUCKET", "N", "K_BUCKET", "HAS_BIAS", "ACTIVATION", "HAS_RESIDUAL", "STORE_ACT_GRAD",
             "SCALE_A", "STORE_A", "ROWSUM_A", "ALLOW_TF32"],
        prune_configs_by=dict(early_config_prune=_configs_for_variant),
    )(_linear_kernel)


_KERNELS = {
    torch.float16: _autotuned(CONFIGS_16BIT),
    torch.bfloat16: _autotuned(CONFIGS_16BIT),
    torch.float32: _autotuned(CONFIGS_FP32),
}


def _bucket(size):
    """The autotune key of a size that depends on the data: its power of two, within [16, 16384]."""
    return min(next_power_of_2(max(size, 16)), 16384)


# The kernel loads the last tile along M and N wrapped around to valid rows, and vectorises loads
# along a unit stride on the promise that a tile's rows are contiguous. For an operand running
# along M (a) or N (b) with unit stride, the wrapped tile breaks that promise and the vector loads
# would read up to a tile past the tensor's end, unless M (N) is a multiple of every tile size.
LARGEST_TILE = 128


def _without_unit_stride_along(t, dim):
    """A copy of 2-D `t` with unit stride along the other dim and a stride of at least 2 along
    `dim` (a copy only for feature sizes that are not multiples of LARGEST_TILE)."""
    other = 1 - dim
    buffer = t.new_empty((t.shape[dim], max(t.shape[other], 2)))[:, :t.shape[other]]
    buffer.copy_(t if dim == 0 else t.t())
    return buffer if dim == 0 else buffer.t()


def _matmul(a, b, out, *, bias=None, activation=0, residual=None, act_grad=None, scale_a=None,
            store_a=None, row_sum=None):
    """out = epilogue(prologue(a) · b), every operand a 2-D view with unit stride along its rows
    (a and b may be transposed views). act_grad is written by the epilogue, scale_a read by the
    prologue; see the kernel's comment."""
    m, k = a.shape
    n = b.shape[1]
    if a.stride(0) == 1 and m % LARGEST_TILE:
        a = _without_unit_stride_along(a, 0)
    if b.stride(1) == 1 and n % LARGEST_TILE:
        b = _without_unit_stride_along(b, 1)
    if scale_a is not None and scale_a.stride(0) == 1 and m % LARGEST_TILE:  # read like a (one column)
        scale_a = _without_unit_stride_along(scale_a, 0)
    grad_rows = act_grad if act_grad is not None else scale_a
    unused = out  # stands in for the pointers a variant never touches
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)
    _KERNELS[a.dtype][grid](
        a, b, out,
        unused if bias is None else bias,
        unused if residual is None else residual,
        unused if grad_rows is None else grad_rows,
        unused if store_a is None else store_a,
        unused if row_sum is None else row_sum,
        m, n, k, _bucket(m), _bucket(k),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        0 if residual is None else residual.stride(0),
        0 if grad_rows is None else grad_rows.stride(0),
        0 if store_a is None else store_a.stride(0),
        HAS_BIAS=bias is not None, ACTIVATION=activation, HAS_RESIDUAL=residual is not None,
        STORE_ACT_GRAD=act_grad is not None, SCALE_A=scale_a is not None,
        STORE_A=store_a is not None, ROWSUM_A=row_sum is not None,
        ALLOW_TF32=a.dtype == torch.float32 and backend.allows_tf32(),
    )


@launches_on_input_device
def _linear_fwd_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: int,
    residual: torch.Tensor | None, save_act_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = weight.shape[0]
    x2 = rows_view(x)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    act_grad = torch.empty_like(out) if save_act_grad else out.new_empty(0)
    _matmul(
        x2, weight.t(), out, bias=bias, activation=activation,
        residual=None if residual is None else rows_view(residual),
        act_grad=act_grad if save_act_grad else None,
    )
    return out.view(*x.shape[:-1], n), act_grad


_linear_fwd = torch.library.custom_op("fastencoder::linear_fwd", _linear_fwd_impl, mutates_args=())


@_linear_fwd.register_fake
def _(x, weight, bias, activation, residual, save_act_grad):
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    rows = x.numel() // x.shape[-1]
    return out, x.new_empty(rows, weight.shape[0]) if save_act_grad else x.new_empty(0)


@launches_on_input_device
def _linear_bwd_impl(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, act_grad: torch.Tensor | None,
    need_dx: bool, need_dweight: bool, need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    dy2 = rows_view(dy)
    m = dy2.shape[0]
    # outputs that are not needed are distinct empty tensors (custom op outputs may not alias)
    empty = lambda: dy.new_empty(0)
    dx, dweight, dbias = empty(), empty(), empty()
    needs_dh = need_dweight or need_dbias
    dh = dy2
    if act_grad is not None and needs_dh:
        dh = torch.empty((m, n), dtype=dy.dtype, device=dy.device)
    # dh = dy · act'(h) is formed inside the dx product, which therefore also runs when only dh is
    # wanted (a frozen input under a trainable GELU layer)
    if need_dx or dh is not dy2:
        dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
        _matmul(dy2, weight, dx, scale_a=act_grad, store_a=None if dh is dy2 else dh)
        dx = dx.view(*dy.shape[:-1], k) if need_dx else empty()
    if needs_dh:
        dweight = torch.empty_like(weight)
        row_sum = torch.empty(n, dtype=torch.float32, device=dy.device) if need_dbias else None
        _matmul(dh.t(), rows_view(x), dweight, row_sum=row_sum)
        dbias = row_sum.to(weight.dtype) if need_dbias else empty()
        dweight = dweight if need_dweight else empty()
    return dx, dweight, dbias


_linear_bwd = torch.library.custom_op("fastencoder::linear_bwd", _linear_bwd_impl, mutates_args=())


@_linear_bwd.register_fake
def _(dy, x, weight, act_grad, need_dx, need_dweight, need_dbias):
    return (
        x.new_empty(x.shape) if need_dx else dy.new_empty(0),  # contiguous, whatever x's strides
        torch.empty_like(weight) if need_dweight else dy.new_empty(0),
        weight.new_empty(weight.shape[0]) if need_dbias else dy.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, residual, save_act_grad = inputs
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.has_act_grad = save_act_grad
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, _d_act_grad):
    x, weight, act_grad = ctx.saved_tensors
    need_dx, need_dweight, need_dbias, _, need_dresidual, _ = ctx.needs_input_grad
    need_dbias = need_dbias and ctx.has_bias
    dx, dweight, dbias = _call_linear_bwd(
        dy, x, weight, act_grad if ctx.has_act_grad else None, need_dx, need_dweight, need_dbias
    )
    return (
        dx if need_dx else None,
        dweight if need_dweight else None,
        dbias if need_dbias else None,
        None,
        dy if need_dresidual and ctx.has_residual else None,
        None,
    )


_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
_call_linear_fwd = direct_when_eager(_linear_fwd, _linear_fwd_impl, _backward, _setup_context)
_call_linear_bwd = direct_when_eager(_linear_bwd, _linear_bwd_impl)

# each activation of the linear op, as PyTorch computes it (the references, the PyTorch path, and
# the models where an op is not fused)
TORCH_ACTIVATIONS = {
    None: lambda h: h,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
    "relu": torch.relu,
}


def linear_reference(x, weight, bias=None, activation=None, residual=None):
    """PyTorch reference, computed as Hugging Face's BERT computes it (in x's dtype)."""
    y = TORCH_ACTIVATIONS[activation](torch.nn.functional.linear(x, weight, bias))
    return y if residual is None else y + residual


_IN_PLACE_ACTIVATIONS = {
    "gelu": torch.ops.aten.gelu_,
    "gelu_tanh": lambda h: torch.ops.aten.gelu_(h, approximate="tanh"),
    "relu": torch.relu_,
}


def linear_torch(x, weight, bias=None, activation=None, residual=None):
    """The fast PyTorch path of `linear`: one GEMM with the bias added in it (cuBLAS, oneDNN),
    then the activation and the residual add in place on its output when autograd keeps no
    reference to it (inference), so no further buffer is allocated."""
    y = torch.nn.functional.linear(x, weight, bias)
    if y.requires_grad:
        y = TORCH_ACTIVATIONS[activation](y)
        return y if residual is None else y + residual
    if activation is not None:
        y = _IN_PLACE_ACTIVATIONS[activation](y)
    return y if residual is None else y.add_(residual)


def _extent(tensor):
    """How many elements apart the first and last element of `tensor` lie, plus one."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()) if size)


def linear(x, weight, bias=None, activation=None, residual=None):
    """y = act(x · weightᵀ + bias) + residual, with weight [N, K] as in torch.nn.Linear.

    activation: None, "gelu" (exact erf GELU), "gelu_tanh" (tanh approximation) or "relu".
    """
    if not _well_formed(x, weight, bias, residual) or activation not in ACTIVATIONS:
        _check_inputs(x, weight, bias, activation, residual)
    if not backend.use_triton(x.device, x.dtype):
        return linear_torch(x, weight, bias, activation, residual)
    n, k = weight.shape
    operands = [x, weight] + ([] if residual is None else [residual])
    if max(x.numel() // max(k, 1) * n, *(_extent(t) for t in operands)) >= 2**31:
        raise ValueError("the Triton linear kernel indexes with 32 bits: every operand must span < 2**31 "
                         "elements (its strides included)")
    if x.numel() == 0 or k == 0:
        return linear_reference(x, weight, bias, activation, residual)
    save_act_grad = ACTIVATIONS[activation] != 0 and torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return _call_linear_fwd(x, weight, bias, ACTIVATIONS[activation], residual, save_act_grad)[0]


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _well_formed(x, weight, bias, residual):
    """The common call (a model's: a bias, no residual) found valid in a few attribute reads; the
    full checks, whose messages explain a refusal, run for the others. Per-call host time is what
    small batches wait for."""
    return (residual is None and type(x) is torch.Tensor and type(weight) in _PLAIN and type(bias) in _PLAIN
            and x.dtype in FLOAT_DTYPES and weight.dtype == x.dtype == bias.dtype
            and weight.device == x.device == bias.device and weight.dim() == 2 and x.dim() >= 1
            and x.shape[-1] == weight.shape[1] and bias.shape == weight.shape[:1])


def _check_inputs(x, weight, bias, activation, residual):
    check_float("x", x)
    check_like("weight", weight, x, "x")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x's last dim must equal weight's in_features {k}, got x of shape {tuple(x.shape)}")
    if bias is not None:
        check_like("bias", bias, x, "x")
        check_shape("bias", bias, (n,))
    if residual is not None:
        check_like("residual", residual, x, "x")
        check_shape("residual", residual, (*x.shape[:-1], n))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")


# --------------------------------------------------------------------------------------------- GeGLU
# ModernBERT's MLP input projection: Wi [2·I, K] computes both halves, h = x · Wiᵀ + b = [u | gate],
# and the MLP continues with act(u) · gate. Its backward, with y = act(u) · gate:
#   du = dy · gate · act'(u),  dgate = dy · act(u)   →  dh = [du | dgate] = [dy | dy] ⊙ F,
#   F = [gate · act'(u) | act(u)] saved by the forward,  dx = dh · Wi,  dWi = dhᵀ · x,  db = Σ_rows dh
_ACTIVATION_NAMES = {code: name for name, code in ACTIVATIONS.items()}


def _activation_derivative_torch(h, activation):
    if activation == "gelu":
        return torch.special.ndtr(h) + h * torch.exp(-0.5 * h * h) * 0.3989422804014327  # Φ(h) + h·φ(h)
    if activation == "gelu_tanh":
        t = torch.tanh(0.7978845608028654 * (h + 0.044715 * h ** 3))
        return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * h * h)
    if activation == "relu":
        return (h > 0).to(h.dtype)
    return torch.ones_like(h)


@launches_on_input_device
def _geglu_fwd_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: int, save_factors: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    name = _ACTIVATION_NAMES[activation]
    u, gate = torch.nn.functional.linear(x, weight, bias).float().chunk(2, -1)
    act = TORCH_ACTIVATIONS[name](u)
    out = (act * gate).to(x.dtype)
    if not save_factors:
        return out, x.new_empty(0)
    factors = torch.cat([gate * _activation_derivative_torch(u, name), act], -1).to(x.dtype)
    return out, factors.reshape(-1, weight.shape[0])


_geglu_fwd = torch.library.custom_op("fastencoder::geglu_linear_fwd", _geglu_fwd_impl, mutates_args=())


@_geglu_fwd.register_fake
def _(x, weight, bias, activation, save_factors):
    out = x.new_empty(*x.shape[:-1], weight.shape[0] // 2)
    rows = x.numel() // x.shape[-1]
    return out, x.new_empty(rows, weight.shape[0]) if save_factors else x.new_empty(0)


@launches_on_input_device
def _geglu_bwd_impl(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, factors: torch.Tensor,
    need_dx: bool, need_dweight: bool, need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dy2 = rows_view(dy)
    rows, intermediate = dy2.shape
    dh = torch.empty(rows, 2 * intermediate, dtype=dy.dtype, device=dy.device)
    # [dy | dy] ⊙ F in one broadcast pass, rounded once as the kernels round
    torch.mul(factors.view(rows, 2, intermediate), dy2[:, None, :], out=dh.view(rows, 2, intermediate))
    empty = lambda: dy.new_empty(0)
    dx = (dh @ weight).view(*dy.shape[:-1], weight.shape[1]) if need_dx else empty()
    dweight = dh.t() @ rows_view(x) if need_dweight else empty()
    dbias = dh.sum(0, dtype=torch.float32).to(weight.dtype) if need_dbias else empty()
    return dx, dweight, dbias


_geglu_bwd = torch.library.custom_op("fastencoder::geglu_linear_bwd", _geglu_bwd_impl, mutates_args=())


@_geglu_bwd.register_fake
def _(dy, x, weight, factors, need_dx, need_dweight, need_dbias):
    return (
        x.new_empty(x.shape) if need_dx else dy.new_empty(0),
        torch.empty_like(weight) if need_dweight else dy.new_empty(0),
        weight.new_empty(weight.shape[0]) if need_dbias else dy.new_empty(0),
    )


def _geglu_setup_context(ctx, inputs, output):
    x, weight, bias, activation, save_factors = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, output[1])


def _geglu_backward(ctx, dy, _d_factors):
    x, weight, factors = ctx.saved_tensors
    need_dx, need_dweight, need_dbias, _, _ = ctx.needs_input_grad
    need_dbias = need_dbias and ctx.has_bias
    dx, dweight, dbias = _call_geglu_bwd(dy, x, weight, factors, need_dx, need_dweight, need_dbias)
    return dx if need_dx else None, dweight if need_dweight else None, dbias if need_dbias else None, None, None


_geglu_fwd.register_autograd(_geglu_backward, setup_context=_geglu_setup_context)
_call_geglu_fwd = direct_when_eager(_geglu_fwd, _geglu_fwd_impl, _geglu_backward, _geglu_setup_context)
_call_geglu_bwd = direct_when_eager(_geglu_bwd, _geglu_bwd_impl)


def geglu_linear_reference(x, weight, bias=None, activation="gelu"):
    """PyTorch reference, computed as Hugging Face's ModernBertMLP computes it (in x's dtype)."""
    u, gate = torch.nn.functional.linear(x, weight, bias).chunk(2, -1)
    return TORCH_ACTIVATIONS[activation](u) * gate


def geglu_linear_torch(x, weight, bias=None, activation="gelu"):
    """The fast PyTorch path of `geglu_linear`: one GEMM (bias added in it), then, when autograd
    keeps no reference to its output (inference), the activation and the gate in place on its
    first half: the result is a view of the GEMM's output (rows 2·I elements apart), no further
    buffer allocated."""
    u, gate = torch.nn.functional.linear(x, weight, bias).chunk(2, -1)
    if u.requires_grad:
        return TORCH_ACTIVATIONS[activation](u) * gate
    if activation is not None:
        u = _IN_PLACE_ACTIVATIONS[activation](u)
    return u.mul_(gate)


def geglu_linear(x, weight, bias=None, activation="gelu"):
    """act(x · W[:I]ᵀ + b[:I]) · (x · W[I:]ᵀ + b[I:]), shape [..., I], with weight [2·I, K] and bias
    [2·I] as Hugging Face's ModernBERT `Wi` holds them (its MLP's `input, gate = Wi(x).chunk(2, -1)`).

    activation: "gelu" (exact erf GELU, ModernBERT's default), "gelu_tanh", "relu" or None.
    """
    _check_geglu_inputs(x, weight, bias, activation)
    if not backend.use_triton(x.device, x.dtype):
        return geglu_linear_torch(x, weight, bias, activation)
    if x.numel() == 0 or weight.shape[1] == 0:
        return geglu_linear_reference(x, weight, bias, activation)
    if max(x.numel() // weight.shape[1] * weight.shape[0], _extent(x), _extent(weight)) >= 2**31:
        raise ValueError("the Triton GeGLU kernel indexes with 32 bits: every operand must span < 2**31 "
                         "elements (its strides included)")
    save_factors = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return _call_geglu_fwd(x, weight, bias, ACTIVATIONS[activation], save_factors)[0]


def _check_geglu_inputs(x, weight, bias, activation):
    if (type(x) is torch.Tensor and type(weight) in _PLAIN and (bias is None or type(bias) in _PLAIN)
            and x.dtype in FLOAT_DTYPES and weight.dtype == x.dtype and weight.device == x.device
            and weight.dim() == 2 and weight.shape[0] % 2 == 0 and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
            and (bias is None or (bias.dtype == x.dtype and bias.device == x.device and bias.shape == weight.shape[:1]))
            and activation in ACTIVATIONS):
        return  # the common call, found valid in a few attribute reads
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] % 2:
        raise ValueError(f"weight must have an even number of rows [2 * intermediate, in_features] (the "
                         f"input half, then the gate half), got shape {tuple(weight.shape)}")
    _check_inputs(x, weight, bias, activation, None)


# What the ops launch: flag combinations and operand layouts of the forward, dx and dW products.
# Unit strides are given as constants (the runtime specialises integer arguments equal to 1 too).
_FORWARD = dict(stride_ak=1, stride_bk=1, stride_cn=1)  # A = x, B = Wᵀ
_DX = dict(stride_ak=1, stride_bn=1, stride_cn=1)  # A = dy, B = W
_DW = dict(stride_am=1, stride_bn=1, stride_cn=1)  # A = dhᵀ, B = x
_VARIANTS = {
    "fwd": dict(_FORWARD, HAS_BIAS=True),
    "fwd+gelu": dict(_FORWARD, HAS_BIAS=True, ACTIVATION=1),
    "fwd+gelu+grad": dict(_FORWARD, HAS_BIAS=True, ACTIVATION=1, STORE_ACT_GRAD=True),
    "fwd+gelu_tanh+grad": dict(_FORWARD, HAS_BIAS=True, ACTIVATION=2, STORE_ACT_GRAD=True),
    "fwd+residual": dict(_FORWARD, HAS_BIAS=True, HAS_RESIDUAL=True),
    "dx": dict(_DX),
    "dx+act_grad": dict(_DX, SCALE_A=True, STORE_A=True),
    "dw+dbias": dict(_DW, ROWSUM_A=True),
}
_INT_ARGS = ("M", "N", "K", "M_BUCKET", "K_BUCKET", "stride_am", "stride_ak", "stride_bk", "stride_bn",
             "stride_cm", "stride_cn", "stride_rm", "stride_gm", "stride_dam")


def compile_cases():
    """Every config × launched variant × dtype, for the static kernel report (kernels/report.py)."""
    flags = dict(HAS_BIAS=False, ACTIVATION=0, HAS_RESIDUAL=False, STORE_ACT_GRAD=False,
                 SCALE_A=False, STORE_A=False, ROWSUM_A=False, ALLOW_TF32=False)
    for dtype, configs in (("fp16", CONFIGS_16BIT), ("bf16", CONFIGS_16BIT), ("fp32", CONFIGS_FP32)):
        for config in configs:
            tile = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**config.kwargs)
            for variant, overrides in _VARIANTS.items():
                constexprs = {**flags, **overrides, **config.kwargs}
                if not _configs_for_variant([config], {}, **constexprs):
                    continue
                p = f"*{dtype}"
                signature = dict(A=p, B=p, C=p, Bias=p, Residual=p, ActGrad=p, DA=p, RowSum="*fp32")
                signature.update({name: "i32" for name in _INT_ARGS if name not in constexprs})
                # BERT-family feature sizes (N, K) and row strides are multiples of 16; M, the tokens,
                # is never specialised on. In the dW product K is the tokens: a multiple of 16 or not
                for tokens_k in (False, True) if variant.startswith("dw") else (False,):
                    yield dict(
                        name=f"linear {variant} {tile} w{config.num_warps}s{config.num_stages} {dtype}"
                             + (" K%16!=0" if tokens_k else ""),
                        fn=_linear_kernel, signature=signature, constexprs=constexprs,
                        divisible_by_16=[n for n in signature if n.startswith("stride") or n == "N"
                                         or n == "K" and not tokens_k],
                        num_warps=config.num_warps, num_stages=config.num_stages,
                        matmul=dtype != "fp32",  # fp32 without TF32 runs on FMA units, not wgmma
                        min_ctas={"sm_90a": 2} if config is TWO_CTAS_128X128 else {},
                    )
