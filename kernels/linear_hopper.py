"""The Hopper GEMM of kernels/linear_kernel.py's products (sm_90, fp16 / bf16, TF32 forward): the
operands and the output move by tensor descriptors (TMA), and persistent programs, one per SM, walk
the output tiles in the classic kernel's grouped order, so that a program's next tile loads while
neighbouring programs share B tiles in L2.

The same prologue and epilogues as the classic kernel (see its comment), with
  C = act(A · B + bias) + residual, act' → ActGrad;  A ← A · G (SCALE_A), written to DA (STORE_A),
  Σ_k A → RowSum (ROWSUM_A);  GeGLU (GLU): W [2·N, K] read through a 3-D descriptor as [2, N, K],
  so that one box brings both halves' rows n0… (u, then gate) and one dot fills a [BLOCK_M,
  2·BLOCK_N] accumulator: the main loop is the plain GEMM's. C = act(u) · gate,
  [gate · act'(u) | act(u)] → ActGrad (N: the output width).
A is stored [M, K] (rows along K) or [K, M] (A_KM: the dW product's dhᵀ), B [N, K] (Wᵀ of the
forward) or [K, N] (B_KN: W in the dx product, x in the dW product). A descriptor load outside the
tensor reads zeros and a store is clipped to it: no masks in the main loop, no wrapped tiles.

The classic kernel stays for sm_80 and for operands a descriptor cannot take: TMA needs 16-byte
aligned base addresses and row strides, and a unit stride along the last dim.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from ._no_triton import tl, triton
try:  # host-side tensor descriptors: Triton 3.4 and later
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from . import backend
from ._launch import batch_generic, cdiv
from .activation import activation_and_grad
from .gemm_choice import bucket


# M: the tokens; K too in the dW product, and the descriptors bound K whatever its value: one variant
@batch_generic("M", "K", "M_BUCKET", "K_BUCKET", "NUM_SMS")
def _linear_hopper_kernel(
    a_desc, b_desc, c_desc, g_desc, da_desc, Bias, Residual, ActGrad, RowSum,
    M, N, K, M_BUCKET, K_BUCKET, NUM_SMS, stride_rm, stride_gm,
    A_KM: tl.constexpr, B_KN: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_ACT_GRAD: tl.constexpr, SCALE_A: tl.constexpr, STORE_A: tl.constexpr,
    ROWSUM_A: tl.constexpr, GLU: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * blocks_n
    for tile in tl.range(tl.program_id(0), blocks_m * blocks_n, NUM_SMS):
        first_m = (tile // group_size) * GROUP_M
        rows_in_group = min(blocks_m - first_m, GROUP_M)
        m0 = (first_m + (tile % group_size) % rows_in_group) * BLOCK_M
        n0 = (tile % group_size) // rows_in_group * BLOCK_N
        if GLU:
            acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ROWSUM_A:
            row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if A_KM:
                a = a_desc.load([k0, m0]).T
            else:
                a = a_desc.load([m0, k0])
            if SCALE_A:
                a = (a.to(tl.float32) * g_desc.load([m0, k0]).to(tl.float32)).to(a.dtype)
                if STORE_A:
                    if n0 == 0:
                        da_desc.store([m0, k0], a)
            if ROWSUM_A:
                row_sum += tl.sum(a.to(tl.float32), axis=1)
            if GLU:  # rows n0… of both halves, stacked: [2·BLOCK_N, BLOCK_K]
                b = b_desc.load([0, n0, k0]).reshape(2 * BLOCK_N, BLOCK_K).T
            elif B_KN:
                b = b_desc.load([k0, n0])
            else:
                b = b_desc.load([n0, k0]).T
            if ALLOW_TF32:
                acc = tl.dot(a, b, acc, input_precision="tf32")
            else:
                acc = tl.dot(a, b, acc)

        rm = m0 + tl.arange(0, BLOCK_M)
        rn = n0 + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        c_mask = m_ok[:, None] & n_ok[None, :]
        if ROWSUM_A:
            if n0 == 0:
                tl.store(RowSum + rm, row_sum, mask=m_ok)
        if GLU:  # the halves are column blocks a thread holds in its registers alike: no data moves
            acc, acc_gate = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GLU:
                acc_gate += tl.load(Bias + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc, act_grad = activation_and_grad(acc, ACTIVATION, STORE_ACT_GRAD)
        g_ptrs = ActGrad + rm[:, None] * stride_gm + rn[None, :]
        if GLU:
            if STORE_ACT_GRAD:
                if ACTIVATION == 0:
                    act_grad = acc_gate
                else:
                    act_grad = act_grad * acc_gate
                tl.store(g_ptrs + N, acc.to(ActGrad.dtype.element_ty), mask=c_mask)
            acc = acc * acc_gate
        if STORE_ACT_GRAD:
            tl.store(g_ptrs, act_grad.to(ActGrad.dtype.element_ty), mask=c_mask)
        if HAS_RESIDUAL:
            acc += tl.load(Residual + rm[:, None] * stride_rm + rn[None, :], mask=c_mask, other=0.0).to(tl.float32)
        c_desc.store([m0, n0], acc.to(c_desc.dtype))


def _set_block_shapes(args):
    """The descriptors' boxes follow the config the autotuner runs (a pre-hook of every config)."""
    block_m, block_n, block_k = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
    args["a_desc"].block_shape = [block_k, block_m] if args["A_KM"] else [block_m, block_k]
    if args["GLU"]:
        args["b_desc"].block_shape = [2, block_n, block_k]
    else:
        args["b_desc"].block_shape = [block_k, block_n] if args["B_KN"] else [block_n, block_k]
    args["c_desc"].block_shape = [block_m, block_n]
    for name in ("g_desc", "da_desc"):
        if args[name] is not args["a_desc"]:
            args[name].block_shape = [block_m, block_k]


