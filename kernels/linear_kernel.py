"""The Triton GEMM behind kernels/linear.py's ops, with its fused prologue and epilogues, its
autotuned configs, its launcher and the cases the static report compiles.

One kernel serves the forward and both backward products of `linear` and `geglu_linear` (see the
comment above it). On a GPU each GEMM runs the kernel or its cuBLAS candidate
(kernels/linear_cublas.py), whichever kernels/gemm_choice.py timed faster for it.
"""
import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from ._no_triton import tl, triton

from . import backend, gemm_choice, linear_cublas, linear_hopper
from ._launch import batch_generic, cdiv
from .activation import ACTIVATIONS, activation_and_grad

_ACTIVATION_NAMES = {code: name for name, code in ACTIVATIONS.items()}


# C[M, N] = epilogue(prologue(A)[M, K] · B[K, N]), fp32 accumulation, tiles ordered in groups of
# GROUP_M rows so that neighbouring programs share B tiles in L2.
#   epilogue (forward):   C ← act(C + bias) + residual;  act'(C + bias) → ActGrad (STORE_ACT_GRAD)
#   prologue (backward):  A ← A · ActGrad (SCALE_A), written once to DA (STORE_A);
#                         Σ_k A → RowSum (ROWSUM_A: the bias gradient, reduced in the dW product)
#   GeGLU (GLU):          B's columns are W's rows [u | gate] interleaved, column 2j from row j, 2j + 1
#                         from row N/2 + j: one accumulator tile holds both halves of BLOCK_N / 2
#                         outputs, the main loop is the plain GEMM's, and the epilogue splits the pairs:
#                         C[:, j] ← act(u_j) · gate_j;  [gate·act'(u) | act(u)] → ActGrad (STORE_ACT_GRAD)
@batch_generic("M", "M_BUCKET", "K_BUCKET")  # M: the tokens (K too in the dW product, see compile_cases)
def _linear_kernel(
    A, B, C, Bias, Residual, ActGrad, DA, RowSum,
    M, N, K, M_BUCKET, K_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_rm, stride_gm,
    stride_dam,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_ACT_GRAD: tl.constexpr, SCALE_A: tl.constexpr, STORE_A: tl.constexpr,
    ROWSUM_A: tl.constexpr, GLU: tl.constexpr, ALLOW_TF32: tl.constexpr,
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
    if GLU:  # the W row each accumulator column reads (see above); no contiguity to promise
        half_n = N // 2
        rn_load = (rn // 2) % half_n + (rn % 2) * half_n
    else:
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
    if GLU:
        if HAS_BIAS:
            acc += tl.load(Bias + rn_load).to(tl.float32)[None, :]
        # the pairs (u_j, gate_j) are neighbouring columns, which a thread holds together
        u, gate = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        u, act_grad = activation_and_grad(u, ACTIVATION, STORE_ACT_GRAD)
        ro = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        o_mask = m_ok[:, None] & (ro < half_n)[None, :]
        if STORE_ACT_GRAD:
            g_ptrs = ActGrad + rm[:, None] * stride_gm + ro[None, :]
            if ACTIVATION == 0:
                act_grad = gate
            else:
                act_grad = act_grad * gate
            tl.store(g_ptrs, act_grad.to(ActGrad.dtype.element_ty), mask=o_mask)
            tl.store(g_ptrs + half_n, u.to(ActGrad.dtype.element_ty), mask=o_mask)
        tl.store(C + rm[:, None] * stride_cm + ro[None, :] * stride_cn, (u * gate).to(C.dtype.element_ty),
                 mask=o_mask)
    else:
        c_mask = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc, act_grad = activation_and_grad(acc, ACTIVATION, STORE_ACT_GRAD)
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
             "SCALE_A", "STORE_A", "ROWSUM_A", "GLU", "ALLOW_TF32"],
        prune_configs_by=dict(early_config_prune=_configs_for_variant),
    )(_linear_kernel)


_KERNELS = {
    torch.float16: _autotuned(CONFIGS_16BIT),
    torch.bfloat16: _autotuned(CONFIGS_16BIT),
    torch.float32: _autotuned(CONFIGS_FP32),
}


_bucket = gemm_choice.bucket  # the autotune key of the token counts


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


