"""Property-based tests (hypothesis) of every op: random shapes crossing the kernels' block edges
(the interpreter's 32-wide linear tiles, LayerNorm's row blocks, attention's 16- to 128-wide
blocks, pad/unpad's 16-row and 256-column blocks), strided and transposed inputs, masks with empty
and full rows, every dtype the interpreter computes right (bf16 on the ops without tl.dot), forward
and backward against float64, by FlashAttention's rule: the op's error is at most twice that of
plain PyTorch in the same dtype, plus a floor (in units of the result's magnitude) for where both
are ~0. pad/unpad copy values, so they must be exact.

Examples are few (the interpreter runs ~1.5 ms per program) and derandomized: CI sees the same
examples on every run; torch data comes from a seed hypothesis draws."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastencoder.kernels import attention, layer_norm, linear, pad, unpad
from fastencoder.kernels.linear import linear_reference

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = st.sampled_from([torch.float32, torch.float16])
# the fixtures (backend, launch counter) hold for every example of a test
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _randn(generator, *shape):
    """Reproducible normal values on the CPU (the generator's device), for the test to move."""
    return torch.randn(*shape, generator=generator, device="cpu")


def _check_rule(what, ours, plain, exact):
    """ours and plain: the op's and PyTorch's results in the same dtype; exact: float64."""
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    our_error = (ours.double() - exact).abs().max().item() if exact.numel() else 0.0
    plain_error = (plain.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert our_error <= 2 * plain_error + FLOOR[ours.dtype] * scale, (what, our_error, plain_error)


def _layout(tensor, kind):
    """The same values as `tensor` (2-D or more), stored contiguously, transposed (unit stride on
    the first dim) or as every other row of a larger tensor."""
    if kind == "transposed":
        return tensor.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "sliced":
        wide = tensor.new_empty((tensor.shape[0] * 2, *tensor.shape[1:]))
        wide[::2] = tensor
        return wide[::2]
    return tensor


def _run(function, inputs, grad_out_seed):
    """function(*inputs) and the gradients of its inputs for a random output gradient."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = function(*leaves)
    grad_out = _randn(torch.Generator().manual_seed(grad_out_seed), *out.shape).to(out.device, out.dtype)
    out.backward(grad_out)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _compare(function_ours, function_plain, inputs, names, seed):
    """The op vs plain PyTorch, both in the inputs' dtype, vs PyTorch in float64."""
    ours = _run(function_ours, inputs, seed)
    plain = _run(function_plain, inputs, seed)
    exact = _run(function_plain, [None if t is None else t.double() for t in inputs], seed)
    _check_rule("output", ours[0], plain[0], exact[0])
    for name, mine, theirs, truth in zip(names, ours[1], plain[1], exact[1]):
        if truth is not None:
            _check_rule(f"grad of {name}", mine, theirs, truth)


@settings(max_examples=12, **SETTINGS)
@given(m=st.integers(1, 70), k=st.integers(1, 70), n=st.integers(1, 70), dtype=DTYPES,
       activation=st.sampled_from([None, "gelu", "gelu_tanh", "relu"]), with_bias=st.booleans(),
       with_residual=st.booleans(), layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       seed=st.integers(0, 2**31))
def test_linear(device, triton_backend, kernel_launches, m, k, n, dtype, activation, with_bias, with_residual,
                layout, seed):
    generator = torch.Generator().manual_seed(seed)
    x = _layout(_randn(generator, m, k).to(device, dtype), layout)
    weight = _layout((_randn(generator, n, k) / math.sqrt(k)).to(device, dtype), layout)
    bias = _randn(generator, n).to(device, dtype) if with_bias else None
    residual = _randn(generator, m, n).to(device, dtype) if with_residual else None
    _compare(lambda *a: linear(*a[:3], activation, a[3]), lambda *a: linear_reference(*a[:3], activation, a[3]),
             [x, weight, bias, residual], ("x", "weight", "bias", "residual"), seed)
    assert "_linear_kernel" in kernel_launches


@settings(max_examples=12, **SETTINGS)
@given(rows=st.integers(1, 40), n=st.integers(1, 300), dtype=st.sampled_from([torch.float32, torch.float16,
                                                                               torch.bfloat16]),
       with_residual=st.booleans(), eps=st.sampled_from([1e-12, 1e-5]),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), seed=st.integers(0, 2**31))
def test_layer_norm(device, triton_backend, kernel_launches, rows, n, dtype, with_residual, eps, layout, seed):
    generator = torch.Generator().manual_seed(seed)
    x = _layout((3 * _randn(generator, rows, n) + 1).to(device, dtype), layout)
    residual = _randn(generator, rows, n).to(device, dtype) if with_residual else None
    weight = (1 + 0.5 * _randn(generator, n)).to(device, dtype)
    bias = _randn(generator, n).to(device, dtype)

    def plain(x, weight, bias, residual):  # as Hugging Face computes it, in the dtype
        z = x if residual is None else x + residual
        return torch.nn.functional.layer_norm(z, (n,), weight, bias, eps)

    _compare(lambda x, w, b, r: layer_norm(x, w, b, eps, residual=r), plain, [x, weight, bias, residual],
             ("x", "weight", "bias", "residual"), seed)
    assert "_layer_norm_fwd_kernel" in kernel_launches


def _plain_attention(q, k, v, key_padding_mask):
    """Attention as plain PyTorch in the inputs' dtype; rows with no visible key give zeros."""
    scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    no_keys = (scores == float("-inf")).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(no_keys, 0.0), dim=-1).masked_fill(no_keys, 0.0)
    return (probs @ v.transpose(1, 2)).transpose(1, 2)