def _config(block_m, block_n, block_k, stages, warps):
    return triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8),
                         num_stages=stages, num_warps=warps, pre_hook=_set_block_shapes)


# Two warpgroups on a 128-row tile (wgmma's 64 rows each); 128x256 keeps 256 fp32 accumulators a
# thread only without the prologues' registers. GeGLU's tiles are 64 outputs wide: an accumulator of
# 128 columns, both halves (BLOCK_N is the output tile's width).
GEGLU_TILE_N = 64
CONFIGS_16BIT = [
    _config(128, 128, 64, 4, 8),
    _config(128, 256, 64, 3, 8),
    _config(64, 128, 64, 4, 4),
    _config(128, GEGLU_TILE_N, 64, 4, 8),
    _config(64, GEGLU_TILE_N, 64, 4, 4),
]
CONFIGS_TF32 = [_config(128, 128, 32, 4, 8), _config(64, 128, 32, 4, 4)]
INTERPRETER_CONFIGS = [_config(32, 32, 32, 1, 4)]


def _configs_for_variant(configs, named_args, **kwargs):
    """GeGLU's tiles for GeGLU, the others for the rest; the 128x256 tile only where its registers
    leave room (no prologue, no act' stored)."""
    flags = {**named_args, **kwargs}
    wide_ok = not (flags["SCALE_A"] or flags["ROWSUM_A"] or flags["STORE_ACT_GRAD"])
    if flags["GLU"]:
        return [config for config in configs if config.kwargs["BLOCK_N"] == GEGLU_TILE_N]
    return [config for config in configs
            if GEGLU_TILE_N < config.kwargs["BLOCK_N"] and (wide_ok or config.kwargs["BLOCK_N"] < 256)]


def _autotuned(configs):
    return triton.autotune(
        configs=INTERPRETER_CONFIGS if backend.INTERPRET else configs,
        key=["M_BUCKET", "N", "K_BUCKET", "A_KM", "B_KN", "HAS_BIAS", "ACTIVATION", "HAS_RESIDUAL",
             "STORE_ACT_GRAD", "SCALE_A", "STORE_A", "ROWSUM_A", "GLU", "ALLOW_TF32"],
        prune_configs_by=dict(early_config_prune=_configs_for_variant),
    )(_linear_hopper_kernel)


