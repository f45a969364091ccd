"""The fast PyTorch path (backend "torch", and "auto" wherever the kernels do not run) against the
float64 references the kernels are tested against, with the kernels' own tolerances (stated in
tests/test_attention.py, test_linear.py and test_layer_norm.py): the same checks on both paths.
These run on the CPU without the interpreter, so shapes can be those of real models."""
import importlib
import math
import time

import pytest
import torch

from fastencoder.kernels import attention, layer_norm, linear, onednn, pad, unpad
from fastencoder.kernels.layer_norm import layer_norm_reference, layer_norm_torch
from fastencoder.kernels.linear import linear_reference, linear_torch
from fastencoder.kernels.padding import pad_reference, pad_torch, unpad_reference, unpad_torch

# the module, not the function fastencoder.kernels exports under the same name
attention_module = importlib.import_module("fastencoder.kernels.attention.reference")
linear_module = importlib.import_module("fastencoder.kernels.linear")

# as for the kernels (tests/test_attention.py): fp32 ~1e-6 measured, 1e-4 with margin; 16-bit from
# the rounding of P and of the outputs
ATTENTION_TOLERANCES = {
    torch.float32: dict(out=(1e-4, 1e-4), grad=(1e-4, 1e-4)),
    torch.float16: dict(out=(2e-3, 2e-3), grad=(1e-2, 1e-2)),
    torch.bfloat16: dict(out=(1.6e-2, 1.6e-2), grad=(6e-2, 6e-2)),
}


@pytest.fixture
def no_kernels(torch_backend, kernel_launches):
    """Backend "torch": the test also proves that no Triton kernel ran."""
    yield
    assert kernel_launches == []


