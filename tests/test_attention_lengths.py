"""Attention with key padding masks run as per-sequence lengths, and the kernels' tail blocks.

A right-padded mask row (True on a prefix, False after: BERT's usual batch) reaches the kernels as
the sequence's length, decided on the device; any other row (left padding, holes) as -1, and the
kernels read its bytes. Both kinds mix in one batch. Each kernel runs its full blocks unmasked and
one masked tail block, so lengths sit at, one below and one above block multiples here. Shapes are
small (the interpreter is slow) but cross every block edge.
"""
import importlib

import pytest
import torch

from fastencoder.kernels._launch import on_device_of
from fastencoder.kernels.attention import attention
from fastencoder.kernels.attention.dropout import _draw_dropout_seed, _dropout_keep_mask, _philox
from test_attention import BWD, FWD, _check_against_float64, _cu_seqlens, _packed, _qkv

attention_op = importlib.import_module("fastencoder.kernels.attention.op")


def _mask(rows, seqlen, device):
    """bool [B, S] from (kind, n) per row: "right" (n real tokens then padding), "left" (padding
    then n real tokens), "holes" (a prefix of n with every third token masked), "none" (no real
    token)."""
    positions = torch.arange(seqlen, device=device)
    built = []
    for kind, n in rows:
        if kind == "right":
            built.append(positions < n)
        elif kind == "left":
            built.append(positions >= seqlen - n)
        elif kind == "holes":
            built.append((positions < n) & (positions % 3 != 1))
        else:
            built.append(torch.zeros(seqlen, dtype=torch.bool, device=device))
    return torch.stack(built)


# the key lengths the launcher derives: the length of a right-padded row, -1 for any other
MIXED_ROWS = [("right", 37), ("right", 20), ("left", 25), ("holes", 30), ("none", 0), ("right", 1)]
MIXED_LENGTHS = [37, 20, -1, -1, 0, 1]


def _key_lengths_launched(launch_arguments):
    lengths = [arguments["KeyLengths"].tolist() for name, arguments in launch_arguments
               if name in (FWD, *BWD) and "KeyLengths" in arguments]
    assert lengths, "no attention kernel took key lengths"
    return lengths