_KERNELS = {
    torch.float16: _autotuned(CONFIGS_16BIT),
    torch.bfloat16: _autotuned(CONFIGS_16BIT),
    torch.float32: _autotuned(CONFIGS_TF32),
}

_hopper_devices = {}  # CUDA device index → compute capability 9.x
# Persistent programs under the interpreter (which runs on the CPU): a few, so that each walks tiles
INTERPRETER_PROGRAMS = 3


def _is_hopper(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _hopper_devices.get(index)
    if found is None:
        found = _hopper_devices[index] = torch.cuda.get_device_capability(index)[0] == 9
    return found


def runs_on(tensor):
    """Whether the Hopper kernel can run on `tensor`'s device: a compute capability 9.x GPU, the
    kernels compiled by a Triton with host-side tensor descriptors (the tests run it in the
    interpreter by declaring the CPU one)."""
    return tensor.is_cuda and TensorDescriptor is not None and not backend.INTERPRET and _is_hopper(tensor.device)


def _descriptor_ok(t):
    """TMA takes a 2-D tensor with a unit last stride, a 16-byte aligned base and row stride."""
    size = t.element_size()
    return t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0 and t.shape[1] * size >= 16


def _as_stored(t):
    """(`t` as stored, row-major, whether that is its transpose) for a 2-D view with a unit stride."""
    return (t, False) if t.stride(1) == 1 else (t.t(), True)


def eligible(a, b, out, *, scale_a=None, store_a=None, act_grad=None, glu=False, **_epilogue):
    """Whether the Hopper kernel takes this product: 16-bit operands (fp32 only for TF32 in the
    forward's layout, both operands along K: wgmma reads TF32 K-major), every operand a descriptor
    can address."""
    a_stored, a_km = _as_stored(a)
    b_stored, b_nk = _as_stored(b)  # b is [K, N]: stored transposed means [N, K], along K
    if a.dtype == torch.float32 and (glu or a_km or not b_nk or not backend.allows_tf32()):
        return False
    if scale_a is not None and (a_km or not _descriptor_ok(scale_a)) or glu and not b_nk:
        return False
    return all(_descriptor_ok(t) for t in (a_stored, b_stored, out) + ((store_a,) if store_a is not None else ()))


def hopper_matmul(a, b, out, *, bias=None, activation=0, residual=None, act_grad=None, scale_a=None,
                  store_a=None, row_sum=None, glu=False):
    """`_kernel_matmul`'s product by the Hopper kernel (see `eligible`)."""
    m, k = a.shape
    n = out.shape[1]  # with glu, b holds 2n columns
    a_stored, a_km = _as_stored(a)
    b_stored, b_transposed = _as_stored(b)
    placeholder = [16, 16]  # every box is set per config by _set_block_shapes
    a_desc = TensorDescriptor.from_tensor(a_stored, placeholder)
    if glu:  # W [2n, K] as [2, n, K]
        b_desc = TensorDescriptor(b_stored, [2, n, k], [n * b_stored.stride(0), b_stored.stride(0), 1], [2, 16, 16])
    else:
        b_desc = TensorDescriptor.from_tensor(b_stored, placeholder)
    c_desc = TensorDescriptor.from_tensor(out, placeholder)
    g_desc = a_desc if scale_a is None else TensorDescriptor.from_tensor(scale_a, placeholder)
    da_desc = a_desc if store_a is None else TensorDescriptor.from_tensor(store_a, placeholder)
    unused = out
    programs = INTERPRETER_PROGRAMS if backend.INTERPRET else torch.cuda.get_device_properties(
        out.device).multi_processor_count
    grid = lambda meta: (min(programs, cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])),)
    _KERNELS[a.dtype][grid](
        a_desc, b_desc, c_desc, g_desc, da_desc,
        unused if bias is None else bias,
        unused if residual is None else residual,
        unused if act_grad is None else act_grad,
        unused if row_sum is None else row_sum,
        m, n, k, bucket(m), bucket(k), programs,
        0 if residual is None else residual.stride(0), 0 if act_grad is None else act_grad.stride(0),
        A_KM=a_km, B_KN=not b_transposed,
        HAS_BIAS=bias is not None, ACTIVATION=activation, HAS_RESIDUAL=residual is not None,
        STORE_ACT_GRAD=act_grad is not None, SCALE_A=scale_a is not None, STORE_A=store_a is not None,
        ROWSUM_A=row_sum is not None, GLU=glu, ALLOW_TF32=a.dtype == torch.float32 and backend.allows_tf32(),
    )



