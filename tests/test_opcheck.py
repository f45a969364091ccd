"""torch.library.opcheck on every custom op: schema (no mutation, no aliasing), autograd
registration, fake (meta) implementations giving the real outputs' shapes, dtypes and strides, and
AOT tracing with dynamic shapes giving the eager results. Each op in each dtype (bf16 only where the
interpreter runs no bf16 tl.dot, or on a GPU), contiguous and transposed / permuted inputs, with
and without the optional tensors."""
import importlib

import pytest
import torch

# the modules, not the functions fastencoder.kernels exports under the same names
attention, layer_norm, linear, padding = (importlib.import_module(f"fastencoder.kernels.{name}")
                                          for name in ("attention.op", "layer_norm", "linear", "padding"))

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")]
BF16 = pytest.param(torch.bfloat16, id="bf16")
# bf16 tl.dot is wrong in the interpreter: the ops that multiply matrices take bf16 on a GPU only
BF16_WITH_DOT = pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu)
LAYOUTS = ["contiguous", "transposed"]


def _grad(tensor, requires_grad):
    return tensor.requires_grad_(requires_grad)


def _matrix(rows, cols, dtype, device, layout):
    """[rows, cols] with unit column stride, or a transposed view (unit row stride)."""
    if layout == "contiguous":
        return torch.randn(rows, cols, device=device).to(dtype)
    return torch.randn(cols, rows, device=device).to(dtype).t()


@pytest.mark.parametrize("dtype", DTYPES + [BF16_WITH_DOT])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_optional", [False, True], ids=["bare", "bias+residual"])
def test_linear(device, triton_backend, dtype, layout, with_optional):
    x = _matrix(37, 40, dtype, device, layout)
    x3 = x[:36].reshape(2, 18, 40) if layout == "contiguous" else x[:36].t().reshape(40, 2, 18).permute(1, 2, 0)
    weight = _matrix(24, 40, dtype, device, layout)
    bias = torch.randn(24, device=device).to(dtype) if with_optional else None
    residual = _matrix(37, 24, dtype, device, layout) if with_optional else None
    torch.library.opcheck(linear._linear_fwd, (_grad(x.clone(), True), _grad(weight.clone(), True),
                                               None if bias is None else _grad(bias.clone(), True), 1,
                                               residual, True))
    residual3 = None if residual is None else residual[:36].reshape(2, 18, 24)
    torch.library.opcheck(linear._linear_fwd, (x3, weight, bias, 2, residual3, False))
    _, act_grad = linear._linear_fwd(x, weight, bias, 1, residual, True)
    dy = _matrix(37, 24, dtype, device, layout)
    torch.library.opcheck(linear._linear_bwd, (dy, x, weight, act_grad, True, True, bias is not None))
    torch.library.opcheck(linear._linear_bwd, (dy[:36].reshape(2, 18, 24), x3, weight, None, True, False, False))


@pytest.mark.parametrize("dtype", DTYPES + [BF16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["bare", "residual"])
def test_layer_norm(device, triton_backend, dtype, layout, with_residual):
    def tokens():  # [2, 9, 48]: contiguous, or a permuted view of [48, 2, 9]
        if layout == "contiguous":
            return torch.randn(2, 9, 48, device=device).to(dtype)
        return torch.randn(48, 2, 9, device=device).to(dtype).permute(1, 2, 0)

    x, residual = tokens(), tokens() if with_residual else None
    weight, bias = torch.randn(48, device=device).to(dtype), torch.randn(48, device=device).to(dtype)
    torch.library.opcheck(layer_norm._layer_norm_fwd, (_grad(x.clone(), True), _grad(weight.clone(), True),
                                          _grad(bias.clone(), True), 1e-5,
                                          None if residual is None else _grad(residual.clone(), True)))
    _, mean, rstd = layer_norm._layer_norm_fwd(x, weight, bias, 1e-5, residual)
    torch.library.opcheck(layer_norm._layer_norm_bwd, (tokens(), x, residual, weight, mean, rstd))


def _attention_inputs(dtype, device, layout, batch=2, seqlen=19, heads=2, head_dim=16):
    """q, k, v [B, S, H, D]: views of one fused [B, S, 3, H, D] projection, or [B, H, S, D] tensors
    permuted to [B, S, H, D] (strides (H·S·D, D, S·D, 1))."""
    if layout == "contiguous":
        return torch.randn(batch, seqlen, 3, heads, head_dim, device=device).to(dtype).unbind(2)
    return tuple(torch.randn(batch, heads, seqlen, head_dim, device=device).to(dtype).transpose(1, 2)
                 for _ in range(3))


def _detached(arguments):
    """The backward op's arguments without autograd history (it registers none; the relative
    bias's table requires grad in the forward's calls, and so does their output)."""
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in arguments)


