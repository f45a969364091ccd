"""Sliding-window attention and rotary position embeddings (ModernBERT's) in `attention`: the float64
reference against a straightforward computation written here, Hugging Face's own mask and rotation,
the PyTorch path (outputs and gradients, chunked windows, 8,192 tokens) and refusals.

Tolerances are test_attention.py's (16-bit: P and dS rounded before their matmuls); the rotation
adds one rounding of the rotated q and k to q's dtype (2^-11 relative in fp16, as rounding the
inputs themselves), inside them."""
import importlib
import math
import operator

import pytest
import torch

from fastencoder.kernels.attention import attention, attention_reference, attention_torch
from fastencoder.kernels.attention.dropout import _draw_dropout_seed, _dropout_keep_mask
from test_attention import TOLERANCES, _check_close, _cu_seqlens, _lengths_mask

reference_module = importlib.import_module("fastencoder.kernels.attention.reference")


def rotary_tables(positions, head_dim, theta=10_000.0):
    """float32 cos, sin [positions, D] as Hugging Face's default rotary embedding builds them:
    angles p / theta^(2i/D) for i < D/2, the two halves equal."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), -1)
    return angles.cos(), angles.sin()


def _rotated_naive(x, cos, sin):
    """x [S, D] (float64) at positions 0..S-1, its dims d and d + D/2 rotated as a pair, one by one."""
    seqlen, head_dim = x.shape
    half = head_dim // 2
    cos, sin = cos[:seqlen].double(), sin[:seqlen].double()
    out = torch.empty_like(x)
    for d in range(half):
        out[:, d] = x[:, d] * cos[:, d] - x[:, d + half] * sin[:, d]
        out[:, d + half] = x[:, d + half] * cos[:, d + half] + x[:, d] * sin[:, d + half]
    return out


def _naive_sequence(q, k, v, real_keys, window, rotary, scale, bias):
    """One sequence [S, H, D] in float64, head by head: scores, the visible pairs (a real key, and
    |i - j| <= window), softmax over them (a row with none gives zeros), the weighted values."""
    seqlen, heads, _ = q.shape
    out = torch.zeros_like(q, dtype=torch.float64)
    rows = torch.arange(seqlen)
    visible = real_keys[None, :].expand(seqlen, seqlen).clone()
    if window is not None:
        visible &= (rows[:, None] - rows[None, :]).abs() <= window
    for h in range(heads):
        qh, kh, vh = q[:, h].double(), k[:, h].double(), v[:, h].double()
        if rotary is not None:
            qh, kh = _rotated_naive(qh, *rotary), _rotated_naive(kh, *rotary)
        scores = qh @ kh.T * scale
        if bias is not None:
            scores = scores + bias[h].double()
        for i in range(seqlen):
            if visible[i].any():
                weights = torch.softmax(scores[i][visible[i]], 0)
                out[i, h] = weights @ vh[visible[i]]
    return out


def _naive(q, k, v, window=None, rotary=None, key_padding_mask=None, cu_seqlens=None, bias=None, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if cu_seqlens is None:
        mask = torch.ones(q.shape[:2], dtype=torch.bool) if key_padding_mask is None else key_padding_mask
        return torch.stack([_naive_sequence(q[b], k[b], v[b], mask[b], window, rotary, scale,
                                            None if bias is None else bias[b]) for b in range(q.shape[0])])
    bounds = cu_seqlens.tolist()
    return torch.cat([_naive_sequence(q[start:end], k[start:end], v[start:end], torch.ones(end - start, dtype=torch.bool),
                                      window, rotary, scale, None) for start, end in zip(bounds[:-1], bounds[1:])])


@pytest.mark.parametrize("window", [None, 0, 1, 5, 18])
@pytest.mark.parametrize("with_rotary", [False, True], ids=["no-rotary", "rotary"])
def test_reference_is_the_straightforward_computation(window, with_rotary):
    torch.manual_seed(window or 0)
    batch, seqlen, heads, head_dim = 2, 19, 2, 8
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, dtype=torch.float64) for _ in range(3))
    rotary = rotary_tables(seqlen + 3, head_dim) if with_rotary else None
    mask = _lengths_mask([19, 11], seqlen, True, "cpu")  # left padding: positions stay row indices
    bias = torch.randn(batch, heads, seqlen, seqlen, dtype=torch.float64)
    expected = _naive(q, k, v, window, rotary, key_padding_mask=mask, bias=bias, scale=0.3)
    out = attention_reference(q, k, v, key_padding_mask=mask, bias=bias, scale=0.3, window=window, rotary=rotary)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)

    lengths = [19, 4, 0, 11]  # packed: positions from each sequence's start
    cu_seqlens = _cu_seqlens(lengths, "cpu")
    q, k, v = (torch.randn(sum(lengths), heads, head_dim, dtype=torch.float64) for _ in range(3))
    expected = _naive(q, k, v, window, rotary, cu_seqlens=cu_seqlens)
    out = attention_reference(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=seqlen, window=window, rotary=rotary)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_window_is_hugging_faces_modernbert_mask():
    """Hugging Face's ModernBERT (SDPA) masks its sliding layers with
    create_bidirectional_sliding_window_mask(config) (config.sliding_window = local_attention // 2);
    window = config.sliding_window gives the same pairs, with padding, at lengths on both sides of
    the window."""
    from transformers import ModernBertConfig
    from transformers.masking_utils import create_bidirectional_sliding_window_mask

    for local_attention, seqlen in ((8, 23), (16, 9), (6, 6)):
        config = ModernBertConfig(hidden_size=32, num_attention_heads=2, local_attention=local_attention)
        config._attn_implementation = "sdpa"
        attention_mask = _lengths_mask([seqlen, seqlen - 3], seqlen, False, "cpu").long()
        hf = create_bidirectional_sliding_window_mask(
            config=config, inputs_embeds=torch.zeros(2, seqlen, 32), attention_mask=attention_mask)
        ours = reference_module.window_band(0, seqlen, 0, seqlen, config.sliding_window, "cpu")
        ours = ours[None, None] & attention_mask.bool()[:, None, None, :]
        assert hf.dtype == torch.bool and torch.equal(hf.expand_as(ours), ours), (local_attention, seqlen)


def test_rotation_is_hugging_faces_apply_rotary_pos_emb():
    """The tables are Hugging Face's ModernBERT rotary embedding's own (both thetas); our rotation
    of q and k in fp16 (fp32 math, rounded) equals its apply_rotary_pos_emb exactly."""
    from transformers import ModernBertConfig
    from transformers.models.modernbert import modeling_modernbert as hf

    config = ModernBertConfig(hidden_size=128, num_attention_heads=2)
    embedding = hf.ModernBertRotaryEmbedding(config)
    seqlen, head_dim = 33, 64
    x = torch.randn(2, seqlen, 2, head_dim)
    for layer_type in ("full_attention", "sliding_attention"):
        cos, sin = embedding(x, torch.arange(seqlen)[None], layer_type)
        q, k = (torch.randn(2, seqlen, 2, head_dim).half() for _ in range(2))
        expected_q, expected_k = hf.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        for x, expected in ((q, expected_q), (k, expected_k)):
            ours = reference_module.rotate(x, (cos[0], sin[0]), slice(0, seqlen), torch.float32).half()
            assert torch.equal(ours, expected.transpose(1, 2))


def _qkv(shape, dtype):
    return torch.randn(*shape[:-2], 3, *shape[-2:]).to(dtype).requires_grad_()


def _against_float64(qkv, dtype, tolerance_dtype=None, **kwargs):
    """attention(**kwargs) on q, k, v views of qkv: the output and the gradients of q, k, v against
    the float64 reference."""
    out = attention(*qkv.unbind(-3), **kwargs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    reference_qkv = qkv.detach().double().requires_grad_()
    expected = attention_reference(*reference_qkv.unbind(-3), **{
        name: value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        for name, value in kwargs.items()})
    expected.backward(grad_out.double())
    tolerance = TOLERANCES[tolerance_dtype or dtype]
    _check_close("out", out, expected, tolerance["out"])
    for index, name in enumerate(("dq", "dk", "dv")):
        _check_close(name, qkv.grad.select(-3, index), reference_qkv.grad.select(-3, index), tolerance["grad"])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("window", [None, 0, 7, 40])
def test_torch_path_matches_float64(torch_backend, kernel_launches, dtype, window):
    torch.manual_seed(3)
    seqlen, heads, head_dim = 37, 2, 16
    rotary = rotary_tables(64, head_dim)
    qkv = _qkv((2, seqlen, heads, head_dim), dtype)
    mask = _lengths_mask([37, 20], seqlen, False, "cpu")
    _against_float64(qkv, dtype, key_padding_mask=mask, window=window, rotary=rotary)
    lengths = [30, 0, 9, 37]
    qkv = _qkv((sum(lengths), heads, head_dim), dtype)
    _against_float64(qkv, dtype, cu_seqlens=_cu_seqlens(lengths, "cpu"), max_seqlen=seqlen, window=window, rotary=rotary)
    assert not kernel_launches


@pytest.mark.parametrize("layout", ["padded", "packed-buckets", "packed-scattered"])
def test_torch_path_windows_run_in_chunks_of_queries(torch_backend, monkeypatch, layout):
    """Shrunk to 8 queries a chunk: chunk edges, key slices clipped at both ends, a bias sliced
    along, rows whose window holds padding only (zeros), against the float64 reference."""
    monkeypatch.setattr(reference_module, "WINDOW_QUERY_CHUNK", 8)
    torch.manual_seed(4)
    seqlen, heads, head_dim, window = 29, 2, 16, 5
    rotary = rotary_tables(seqlen, head_dim)
    if layout == "padded":
        qkv = _qkv((3, seqlen, heads, head_dim), torch.float32)
        mask = _lengths_mask([29, 3, 20], seqlen, True, "cpu")  # the second row's early queries see no key
        bias = torch.randn(3, 1, seqlen, seqlen)
        out = _against_float64(qkv, torch.float32, key_padding_mask=mask, bias=bias, window=window, rotary=rotary)
        assert (out[1, :seqlen - 3 - window] == 0).all()
        return
    if layout == "packed-scattered":  # the path torch.compile and CUDA graphs take
        monkeypatch.setattr(reference_module, "capturing_or_compiling", lambda tensor: True)
    lengths = [29, 12, 1, 25]
    qkv = _qkv((sum(lengths), heads, head_dim), torch.float32)
    _against_float64(qkv, torch.float32, cu_seqlens=_cu_seqlens(lengths, "cpu"), max_seqlen=seqlen, window=window,
                     rotary=rotary)


@pytest.mark.parametrize("window, queries_per_call", [(5, 32), (40, 40)])
def test_torch_path_windows_on_the_cpu_run_in_chunks_of_a_window(torch_backend, monkeypatch, window,
                                                                 queries_per_call):
    """On the CPU a chunk holds about a window's queries (at least 32): the keys outside every
    window of a chunk are not computed at all, against the float64 reference."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *args, **kwargs: calls.append(q.shape[-2]) or sdpa(q, *args, **kwargs))
    torch.manual_seed(5)
    seqlen = 100
    qkv = _qkv((2, seqlen, 2, 16), torch.float32)
    _against_float64(qkv, torch.float32, window=window)
    chunks = [min(queries_per_call, seqlen - first) for first in range(0, seqlen, queries_per_call)]
    assert calls == chunks


KERNELS = {"_attention_fwd_kernel", "_attention_bwd_delta_kernel", "_attention_bwd_dkdv_kernel",
           "_attention_bwd_dq_kernel"}


def _kernels_against_float64(kernel_launches, qkv, dtype, **kwargs):
    """`_against_float64`, and the forward and backward kernels were the ones that ran (the PyTorch
    path launches none)."""
    kernel_launches.clear()
    out = _against_float64(qkv, dtype, **kwargs)
    assert set(kernel_launches) == KERNELS, kernel_launches
    return out


# Tiles (kernels/attention/configs.py): fp32 ("ieee") 32x32 forward, 16x16 backward blocks, 16x16
# everywhere with rotary embeddings; fp16 128x64 forward, 16x64 dK/dV, 128x32 dQ blocks, 128x32
# forward and 16x16 backward with rotary embeddings. fp32 at 45 tokens and fp16 at 150 cross every
# block edge of each kernel (D = 16: each rotated half padded to 16 dims in the kernels); the
# windows: the diagonal only, narrower than a block, crossing several, wider than the sequence (no
# window: rotary embeddings alone); the packed and masked rows include sequences shorter than a
# window and an empty one.
KERNEL_CASES = [(torch.float32, 16, 45), (torch.float16, 32, 150)]


@pytest.mark.parametrize("dtype, head_dim, seqlen", KERNEL_CASES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("window, with_rotary", [(0, False), (5, True), (37, False), (37, True), (1000, True)])
@pytest.mark.parametrize("layout", ["prefix-mask", "byte-mask", "packed"])
def test_kernels_match_float64(triton_backend, kernel_launches, poisoned_allocations, dtype, head_dim, seqlen,
                               window, with_rotary, layout):
    torch.manual_seed(window + seqlen)
    heads = 2
    kwargs = dict(window=window)
    if with_rotary:  # ModernBERT's local theta: different tables, same code
        kwargs["rotary"] = rotary_tables(seqlen + 5, head_dim, theta=10_000.0 if window == 1000 else 160_000.0)
    if layout == "packed":
        lengths = [seqlen, 3, 0, seqlen - 20]
        qkv = _qkv((sum(lengths), heads, head_dim), dtype)
        kwargs.update(cu_seqlens=_cu_seqlens(lengths, "cpu"), max_seqlen=seqlen)
    else:
        qkv = _qkv((3, seqlen, heads, head_dim), dtype)
        if layout == "prefix-mask":  # right-padded: the kernels bound the keys by each row's length
            kwargs["key_padding_mask"] = _lengths_mask([seqlen, 4, seqlen - 17], seqlen, False, "cpu")
        else:  # not a prefix: the kernels read the mask's bytes (and a row's early windows hold none)
            kwargs["key_padding_mask"] = _lengths_mask([seqlen, 4, seqlen - 17], seqlen, True, "cpu")
            kwargs["key_padding_mask"][0] = torch.rand(seqlen) < 0.7
    _kernels_against_float64(kernel_launches, qkv, dtype, **kwargs)


@pytest.mark.parametrize("with_rotary", [False, True], ids=["window", "window-rotary"])
def test_kernels_run_their_configurations(triton_backend, launch_arguments, with_rotary):
    """A rotary call runs the rotary tiles in all three kernels; a window alone runs the plain ones."""
    configs = importlib.import_module("fastencoder.kernels.attention.configs")
    names = ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")
    torch.manual_seed(2)
    qkv = _qkv((2, 20, 2, 16), torch.float16)
    kwargs = dict(window=5, rotary=rotary_tables(20, 16)) if with_rotary else dict(window=5)
    attention(*qkv.unbind(-3), **kwargs).sum().backward()
    expected = dict(zip(names, (
        configs._fwd_config(16, torch.float16, False, False, False, rotary=with_rotary),
        *configs._bwd_configs(16, torch.float16, False, False, rotary=with_rotary))))
    launched = {name: (arguments["BLOCK_M"], arguments["BLOCK_N"], arguments["num_warps"], arguments["num_stages"])
                for name, arguments in launch_arguments if name in names}
    assert launched == expected
    key = ("16", 64, False)  # the two tables differ in every kernel, so the comparison tells them apart
    assert all(map(operator.ne, (configs._ROTARY_FWD_CONFIGS[key], *configs._ROTARY_BWD_CONFIGS[key]),
                   (configs._FWD_CONFIGS[key], *configs._BWD_CONFIGS[key])))


@pytest.mark.parametrize("extra", ["bias", "relative-bias", "dropout"])
def test_kernels_combine_window_and_rotary_with(triton_backend, kernel_launches, poisoned_allocations, extra):
    """fp32, 45 tokens, window 7 and rotary embeddings, with a key padding mask and a dense bias
    (and a negative scale), a relative bias, or dropout (the kernels' own keep mask, drawn again
    from the same seed, in the reference)."""
    torch.manual_seed(11)
    batch, seqlen, heads, head_dim, window = 2, 45, 2, 32, 7
    qkv = _qkv((batch, seqlen, heads, head_dim), torch.float32)
    kwargs = dict(window=window, key_padding_mask=_lengths_mask([45, 30], seqlen, False, "cpu"),
                  rotary=rotary_tables(seqlen, head_dim))
    if extra == "bias":
        kwargs.update(bias=torch.randn(batch, 1, seqlen, seqlen), scale=-0.2)
    elif extra == "relative-bias":
        kwargs["relative_bias"] = torch.randn(heads, 2 * seqlen - 1)
    if extra != "dropout":
        _kernels_against_float64(kernel_launches, qkv, torch.float32, **kwargs)
        return
    torch.manual_seed(5)
    out = attention(*qkv.unbind(-3), dropout_p=0.3, **kwargs)
    out.backward(grad_out := torch.randn_like(out))
    assert set(kernel_launches) == KERNELS
    torch.manual_seed(5)
    keep = _dropout_keep_mask(_draw_dropout_seed(), batch, heads, seqlen, 0.3, "cpu")
    reference_qkv = qkv.detach().double().requires_grad_()
    expected = attention_reference(*reference_qkv.unbind(-3), dropout_p=0.3, dropout_mask=keep, **kwargs)
    expected.backward(grad_out.double())
    tolerance = TOLERANCES[torch.float32]
    _check_close("out", out, expected, tolerance["out"])
    for index, name in enumerate(("dq", "dk", "dv")):
        _check_close(name, qkv.grad.select(-3, index), reference_qkv.grad.select(-3, index), tolerance["grad"])


def _rows_against_naive(q, k, v, out, rows, window, rotary, starts=None):
    """Sampled query rows of a long windowed attention against the straightforward float64 sum over
    their windows (the full S x S reference would be gigabytes at S = 8192)."""
    cos, sin = (table.double() for table in rotary)
    half = q.shape[-1] // 2

    def rotated(x, position):
        return x * cos[position] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[position]

    for row, (start, end) in zip(rows, starts):
        position = row - start
        first, last = max(start, row - window), min(end, row + window + 1)
        keys = torch.stack([rotated(k[j].double(), j - start) for j in range(first, last)])  # [keys, H, D]
        query = rotated(q[row].double(), position)  # [H, D]
        weights = torch.softmax(torch.einsum("hd,khd->hk", query, keys) / math.sqrt(q.shape[-1]), -1)
        expected = torch.einsum("hk,khd->hd", weights, v[first:last].double())
        torch.testing.assert_close(out[row].double(), expected, atol=1e-4, rtol=1e-4, msg=lambda m: f"row {row}: {m}")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_torch_path_at_8192_tokens(torch_backend, layout):
    """ModernBERT's longest sequences, window 64: rows at the start, at chunk edges and at the end
    match the float64 sum over their windows; the packed batch holds a sequence of 8192 tokens
    after a short one (positions restart at each sequence)."""
    torch.manual_seed(6)
    heads, head_dim, window, seqlen = 2, 16, 64, 8192
    rotary = rotary_tables(seqlen, head_dim, theta=160_000.0)
    lengths = [seqlen] if layout == "padded" else [100, seqlen, 37]
    q, k, v = (torch.randn(sum(lengths), heads, head_dim) for _ in range(3))
    if layout == "padded":
        out = attention(q[None], k[None], v[None], window=window, rotary=rotary)[0]
    else:
        out = attention(q, k, v, cu_seqlens=_cu_seqlens(lengths, "cpu"), max_seqlen=seqlen, window=window,
                        rotary=rotary)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    longest = lengths.index(seqlen)
    sampled = [(longest, position) for position in (0, 63, 64, 511, 512, 575, 4100, seqlen - 65, seqlen - 1)]
    if layout == "packed":
        sampled += [(0, 0), (0, 99), (2, 0), (2, 36)]
    rows = [bounds[b] + position for b, position in sampled]
    _rows_against_naive(q, k, v, out, rows, window, rotary, [(bounds[b], bounds[b + 1]) for b, _ in sampled])


def _bad_calls():
    q = torch.randn(2, 8, 2, 16)
    cos, sin = rotary_tables(8, 16)
    return q, {
        "negative window": (dict(window=-1), ValueError, "window must be >= 0"),
        "float window": (dict(window=4.0), TypeError, "window must be an int"),
        "bool window": (dict(window=True), TypeError, "window must be an int"),
        "rotary not a pair": (dict(rotary=(cos,)), TypeError, "rotary must be a pair"),
        "rotary a tensor": (dict(rotary=cos), TypeError, "rotary must be a pair"),
        "rotary fp16": (dict(rotary=(cos.half(), sin)), TypeError, "must be float32"),
        "rotary too short": (dict(rotary=(cos[:7], sin[:7])), ValueError, r"P >= 8"),
        "rotary wrong head dim": (dict(rotary=(cos[:, :8], sin[:, :8])), ValueError, "D = 16"),
        "rotary 1-D": (dict(rotary=(cos[0], sin[0])), ValueError, r"\[P, D\]"),
        "rotary requires grad": (dict(rotary=(cos.requires_grad_(), sin)), ValueError, "requires grad"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()[1]))
@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
def test_bad_window_or_rotary_is_refused(request, kernel_launches, backend, case):
    request.getfixturevalue(backend)
    q, cases = _bad_calls()
    kwargs, error, message = cases[case]
    with pytest.raises(error, match=message):
        attention(q, q, q, **kwargs)
    assert not kernel_launches


def test_rotary_needs_an_even_head_dim(torch_backend):
    q = torch.randn(1, 4, 1, 5)
    with pytest.raises(ValueError, match="even head dim"):
        attention(q, q, q, rotary=(torch.ones(4, 5), torch.zeros(4, 5)))


def test_packed_rotary_tables_cover_max_seqlen(torch_backend):
    q = torch.randn(10, 2, 16)
    cos, sin = rotary_tables(8, 16)
    with pytest.raises(ValueError, match=r"P >= 9 \(max_seqlen\)"):
        attention(q, q, q, cu_seqlens=_cu_seqlens([9, 1], "cpu"), max_seqlen=9, rotary=(cos, sin))
