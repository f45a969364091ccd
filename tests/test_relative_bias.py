"""The relative position bias (MPNet's) in the attention kernels and the PyTorch path: outputs and
the gradients of q, k, v and the bias table against the float64 reference, padded and packed, with
key padding masks and dropout. Tolerances: test_attention.py's (the table's gradient is a sum of
dS over at most B·S entries, each within the dS tolerance)."""
import pytest
import torch

from fastencoder.kernels.attention import attention, attention_reference
from fastencoder.kernels.attention.dropout import _draw_dropout_seed, _dropout_keep_mask
from fastencoder.kernels.attention.reference import relative_bias_matrix
from test_attention import BWD, FWD, TOLERANCES, _check_close, _cu_seqlens, _lengths_mask


def _table(heads, max_seqlen, scale, device):
    return (torch.randn(heads, 2 * max_seqlen - 1, device=device) * scale).requires_grad_()


def _check(qkv, table, out, grad_out, dtype, **kwargs):
    reference_qkv = qkv.detach().double().requires_grad_()
    reference_table = table.detach().double().requires_grad_()
    expected = attention_reference(*reference_qkv.unbind(-3), relative_bias=reference_table, **kwargs)
    expected.backward(grad_out.double())
    tolerance = TOLERANCES[dtype]
    _check_close("out", out, expected, tolerance["out"])
    for index, name in enumerate(("dq", "dk", "dv")):
        _check_close(name, qkv.grad.select(-3, index), reference_qkv.grad.select(-3, index), tolerance["grad"])
    _check_close("d relative_bias", table.grad, reference_table.grad, tolerance["grad"])