@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_mixed_masks_match_float64(device, triton_backend, launch_arguments, poisoned_allocations,
                                   dropout_p, with_bias):
    """Right-padded, left-padded, holed and all-False rows in one batch, fp32 (32-row forward and
    16/32-row backward blocks: S = 37 ends mid-block), forward and gradients against the float64
    reference with the kernels' own dropout mask."""
    seqlen, heads = 37, 2
    mask = _mask(MIXED_ROWS, seqlen, device)
    qkv, (q, k, v) = _qkv(len(MIXED_ROWS), seqlen, heads, 32, torch.float32, device)
    kwargs = dict(key_padding_mask=mask)
    if with_bias:
        kwargs["bias"] = torch.randn(len(MIXED_ROWS), heads, seqlen, seqlen, device=device)
    torch.manual_seed(5)
    out = attention(q, k, v, dropout_p=dropout_p, **kwargs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert all(lengths == MIXED_LENGTHS for lengths in _key_lengths_launched(launch_arguments))
    keep = None
    if dropout_p:
        torch.manual_seed(5)
        keep = _dropout_keep_mask(_draw_dropout_seed(), len(MIXED_ROWS), heads, seqlen, dropout_p, device)
    _check_against_float64(qkv, out, grad_out, torch.float32, dropout_mask=keep, dropout_p=dropout_p,
                           **kwargs)
    assert (out[4] == 0).all() and (qkv.grad[4] == 0).all()  # no real key: zeros, zero gradients


def test_masked_keys_get_zero_gradients_and_padding_queries_are_still_computed(device, triton_backend):
    """Query rows at padding positions still attend to the real keys (as in PyTorch); masked keys
    receive no gradient, in both the lengths path and the bytes path."""
    seqlen = 40
    mask = _mask([("right", 9), ("left", 9)], seqlen, device)
    qkv, (q, k, v) = _qkv(2, seqlen, 1, 16, torch.float32, device)
    out = attention(q, k, v, key_padding_mask=mask)
    out.sum().backward()
    for b in range(2):
        assert (qkv.grad[b, :, 1:][~mask[b]] == 0).all()  # dK, dV of masked keys
        assert (out[b][~mask[b]] != 0).any(dim=-1).all()  # padding queries see the real keys


def test_key_lengths_are_computed_on_the_device_and_remembered(device):
    mask = _mask(MIXED_ROWS, 37, device)
    lengths = attention_op._key_lengths(mask)
    assert lengths.dtype == torch.int32 and lengths.device == mask.device
    assert lengths.tolist() == MIXED_LENGTHS
    assert attention_op._key_lengths(mask) is lengths  # every layer passes the same mask
    mask[0, 36] = False  # changed in place: computed again (still a prefix, one shorter)
    assert attention_op._key_lengths(mask).tolist() == [36, *MIXED_LENGTHS[1:]]
    mask[1, 30] = True  # a True after the padding: not a prefix any more
    assert attention_op._key_lengths(mask).tolist()[1] == -1


# fp16, head dim 64: 128-query forward programs over 64-key blocks; dK/dV 64-key programs over
# 32-query blocks; dQ 128-query programs over 32-key blocks. Lengths at, one below and one above
# multiples of 32, 64 and 128.
TAIL_LENGTHS = [64, 63, 65, 128, 127, 129, 32, 33]


@pytest.mark.parametrize("layout", ["mask", "packed"])
def test_lengths_at_block_edges_fp16(device, triton_backend, kernel_launches, poisoned_allocations, layout):
    seqlen, heads, dtype = 130, 1, torch.float16
    lengths = TAIL_LENGTHS
    qkv, (q, k, v) = _qkv(len(lengths), seqlen, heads, 64, dtype, device)
    if layout == "packed":
        qkv = _packed(qkv.detach(), lengths).requires_grad_()
        q, k, v = qkv.unbind(1)
        kwargs = dict(cu_seqlens=_cu_seqlens(lengths, device), max_seqlen=seqlen)
    else:
        kwargs = dict(key_padding_mask=_mask([("right", n) for n in lengths], seqlen, device))
    out = attention(q, k, v, **kwargs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert kernel_launches.count(FWD) == 1 and all(name in kernel_launches for name in BWD)
    _check_against_float64(qkv, out, grad_out, dtype, **kwargs)


@pytest.mark.parametrize("seqlen", [31, 32, 33, 64, 65])
def test_unmasked_lengths_at_block_edges_fp32(device, triton_backend, poisoned_allocations, seqlen):
    """No mask: the sequence length alone splits full blocks from the tail (fp32: 32-query forward
    programs over 32-key blocks, 32-key dK/dV programs over 16-query blocks, 16-query dQ programs
    over 16-key blocks)."""
    qkv, (q, k, v) = _qkv(1, seqlen, 2, 32, torch.float32, device)
    out = attention(q, k, v)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    _check_against_float64(qkv, out, grad_out, torch.float32)


@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
def test_negative_and_zero_scale(device, triton_backend, poisoned_allocations, scale):
    """The forward takes its running max on unscaled scores: a negative scale's sign goes into q
    (and dQ's sign back out); a zero scale averages the visible values uniformly."""
    seqlen = 33
    mask = _mask([("right", 20), ("holes", 33)], seqlen, device)
    qkv, (q, k, v) = _qkv(2, seqlen, 2, 32, torch.float32, device)
    out = attention(q, k, v, key_padding_mask=mask, scale=scale)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    _check_against_float64(qkv, out, grad_out, torch.float32, key_padding_mask=mask, scale=scale)


def test_philox_draws_the_numbers_of_tl_philox(device):
    """The dropout mask's Philox (one wide multiply per product) gives tl.philox's four outputs."""
    import triton
    import triton.language as tl

    @triton.jit
    def compare(Same, seed, stream):
        counter = (tl.arange(0, 64) * 7919 + 12345).to(tl.uint32)
        a0, a1, a2, a3 = tl.philox(seed, counter, stream.to(tl.uint32), 0, 0)
        b0, b1, b2, b3 = _philox(seed, counter, stream.to(tl.uint32))
        same = (a0 == b0) & (a1 == b1) & (a2 == b2) & (a3 == b3)
        tl.store(Same + tl.arange(0, 64), same.to(tl.int32))

    same = torch.zeros(64, dtype=torch.int32, device=device)
    for seed in (2**31 + 5, 2**62 + 123456789):
        same.zero_()
        with on_device_of(same):
            compare[(1,)](same, seed, 7)
        assert same.all()


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_new_masks(device, triton_backend):
    """A captured attention call recomputes the key lengths from its static mask on every replay,
    even after the same mask tensor was used (and its lengths remembered) before the capture."""
    seqlen = 130
    _, (q, k, v) = _qkv(3, seqlen, 2, 64, torch.float16, device)
    q, k, v = (t.detach() for t in (q, k, v))
    mask = _mask([("right", 130), ("right", 70), ("left", 40)], seqlen, device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attention(q, k, v, key_padding_mask=mask)  # warm-up: compiles, remembers the lengths
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(q, k, v, key_padding_mask=mask)
    for rows in ([("right", 1), ("holes", 100), ("right", 129)], [("none", 0), ("right", 64), ("left", 3)]):
        mask.copy_(_mask(rows, seqlen, device))
        graph.replay()
        torch.testing.assert_close(out, attention(q, k, v, key_padding_mask=mask), atol=0, rtol=0)