def _check_close(name, actual, expected, tolerance):
    assert torch.isfinite(actual).all(), f"{name} has non-finite values"
    atol, rtol = tolerance
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _float64(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _attention_against_float64(qkv, dtype, bias=None, **kwargs):
    """attention() on q, k, v views of qkv (and a bias) against the float64 reference: output and
    the gradients of q, k, v (and of the bias when it requires grad)."""
    q, k, v = qkv.unbind(-3)
    out = attention(q, k, v, bias=bias, **kwargs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    reference_qkv = qkv.detach().double().requires_grad_()
    reference_bias = None if bias is None else bias.detach().double().requires_grad_(bias.requires_grad)
    expected = attention_module.attention_reference(
        *reference_qkv.unbind(-3), bias=reference_bias, **{n: _float64(v) for n, v in kwargs.items()})
    expected.backward(grad_out.double())
    tolerances = ATTENTION_TOLERANCES[dtype]
    _check_close("out", out, expected, tolerances["out"])
    for index, name in enumerate(("dq", "dk", "dv")):
        _check_close(name, qkv.grad.select(-3, index), reference_qkv.grad.select(-3, index), tolerances["grad"])
    if bias is not None and bias.requires_grad:
        _check_close("dbias", bias.grad, reference_bias.grad, tolerances["grad"])
    return out


def _lengths_mask(lengths, seqlen, left_padding=False):
    positions = torch.arange(seqlen)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    return positions >= seqlen - lengths if left_padding else positions < lengths


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("dtype, seqlen, head_dim, lengths, left_padding, bias_kind", [
    (torch.float32, 1, 32, None, False, None),
    (torch.float32, 17, 64, [17, 1], False, None),
    (torch.float32, 129, 32, [100, 0], True, "full"),
    (torch.float32, 77, 80, None, False, "broadcast"),
    (torch.float32, 40, 24, [40, 3], False, "full"),  # a head dim the kernels do not take
    (torch.float16, 129, 64, [129, 1], False, "full"),
    (torch.float16, 77, 80, [40, 77], True, None),
    (torch.bfloat16, 65, 32, [65, 0], False, "broadcast"),
])
def test_padded_attention_matches_float64(no_kernels, dtype, seqlen, head_dim, lengths, left_padding, bias_kind):
    batch, heads = 2, 3
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim).to(dtype).requires_grad_()
    kwargs = {}
    if lengths is not None:
        kwargs["key_padding_mask"] = _lengths_mask(lengths, seqlen, left_padding)
    if bias_kind == "full":  # per head, a query row seeing no key, one of finfo.min, a key never seen
        bias = torch.randn(batch, heads, seqlen, seqlen).to(dtype)
        bias[0, 1, seqlen // 2, :] = float("-inf")
        bias[0, 0, 0, :] = torch.finfo(dtype).min  # finite: a uniform average, as in Hugging Face
        bias[1, 1, :, 0] = float("-inf")
        kwargs["bias"] = bias
    elif bias_kind == "broadcast":  # a Hugging Face extended mask [B, 1, 1, S]
        bias = torch.zeros(batch, 1, 1, seqlen, dtype=dtype)
        bias[0, ..., seqlen // 3:] = torch.finfo(dtype).min
        kwargs["bias"] = bias
    out = _attention_against_float64(qkv, dtype, **kwargs)
    if lengths is not None and 0 in lengths:  # a sequence with no real key: zeros
        assert (out[lengths.index(0)] == 0).all()
    if bias_kind == "full":
        assert (out[0, seqlen // 2, 1] == 0).all()


@pytest.mark.parametrize("with_bias", [False, True])
def test_rows_without_keys_are_handled_alike_without_host_reads(no_kernels, with_bias):
    """On a GPU the mask for SDPA is built without reading anything back (the CPU looks first and
    skips what is not needed): both ways give the same zeros and the same values."""
    q, k, v = (torch.randn(3, 2, 5, 8) for _ in range(3))  # [B, H, S, D], as SDPA takes them
    key_padding_mask = _lengths_mask([5, 0, 3], 5)
    bias = None
    if with_bias:
        bias = torch.randn(3, 1, 5, 5)
        bias[0, 0, 2] = float("-inf")  # a query row of the first sequence sees no key
    outputs = []
    for device in ("cpu", "cuda"):  # only the device type decides
        mask, no_keys = attention_module._sdpa_mask(key_padding_mask, bias, torch.device(device))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        outputs.append(out if no_keys is None else out.masked_fill(no_keys, 0.0))
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    assert (outputs[1][1] == 0).all() and outputs[1][0].abs().sum() > 0
    if with_bias:
        assert (outputs[1][0, :, 2] == 0).all()


def test_a_bias_that_requires_grad_gets_its_gradient(no_kernels):
    qkv = torch.randn(2, 33, 3, 2, 32, requires_grad=True)
    bias = torch.randn(2, 2, 33, 33, requires_grad=True)
    _attention_against_float64(qkv, torch.float32, bias=bias, key_padding_mask=_lengths_mask([33, 20], 33))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_attention_matches_float64_and_padded(no_kernels, dtype):
    """Scattered into a padded batch and gathered back: an empty sequence and a per-sequence bias
    included."""
    lengths, heads, head_dim = [1, 0, 70, 17], 2, 32
    max_seqlen = max(lengths)
    padded_qkv = torch.randn(len(lengths), max_seqlen, 3, heads, head_dim).to(dtype)
    packed_qkv = torch.cat([padded_qkv[b, :n] for b, n in enumerate(lengths)]).requires_grad_()
    bias = torch.randn(len(lengths), 1, max_seqlen, max_seqlen).to(dtype)
    out = _attention_against_float64(packed_qkv, dtype, bias=bias, cu_seqlens=_cu_seqlens(lengths),
                                     max_seqlen=max_seqlen)
    padded_out = attention(*padded_qkv.unbind(2), key_padding_mask=_lengths_mask(lengths, max_seqlen), bias=bias)
    _check_close("packed vs padded", out, torch.cat([padded_out[b, :n] for b, n in enumerate(lengths)]).double(),
                 ATTENTION_TOLERANCES[dtype]["out"])


def test_packed_positions_follow_changes_to_cu_seqlens(no_kernels):
    """The packed layout remembers each cu_seqlens tensor's positions; writing to it in place
    (its version moves) must not leave a stale one."""
    cu_seqlens = _cu_seqlens([3, 5])
    flat, key_mask = attention_module._packed_positions(cu_seqlens, 8, 5)
    assert flat.tolist() == [0, 1, 2, 5, 6, 7, 8, 9]
    assert key_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert attention_module._packed_positions(cu_seqlens, 8, 5)[0] is flat  # remembered
    cu_seqlens[1] = 4
    flat, key_mask = attention_module._packed_positions(cu_seqlens, 8, 5)
    assert flat.tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert key_mask.sum(1).tolist() == [4, 4]


@pytest.mark.parametrize("lengths", [
    [128] + [60] * 11 + [59] * 4,  # one long row, the rest of about one length: two buckets
    [5, 0, 9, 1, 0, 33, 2, 64, 17, 64],  # empty sequences among several buckets
    [7, 7, 7],  # one bucket without padding: no mask, no gather
])
def test_packed_attention_in_length_buckets_matches_float64(no_kernels, lengths):
    """On the CPU the packed layout without a bias runs in length buckets: output and gradients
    against the float64 reference, whatever the lengths' order and the empty sequences."""
    qkv = torch.randn(sum(lengths), 3, 2, 32, requires_grad=True)
    cu_seqlens = _cu_seqlens(lengths)
    out = _attention_against_float64(qkv, torch.float32, cu_seqlens=cu_seqlens, max_seqlen=max(1, *lengths))
    assert out.shape == (sum(lengths), 2, 32)
    buckets = attention_module._length_buckets(cu_seqlens, sum(lengths))
    assert sorted(length for length in lengths if length) == sorted(
        length for (sequences, longest), mask in zip(buckets.shapes, buckets.key_masks)
        for length in ([longest] * sequences if mask is None else mask.sum(-1).flatten().tolist()))
    assert len(buckets.shapes) <= attention_module.MAX_LENGTH_BUCKETS


def test_length_buckets_cut_where_the_attention_saves_most(no_kernels):
    """Sorted by length, cut while a cut saves more than BUCKET_SPLIT_MIN_PAIRS query-key pairs, at
    most MAX_LENGTH_BUCKETS; equal lengths share a bucket without a mask; no tokens, no bucket;
    and the remembered plan follows changes to cu_seqlens."""
    cu_seqlens = _cu_seqlens([60] * 7 + [128] + [60] * 8)
    buckets = attention_module.remembered(cu_seqlens, attention_module._length_buckets, 128 + 15 * 60)
    assert buckets.shapes == [(1, 128), (15, 60)] and buckets.key_masks == [None, None]
    assert buckets.gather[:128].tolist() == list(range(420, 548))  # the long sequence first
    assert attention_module.remembered(cu_seqlens, attention_module._length_buckets, 128 + 15 * 60) is buckets
    small = attention_module._length_buckets(_cu_seqlens([20, 19, 18]), 57)  # a cut would save < 16384
    assert small.shapes == [(3, 20)] and small.key_masks[0][:, 0, 0].sum(-1).tolist() == [20, 19, 18]
    many = attention_module._length_buckets(_cu_seqlens(list(range(1, 513))), 512 * 513 // 2)
    assert len(many.shapes) == attention_module.MAX_LENGTH_BUCKETS
    assert attention_module._length_buckets(_cu_seqlens([0, 0]), 0).shapes == []
    empty = torch.randn(0, 2, 8)
    assert attention(empty, empty, empty, cu_seqlens=_cu_seqlens([0, 0]), max_seqlen=1).shape == (0, 2, 8)
    cu_seqlens[1:] += 1  # in place: the first sequence one token longer, a cut there saves too little
    changed = attention_module.remembered(cu_seqlens, attention_module._length_buckets, 128 + 15 * 60 + 1)
    assert changed.shapes == [(1, 128), (15, 61)] and changed.key_masks[1][:, 0, 0].sum(-1).tolist() == [61] + [60] * 14


@pytest.mark.parametrize("packed", [False, True])
def test_dropout_keeps_one_minus_p_and_scales_the_kept(no_kernels, packed):
    """q = k = 0: every probability is 1/S; v = identity: out[i] = keep[i, :] / (S·(1-p)), so each
    entry is 0 or exactly 1/(S·(1-p)), a fraction 1-p of them kept, and the masks differ across
    heads and sequences."""
    batch, seqlen, heads, p = 2, 64, 2, 0.3
    q = torch.zeros(batch, seqlen, heads, seqlen)
    v = torch.eye(seqlen)[None, :, None, :].expand(batch, seqlen, heads, seqlen).contiguous()
    if packed:
        q, v = q.flatten(0, 1), v.flatten(0, 1)
        out = attention(q, q, v, dropout_p=p, cu_seqlens=_cu_seqlens([seqlen] * batch), max_seqlen=seqlen)
        out = out.view(batch, seqlen, heads, seqlen)
    else:
        out = attention(q, q, v, dropout_p=p)
    kept = (out * seqlen * (1 - p)).permute(0, 2, 1, 3)  # [B, H, S, S]
    assert torch.allclose(kept, kept.round(), atol=1e-4) and set(kept.round().unique().tolist()) == {0.0, 1.0}
    keep_rate = kept.round().mean().item()
    assert abs(keep_rate - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / kept.numel()), keep_rate
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0], kept[1, 0])


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("with_grad", [False, True])
def test_linear_matches_float64(no_kernels, activation, with_grad):
    """Without autograd the activation and residual are applied in place on the GEMM's output:
    same values, inputs untouched. Tolerance as tests/test_linear.py's fp32 (1e-4)."""
    x = torch.randn(37, 96, requires_grad=with_grad)
    weight = (torch.randn(80, 96) / 96**0.5).requires_grad_(with_grad)
    bias, residual = torch.randn(80, requires_grad=with_grad), torch.randn(37, 80, requires_grad=with_grad)
    inputs = [t.detach().clone() for t in (x, weight, bias, residual)]
    y = linear(x, weight, bias, activation, residual=residual)
    expected = linear_reference(*(t.detach().double().requires_grad_() for t in (x, weight, bias)), activation,
                                residual.detach().double())
    _check_close("y", y, expected, (1e-4, 1e-4))
    assert all(torch.equal(t, before) for t, before in zip((x, weight, bias, residual), inputs))
    if with_grad:
        y.backward(torch.ones_like(y))
        assert y.grad_fn is not None and all(t.grad is not None for t in (x, weight, bias, residual))
        torch.testing.assert_close(
            x.grad, torch.autograd.grad(linear_reference(x, weight, bias, activation, residual).sum(), x)[0])


@pytest.fixture
def onednn_calls(monkeypatch):
    """The calls that linear_torch hands to oneDNN (kernels/onednn.py), oneDNN taken as the faster."""
    calls = []
    run = onednn.linear
    monkeypatch.setattr(onednn, "fastest", lambda plain, *args: calls.append(args) or run(*args))
    return calls


@pytest.mark.skipif(not onednn._AVAILABLE, reason="this torch is built without oneDNN")
@pytest.mark.parametrize("slower", ["onednn", "plain"])
def test_onednn_or_f_linear_whichever_was_faster_at_the_shape(no_kernels, monkeypatch, slower):
    """The first call at a shape times oneDNN and F.linear (with the epilogue in place) and keeps the
    faster for that shape; other shapes are timed on their own. Here one way is slowed down by 20 ms."""
    monkeypatch.setattr(onednn, "_ONEDNN_FASTER", {})
    calls = {"onednn": 0, "plain": 0}

    def counted(name, run):
        def wrapper(*args):
            calls[name] += 1
            if name == slower:
                time.sleep(0.02)
            return run(*args)
        return wrapper

    monkeypatch.setattr(onednn, "linear", counted("onednn", onednn.linear))
    monkeypatch.setattr(linear_module, "_linear_then_epilogue", counted("plain", linear_module._linear_then_epilogue))
    x, weight, bias, residual = torch.randn(2, 129, 768), torch.randn(1024, 768) / 768**0.5, torch.randn(1024), \
        torch.randn(2, 129, 1024)
    expected = linear_reference(x.double(), weight.double(), bias.double(), "gelu", residual.double())
    with torch.no_grad():
        for _ in range(3):
            _check_close("y", linear(x, weight, bias, "gelu", residual=residual), expected, (1e-4, 1e-4))
        timed = dict(calls)
        linear(x, weight, bias)  # another shape (no epilogue): timed anew
    runs = 1 + onednn.TIMED_RUNS
    faster = "plain" if slower == "onednn" else "onednn"
    assert timed == {slower: runs, faster: runs + 2}
    assert calls == {slower: 2 * runs, faster: 2 * runs + 2}
    assert set(onednn._ONEDNN_FASTER.values()) == {faster == "onednn"}


@pytest.mark.skipif(not onednn._AVAILABLE, reason="this torch is built without oneDNN")
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("residual_layout", [None, "contiguous", "strided"])
def test_large_fp32_inference_linears_run_in_onednn(no_kernels, onednn_calls, activation, residual_layout):
    """A BERT-sized fp32 projection without autograd runs in one oneDNN call (activation and a
    contiguous residual as post-ops; a strided residual added in place after it): the float64
    reference's values, inputs untouched. Tolerance as the fp32 test above (1e-4): at K = 768 the
    fp32 sums are off by ~1e-6 relative, ~1e-5 absolute at these magnitudes."""
    x, weight, bias = torch.randn(2, 129, 768), torch.randn(1024, 768) / 768**0.5, torch.randn(1024)
    residual = {None: None, "contiguous": torch.randn(2, 129, 1024),
                "strided": torch.randn(2, 1024, 129).transpose(1, 2)}[residual_layout]
    inputs = [t.clone() for t in (x, weight, bias) + ((residual,) if residual is not None else ())]
    with torch.no_grad():
        y = linear(x, weight, bias, activation, residual=residual)
    assert len(onednn_calls) == 1
    expected = linear_reference(x.double(), weight.double(), bias.double(), activation,
                                None if residual is None else residual.double())
    _check_close("y", y, expected, (1e-4, 1e-4))
    assert all(torch.equal(t, before) for t, before in zip((x, weight, bias, residual), inputs))


@pytest.mark.skipif(not onednn._AVAILABLE, reason="this torch is built without oneDNN")
def test_onednn_serves_only_large_fp32_inference(no_kernels, onednn_calls):
    """oneDNN's linear has no autograd and a per-call setup cost: training, small GEMMs, other
    dtypes and a user's torch.backends.mkldnn.enabled = False stay on F.linear."""
    x, weight = torch.randn(256, 768), torch.randn(1024, 768) / 768**0.5
    linear(x, weight.requires_grad_())
    linear(x[:4], weight.detach())
    with torch.no_grad():
        linear(x.bfloat16(), weight.bfloat16())
        with torch.backends.mkldnn.flags(enabled=False):
            linear(x, weight)
    assert onednn_calls == []
    with torch.no_grad():
        linear(x, weight)
    assert len(onednn_calls) == 1


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_layer_norm_matches_float64(no_kernels, dtype, tolerance):
    x, residual = (torch.randn(33, 384).to(dtype).requires_grad_() for _ in range(2))
    weight, bias = (torch.randn(384).to(dtype).requires_grad_() for _ in range(2))
    y = layer_norm(x, weight, bias, 1e-12, residual=residual)
    assert y.dtype == dtype
    expected = layer_norm_reference(*(t.detach().double() for t in (x, weight, bias)), 1e-12, residual.detach().double())
    _check_close("y", y, expected, (tolerance, tolerance))
    grad = torch.randn_like(y)
    y.backward(grad)
    reference = [t.detach().double().requires_grad_() for t in (x, weight, bias, residual)]
    layer_norm_reference(*reference[:3], 1e-12, reference[3]).backward(grad.double())
    grad_tolerance = (tolerance * 10, tolerance * 10)  # summed over 33 rows (dweight, dbias)
    for name, ours, exact in zip(("dx", "dweight", "dbias", "dresidual"), (x, weight, bias, residual), reference):
        _check_close(name, ours.grad, exact.grad, grad_tolerance)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_pad_and_unpad_match_the_references_exactly(no_kernels, index_dtype):
    hidden = torch.randn(3, 7, 2, 5, requires_grad=True)
    indices = torch.tensor([0, 1, 2, 8, 13, 14, 20], dtype=index_dtype)
    rows = unpad(hidden, indices)
    torch.testing.assert_close(rows, unpad_reference(hidden, indices), atol=0, rtol=0)
    padded = pad(rows * 2, indices, 3, 7)
    torch.testing.assert_close(padded, pad_reference(rows * 2, indices, 3, 7), atol=0, rtol=0)
    padded.sum().backward()
    expected = torch.zeros(21, 2, 5).index_fill_(0, indices.long(), 2.0).view(3, 7, 2, 5)
    torch.testing.assert_close(hidden.grad, expected, atol=0, rtol=0)


def test_the_torch_path_functions_are_what_the_ops_run(no_kernels):
    """Backend "torch" runs exactly the *_torch functions (the references stay apart)."""
    x, weight, bias = torch.randn(4, 6, 16), torch.randn(16, 16), torch.randn(16)
    assert torch.equal(linear(x, weight, bias, "gelu"), linear_torch(x, weight, bias, "gelu"))
    assert torch.equal(layer_norm(x, bias, bias, 1e-5, residual=x), layer_norm_torch(x, bias, bias, 1e-5, residual=x))
    indices = torch.tensor([0, 3, 5, 9])
    assert torch.equal(unpad(x, indices), unpad_torch(x, indices))
    assert torch.equal(pad(x[0, :4], indices, 2, 6), pad_torch(x[0, :4], indices, 2, 6))
    q = x.view(4, 6, 2, 8)
    mask = _lengths_mask([6, 2, 0, 5], 6)
    assert torch.equal(attention(q, q, q, key_padding_mask=mask),
                       attention_module.attention_torch(q, q, q, key_padding_mask=mask))


def test_packed_attention_of_fused_qkv_views_without_autograd(no_kernels):
    """A model's q, k, v (views of one [T, 3, H, D] projection) are scattered as one tensor when no
    gradient is needed: the same output as three separate tensors."""
    lengths = [5, 0, 9, 1]
    qkv = torch.randn(sum(lengths), 3, 2, 16)
    kwargs = dict(cu_seqlens=_cu_seqlens(lengths), max_seqlen=9)
    with torch.no_grad():
        fused = attention(*qkv.unbind(1), **kwargs)
        separate = attention(*(t.clone() for t in qkv.unbind(1)), **kwargs)
    torch.testing.assert_close(fused, separate, atol=0, rtol=0)
    expected = attention_module.attention_reference(*qkv.double().unbind(1), **kwargs)
    _check_close("out", fused, expected, ATTENTION_TOLERANCES[torch.float32]["out"])
