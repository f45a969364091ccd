"""LayerNorm with a fused residual add: y = LN(x + residual) · weight + bias, over the last dim.

BERT's post-LN "add & norm"; without a bias (bias=None: ModernBERT's `norm_bias=False`) too.
Statistics are computed in fp32 whatever the input dtype, and eps is used exactly as given (BERT's
1e-12 included). Any hidden size: rows up to MAX_HIDDEN wide (every BERT-family model) run the
Triton kernels, wider ones the PyTorch reference.

x, residual and the affine parameters may differ in dtype (under autocast: a 16-bit branch output,
the fp32 residual stream, fp32 weights): each is converted to fp32 as it is loaded, the output
takes the promoted dtype of x and residual (that of x + residual), and each input's gradient comes
back in that input's dtype.
"""
import torch
try:
    import triton.language as tl
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from ._no_triton import tl

from . import backend
from ._checks import FLOAT_DTYPES, check_float, check_like, check_shape, rows_view
from ._dispatch import direct_when_eager
from ._launch import batch_generic, cdiv, launches_on_input_device, next_power_of_2

MAX_HIDDEN = 4096  # a row lives in registers; wider rows spill in the backward


# Forward, BLOCK_M rows per program, each row whole in registers:
#   z = x + r,  mean = Σz / N,  rstd = 1 / sqrt(Σ(z - mean)² / N + eps)
#   y = (z - mean) · rstd · w + b          (b = 0 without a bias; mean and rstd kept for the backward)
@batch_generic("M")  # the rows: tokens
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, Mean, Rstd,
    M, N, stride_x, stride_r, stride_y, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    z = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        z += tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(z, axis=1) / N
    centered = tl.where(mask, z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / N + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


# Backward. With ẑ = (z - mean) · rstd and g = dy · w:
#   dz = rstd · (g - ẑ · mean(g · ẑ) - mean(g)),   dx = dresidual = dz
#   dw = Σ_rows dy · ẑ,   db = Σ_rows dy
# Each program walks a strided set of rows and writes its partial dw, db (fp32) to its own slot of
# a [programs, N] buffer, summed afterwards: no atomics, deterministic. (Without a bias, db is
# dropped: one add per element, where a second kernel variant would double the compiled ones.)
@batch_generic("M")
def _layer_norm_bwd_kernel(
    X, R, W, DY, DZ, Mean, Rstd, DW_partial, DB_partial,
    M, N, stride_x, stride_r, stride_dy, stride_dz,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(pid, M, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        z = tl.load(X + row64 * stride_x + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            z += tl.load(R + row64 * stride_r + cols, mask=col_ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=col_ok, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        z_hat = tl.where(col_ok, (z - mean) * rstd, 0.0)
        # w is re-read per row (from L1) rather than held: wide rows run out of registers
        g = dy * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dz = rstd * (g - z_hat * (tl.sum(g * z_hat, axis=0) / N) - tl.sum(g, axis=0) / N)
        tl.store(DZ + row64 * stride_dz + cols, dz.to(DZ.dtype.element_ty), mask=col_ok)
        dw += dy * z_hat
        db += dy
    tl.store(DW_partial + pid * N + cols, dw, mask=col_ok)
    tl.store(DB_partial + pid * N + cols, db, mask=col_ok)


def _fwd_launch_params(n):
    block_n = next_power_of_2(n)
    block_m = max(1, 4096 // block_n)  # ~4K elements per program
    num_warps = 4 if block_n <= 2048 else (8 if block_n <= 8192 else 16)
    return block_m, block_n, num_warps


def _bwd_launch_params(n):
    block_n = next_power_of_2(n)
    return block_n, (4 if block_n <= 1024 else (8 if block_n <= 4096 else 16))


def _bwd_programs(device, rows):
    if device.type == "cuda":
        return min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 8)  # the interpreter runs programs one by one: few, long ones are cheapest


@launches_on_input_device
def _layer_norm_fwd_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = rows_view(x)
    r2 = rows_view(residual) if residual is not None else x2
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=_output_dtype(x, residual), device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block_m, block_n, num_warps = _fwd_launch_params(n)
    _layer_norm_fwd_kernel[(cdiv(m, block_m),)](
        x2, r2, weight, weight if bias is None else bias, y, mean, rstd,
        m, n, x2.stride(0), r2.stride(0), y.stride(0), eps,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y.view(x.shape), mean, rstd


_layer_norm_fwd = torch.library.custom_op("fastencoder::layer_norm_fwd", _layer_norm_fwd_impl, mutates_args=())


def _output_dtype(x, residual):
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, residual):
    rows = x.numel() // x.shape[-1]
    stats = x.new_empty(rows, dtype=torch.float32)
    # contiguous, whatever x's strides
    return x.new_empty(x.shape, dtype=_output_dtype(x, residual)), stats, stats.clone()


@launches_on_input_device
def _layer_norm_bwd_impl(
    dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = rows_view(x)
    r2 = rows_view(residual) if residual is not None else x2
    dy2 = rows_view(dy)
    m = x2.shape[0]
    dz = torch.empty((m, n), dtype=_output_dtype(x, residual), device=x.device)
    programs = max(1, _bwd_programs(x.device, m))
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    block_n, num_warps = _bwd_launch_params(n)
    _layer_norm_bwd_kernel[(programs,)](
        x2, r2, weight, dy2, dz, mean, rstd, dw_partial, db_partial,
        m, n, x2.stride(0), r2.stride(0), dy2.stride(0), dz.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dz.view(x.shape), dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)


_layer_norm_bwd = torch.library.custom_op("fastencoder::layer_norm_bwd", _layer_norm_bwd_impl, mutates_args=())


@_layer_norm_bwd.register_fake
def _(dy, x, residual, weight, mean, rstd):
    return (x.new_empty(x.shape, dtype=_output_dtype(x, residual)), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, residual = inputs
    _, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, residual, weight, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, residual, weight, mean, rstd = ctx.saved_tensors
    # dz is in the output's dtype: each input's gradient in that input's dtype, as autograd gives
    # for x + residual
    dz, dweight, dbias = _call_layer_norm_bwd(dy, x, residual, weight, mean, rstd)
    dresidual = dz.to(residual.dtype) if ctx.has_residual else None
    return dz.to(x.dtype), dweight, dbias if ctx.has_bias else None, None, dresidual


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
_call_layer_norm_fwd = direct_when_eager(_layer_norm_fwd, _layer_norm_fwd_impl, _backward, _setup_context)
_call_layer_norm_bwd = direct_when_eager(_layer_norm_bwd, _layer_norm_bwd_impl)


def layer_norm_reference(x, weight, bias, eps, residual=None):
    """PyTorch reference: x + residual and the statistics in fp32 (or wider, for float64 inputs),
    the result in the promoted dtype of x and residual."""
    compute = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    z = x.to(compute) if residual is None else x.to(compute) + residual.to(compute)
    bias = None if bias is None else bias.to(compute)
    y = torch.nn.functional.layer_norm(z, z.shape[-1:], weight.to(compute), bias, eps)
    return y.to(_output_dtype(x, residual))


def layer_norm_torch(x, weight, bias, eps, residual=None):
    """The fast PyTorch path of `layer_norm`: the residual add (in the promoted dtype, as Hugging
    Face adds), then `F.layer_norm` (its statistics are fp32 for 16-bit inputs too, on the CPU and on
    GPUs), affine parameters of another dtype in fp32 with it."""
    z = x if residual is None else x + residual
    if weight.dtype != z.dtype or bias is not None and bias.dtype != z.dtype:
        compute = torch.promote_types(z.dtype, torch.float32)
        bias = None if bias is None else bias.to(compute)
        return torch.nn.functional.layer_norm(z.to(compute), z.shape[-1:], weight.to(compute), bias, eps).to(z.dtype)
    return torch.nn.functional.layer_norm(z, z.shape[-1:], weight, bias, eps)


def layer_norm(x, weight, bias, eps, residual=None):
    """y = LayerNorm(x + residual) over the last dim, with affine weight and bias of shape [N] (bias
    None: no bias, as nn.LayerNorm(bias=False))."""
    if not _well_formed(x, weight, bias, eps, residual):
        _check_inputs(x, weight, bias, eps, residual)
    if not backend.use_triton(x.device) or x.shape[-1] > MAX_HIDDEN:
        return layer_norm_torch(x, weight, bias, eps, residual)
    if x.numel() == 0:
        return torch.empty_like(x, dtype=_output_dtype(x, residual))
    return _call_layer_norm_fwd(x, weight, bias, float(eps), residual)[0]


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _well_formed(x, weight, bias, eps, residual):
    """The common call (a model's: parameters, a float eps) found valid in a few attribute reads;
    the full checks, whose messages explain a refusal, run for the others."""
    return (type(x) is torch.Tensor and type(weight) in _PLAIN and type(eps) is float and eps >= 0
            and x.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES and weight.device == x.device
            and x.dim() >= 1 and x.shape[-1] > 0 and weight.shape == x.shape[-1:]
            and (bias is None or type(bias) in _PLAIN and bias.dtype == weight.dtype and bias.device == x.device
                 and bias.shape == weight.shape)
            and (residual is None or type(residual) is torch.Tensor and residual.dtype in FLOAT_DTYPES
                 and residual.device == x.device and residual.shape == x.shape))


def _check_inputs(x, weight, bias, eps, residual):
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    for name, tensor, shape in (("weight", weight, (n,)), ("residual", residual, x.shape)):
        if tensor is not None:  # any float dtype: see the module docstring
            check_float(name, tensor)
            if tensor.device != x.device:
                raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
            check_shape(name, tensor, shape)
    if bias is not None:
        check_like("bias", bias, weight, "weight")
        check_shape("bias", bias, (n,))
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def compile_cases():
    """Every compiled variant, for the static kernel report (kernels/report.py). The rows of
    contiguous hidden states are N apart: N and the row strides are multiples of 16 where N is
    (every BERT-family width), and launches specialise on that; M, the tokens, is never
    specialised on."""
    for n in (100, 384, 768, 1024, MAX_HIDDEN):
        block_m, block_n, fwd_warps = _fwd_launch_params(n)
        bwd_block_n, bwd_warps = _bwd_launch_params(n)
        # (x, residual, weight and bias, output): one dtype throughout, or autocast's 16-bit branch
        # output with the fp32 residual stream and weights
        variants = [(dtype, dtype, dtype, dtype) for dtype in ("fp16", "bf16", "fp32")]
        variants += [(dtype, "fp32", "fp32", "fp32") for dtype in ("fp16", "bf16")]
        for x, r, w, y in variants:
            for has_residual in (False, True) if x == r else (True,):
                variant = f"N={n} {x}" + (f" +{r} residual" if x != r else " +residual" if has_residual else "")
                # without a bias (ModernBERT's norms): in one dtype throughout, as such models run
                for has_bias in (True, False) if x == r else (True,):
                    yield dict(
                        name=f"layer_norm_fwd {variant}" + ("" if has_bias else " no bias"), fn=_layer_norm_fwd_kernel,
                        signature=dict(
                            X=f"*{x}", R=f"*{r}", W=f"*{w}", B=f"*{w}", Y=f"*{y}",
                            Mean="*fp32", Rstd="*fp32", M="i32", N="i32",
                            stride_x="i32", stride_r="i32", stride_y="i32", eps="fp32",
                        ),
                        constexprs=dict(HAS_RESIDUAL=has_residual, HAS_BIAS=has_bias, BLOCK_M=block_m,
                                        BLOCK_N=block_n),
                        divisible_by_16=("N", "stride_x", "stride_r", "stride_y") if n % 16 == 0 else (),
                        num_warps=fwd_warps, num_stages=1, matmul=False,
                    )
                yield dict(
                    name=f"layer_norm_bwd {variant}", fn=_layer_norm_bwd_kernel,
                    signature=dict(
                        X=f"*{x}", R=f"*{r}", W=f"*{w}", DY=f"*{y}", DZ=f"*{y}",
                        Mean="*fp32", Rstd="*fp32", DW_partial="*fp32", DB_partial="*fp32",
                        M="i32", N="i32", stride_x="i32", stride_r="i32", stride_dy="i32",
                        stride_dz="i32",
                    ),
                    constexprs=dict(HAS_RESIDUAL=has_residual, BLOCK_N=bwd_block_n),
                    divisible_by_16=("N", "stride_x", "stride_r", "stride_dy", "stride_dz") if n % 16 == 0 else (),
                    num_warps=bwd_warps, num_stages=1, matmul=False,
                )