@pytest.mark.parametrize("dtype", DTYPES + [BF16_WITH_DOT])
@pytest.mark.parametrize("layout", LAYOUTS)
def _rotary_tables(positions, head_dim, device):
    """cos, sin float32 [positions, D] of rotary embeddings (the op takes any such tables)."""
    angles = torch.arange(positions, device=device)[:, None] * torch.rand(head_dim, device=device)[None, :]
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", DTYPES + [BF16_WITH_DOT])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("optional", ["bare", "mask+bias+dropout", "mask+relative+dropout", "mask+window+rotary"])
def test_attention_padded(device, triton_backend, dtype, layout, optional):
    q, k, v = _attention_inputs(dtype, device, layout)
    mask = bias = relative = seed = window = cos = sin = None
    dropout_p = 0.0
    if "mask" in optional:
        mask = torch.arange(19, device=device)[None, :] < torch.tensor([[19], [6]], device=device)
    if "dropout" in optional:
        seed, dropout_p = attention._draw_dropout_seed(), 0.2
    if "rotary" in optional:
        window, (cos, sin) = 4, _rotary_tables(21, 16, device)
    if optional == "mask+bias+dropout":
        bias = torch.randn(2, 1, 19, 19, device=device).to(dtype)
    elif optional == "mask+relative+dropout":
        relative = _grad(torch.randn(2, 37, device=device), True)
    arguments = (mask, bias, relative, None, seed, 19, 0.3, dropout_p, False, window, cos, sin)
    torch.library.opcheck(attention._attention_fwd, tuple(_grad(t.detach().clone(), True) for t in (q, k, v)) + arguments)
    out, stats = attention._attention_fwd(q, k, v, *arguments)
    do = _attention_inputs(dtype, device, layout)[0]
    torch.library.opcheck(attention._attention_bwd, _detached((do, q, k, v, out, stats) + arguments))


@pytest.mark.parametrize("dtype", DTYPES + [BF16_WITH_DOT])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("optional", ["bare", "bias+dropout", "relative+dropout", "window+rotary"])
def test_attention_packed(device, triton_backend, dtype, layout, optional):
    lengths = [7, 0, 12]
    cu_seqlens = torch.tensor([0, 7, 7, 19], dtype=torch.int32, device=device)
    q, k, v = (t[0] for t in _attention_inputs(dtype, device, layout, batch=1))  # [T = 19, H, D]
    bias = relative = seed = window = cos = sin = None
    dropout_p = 0.0
    if "dropout" in optional:
        seed, dropout_p = attention._draw_dropout_seed(), 0.2
    if "rotary" in optional:
        window, (cos, sin) = 3, _rotary_tables(12, 16, device)
    if optional == "bias+dropout":
        bias = torch.randn(1, 2, max(lengths), max(lengths), device=device).to(dtype)
    elif optional == "relative+dropout":
        relative = _grad(torch.randn(2, 2 * max(lengths) - 1, device=device), True)
    arguments = (None, bias, relative, cu_seqlens, seed, max(lengths), 0.3, dropout_p, False, window, cos, sin)
    torch.library.opcheck(attention._attention_fwd, tuple(_grad(t.detach().clone(), True) for t in (q, k, v)) + arguments)
    out, stats = attention._attention_fwd(q, k, v, *arguments)
    do = _attention_inputs(dtype, device, layout, batch=1)[0][0]
    torch.library.opcheck(attention._attention_bwd, _detached((do, q, k, v, out, stats) + arguments))


@pytest.mark.parametrize("dtype", DTYPES + [BF16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_unpad_and_pad(device, triton_backend, dtype, layout, index_dtype):
    indices = torch.tensor([0, 3, 4, 5, 9, 17, 20], dtype=index_dtype, device=device)
    hidden = _matrix(21, 40, dtype, device, layout)  # [positions, features]
    torch.library.opcheck(padding._unpad, (_grad(hidden.clone(), True), indices))
    torch.library.opcheck(padding._unpad, (hidden, indices[:0]))
    rows = _matrix(7, 40, dtype, device, layout)
    torch.library.opcheck(padding._pad, (_grad(rows.clone(), True), indices, 21))
    torch.library.opcheck(padding._pad, (rows[:0], indices[:0], 21))