@settings(max_examples=10, **SETTINGS)
@given(data=st.data(), batch=st.integers(1, 3), heads=st.integers(1, 2), seqlen=st.integers(1, 80),
       head_dim=st.sampled_from([16, 32]), dtype=DTYPES, masking=st.sampled_from(["none", "padded", "packed"]),
       fused=st.booleans(), seed=st.integers(0, 2**31))
def test_attention(device, triton_backend, kernel_launches, data, batch, heads, seqlen, head_dim, dtype, masking,
                   fused, seed):
    """Padded with or without a key padding mask, or packed; sequences of every length from 0 (no
    visible key) to full; q, k, v as views of a fused projection or separate tensors."""
    generator = torch.Generator().manual_seed(seed)
    lengths = data.draw(st.lists(st.integers(0, seqlen), min_size=batch, max_size=batch))
    if masking == "packed":
        lengths[0] = seqlen  # max_seqlen is the longest sequence
    if fused:
        q, k, v = _randn(generator, batch, seqlen, 3, heads, head_dim).to(device, dtype).unbind(2)
    else:
        q, k, v = (_randn(generator, batch, seqlen, heads, head_dim).to(device, dtype) for _ in range(3))
    mask = torch.arange(seqlen, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    if masking == "none":
        mask = None

    def ours(q, k, v):
        if masking != "packed":
            return attention(q, k, v, key_padding_mask=mask)
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                                  device=device)
        rows = attention(q[mask], k[mask], v[mask], cu_seqlens=cu_seqlens, max_seqlen=seqlen)
        return torch.zeros_like(q).masked_scatter(mask[..., None, None], rows)

    def plain(q, k, v):
        out = _plain_attention(q, k, v, mask)
        return out if masking != "packed" else out * mask[..., None, None]  # the packed layout has no padding rows

    _compare(ours, plain, [q, k, v], ("q", "k", "v"), seed)
    assert "_attention_fwd_kernel" in kernel_launches or masking == "packed" and sum(lengths) == 0


@settings(max_examples=15, **SETTINGS)
@given(data=st.data(), batch=st.integers(1, 4), seqlen=st.integers(1, 40), width=st.integers(1, 300),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       index_dtype=st.sampled_from([torch.int32, torch.int64]), transposed=st.booleans(),
       seed=st.integers(0, 2**31))
def test_unpad_and_pad(device, triton_backend, kernel_launches, data, batch, seqlen, width, dtype, index_dtype,
                       transposed, seed):
    """Copies are exact: the real tokens gathered, zeros scattered to padding, each op's gradient the
    other op. Rows of every kind: empty, full and holed."""
    kinds = data.draw(st.lists(st.sampled_from(["empty", "full", "random"]), min_size=batch, max_size=batch))
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, seqlen, generator=generator, device="cpu") < 0.5
    for row, kind in enumerate(kinds):
        if kind != "random":
            mask[row] = kind == "full"
    mask = mask.to(device)
    indices = mask.flatten().nonzero()[:, 0].to(index_dtype)
    hidden = _randn(generator, batch, seqlen, width).to(device, dtype)
    if transposed:  # unit stride along the sequence, not the features
        hidden = hidden.transpose(1, 2).contiguous().transpose(1, 2)
    hidden.requires_grad_()
    rows = unpad(hidden, indices)
    assert torch.equal(rows, hidden.detach()[mask])
    padded = pad(rows, indices, batch, seqlen)
    assert torch.equal(padded, torch.where(mask[..., None], hidden.detach(), 0.0))
    grad = _randn(generator, *padded.shape).to(device, dtype)
    padded.backward(grad)
    assert torch.equal(hidden.grad, torch.where(mask[..., None], grad, 0.0))
    if indices.numel():
        assert {"_unpad_kernel", "_pad_kernel"} <= set(kernel_launches)