@pytest.mark.parametrize("dtype, seqlen, head_dim, lengths, left_padding, table_scale, scale", [
    pytest.param(torch.float32, 40, 32, [40, 17], True, 1.0, None, id="fp32-S40-left-padding"),
    pytest.param(torch.float32, 19, 16, None, False, 4.0, -0.3, id="fp32-S19-no-mask-big-bias-negative-scale"),
    pytest.param(torch.float16, 33, 64, [33, 9], False, 1.0, None, id="fp16-S33-right-padding"),
])
def test_padded_matches_float64(device, triton_backend, kernel_launches, poisoned_allocations, dtype, seqlen,
                                head_dim, lengths, left_padding, table_scale, scale):
    torch.manual_seed(seqlen)
    batch, heads = 2, 2
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, device=device).to(dtype).requires_grad_()
    table = _table(heads, seqlen, table_scale, device)
    kwargs = dict(scale=scale)
    if lengths is not None:
        kwargs["key_padding_mask"] = _lengths_mask(lengths, seqlen, left_padding, device)
    out = attention(*qkv.unbind(2), relative_bias=table, **kwargs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert kernel_launches.count(FWD) == 1 and all(name in kernel_launches for name in BWD)
    _check(qkv, table, out, grad_out, dtype, **kwargs)


def test_packed_matches_float64(device, triton_backend, kernel_launches, poisoned_allocations):
    torch.manual_seed(1)
    # full key blocks with and without a tail block after them, a tail alone; max_seqlen above the longest
    lengths, heads, head_dim, max_seqlen = [37, 5, 20, 32], 2, 32, 40
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, device=device, requires_grad=True)
    table = _table(heads, max_seqlen, 1.0, device)
    kwargs = dict(cu_seqlens=_cu_seqlens(lengths, device), max_seqlen=max_seqlen)
    out = attention(*qkv.unbind(1), relative_bias=table, **kwargs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert kernel_launches.count(FWD) == 1 and all(name in kernel_launches for name in BWD)
    _check(qkv, table, out, grad_out, torch.float32, **kwargs)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_infinite_relative_bias_gives_no_nan(device, triton_backend, kernel_launches, poisoned_allocations, layout):
    """Infinities are outside the op's contract (finite values), yet give no NaN: the kernels take
    every row's max as finite. Head 0 sees -inf at every distance, head 1 at some, head 2 +inf at one."""
    torch.manual_seed(2)
    seqlen, heads, head_dim = 24, 3, 16
    table = torch.randn(heads, 2 * seqlen - 1, device=device)
    table[0] = float("-inf")
    table[1, ::3] = float("-inf")
    table[2, seqlen + 2] = float("inf")
    if layout == "padded":
        q, k, v = torch.randn(3, 2, seqlen, heads, head_dim, device=device).unbind()
        kwargs = {}
    else:
        q, k, v = torch.randn(3, 30, heads, head_dim, device=device).unbind()
        kwargs = dict(cu_seqlens=_cu_seqlens([seqlen, 6], device), max_seqlen=seqlen)
    out = attention(q, k, v, relative_bias=table, **kwargs)
    assert kernel_launches.count(FWD) == 1
    assert torch.isfinite(out).all()


def test_dropout_gradients_match_reference_with_same_mask(device, triton_backend, poisoned_allocations):
    p, lengths, heads, head_dim = 0.25, [33, 12], 2, 32
    seqlen = max(lengths)
    torch.manual_seed(5)
    qkv = torch.randn(len(lengths), seqlen, 3, heads, head_dim, device=device, requires_grad=True)
    table = _table(heads, seqlen, 1.0, device)
    mask = _lengths_mask(lengths, seqlen, False, device)
    torch.manual_seed(99)
    out = attention(*qkv.unbind(2), relative_bias=table, key_padding_mask=mask, dropout_p=p)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.manual_seed(99)
    keep = _dropout_keep_mask(_draw_dropout_seed(), len(lengths), heads, seqlen, p, device)
    _check(qkv, table, out, grad_out, torch.float32, key_padding_mask=mask, dropout_p=p, dropout_mask=keep)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_torch_path_matches_float64(device, torch_backend, layout):
    torch.manual_seed(2)
    lengths, heads, head_dim = [30, 7, 18, 30], 3, 16
    seqlen = max(lengths)
    table = _table(heads, seqlen, 1.0, device)
    if layout == "padded":
        qkv = torch.randn(len(lengths), seqlen, 3, heads, head_dim, device=device, requires_grad=True)
        kwargs = dict(key_padding_mask=_lengths_mask(lengths, seqlen, False, device))
    else:
        qkv = torch.randn(sum(lengths), 3, heads, head_dim, device=device, requires_grad=True)
        kwargs = dict(cu_seqlens=_cu_seqlens(lengths, device), max_seqlen=seqlen)
    out = attention(*qkv.unbind(-3), relative_bias=table, **kwargs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    _check(qkv, table, out, grad_out, torch.float32, **kwargs)


def test_matrix_indexes_by_key_minus_query():
    table = torch.arange(7.0)[None]  # S = 4: distances -3..3 at 0..6
    matrix = relative_bias_matrix(table, 3)[0, 0]
    assert matrix.tolist() == [[3.0, 4.0, 5.0], [2.0, 3.0, 4.0], [1.0, 2.0, 3.0]]
    seqlen, heads = 6, 3  # every length up to S, every head, and the table's gradient (summed per distance)
    table = torch.randn(heads, 2 * seqlen - 1, dtype=torch.float64, requires_grad=True)
    for length in range(1, seqlen + 1):
        matrix = relative_bias_matrix(table, length)
        expected = torch.stack([torch.stack([table[:, j - i + seqlen - 1] for j in range(length)], -1)
                                for i in range(length)], -2)[None]
        assert matrix.shape == (1, heads, length, length) and torch.equal(matrix, expected)
        weights = torch.randn_like(matrix)
        grad, = torch.autograd.grad((matrix * weights).sum(), table)
        expected_grad, = torch.autograd.grad((expected * weights).sum(), table)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["shape", "with bias", "dtype"])
def test_bad_relative_bias_is_refused(device, triton_backend, kernel_launches, case):
    q = torch.randn(2, 8, 2, 16, device=device)
    table = torch.randn(2, 15, device=device)
    kwargs = dict(relative_bias=table)
    if case == "shape":
        kwargs["relative_bias"] = table[:, :14]
    elif case == "with bias":
        kwargs["bias"] = torch.zeros(8, 8, device=device)
    else:
        kwargs["relative_bias"] = table.long()
    with pytest.raises((ValueError, TypeError), match="relative_bias"):
        attention(q, q, q, **kwargs)
    assert not kernel_launches