# What the ops launch, as kernels/linear_kernel.py's cases: the forward (x [M, K], W [N, K]), dx
# (dy [M, N], W [N, K] read as [K, N]) and dW (dh [M, N] read as [K, M]ᵀ, x [M, K] read as [K, N]).
_VARIANTS = {
    "fwd": dict(HAS_BIAS=True),
    "fwd+gelu+grad": dict(HAS_BIAS=True, ACTIVATION=1, STORE_ACT_GRAD=True),
    "fwd+residual": dict(HAS_BIAS=True, HAS_RESIDUAL=True),
    "fwd+geglu+grad": dict(GLU=True, ACTIVATION=1, STORE_ACT_GRAD=True),
    "dx": dict(B_KN=True),
    "dx+act_grad": dict(B_KN=True, SCALE_A=True, STORE_A=True),
    "dw+dbias": dict(A_KM=True, B_KN=True, ROWSUM_A=True),
}
_INT_ARGS = ("M", "N", "K", "M_BUCKET", "K_BUCKET", "NUM_SMS", "stride_rm", "stride_gm")


def compile_cases():
    """Every config × launched variant × dtype, for sm_90a only (tensor descriptors are Hopper's)."""
    flags = dict(A_KM=False, B_KN=False, HAS_BIAS=False, ACTIVATION=0, HAS_RESIDUAL=False, STORE_ACT_GRAD=False,
                 SCALE_A=False, STORE_A=False, ROWSUM_A=False, GLU=False, ALLOW_TF32=False)
    for dtype, configs in (("fp16", CONFIGS_16BIT), ("bf16", CONFIGS_16BIT), ("fp32", CONFIGS_TF32)):
        for config in configs:
            block_m, block_n, block_k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            for variant, overrides in _VARIANTS.items():
                constexprs = {**flags, **overrides, **config.kwargs, "ALLOW_TF32": dtype == "fp32"}
                if dtype == "fp32" and not variant.startswith("fwd") or dtype == "fp32" and constexprs["GLU"]:
                    continue  # TF32 only where both operands run along K (see eligible)
                if not _configs_for_variant([config], {}, **constexprs):
                    continue
                box = lambda rows, cols: f"tensordesc<{dtype}[{rows}, {cols}]>"
                a_box = box(block_k, block_m) if constexprs["A_KM"] else box(block_m, block_k)
                b_box = box(block_k, block_n) if constexprs["B_KN"] else box(block_n, block_k)
                if constexprs["GLU"]:
                    b_box = f"tensordesc<{dtype}[2, {block_n}, {block_k}]>"
                p = f"*{dtype}"
                signature = dict(a_desc=a_box, b_desc=b_box, c_desc=box(block_m, block_n), g_desc=box(block_m, block_k),
                                 da_desc=box(block_m, block_k), Bias=p, Residual=p, ActGrad=p, RowSum="*fp32",
                                 **{name: "i32" for name in _INT_ARGS})
                tile = f"{block_m}x{block_n}x{block_k}"
                # feature sizes and row strides are multiples of 16; the tokens, K and the SM count are never
                # specialised on
                yield dict(
                    name=f"linear hopper {variant} {tile} w{config.num_warps}s{config.num_stages} {dtype}",
                    fn=_linear_hopper_kernel, signature=signature, constexprs=constexprs,
                    divisible_by_16=["N", "stride_rm", "stride_gm"],
                    num_warps=config.num_warps, num_stages=config.num_stages, matmul=True, archs=("sm_90a",),
                    tma=True,
                )
