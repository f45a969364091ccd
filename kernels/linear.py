"""Linear layer with its epilogue fused: y = act(x · Wᵀ + b) + residual; and GeGLU's input
projection, both halves in one GEMM: y = act(x · W[:I]ᵀ + b[:I]) · (x · W[I:]ᵀ + b[I:]).

One Triton matmul (kernels/linear_kernel.py) serves the forward and both backward products:
  forward   y  = act(h) + r,  h = x · Wᵀ + b   (act'(h) is stored when a gradient will need it)
  backward  dh = dy · act'(h)                   (fused into the load of dy, written once for reuse)
            dx = dh · W,   dW = dhᵀ · x,   db = Σ_rows dh   (db reduced inside the dW product)
            dr = dy
act is erf GELU (BERT "gelu"), tanh GELU (ALBERT "gelu_new"), ReLU, or none.
Accumulation is fp32; fp32 inputs use TF32 only when torch's settings allow it for cuBLAS matmuls
(`backend.allows_tf32`).
"""
import torch

from . import backend, onednn
from ._checks import FLOAT_DTYPES, check_float, check_like, check_shape, rows_view
from ._dispatch import direct_when_eager
from ._launch import launches_on_input_device
from .activation import ACTIVATIONS
from .linear_kernel import compile_cases, matmul

__all__ = ["compile_cases", "geglu_linear", "linear"]  # compile_cases: for the static report


@launches_on_input_device
def _linear_fwd_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: int,
    residual: torch.Tensor | None, save_act_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = weight.shape[0]
    x2 = rows_view(x)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    act_grad = torch.empty_like(out) if save_act_grad else out.new_empty(0)
    matmul(
        "forward", x2, weight.t(), out, bias=bias, activation=activation,
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
        matmul("dx", dy2, weight, dx, scale_a=act_grad, store_a=None if dh is dy2 else dh)
        dx = dx.view(*dy.shape[:-1], k) if need_dx else empty()
    if needs_dh:
        dweight = torch.empty_like(weight)
        row_sum = torch.empty(n, dtype=torch.float32, device=dy.device) if need_dbias else None
        matmul("dW", dh.t(), rows_view(x), dweight, row_sum=row_sum)
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
    """The fast PyTorch path of `linear`: one GEMM with the bias added in it (cuBLAS, MKL),
    then the activation and the residual add in place on its output when autograd keeps no
    reference to it (inference), so no further buffer is allocated. On the CPU, large fp32
    inference GEMMs run in oneDNN with the activation and residual fused where that is faster
    (kernels/onednn.py)."""
    if onednn.takes(x, weight, bias, residual):
        return onednn.fastest(_linear_then_epilogue, x, weight, bias, activation, residual)
    return _linear_then_epilogue(x, weight, bias, activation, residual)


def _linear_then_epilogue(x, weight, bias, activation, residual):
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
@launches_on_input_device
def _geglu_fwd_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: int, save_factors: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = rows_view(x)
    out = torch.empty((x2.shape[0], weight.shape[0] // 2), dtype=x.dtype, device=x.device)
    factors = torch.empty((x2.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device) if save_factors \
        else out.new_empty(0)
    matmul("forward", x2, weight.t(), out, bias=bias, activation=activation,
            act_grad=factors if save_factors else None, glu=True)
    return out.view(*x.shape[:-1], out.shape[1]), factors


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
    dx, dweight, dbias = empty(), empty(), empty()
    if need_dx:
        dx = torch.empty((rows, weight.shape[1]), dtype=dy.dtype, device=dy.device)
        matmul("dx", dh, weight, dx)
        dx = dx.view(*dy.shape[:-1], weight.shape[1])
    if need_dweight or need_dbias:
        dweight = torch.empty_like(weight)
        row_sum = torch.empty(weight.shape[0], dtype=torch.float32, device=dy.device) if need_dbias else None
        matmul("dW", dh.t(), rows_view(x), dweight, row_sum=row_sum)
        dbias = row_sum.to(weight.dtype) if need_dbias else empty()
        dweight = dweight if need_dweight else empty()
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
    buffer allocated. Large fp32 CPU inference GEMMs run in oneDNN where faster, as in `linear_torch`."""
    if onednn.takes(x, weight, bias, None):
        u, gate = onednn.fastest(_linear_then_epilogue, x, weight, bias).chunk(2, -1)
    else:
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