def matmul(product, a, b, out, **epilogue):
    """out = epilogue(prologue(a) · b), every operand a 2-D view with unit stride along its rows
    (a and b may be transposed views); the keyword arguments are `_kernel_matmul`'s. On a GPU the
    classic kernel, the Hopper kernel or the cuBLAS candidate, whichever kernels/gemm_choice.py
    found fastest for this GEMM (product: "forward", "dx" or "dW")."""
    if not gemm_choice.times(a):
        return _kernel_matmul(a, b, out, **epilogue)
    winner = gemm_choice.choose(_choice_key(product, a, b, epilogue), a, lambda: _candidates(a, b, out, epilogue))
    # the key does not tell the operands' alignment: the Hopper kernel's descriptors are checked per call
    if winner == gemm_choice.HOPPER and linear_hopper.runs_on(a) and linear_hopper.eligible(a, b, out, **epilogue):
        linear_hopper.hopper_matmul(a, b, out, **epilogue)
    elif winner == gemm_choice.CUBLAS:
        linear_cublas.cublas_matmul(a, b, out, **epilogue)
    else:
        _kernel_matmul(a, b, out, **epilogue)


def _candidates(a, b, out, epilogue):
    candidates = {gemm_choice.CLASSIC: lambda: _kernel_matmul(a, b, out, **epilogue)}
    if linear_hopper.runs_on(a) and linear_hopper.eligible(a, b, out, **epilogue):
        candidates[gemm_choice.HOPPER] = lambda: linear_hopper.hopper_matmul(a, b, out, **epilogue)
    candidates[gemm_choice.CUBLAS] = lambda: linear_cublas.cublas_matmul(a, b, out, **epilogue)
    return candidates


_OPTIONAL_OPERANDS = ("bias", "scale_a", "store_a", "row_sum", "act_grad", "residual")  # in _choice_key's order
_OPTIONAL_NAMES = dict(bias="bias", scale_a="act'", store_a="dh", row_sum="dbias", act_grad="act'", residual="residual")


@functools.lru_cache(maxsize=None)
def _epilogue_name(present, activation, glu):
    """A readable name of an epilogue ("bias+gelu+act'"): its operands present and activation."""
    names = [_OPTIONAL_NAMES[operand] for operand, here in zip(_OPTIONAL_OPERANDS, present) if here]
    activation = _ACTIVATION_NAMES[activation]
    if glu:
        activation = f"glu({activation or 'linear'})"
    if activation:
        names.insert(1 if "bias" in names else 0, activation)
    return "+".join(names)


def _choice_key(product, a, b, epilogue):
    """The GEMM's key in kernels/gemm_choice.py (built on every call on a GPU: kept cheap)."""
    m, k = a.shape
    get = epilogue.get
    present = (get("bias") is not None, get("scale_a") is not None, get("store_a") is not None,
               get("row_sum") is not None, get("act_grad") is not None, get("residual") is not None)
    return gemm_choice.GemmKey(
        a.device, product, a.dtype, a.dtype is torch.float32 and backend.allows_tf32(), _bucket(m), b.shape[1],
        _bucket(k), _epilogue_name(present, epilogue.get("activation", 0), epilogue.get("glu", False)),
        _LAYOUTS[a.stride(1) == 1, b.stride(1) == 1])


_LAYOUTS = {(True, True): "NN", (True, False): "NT", (False, True): "TN", (False, False): "TT"}


def _kernel_matmul(a, b, out, *, bias=None, activation=0, residual=None, act_grad=None, scale_a=None,
                   store_a=None, row_sum=None, glu=False):
    """out = epilogue(prologue(a) · b) by the fused kernel. act_grad is written by the epilogue,
    scale_a read by the prologue; with glu, b = Wᵀ holds both GeGLU halves and out has half its
    columns. See the kernel's comment."""
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
        STORE_A=store_a is not None, ROWSUM_A=row_sum is not None, GLU=glu,
        ALLOW_TF32=a.dtype == torch.float32 and backend.allows_tf32(),
    )


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
    "dw": dict(_DW),
    "dw+dbias": dict(_DW, ROWSUM_A=True),
    # GeGLU (ModernBERT's Wi: no bias, erf GELU); its backward runs the dx and dw products above
    "fwd+geglu": dict(_FORWARD, GLU=True, ACTIVATION=1),
    "fwd+geglu+grad": dict(_FORWARD, GLU=True, ACTIVATION=1, STORE_ACT_GRAD=True),
}
_INT_ARGS = ("M", "N", "K", "M_BUCKET", "K_BUCKET", "stride_am", "stride_ak", "stride_bk", "stride_bn",
             "stride_cm", "stride_cn", "stride_rm", "stride_gm", "stride_dam")


def compile_cases():
    """Every config × launched variant × dtype, for the static kernel report (kernels/report.py),
    then the Hopper kernel's (sm_90a) and the elementwise epilogue of the cuBLAS candidates."""
    yield from _kernel_cases()
    yield from linear_hopper.compile_cases()
    yield from linear_cublas.compile_cases()


def _kernel_cases():
    flags = dict(HAS_BIAS=False, ACTIVATION=0, HAS_RESIDUAL=False, STORE_ACT_GRAD=False,
                 SCALE_A=False, STORE_A=False, ROWSUM_A=False, GLU=False, ALLOW_TF32=False)
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
