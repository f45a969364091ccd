"""Fused multi-head attention, FlashAttention-2 style: out = dropout(softmax(q·kᵀ·scale + mask)) · v.

Two layouts:
  * padded: q, k, v of shape [B, S, H, D] with any strides on B, S, H (e.g. views of one fused
    [B, S, 3, H, D] QKV projection) and unit stride on D; an optional boolean key_padding_mask
    [B, S] (True = real token) and/or an additive float bias broadcastable to [B, H, S, S].
  * packed (padding-free): q, k, v of shape [T, H, D] holding B sequences back to back, described
    by cu_seqlens (int32 [B + 1], cumulative lengths from 0) and max_seqlen; a sequence never
    attends across its boundaries. A bias is indexed by positions within each sequence, so it
    must broadcast to [B, H, max_seqlen, max_seqlen].

Non-causal. Head dims 16, 32, 64, 80, 96, 128 in the kernels (the reference takes any). A key
padding mask that is True on a prefix of each row (right padding, BERT's usual batch) runs as
per-sequence lengths, found on the device: such a batch costs what an unmasked one costs, and key
blocks past a sequence's length are skipped. The softmax runs in fp32 whatever the input dtype;
the S×S score matrix is never materialised. A query row whose keys are all masked
(key_padding_mask False or bias -inf everywhere) gives zeros, in the kernels and the reference
alike. float32 inputs run in the kernels too, with fp32 dot products ("ieee"), or TF32 where torch's
settings allow it for cuBLAS matmuls (`backend.allows_tf32`).

Dropout (dropout_p > 0) is applied to the probabilities in the kernels with Philox random numbers
(tl.philox's, each draw's four outputs deciding four adjacent keys): one 64-bit seed per call,
drawn from torch's default CPU generator (so `torch.manual_seed` reproduces it, and gradient
checkpointing, which restores that generator for its recompute, recomputes the same mask); the
backward regenerates the same mask from that seed.
The seed reaches the kernels as a scalar argument: nothing is copied to the device for it, so a
training step never waits on a copy. A CUDA graph would keep that scalar as captured and repeat one
mask on every replay: the kernels refuse dropout while a graph captures (the PyTorch path's
dropout, SDPA's, draws anew per replay).
"""
import inspect
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from ._no_triton import tl, triton

from . import backend
from ._checks import FLOAT_DTYPES, capturing, capturing_or_compiling, check_float, check_like, remembered
from ._dispatch import direct_when_eager
from ._launch import cdiv, launches_on_input_device, next_power_of_2, on_device_of

SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
MAX_DROPOUT_SEQLEN = 46340  # i·S + j < 2³¹ for the dropout counters
# the kernels' grids put sequences x heads on CUDA's y axis (at most 65535 blocks): larger batches
# run in chunks
MAX_BATCH_HEADS = 65535
LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x · log2 e), exp2 is cheaper


# Scores of one [queries × keys] tile start as the dot product's accumulator: bias / scale, so
# that s = (q·kᵀ + bias/scale) · scale · log2 e comes out of the dot already in the matmul's
# register layout (adding a separately loaded bias tile afterwards made the compiler run the whole
# softmax in the load's layout, and spill). The bias has unit stride over keys (scalar loads with
# a runtime key stride spill too). fp32's finfo.min / scale or · log2 e would overflow to -inf,
# turning "masked" (finite: a row masked everywhere averages uniformly, as in PyTorch) into
# "no key" (zeros), hence the floor `bias_floor` = -2.3e38 · min(|scale|, 1). `q_idx` and `k_idx`
# are positions within the sequence, broadcast against each other (a column and a row, either way
# round), so the same helper serves the forward (tiles of q·kᵀ) and the dK/dV backward (tiles of
# k·qᵀ). Callers clamp the indices of full blocks into the sequence, so only a tail block
# (BOUNDED) needs a load mask.
@triton.jit
def _scores_init(Bias, q_idx, k_idx, in_bounds, stride_bm, inv_scale, bias_floor,
                 HAS_BIAS: tl.constexpr, BOUNDED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    if not HAS_BIAS:
        return tl.zeros([ROWS, COLS], dtype=tl.float32)
    if BOUNDED:
        bias = tl.load(Bias + q_idx * stride_bm + k_idx, mask=in_bounds, other=0.0)
    else:
        bias = tl.load(Bias + q_idx * stride_bm + k_idx)
    bias = bias.to(tl.float32)
    return tl.where(bias == float("-inf"), bias, tl.maximum(bias, bias_floor)) * inv_scale


# Dropout keep mask of a [ROWS queries × COLS keys] tile (COLS keys from `key_start`, both
# multiples of 4). One Philox call per 4 adjacent keys of a query: for query i and keys
# 4g .. 4g+3 of sequence b, head h, the counter is (i·G + g, b·H + h, 0, 0) with G = ceil(S / 4)
# (S the padded or max length, at most MAX_DROPOUT_SEQLEN, so that i·G + g fits 31 bits), and its
# four outputs decide keys 4g, 4g+1, 4g+2, 4g+3 in that order. A key is kept when its draw is
# >= `threshold` (dropout_p · 2³², see `_keep_threshold`). The forward, both backward kernels and
# `_dropout_mask_kernel` all draw it here.
@triton.jit
def _dropout_keep(seed, batch_head, rows, key_start, groups_per_row, threshold,
                  ROWS: tl.constexpr, COLS: tl.constexpr):
    groups = key_start // 4 + tl.arange(0, COLS // 4)
    counter = (rows[:, None] * groups_per_row + groups[None, :]).to(tl.uint32, bitcast=True)
    r0, r1, r2, r3 = _philox(seed, counter, batch_head.to(tl.uint32, bitcast=True))
    # join twice: [ROWS, COLS/4, 2, 2] whose flat order is r0, r1, r2, r3 per group
    draws = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    return tl.reshape(draws, [ROWS, COLS]) >= threshold


# Philox4x32-10 (Salmon et al., SC'11) of counter (c0, c1, 0, 0) and key `seed`, the same numbers as
# tl.philox, with each round's two 32x32-bit products taken from one 64-bit product: one wide
# multiply instead of a high and a low one.
@triton.jit
def _philox(seed, c0, c1):
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    c1 = c1 + c3  # the stream number, broadcast to the counters' shape
    for _ in tl.static_range(10):
        p0 = c0.to(tl.uint64) * tl.full([], 0xD2511F53, tl.uint64)
        p2 = c2.to(tl.uint64) * tl.full([], 0xCD9E8D57, tl.uint64)
        c0, c1, c2, c3 = ((p2 >> 32).to(tl.uint32) ^ c1 ^ k0, p2.to(tl.uint32),
                          (p0 >> 32).to(tl.uint32) ^ c3 ^ k1, p0.to(tl.uint32))
        k0 = tl.add(k0, tl.full([], 0x9E3779B9, tl.uint32), sanitize_overflow=False)
        k1 = tl.add(k1, tl.full([], 0xBB67AE85, tl.uint32), sanitize_overflow=False)
    return c0, c1, c2, c3


# dropout_p as an integer threshold on a uniform uint32 draw (kept: draw >= threshold); below
# 2³² whatever the fp32 rounding of dropout_p · 2³² (4294967040 is the largest fp32 below it).
@triton.jit
def _keep_threshold(dropout_p):
    return tl.minimum(dropout_p * 4294967296.0, 4294967040.0).to(tl.uint32)


# Where sequence `b` starts (in tokens of the packed layout; 0 in the padded one) and its length,
# at most max_seqlen: cu_seqlens' values go unchecked where a CUDA graph captures or torch.compile
# traces, and a longer sequence would have its rows of the statistics written past their end.
@triton.jit
def _sequence(CuSeqlens, b, max_seqlen, PACKED: tl.constexpr):
    if PACKED:
        start = tl.load(CuSeqlens + b)
        return start, tl.minimum(tl.load(CuSeqlens + b + 1) - start, max_seqlen)
    return 0, max_seqlen


# The keys a sequence's queries may see: (n_keys, byte_mask). Keys at or past n_keys are masked.
# With a key padding mask the launcher gives each sequence its mask's length when the mask is
# right-padded (True exactly on a prefix, `_key_lengths`), else -1: then every key block of the
# sequence reads the mask's bytes (byte_mask).
@triton.jit
def _visible_keys(KeyLengths, b, seqlen, HAS_KEY_MASK: tl.constexpr):
    if HAS_KEY_MASK:
        length = tl.load(KeyLengths + b)
        return tl.where(length >= 0, tl.minimum(length, seqlen), seqlen), length < 0
    return seqlen, False


# A [rows × HEAD_DIM] tile of a [tokens, D] matrix (unit stride on D); the row mask only where
# rows may run past the sequence (BOUNDED), the dim mask only where BLOCK_D pads HEAD_DIM.
@triton.jit
def _load_rows(ptr, rows, dims, row_ok, stride, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BOUNDED: tl.constexpr):
    ptrs = ptr + rows[:, None] * stride + dims[None, :]
    if BOUNDED:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        return tl.load(ptrs, mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(dims < HEAD_DIM)[None, :], other=0.0)


# A [queries × keys] tile of scores with -inf at keys that the key padding mask's bytes hide, when
# this sequence reads them (byte_mask). The forward masks the dot's starting tile (its
# accumulator): masking the dot's result instead held the loaded bytes in registers across the
# dot, past 128 on sm_90a.
@triton.jit
def _byte_masked(scores, KeyMask, cols, key_ok, stride_mk, byte_mask, TAIL: tl.constexpr):
    if byte_mask:
        if TAIL:
            real_key = tl.load(KeyMask + cols * stride_mk, mask=key_ok, other=0)
        else:
            real_key = tl.load(KeyMask + cols * stride_mk)
        scores = tl.where(real_key[None, :] != 0, scores, float("-inf"))
    return scores


# exp2(s - max s) of a tile, from raw scores r = q·kᵀ (+ bias/scale; s = r · c, c = scale · log2 e,
# positive) and the row max m as the stats keep it. Without a bias m is kept as m·c and this is
# one FFMA per score, exp2(r·c - m·c). With one it is kept raw and this is exp2((r - m)·c): a bias
# can make scores huge (HF masks with finfo.min), and at |m·c| > 2³⁰ the rounding of m·c alone
# would reach exp2 as ±100 or more (inf or 0); r - m is exact near the max.
@triton.jit
def _exp2_shifted(qk, m, scale_log2, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        return tl.math.exp2((qk - m) * scale_log2)
    return tl.math.exp2(tl.fma(qk, scale_log2, -m))


# One key block of the forward's online softmax on raw scores (masked keys get r = -inf; m_i is
# the running max of r). TAIL: the block may run past n_keys. With a bias or a key padding mask a
# row may have seen no visible key yet (max -inf: shift by 0 instead, -inf - -inf being nan);
# otherwise every block holds a visible key for every row (a tail block starts below n_keys).
@triton.jit
def _fwd_block(acc, l_i, m_i, q, K, V, KeyMask, Bias, seed, batch_head, rows, bias_rows, dims,
               key_start, n_keys, byte_mask, stride_ks, stride_vs, stride_mk, stride_bm, scale_log2,
               inv_scale, bias_floor, groups_per_row, threshold,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, TAIL: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, precision: tl.constexpr):
    cols = key_start + tl.arange(0, BLOCK_N)
    key_ok = cols < n_keys
    k = _load_rows(K, cols, dims, key_ok, stride_ks, HEAD_DIM, BLOCK_D, TAIL)
    init = _scores_init(Bias, bias_rows[:, None], cols[None, :], key_ok[None, :], stride_bm,
                        inv_scale, bias_floor, HAS_BIAS, TAIL, BLOCK_M, BLOCK_N)
    if HAS_KEY_MASK:
        init = _byte_masked(init, KeyMask, cols, key_ok, stride_mk, byte_mask, TAIL)
    qk = tl.dot(q, tl.trans(k), init, input_precision=precision)
    if TAIL:
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    if HAS_BIAS or HAS_KEY_MASK:
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    if HAS_BIAS:
        alpha = tl.math.exp2((m_i - m_shift) * scale_log2)
    else:
        m_shift = m_shift * scale_log2
        alpha = tl.math.exp2(m_i * scale_log2 - m_shift)
    p = _exp2_shifted(qk, m_shift[:, None], scale_log2, HAS_BIAS)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if HAS_DROPOUT:  # 1 / (1 - p) is applied once, to the output
        keep = _dropout_keep(seed, batch_head, rows, key_start, groups_per_row, threshold,
                             BLOCK_M, BLOCK_N)
        p = tl.where(keep, p, 0.0)
    v = _load_rows(V, cols, dims, key_ok, stride_vs, HEAD_DIM, BLOCK_D, TAIL)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=precision)
    return acc, l_i, m_new


# The forward's loop over the keys below n_keys: full blocks unmasked, then one masked tail block.
@triton.jit
def _fwd_keys(acc, l_i, m_i, q, K, V, KeyMask, Bias, seed, batch_head, rows, bias_rows, dims,
              n_keys, byte_mask, stride_ks, stride_vs, stride_mk, stride_bm, scale_log2, inv_scale,
              bias_floor, groups_per_row, threshold,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, precision: tl.constexpr):
    # With a bias tile to load, or accumulators wider than 64, registers are short (sm_80 spills
    # with a second copy of the block code): one loop, every block bounds-checked.
    if HAS_BIAS or BLOCK_D > 64:
        for key_start in range(0, n_keys, BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, K, V, KeyMask, Bias, seed, batch_head, rows, bias_rows, dims,
                key_start, n_keys, byte_mask, stride_ks, stride_vs, stride_mk, stride_bm,
                scale_log2, inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM, BLOCK_D,
                BLOCK_M, BLOCK_N, True, HAS_KEY_MASK, HAS_BIAS, HAS_DROPOUT, precision)
        return acc, l_i, m_i
    full_end = n_keys - n_keys % BLOCK_N
    # two loops, one of which runs: the keys bounded by a length only, or the mask's bytes read
    bytes_from = tl.where(byte_mask, 0, full_end)
    for key_start in range(0, bytes_from, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, K, V, KeyMask, Bias, seed, batch_head, rows, bias_rows, dims,
            key_start, n_keys, False, stride_ks, stride_vs, stride_mk, stride_bm, scale_log2,
            inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
            False, False, HAS_BIAS, HAS_DROPOUT, precision)
    if HAS_KEY_MASK:
        for key_start in range(bytes_from, full_end, BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, K, V, KeyMask, Bias, seed, batch_head, rows, bias_rows, dims,
                key_start, n_keys, True, stride_ks, stride_vs, stride_mk, stride_bm, scale_log2,
                inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM, BLOCK_D, BLOCK_M,
                BLOCK_N, False, True, HAS_BIAS, HAS_DROPOUT, precision)
    if full_end < n_keys:
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, K, V, KeyMask, Bias, seed, batch_head, rows, bias_rows, dims,
            full_end, n_keys, byte_mask, stride_ks, stride_vs, stride_mk, stride_bm, scale_log2,
            inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
            True, HAS_KEY_MASK, HAS_BIAS, HAS_DROPOUT, precision)
    return acc, l_i, m_i


# Forward, one program per (block of BLOCK_M queries, batch·head), online softmax over key blocks
# (r = q·kᵀ + bias/scale, s = r · c with c = scale · log2 e, positive: the launcher folds a
# negative scale's sign into q):
#   m = running max of r, l = Σ exp2(s - m·c), acc = Σ exp2(s - m·c) · keep · v  (both rescaled
#   by exp2((m_old - m_new)·c) when the max grows);  out = acc · (1/l) / (1 - p)
# The backward recomputes P = exp2(s - m·c) · (1/l) from the saved m·c and 1/l, as the forward
# computed it. (A single logsumexp m + log2 l would be cheaper but loses log2 l when |m| is huge,
# e.g. a row masked everywhere by a finfo.min bias, and P with it.) Rows with no visible key
# (l = 0) store out = 0, m = 0 and 1/l = 0, so that their P is 0 in the backward. Rows past the
# sequence's end are computed on zero queries (finite: the loop has no row mask) and never stored.
@triton.jit(do_not_specialize=["seed"])  # one compiled variant whatever the seed's value
def _attention_fwd_kernel(
    Q, K, V, Out, Stats, KeyMask, KeyLengths, Bias, CuSeqlens, seed,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
    stride_mb, stride_mk, stride_bb, stride_bh, stride_bm,
    num_heads, max_seqlen, scale_log2, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ALLOW_TF32: tl.constexpr,
):
    precision: tl.constexpr = "tf32" if ALLOW_TF32 else "ieee"
    batch_head = tl.program_id(1)
    b = batch_head // num_heads
    h = batch_head % num_heads
    start, seqlen = _sequence(CuSeqlens, b, max_seqlen, PACKED)
    if tl.program_id(0) * BLOCK_M >= seqlen:
        return
    n_keys, byte_mask = _visible_keys(KeyLengths, b, seqlen, HAS_KEY_MASK)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    token0 = tl.cast(start, tl.int64)
    Q += b64 * stride_qb + token0 * stride_qs + h64 * stride_qh
    K += b64 * stride_kb + token0 * stride_ks + h64 * stride_kh
    V += b64 * stride_vb + token0 * stride_vs + h64 * stride_vh
    Out += b64 * stride_ob + token0 * stride_os + h64 * stride_oh
    KeyMask += b64 * stride_mb
    Bias += b64 * stride_bb + h64 * stride_bh

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen
    q = _load_rows(Q, rows, dims, row_ok, stride_qs, HEAD_DIM, BLOCK_D, True)
    inv_scale = tl.fdiv(1.4426950408889634, scale_log2)  # approximate: no slow-path call
    bias_floor = -2.3e38 * tl.minimum(scale_log2 / 1.4426950408889634, 1.0)
    bias_rows = tl.minimum(rows, seqlen - 1)  # rows past the end read the last row's bias
    groups_per_row = (max_seqlen + 3) // 4
    threshold = _keep_threshold(dropout_p)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_keys(
        acc, l_i, m_i, q, K, V, KeyMask, Bias, seed, batch_head, rows, bias_rows, dims, n_keys,
        byte_mask, stride_ks, stride_vs, stride_mk, stride_bm, scale_log2, inv_scale, bias_floor,
        groups_per_row, threshold, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_KEY_MASK, HAS_BIAS,
        HAS_DROPOUT, precision)
    has_keys = l_i > 0.0
    # l >= 1 where a row has keys (its max term is 1): the approximate reciprocal is exact to 2 ulp
    inv_l = tl.where(has_keys, tl.fdiv(1.0, tl.where(has_keys, l_i, 1.0)), 0.0)
    out_scale = inv_l
    if HAS_DROPOUT:
        out_scale = inv_l * tl.fdiv(1.0, 1.0 - dropout_p)
    out = acc * out_scale[:, None]
    out_ptrs = Out + rows[:, None] * stride_os + dims[None, :]
    if HEAD_DIM == BLOCK_D:
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(out_ptrs, out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :])
    Stats += batch_head.to(tl.int64) * 2 * max_seqlen
    if not HAS_BIAS:
        m_i = m_i * scale_log2
    tl.store(Stats + rows, tl.where(has_keys, m_i, 0.0), mask=row_ok)
    tl.store(Stats + max_seqlen + rows, inv_l, mask=row_ok)


# Backward preprocess: delta_i = Σ_d dO_id · O_id  (= Σ_j P_ij · dP_ij, dropout included), per row.
@triton.jit
def _attention_bwd_delta_kernel(
    Out, DO, Delta, CuSeqlens,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
    num_heads, max_seqlen,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, PACKED: tl.constexpr,
):
    batch_head = tl.program_id(1)
    b = batch_head // num_heads
    h = batch_head % num_heads
    start, seqlen = _sequence(CuSeqlens, b, max_seqlen, PACKED)
    if tl.program_id(0) * BLOCK_M >= seqlen:
        return
    token0 = tl.cast(start, tl.int64)
    Out += b.to(tl.int64) * stride_ob + token0 * stride_os + h.to(tl.int64) * stride_oh
    DO += b.to(tl.int64) * stride_dob + token0 * stride_dos + h.to(tl.int64) * stride_doh
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < seqlen)[:, None] & (dims < HEAD_DIM)[None, :]
    o = tl.load(Out + rows[:, None] * stride_os + dims[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dos + dims[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + batch_head.to(tl.int64) * max_seqlen + rows, delta, mask=rows < seqlen)


# One query block of the dK/dV backward (tiles transposed, [keys × queries]). Keys are not masked
# here: a masked key's row of Pᵀ only feeds its own rows of dK and dV, which the kernel zeroes.
# TAIL: the block may run past the sequence: its rows load as zeros with m = 1/l = delta = 0, so
# their P is exactly 0 (a bias is not read there) and nothing reaches the sums.
@triton.jit
def _dkdv_block(dk, dv, k, v, Q, DO, Stats, Delta, Bias, seed, batch_head, key_start, bias_cols, dims,
                query_start, seqlen, max_seqlen, stride_qs, stride_dos, stride_bm, scale_log2,
                inv_scale, bias_floor, groups_per_row, threshold, keep_fraction,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, TAIL: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, precision: tl.constexpr):
    rows = query_start + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen
    q = _load_rows(Q, rows, dims, row_ok, stride_qs, HEAD_DIM, BLOCK_D, TAIL)
    do = _load_rows(DO, rows, dims, row_ok, stride_dos, HEAD_DIM, BLOCK_D, TAIL)
    if TAIL:
        row_max = tl.load(Stats + rows, mask=row_ok, other=0.0)
        inv_sum = tl.load(Stats + max_seqlen + rows, mask=row_ok, other=0.0)
        delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
    else:
        row_max = tl.load(Stats + rows)
        inv_sum = tl.load(Stats + max_seqlen + rows)
        delta = tl.load(Delta + rows)
    init = _scores_init(Bias, rows[None, :], bias_cols[:, None], row_ok[None, :], stride_bm,
                        inv_scale, bias_floor, HAS_BIAS, TAIL, BLOCK_N, BLOCK_M)
    qk_t = tl.dot(k, tl.trans(q), init, input_precision=precision)
    p_t = _exp2_shifted(qk_t, row_max[None, :], scale_log2, HAS_BIAS) * inv_sum[None, :]
    dp_t = tl.dot(v, tl.trans(do), input_precision=precision)
    if HAS_DROPOUT:  # 1 / (1 - p) is applied once, to the sums, hence delta · (1 - p)
        keep_t = tl.trans(_dropout_keep(seed, batch_head, rows, key_start, groups_per_row, threshold,
                                        BLOCK_M, BLOCK_N))
        dv += tl.dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, input_precision=precision)
        ds_t = p_t * (tl.where(keep_t, dp_t, 0.0) - (delta * keep_fraction)[None, :])
    else:
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=precision)
        ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=precision)
    return dk, dv


# Backward for one block of BLOCK_N keys, looping over query blocks (P recomputed from the
# forward's m·c and 1/l, Z = keep mask, D = delta, k = 1 / (1 - p) or 1 without dropout):
#   P = exp2(s - m·c) · (1/l),  dV = k · Σ_i (P∘Z)ᵀ·dO,  dP = (dO·Vᵀ)∘Z·k,  dS = P∘(dP - D),
#   dK = scale · Σ_i dSᵀ·Q = scale · k · Σ_i (P∘((dO·Vᵀ)∘Z - D/k))ᵀ·Q
# Tiles are kept transposed ([keys × queries]) so that no register tile needs transposing. Full
# query blocks run unmasked, then one masked tail block. Keys that no query sees (past the
# sequence's visible keys, or masked by the mask's bytes) store zero gradients; a block of them
# only (padding, with a right-padded mask) skips the loop.
@triton.jit(do_not_specialize=["seed"])
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Stats, Delta, KeyMask, KeyLengths, Bias, CuSeqlens, seed,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_mb, stride_mk, stride_bb, stride_bh, stride_bm,
    num_heads, max_seqlen, scale, scale_log2, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ALLOW_TF32: tl.constexpr,
):
    precision: tl.constexpr = "tf32" if ALLOW_TF32 else "ieee"
    batch_head = tl.program_id(1)
    b = batch_head // num_heads
    h = batch_head % num_heads
    start, seqlen = _sequence(CuSeqlens, b, max_seqlen, PACKED)
    key_start = tl.program_id(0) * BLOCK_N
    if key_start >= seqlen:
        return
    n_keys, byte_mask = _visible_keys(KeyLengths, b, seqlen, HAS_KEY_MASK)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    token0 = tl.cast(start, tl.int64)
    Q += b64 * stride_qb + token0 * stride_qs + h64 * stride_qh
    K += b64 * stride_kb + token0 * stride_ks + h64 * stride_kh
    V += b64 * stride_vb + token0 * stride_vs + h64 * stride_vh
    DO += b64 * stride_dob + token0 * stride_dos + h64 * stride_doh
    DK += b64 * stride_dkb + token0 * stride_dks + h64 * stride_dkh
    DV += b64 * stride_dvb + token0 * stride_dvs + h64 * stride_dvh
    Stats += batch_head.to(tl.int64) * 2 * max_seqlen
    Delta += batch_head.to(tl.int64) * max_seqlen
    KeyMask += b64 * stride_mb
    Bias += b64 * stride_bb + h64 * stride_bh

    cols = key_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    in_sequence = cols < seqlen
    visible = cols < n_keys
    if HAS_KEY_MASK:
        real_key = tl.load(KeyMask + cols * stride_mk, mask=in_sequence, other=0) != 0
        visible = tl.where(byte_mask, real_key, visible)
    k = _load_rows(K, cols, dims, in_sequence, stride_ks, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V, cols, dims, in_sequence, stride_vs, HEAD_DIM, BLOCK_D, True)
    inv_scale = tl.fdiv(1.4426950408889634, scale_log2)  # approximate: no slow-path call
    bias_floor = -2.3e38 * tl.minimum(scale_log2 / 1.4426950408889634, 1.0)
    bias_cols = tl.minimum(cols, seqlen - 1)  # keys past the end read the last key's bias
    groups_per_row = (max_seqlen + 3) // 4
    threshold = _keep_threshold(dropout_p)
    keep_fraction = 1.0 - dropout_p
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # no query sees these keys: skip the loop (their gradients are zeros)
    queries = tl.where(key_start < n_keys, seqlen, 0)
    # full query blocks unmasked, then the tail; with a bias tile or accumulators wider than 64
    # every block is bounds-checked (sm_80 spills with a second copy of the block code)
    if HAS_BIAS or BLOCK_D > 64:
        masked_from = 0
    else:
        masked_from = queries - queries % BLOCK_M
    for query_start in range(0, masked_from, BLOCK_M):
        dk, dv = _dkdv_block(
            dk, dv, k, v, Q, DO, Stats, Delta, Bias, seed, batch_head, key_start, bias_cols, dims,
            query_start, seqlen, max_seqlen, stride_qs, stride_dos, stride_bm, scale_log2,
            inv_scale, bias_floor, groups_per_row, threshold, keep_fraction, HEAD_DIM, BLOCK_D,
            BLOCK_M, BLOCK_N, False, HAS_BIAS, HAS_DROPOUT, precision)
    for query_start in range(masked_from, queries, BLOCK_M):
        dk, dv = _dkdv_block(
            dk, dv, k, v, Q, DO, Stats, Delta, Bias, seed, batch_head, key_start, bias_cols, dims,
            query_start, seqlen, max_seqlen, stride_qs, stride_dos, stride_bm, scale_log2,
            inv_scale, bias_floor, groups_per_row, threshold, keep_fraction, HEAD_DIM, BLOCK_D,
            BLOCK_M, BLOCK_N, True, HAS_BIAS, HAS_DROPOUT, precision)
    dk_scale = scale
    dv_scale = 1.0
    if HAS_DROPOUT:
        dv_scale = tl.fdiv(1.0, keep_fraction)
        dk_scale = scale * dv_scale
    # where, not a product: a masked key's row may hold inf or nan
    dk = tl.where(visible[:, None], dk * dk_scale, 0.0)
    dv = tl.where(visible[:, None], dv * dv_scale, 0.0)
    store_mask = in_sequence[:, None] & (dims < HEAD_DIM)[None, :]
    tl.store(DK + cols[:, None] * stride_dks + dims[None, :], dk.to(DK.dtype.element_ty),
             mask=store_mask)
    tl.store(DV + cols[:, None] * stride_dvs + dims[None, :], dv.to(DV.dtype.element_ty),
             mask=store_mask)


# One key block of the dQ backward (rows past the sequence are never stored: no row mask).
@triton.jit
def _dq_block(dq, q, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, seed, batch_head, rows,
              bias_rows, dims, key_start, n_keys, byte_mask, stride_ks, stride_vs, stride_mk,
              stride_bm, scale_log2, inv_scale, bias_floor, groups_per_row, threshold,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, TAIL: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, precision: tl.constexpr):
    cols = key_start + tl.arange(0, BLOCK_N)
    key_ok = cols < n_keys
    k = _load_rows(K, cols, dims, key_ok, stride_ks, HEAD_DIM, BLOCK_D, TAIL)
    v = _load_rows(V, cols, dims, key_ok, stride_vs, HEAD_DIM, BLOCK_D, TAIL)
    init = _scores_init(Bias, bias_rows[:, None], cols[None, :], key_ok[None, :], stride_bm,
                        inv_scale, bias_floor, HAS_BIAS, TAIL, BLOCK_M, BLOCK_N)
    qk = tl.dot(q, tl.trans(k), init, input_precision=precision)
    if TAIL:
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
    if HAS_KEY_MASK:
        qk = _byte_masked(qk, KeyMask, cols, key_ok, stride_mk, byte_mask, TAIL)
    p = _exp2_shifted(qk, row_max[:, None], scale_log2, HAS_BIAS) * inv_sum[:, None]
    dp = tl.dot(do, tl.trans(v), input_precision=precision)
    if HAS_DROPOUT:  # delta arrives as delta · (1 - p): 1 / (1 - p) is applied once, to dQ
        keep = _dropout_keep(seed, batch_head, rows, key_start, groups_per_row, threshold,
                             BLOCK_M, BLOCK_N)
        dp = tl.where(keep, dp, 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=precision)


@triton.jit
def _dq_keys(dq, q, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, seed, batch_head, rows,
             bias_rows, dims, n_keys, byte_mask, stride_ks, stride_vs, stride_mk, stride_bm,
             scale_log2, inv_scale, bias_floor, groups_per_row, threshold,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
             HAS_DROPOUT: tl.constexpr, precision: tl.constexpr):
    # full key blocks unmasked, then the tail; with a bias tile or accumulators wider than 64 every
    # block is bounds-checked (sm_80 spills with a second copy of the block code)
    if HAS_BIAS or BLOCK_D > 64:
        masked_from = 0
    else:
        masked_from = n_keys - n_keys % BLOCK_N
    for key_start in range(0, masked_from, BLOCK_N):
        dq = _dq_block(dq, q, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, seed, batch_head,
                       rows, bias_rows, dims, key_start, n_keys, byte_mask, stride_ks, stride_vs,
                       stride_mk, stride_bm, scale_log2, inv_scale, bias_floor, groups_per_row,
                       threshold, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, HAS_KEY_MASK, HAS_BIAS,
                       HAS_DROPOUT, precision)
    for key_start in range(masked_from, n_keys, BLOCK_N):
        dq = _dq_block(dq, q, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, seed, batch_head,
                       rows, bias_rows, dims, key_start, n_keys, byte_mask, stride_ks, stride_vs,
                       stride_mk, stride_bm, scale_log2, inv_scale, bias_floor, groups_per_row,
                       threshold, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, HAS_KEY_MASK, HAS_BIAS,
                       HAS_DROPOUT, precision)
    return dq


# Backward for one block of BLOCK_M queries, looping over key blocks (full blocks unmasked, one
# masked tail block):
#   P = exp2(s - m·c) · (1/l),  dP = (dO·Vᵀ)∘Z·k,  dS = P∘(dP - D),
#   dQ = scale · Σ_j dS·K = scale · k · Σ_j (P∘((dO·Vᵀ)∘Z - D/k))·K
@triton.jit(do_not_specialize=["seed"])
def _attention_bwd_dq_kernel(
    Q, K, V, DO, DQ, Stats, Delta, KeyMask, KeyLengths, Bias, CuSeqlens, seed,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_mb, stride_mk, stride_bb, stride_bh, stride_bm,
    num_heads, max_seqlen, scale, scale_log2, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ALLOW_TF32: tl.constexpr,
):
    precision: tl.constexpr = "tf32" if ALLOW_TF32 else "ieee"
    batch_head = tl.program_id(1)
    b = batch_head // num_heads
    h = batch_head % num_heads
    start, seqlen = _sequence(CuSeqlens, b, max_seqlen, PACKED)
    if tl.program_id(0) * BLOCK_M >= seqlen:
        return
    n_keys, byte_mask = _visible_keys(KeyLengths, b, seqlen, HAS_KEY_MASK)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    token0 = tl.cast(start, tl.int64)
    Q += b64 * stride_qb + token0 * stride_qs + h64 * stride_qh
    K += b64 * stride_kb + token0 * stride_ks + h64 * stride_kh
    V += b64 * stride_vb + token0 * stride_vs + h64 * stride_vh
    DO += b64 * stride_dob + token0 * stride_dos + h64 * stride_doh
    DQ += b64 * stride_dqb + token0 * stride_dqs + h64 * stride_dqh
    KeyMask += b64 * stride_mb
    Bias += b64 * stride_bb + h64 * stride_bh

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen
    q = _load_rows(Q, rows, dims, row_ok, stride_qs, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO, rows, dims, row_ok, stride_dos, HEAD_DIM, BLOCK_D, True)
    Stats += batch_head.to(tl.int64) * 2 * max_seqlen
    row_max = tl.load(Stats + rows, mask=row_ok, other=0.0)
    inv_sum = tl.load(Stats + max_seqlen + rows, mask=row_ok, other=0.0)
    delta = tl.load(Delta + batch_head.to(tl.int64) * max_seqlen + rows, mask=row_ok, other=0.0)
    inv_scale = tl.fdiv(1.4426950408889634, scale_log2)  # approximate: no slow-path call
    bias_floor = -2.3e38 * tl.minimum(scale_log2 / 1.4426950408889634, 1.0)
    bias_rows = tl.minimum(rows, seqlen - 1)  # rows past the end read the last row's bias
    groups_per_row = (max_seqlen + 3) // 4
    threshold = _keep_threshold(dropout_p)
    dq_scale = scale
    if HAS_DROPOUT:
        delta = delta * (1.0 - dropout_p)
        dq_scale = scale * tl.fdiv(1.0, 1.0 - dropout_p)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # a sequence whose mask is not a prefix reads its bytes in every key block; the others run a
    # copy of the loops without that code
    if byte_mask:
        dq = _dq_keys(dq, q, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, seed, batch_head,
                      rows, bias_rows, dims, n_keys, byte_mask, stride_ks, stride_vs, stride_mk,
                      stride_bm, scale_log2, inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM,
                      BLOCK_D, BLOCK_M, BLOCK_N, HAS_KEY_MASK, HAS_BIAS, HAS_DROPOUT, precision)
    else:
        dq = _dq_keys(dq, q, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, seed, batch_head,
                      rows, bias_rows, dims, n_keys, byte_mask, stride_ks, stride_vs, stride_mk,
                      stride_bm, scale_log2, inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM,
                      BLOCK_D, BLOCK_M, BLOCK_N, False, HAS_BIAS, HAS_DROPOUT, precision)
    dq_mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    tl.store(DQ + rows[:, None] * stride_dqs + dims[None, :], (dq * dq_scale).to(DQ.dtype.element_ty),
             mask=dq_mask)


# The dropout keep mask as a tensor [B, H, S, S], drawn exactly as the attention kernels draw it.
@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(Keep, seed, max_seqlen, dropout_p, BLOCK: tl.constexpr):
    batch_head = tl.program_id(1)
    row = tl.program_id(0) + tl.zeros([1], dtype=tl.int32)
    groups_per_row = (max_seqlen + 3) // 4
    threshold = _keep_threshold(dropout_p)
    for key_start in range(0, max_seqlen, BLOCK):
        keep = tl.reshape(_dropout_keep(seed, batch_head, row, key_start, groups_per_row, threshold,
                                        1, BLOCK), [BLOCK])
        k_idx = key_start + tl.arange(0, BLOCK)
        offsets = (batch_head.to(tl.int64) * max_seqlen + row) * max_seqlen + k_idx
        tl.store(Keep + offsets, keep.to(tl.int8), mask=k_idx < max_seqlen)


# Launch configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed by (precision, head-dim
# bucket, has bias). Every one is listed in compile_cases() and checked there to compile without
# register spills for sm_80 and sm_90a, for every head dim it serves. What the registers must hold
# grows with the head dim (the [rows, D] fp32 accumulators), with fp32 operands, with a bias tile
# (loaded, then moved into the dot's layout) and with dropout's Philox rounds; the biggest tiles
# that stay spill-free with all of them are below. Precision "16" is fp16/bf16 (tensor cores),
# "tf32" is fp32 on tensor cores, "ieee" is fp32 on the FMA units (no wgmma, so small tiles).
_FWD_CONFIGS = {
    ("16", 64, False): (128, 64, 8, 2),
    ("16", 64, True): (128, 64, 8, 2),
    ("16", 128, False): (128, 64, 8, 2),
    ("16", 128, True): (64, 64, 4, 2),
    ("tf32", 64, False): (64, 32, 4, 2),
    ("tf32", 64, True): (64, 32, 4, 2),
    ("tf32", 128, False): (64, 32, 4, 2),
    ("tf32", 128, True): (64, 32, 4, 2),
    ("ieee", 64, False): (32, 32, 4, 1),
    ("ieee", 64, True): (32, 32, 4, 1),
    ("ieee", 128, False): (16, 16, 4, 1),
    ("ieee", 128, True): (16, 16, 4, 1),
}
# Dropout's Philox rounds at head dims above 64 (the [rows, D] accumulators twice as wide): 32-key
# blocks, half the draws per block. (A single 128-key block for sequences up to 128 keys is not
# used: on sm_80 its 128 keys of K fragments spill, and on sm_90a it needs ~176 registers, one CTA
# per SM, where 128x64 keeps two.)
_FWD_DROPOUT_CONFIGS = {
    ("16", 128, False): (128, 32, 8, 2),
    ("16", 128, True): (64, 32, 4, 2),
}
_BWD_CONFIGS = {  # (dK/dV kernel config, dQ kernel config)
    ("16", 64, False): ((32, 64, 4, 2), (128, 32, 8, 2)),
    # dK/dV with a bias: 32-query blocks spill on sm_80 with dropout's draws
    ("16", 64, True): ((16, 64, 4, 1), (128, 32, 8, 2)),
    ("16", 128, False): ((16, 64, 4, 2), (64, 32, 4, 2)),
    ("16", 128, True): ((16, 64, 4, 2), (64, 32, 4, 1)),
    ("tf32", 64, False): ((16, 64, 4, 1), (64, 16, 4, 1)),
    ("tf32", 64, True): ((16, 64, 4, 1), (64, 16, 4, 1)),
    # TF32 dK/dV with D >= 80: 64-key tiles (wgmma's minimum) spill, fp32 K, V, dK and dV tiles
    # being 4x as many registers as fp16 K, V; 32-key tiles run on mma.sync instead of wgmma
    ("tf32", 128, False): ((16, 32, 4, 1), (64, 16, 4, 1)),
    ("tf32", 128, True): ((16, 32, 4, 1), (64, 16, 4, 1)),
    # dK/dV with dropout: 32-key tiles spill (D = 64 on sm_90a; with a bias, D = 32 on sm_80)
    ("ieee", 64, False): ((16, 16, 4, 1), (16, 16, 4, 1)),
    ("ieee", 64, True): ((16, 16, 4, 1), (16, 16, 4, 1)),
    ("ieee", 128, False): ((16, 16, 4, 1), (16, 16, 4, 1)),
    # dQ: with 4 warps, a bias and dropout's 64-bit seed argument spill at D = 80, 96 on sm_90a
    ("ieee", 128, True): ((16, 16, 4, 1), (16, 16, 8, 1)),
}
_DELTA_BLOCK_M = 64
_DROPOUT_MASK_BLOCK = 128


def _config_key(head_dim, dtype, allow_tf32, has_bias):
    precision = "16" if dtype != torch.float32 else ("tf32" if allow_tf32 else "ieee")
    return precision, 64 if head_dim <= 64 else 128, has_bias


def _fwd_config(head_dim, dtype, allow_tf32, has_bias, has_dropout):
    key = _config_key(head_dim, dtype, allow_tf32, has_bias)
    return _FWD_DROPOUT_CONFIGS.get(key, _FWD_CONFIGS[key]) if has_dropout else _FWD_CONFIGS[key]


def _bwd_configs(head_dim, dtype, allow_tf32, has_bias):
    return _BWD_CONFIGS[_config_key(head_dim, dtype, allow_tf32, has_bias)]


def _layout(q, cu_seqlens, max_seqlen):
    """(batch, heads, padded or max sequence length) of either layout."""
    if cu_seqlens is None:
        return q.shape[0], q.shape[2], q.shape[1]
    return cu_seqlens.shape[0] - 1, q.shape[1], max_seqlen


def _bsh_strides(tensor, packed):
    """Strides over (sequence, token, head); the packed layout finds sequences via cu_seqlens."""
    return (0, *tensor.stride()[:2]) if packed else tensor.stride()[:3]


def _unused(device, dtype):
    """Placeholder for an absent optional tensor (its kernel flag is off, it is never read)."""
    return torch.empty(0, dtype=dtype, device=device)


def _mask_bias_args(q, key_padding_mask, bias, batch, heads, max_seqlen):
    """(key mask bytes, key lengths, bias, their strides) as the kernels take them."""
    if key_padding_mask is None:
        mask, mask_strides = _unused(q.device, torch.uint8), (0, 0)
        lengths = _unused(q.device, torch.int32)
    else:
        mask = key_padding_mask.view(torch.uint8)  # same bytes; Triton loads it as u8
        mask_strides = mask.stride()
        lengths = _key_lengths(key_padding_mask)
    if bias is None:
        bias, bias_strides = _unused(q.device, q.dtype), (0, 0, 0)
    else:
        bias, bias_strides = _aligned_bias(bias, batch, heads, max_seqlen)
    return mask, lengths, bias, (*mask_strides, *bias_strides)


def _key_lengths(key_padding_mask):
    """int32 [B]: each sequence's number of real keys where its mask row is right-padded (True
    exactly on a prefix, BERT's usual batch: the kernels then bound the keys by the length and read
    no mask bytes), else -1 (the kernels read the bytes). Computed on the device, no host read, and
    remembered while the mask is unchanged: every layer of a forward, and its backward, pass the
    same mask."""
    return remembered(key_padding_mask, _lengths_of_prefixes)


def _lengths_of_prefixes(key_padding_mask):
    lengths = key_padding_mask.sum(1, dtype=torch.int32)
    positions = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)
    prefix = (key_padding_mask == (positions < lengths[:, None])).all(1)
    return torch.where(prefix, lengths, -1)


def _positive_scale(q, scale):
    """(q, scale) with scale >= 0, as the kernels take them: a negative scale's sign goes into q
    (the forward takes its running max before scaling; dQ then changes sign)."""
    return (q, scale) if scale >= 0 else (-q, -scale)


def _scale_log2(scale):
    """scale (>= 0) · log2 e as the kernels take it, at least 1e-30 · log2 e: a masked score -inf
    times 0 would be nan. The scores change by at most 1e-30 · |q·k|: nothing in fp32."""
    return max(scale, 1e-30) * LOG2E


def _bias_strides(bias):
    """Strides over (sequence, head, query, key) of a [B, H, S, S] bias, 0 where broadcast."""
    return [0 if size == 1 else stride for size, stride in zip(bias.shape, bias.stride())]


def _aligned_bias(bias, batch, heads, max_seqlen):
    """The bias as the kernels read it: [B, H, S, S] with unit stride over keys and its other
    strides multiples of 16 elements (0 where broadcast), so that every row starts 16-element
    aligned and loads as wide vectors (loads of unknown alignment go element by element, a 64-bit
    address each, and spill). Copied, rows padded, only where it is not so already. Returns the
    bias and its (sequence, head, query) strides."""
    bias = bias.expand(batch, heads, max_seqlen, max_seqlen)  # broadcast dims get stride 0
    strides = _bias_strides(bias)
    if strides[3] != 1 or any(stride % 16 for stride in strides[:3]):
        varying = [size if stride else 1 for size, stride in zip(bias.shape[:3], strides[:3])]
        aligned = bias.new_empty(*varying, cdiv(max_seqlen, 16) * 16)[..., :max_seqlen]
        aligned.copy_(bias[tuple(slice(0, size) for size in varying)])
        bias = aligned.expand(batch, heads, max_seqlen, max_seqlen)
        strides = _bias_strides(bias)
    return bias, strides[:3]


@launches_on_input_device
def _attention_fwd_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
    bias: torch.Tensor | None, cu_seqlens: torch.Tensor | None, seed: torch.Tensor | None,
    max_seqlen: int, scale: float, dropout_p: float, allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    packed = cu_seqlens is not None
    batch, heads, _ = _layout(q, cu_seqlens, max_seqlen)
    head_dim = q.shape[-1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # packed: rows past a sequence's end have no query and are never written; zeros keep them defined
    stats = (torch.zeros if packed else torch.empty)((batch, heads, 2, max_seqlen), dtype=torch.float32,
                                                     device=q.device)
    mask, lengths, bias, mask_bias_strides = _mask_bias_args(q, key_padding_mask, bias, batch, heads,
                                                             max_seqlen)
    block_m, block_n, num_warps, num_stages = _fwd_config(
        head_dim, q.dtype, allow_tf32, bias.numel() > 0, seed is not None)
    q, scale = _positive_scale(q, scale)
    _attention_fwd_kernel[(cdiv(max_seqlen, block_m), batch * heads)](
        q, k, v, out, stats, mask, lengths, bias,
        cu_seqlens if packed else _unused(q.device, torch.int32), _seed_argument(seed, q),
        *_bsh_strides(q, packed), *_bsh_strides(k, packed), *_bsh_strides(v, packed),
        *_bsh_strides(out, packed), *mask_bias_strides,
        heads, max_seqlen, _scale_log2(scale), dropout_p,
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), BLOCK_M=block_m,
        BLOCK_N=block_n, PACKED=packed, HAS_KEY_MASK=key_padding_mask is not None,
        HAS_BIAS=bias.numel() > 0, HAS_DROPOUT=seed is not None, ALLOW_TF32=allow_tf32,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, stats


_attention_fwd = torch.library.custom_op("fastencoder::attention_fwd", _attention_fwd_impl, mutates_args=())


@_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, bias, cu_seqlens, seed, max_seqlen, scale, dropout_p, allow_tf32):
    batch, heads, _ = _layout(q, cu_seqlens, max_seqlen)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (batch, heads, 2, max_seqlen), dtype=torch.float32
    )


@launches_on_input_device
def _attention_bwd_impl(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    stats: torch.Tensor, key_padding_mask: torch.Tensor | None, bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None, seed: torch.Tensor | None, max_seqlen: int, scale: float,
    dropout_p: float, allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    packed = cu_seqlens is not None
    batch, heads, _ = _layout(q, cu_seqlens, max_seqlen)
    head_dim = q.shape[-1]
    block_d = next_power_of_2(head_dim)
    if do.stride(-1) != 1:
        do = do.contiguous()
    cu_seqlens = cu_seqlens if packed else _unused(q.device, torch.int32)
    seed_arg = _seed_argument(seed, q)
    mask, lengths, bias, mask_bias_strides = _mask_bias_args(q, key_padding_mask, bias, batch, heads,
                                                             max_seqlen)
    negative_scale = scale < 0
    q, scale = _positive_scale(q, scale)
    flags = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, PACKED=packed,
        HAS_KEY_MASK=key_padding_mask is not None, HAS_BIAS=bias.numel() > 0,
        HAS_DROPOUT=seed is not None, ALLOW_TF32=allow_tf32,
    )
    qkv_do_strides = (*_bsh_strides(q, packed), *_bsh_strides(k, packed),
                      *_bsh_strides(v, packed), *_bsh_strides(do, packed))

    delta = torch.empty((batch, heads, max_seqlen), dtype=torch.float32, device=q.device)
    _attention_bwd_delta_kernel[(cdiv(max_seqlen, _DELTA_BLOCK_M), batch * heads)](
        out, do, delta, cu_seqlens, *_bsh_strides(out, packed), *_bsh_strides(do, packed),
        heads, max_seqlen,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=_DELTA_BLOCK_M, PACKED=packed,
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    (dkdv_m, dkdv_n, dkdv_warps, dkdv_stages), (dq_m, dq_n, dq_warps, dq_stages) = _bwd_configs(
        head_dim, q.dtype, allow_tf32, bias.numel() > 0)
    _attention_bwd_dkdv_kernel[(cdiv(max_seqlen, dkdv_n), batch * heads)](
        q, k, v, do, dk, dv, stats, delta, mask, lengths, bias, cu_seqlens, seed_arg,
        *qkv_do_strides, *_bsh_strides(dk, packed), *_bsh_strides(dv, packed), *mask_bias_strides,
        heads, max_seqlen, scale, _scale_log2(scale), dropout_p,
        BLOCK_M=dkdv_m, BLOCK_N=dkdv_n, **flags, num_warps=dkdv_warps, num_stages=dkdv_stages,
    )
    _attention_bwd_dq_kernel[(cdiv(max_seqlen, dq_m), batch * heads)](
        q, k, v, do, dq, stats, delta, mask, lengths, bias, cu_seqlens, seed_arg,
        *qkv_do_strides, *_bsh_strides(dq, packed), *mask_bias_strides,
        heads, max_seqlen, scale, _scale_log2(scale), dropout_p,
        BLOCK_M=dq_m, BLOCK_N=dq_n, **flags, num_warps=dq_warps, num_stages=dq_stages,
    )
    if negative_scale:  # the kernels' dQ is the gradient of -q
        dq.neg_()
    return dq, dk, dv


_attention_bwd = torch.library.custom_op("fastencoder::attention_bwd", _attention_bwd_impl, mutates_args=())


@_attention_bwd.register_fake
def _(do, q, k, v, out, stats, key_padding_mask, bias, cu_seqlens, seed, max_seqlen, scale,
      dropout_p, allow_tf32):
    return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, bias, cu_seqlens, seed, max_seqlen, scale, dropout_p, allow_tf32 = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, key_padding_mask, bias, cu_seqlens, seed)
    ctx.arguments = (max_seqlen, scale, dropout_p, allow_tf32)


def _backward(ctx, dout, _dstats):
    q, k, v, out, stats, key_padding_mask, bias, cu_seqlens, seed = ctx.saved_tensors
    dq, dk, dv = _call_attention_bwd(
        dout, q, k, v, out, stats, key_padding_mask, bias, cu_seqlens, seed, *ctx.arguments
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
_call_attention_fwd = direct_when_eager(_attention_fwd, _attention_fwd_impl, _backward, _setup_context)
_call_attention_bwd = direct_when_eager(_attention_bwd, _attention_bwd_impl)


def _draw_dropout_seed():
    """The Philox seed of one attention call, from torch's default CPU generator, as an int64 CPU
    tensor: torch.compile traces this draw (and replays it at run time) where reading an int would
    break the graph; the ops read the int from CPU memory. From 2**31 on, every seed reaches Triton
    as the same 64-bit integer type (smaller ones would compile a 32-bit variant)."""
    return torch.randint(2**31, 2**63 - 1, (), dtype=torch.int64, device="cpu")


def _seed_argument(seed, launched_on):
    """The seed as the kernels launched on `launched_on`'s device take it: a scalar (0 where dropout
    is off and it goes unread). Read from CPU memory: no device synchronisation. Refused while a
    CUDA graph captures there: the graph would keep this seed, and every replay the same mask."""
    if seed is None:
        return 0
    if capturing(launched_on):
        raise RuntimeError(
            "the Triton attention's dropout cannot be captured in a CUDA graph: its seed is fixed at "
            "capture, so every replay would repeat the same dropout mask. Capture with dropout_p=0 "
            "(a model in eval mode, or attention_probs_dropout_prob=0), or run attention on the "
            "PyTorch path, whose dropout draws anew per replay: set_backend('torch')")
    return int(seed)


def _dropout_keep_mask(seed, batch, heads, max_seqlen, dropout_p, device):
    """Boolean [batch, heads, S, S] mask of the probabilities the kernels keep for this seed (by
    position within each sequence, in both layouts): the exact mask, drawn by the same code."""
    keep = torch.empty((batch, heads, max_seqlen, max_seqlen), dtype=torch.int8, device=device)
    with on_device_of(keep):
        _dropout_mask_kernel[(max_seqlen, batch * heads)](
            keep, _seed_argument(seed, keep), max_seqlen, dropout_p, BLOCK=_DROPOUT_MASK_BLOCK
        )
    return keep.bool()


def _padded_reference(q, k, v, key_padding_mask, bias, scale, dropout_p, dropout_mask):
    compute = torch.promote_types(q.dtype, torch.float32)
    qh, kh, vh = (t.to(compute).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    scores = (qh @ kh.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(compute)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    # rows with no visible key give zeros; softmax of finite placeholders keeps gradients finite
    no_keys = (scores == float("-inf")).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(no_keys, 0.0), dim=-1).masked_fill(no_keys, 0.0)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return (probs @ vh).transpose(1, 2).to(q.dtype).contiguous()


def attention_reference(q, k, v, *, key_padding_mask=None, bias=None, scale=None, dropout_p=0.0,
                        cu_seqlens=None, max_seqlen=None, dropout_mask=None):
    """PyTorch reference of `attention`, computed in fp32 (or in q's dtype when that is wider:
    float64 inputs give a float64 reference), result in q's dtype.

    dropout_mask: optional boolean [B, H, S, S] (S = max_seqlen in the packed layout, indexed by
    positions within each sequence) of the probabilities kept; without it dropout_p > 0 draws
    torch's own dropout, which is not the kernels' mask.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        if q.shape[1] == 0:
            return torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return _padded_reference(q, k, v, key_padding_mask, bias, scale, dropout_p, dropout_mask)
    batch, heads, _ = _layout(q, cu_seqlens, max_seqlen)
    if bias is not None:
        bias = bias.expand(batch, heads, max_seqlen, max_seqlen)
    bounds = cu_seqlens.tolist()
    outs = [torch.empty((0, *q.shape[1:]), dtype=q.dtype, device=q.device)]
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end == start:
            continue
        length = end - start
        window = (slice(b, b + 1), slice(None), slice(0, length), slice(0, length))
        outs.append(_padded_reference(
            q[start:end][None], k[start:end][None], v[start:end][None], None,
            None if bias is None else bias[window], scale, dropout_p,
            None if dropout_mask is None else dropout_mask[window],
        )[0])
    return torch.cat(outs)


def attention_torch(q, k, v, *, key_padding_mask=None, bias=None, scale=None, dropout_p=0.0,
                    cu_seqlens=None, max_seqlen=None):
    """The fast PyTorch path of `attention` (same arguments, same semantics): whichever
    `F.scaled_dot_product_attention` backend torch picks for the device (flash, memory-efficient,
    cuDNN, or its fused CPU kernel), on strided [B, H, S, D] views of the inputs, no copies.

    Rows with no visible key give zeros, as in the kernels. The packed layout is scattered into a
    zero-padded [B, max_seqlen] batch by index ops, attended with the padding masked and gathered
    back: no host read, no loop over sequences. (One SDPA call per sequence on views instead was
    measured on a 2-core CPU, MiniLM-L6 B16-32 x S128 at 40-50 % padding: 10 % faster with one
    thread, 15 % slower with two on a busy machine, and it reads cu_seqlens back.) Dropout
    (dropout_p > 0) is SDPA's own, drawn from torch's generator: the kernels' distribution, not
    their mask. Gradients reach q, k, v, and a bias that requires grad.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        return _padded_torch(q, k, v, key_padding_mask, bias, scale, dropout_p)
    batch = cu_seqlens.shape[0] - 1
    flat, key_mask = _packed_positions(cu_seqlens, q.shape[0], max_seqlen)
    q, k, v = _scattered(q, k, v, flat, batch * max_seqlen)
    q, k, v = (t.view(batch, max_seqlen, *t.shape[1:]) for t in (q, k, v))
    if bias is None:  # every query row sees a key (see _packed_positions): SDPA as it is
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask[:, None, None, :],
            dropout_p=dropout_p, scale=scale).transpose(1, 2)
    else:
        out = _padded_torch(q, k, v, key_mask, bias, scale, dropout_p)
    return out.reshape(batch * max_seqlen, *out.shape[2:]).index_select(0, flat)


def _scattered(q, k, v, flat, positions):
    """q, k, v [T, H, D] scattered to rows `flat` of zero-filled [positions, H, D] tensors. Views of
    one fused [T, 3, H, D] projection (what the models pass) are scattered as one tensor, outside
    autograd and tracing: one fill and one copy instead of three."""
    heads, dim = q.shape[1:]
    step = heads * dim
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    fused = not (needs_grad or torch.compiler.is_compiling()) and q.stride() == k.stride() == v.stride() == (
        3 * step, dim, 1) and k.data_ptr() - q.data_ptr() == v.data_ptr() - k.data_ptr() == step * q.element_size()
    if not fused:
        return (t.new_zeros((positions, heads, dim)).index_copy_(0, flat, t) for t in (q, k, v))
    qkv = q.as_strided((q.shape[0], 3, heads, dim), (3 * step, step, dim, 1))
    return q.new_zeros((positions, 3, heads, dim)).index_copy_(0, flat, qkv).unbind(1)


def _padded_torch(q, k, v, key_padding_mask, bias, scale, dropout_p):
    if _needs_exact_backward(q, k, v, key_padding_mask, bias):
        return _padded_reference(q, k, v, key_padding_mask, bias, scale, dropout_p, None)
    mask, no_keys = _sdpa_mask(key_padding_mask, bias, q.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p,
        scale=scale)
    if no_keys is not None:
        out = out.masked_fill(no_keys, 0.0)
    return out.transpose(1, 2).contiguous()  # SDPA's output is laid out [B, S, H, D] already


def _sdpa_mask(key_padding_mask, bias, device):
    """(SDPA's attn_mask, a mask of the query rows that see no key, or None).

    SDPA's backends disagree on rows with every key masked (NaN, or zeros); such rows get a
    harmless mask (every key visible, no -inf) and their output is zeroed afterwards, so no NaN
    reaches the forward or the backward. On the CPU the rare case is looked for first (reading a
    CPU tensor waits for nothing): without it, no extra pass; a padding mask without padding is
    dropped, as Hugging Face does, so that SDPA runs unmasked. On a GPU, and under torch.compile
    (which cannot branch on data), both run unconditionally (a device-to-host read would stall the
    stream)."""
    read = key_padding_mask if bias is None else bias  # what the CPU's look reads, if anything
    on_cpu = read is not None and device.type == "cpu" and not capturing_or_compiling(read)
    if bias is None:
        if key_padding_mask is None or (on_cpu and key_padding_mask.all()):
            return None, None
        no_keys = ~key_padding_mask.any(-1)
        if on_cpu and not no_keys.any():
            return key_padding_mask[:, None, None, :], None
        return (key_padding_mask | no_keys[:, None])[:, None, None, :], no_keys[:, None, None, None]
    if key_padding_mask is not None:
        bias = bias.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    no_keys = (bias == float("-inf")).all(-1, keepdim=True)
    if on_cpu and not no_keys.any():
        return bias, None
    return bias.masked_fill(no_keys, 0.0), no_keys


# Below this, a row's largest visible bias swamps its scores' logsumexp in fp32 rounding (Hugging
# Face's finfo.min masks a row everywhere that way: the forward averages the visible values
# uniformly, as the kernels do). SDPA's backward recomputes P as exp(s - logsumexp) and would get
# such rows wrong (P = 1 instead of 1 / keys): with gradients needed they run `_padded_reference`.
SWAMPING_BIAS = -1e3


def _needs_exact_backward(q, k, v, key_padding_mask, bias):
    """Whether this call's gradients must come from the unfused math (see SWAMPING_BIAS). Reads
    one flag back from the device: only for a bias, with gradients needed; under torch.compile,
    which cannot branch on data, and in a CUDA graph capture, such calls always take the unfused
    math."""
    if bias is None or not torch.is_grad_enabled() or not any(
            t.requires_grad for t in (q, k, v, bias)):
        return False
    if capturing_or_compiling(bias):
        return True
    if key_padding_mask is not None:
        bias = bias.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    largest = bias.amax(-1)
    return bool(((largest < SWAMPING_BIAS) & (largest > float("-inf"))).any())


def _packed_positions(cu_seqlens, tokens, max_seqlen):
    """(int64 [T]: each token's flat position b·max_seqlen + s in the padded batch, bool
    [B, max_seqlen]: True at the real tokens, and at every position of an empty sequence, whose
    query rows are never gathered back: so every query row sees a key), computed on the device
    without a host read, and remembered while cu_seqlens is unchanged: every layer of a
    padding-free forward passes the same cu_seqlens."""
    return remembered(cu_seqlens, _positions_in_padded_batch, tokens, max_seqlen)


def _positions_in_padded_batch(cu_seqlens, tokens, max_seqlen):
    device = cu_seqlens.device
    starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff().long()
    sequence = torch.repeat_interleave(torch.arange(lengths.shape[0], device=device), lengths,
                                       output_size=tokens)
    within = torch.arange(tokens, device=device) - starts[sequence]
    # a sequence longer than max_seqlen (unchecked while capturing or compiling) stays in its row
    flat = sequence * max_seqlen + within.clamp_(max=max_seqlen - 1)
    key_mask = (torch.arange(max_seqlen, device=device) < lengths[:, None]) | (lengths == 0)[:, None]
    return flat, key_mask


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_inputs(q, k, v, key_padding_mask, bias, scale, dropout_p, cu_seqlens, max_seqlen):
    check_float("q", q)
    check_like("k", k, q, "q")
    check_like("v", v, q, "q")
    packed = cu_seqlens is not None
    if q.dim() != (3 if packed else 4):
        raise ValueError(
            f"q must be [T, H, D] with cu_seqlens (packed layout) or [B, S, H, D] without, got "
            f"shape {tuple(q.shape)} {'with' if packed else 'without'} cu_seqlens"
        )
    for name, tensor in (("k", k), ("v", v)):
        if tensor.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(tensor.shape)}")
    if scale is not None and not (_is_number(scale) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None (1/sqrt(head dim)), got {scale!r}")
    if not (_is_number(dropout_p) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if packed:
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask cannot be used with cu_seqlens: the packed layout "
                             "holds real tokens only")
        _check_cu_seqlens(cu_seqlens, max_seqlen, q)
    elif max_seqlen is not None:
        raise ValueError("max_seqlen is only for the packed layout (with cu_seqlens)")
    batch, heads, seqlen = _layout(q, cu_seqlens, max_seqlen)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(
                "key_padding_mask must be a torch.bool tensor (True = real token), got "
                f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}; "
                "for a Hugging Face attention_mask pass attention_mask.bool()"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        if tuple(key_padding_mask.shape) != (batch, seqlen):
            raise ValueError(f"key_padding_mask must have shape [B, S] = {(batch, seqlen)}, got "
                             f"{tuple(key_padding_mask.shape)}")
    if bias is not None:
        check_like("bias", bias, q, "q")
        target = (batch, heads, seqlen, seqlen)
        if bias.dim() > 4 or any(n not in (1, t) for n, t in zip(bias.shape[::-1], target[::-1])):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to [B, H, S, S] "
                             f"= {target}")


def _well_formed(q, k, v, key_padding_mask, bias, scale, dropout_p, cu_seqlens, max_seqlen):
    """A model's call (padded with at most a key padding mask, or packed; no bias, default scale)
    found valid in a few attribute reads, cu_seqlens' values aside; the full checks, whose messages
    explain a refusal, run for the others. Per-call host time is what small batches wait for."""
    if not (bias is None and scale is None and type(dropout_p) is float and 0.0 <= dropout_p < 1.0
            and type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
            and q.dtype in FLOAT_DTYPES and k.dtype == q.dtype == v.dtype and k.device == q.device == v.device
            and k.shape == q.shape == v.shape):
        return False
    if cu_seqlens is not None:
        return key_padding_mask is None and q.dim() == 3
    return max_seqlen is None and q.dim() == 4 and (key_padding_mask is None or (
        type(key_padding_mask) is torch.Tensor and key_padding_mask.dtype == torch.bool
        and key_padding_mask.device == q.device and key_padding_mask.shape == q.shape[:2]))


def _check_cu_seqlens(cu_seqlens, max_seqlen, q):
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError("cu_seqlens must be 1-D [B + 1] with B >= 1, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be an int >= 1 (and >= the longest sequence), got {max_seqlen!r}")
    if capturing_or_compiling(cu_seqlens):
        return  # values unread (see _sequence: the kernels cut a sequence to max_seqlen)
    bounds = remembered(cu_seqlens, torch.Tensor.tolist)  # read back, to refuse bad values up front
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or min(lengths) < 0 or bounds[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at T = {q.shape[0]} (q's tokens), "
            f"got {bounds if len(bounds) <= 10 else bounds[:5] + ['...'] + bounds[-2:]}"
        )
    if max_seqlen < max(lengths):
        raise ValueError(f"max_seqlen must be an int >= the longest sequence ({max(lengths)}) and "
                         f">= 1, got {max_seqlen!r}")


def attention(q, k, v, *, key_padding_mask=None, bias=None, scale=None, dropout_p=0.0,
              cu_seqlens=None, max_seqlen=None):
    """Multi-head attention softmax(q·kᵀ·scale + mask)·v, non-causal, with optional dropout.

    q, k, v: [B, S, H, D] (padded layout; any strides on B, S, H, unit stride on D) or [T, H, D]
        with cu_seqlens (int32 [B + 1], cumulative lengths from 0) and max_seqlen (an int, at
        least the longest sequence): the packed layout. cu_seqlens' values are checked on the host,
        except while a CUDA graph captures or torch.compile traces (a read back would fail the
        capture): there the kernels cut a sequence longer than max_seqlen to its first max_seqlen
        tokens, which attend among themselves, and leave its later rows of the output (and of
        the gradients) unwritten; nothing outside the sequence's rows is touched.
    key_padding_mask: bool [B, S], True = real token (padded layout only).
    bias: additive, q's dtype, broadcastable to [B, H, S, S] (S = max_seqlen when packed; -inf and
        finfo.min allowed). Its gradient is not computed: a bias that requires grad is refused.
    scale: default 1/sqrt(D). dropout_p: in [0, 1), dropout on the probabilities (kept ones
        scaled by 1/(1-p)); the seed comes from torch's default CPU generator.
    float16, bfloat16 and float32 all run in the kernels (float32 with fp32 dot products, or TF32
    where torch allows it for cuBLAS matmuls: torch.backends.cuda.matmul.fp32_precision or
    torch.backends.fp32_precision "tf32", or the legacy allow_tf32). Head dims 16, 32, 64, 80, 96,
    128 run in the kernels, others on the PyTorch path (`attention_torch`), as does every call the
    backend switch (kernels/backend.py) does not give to the kernels.
    Returns a contiguous tensor of q's shape; rows whose keys are all masked are zeros.
    """
    if not _well_formed(q, k, v, key_padding_mask, bias, scale, dropout_p, cu_seqlens, max_seqlen):
        _check_inputs(q, k, v, key_padding_mask, bias, scale, dropout_p, cu_seqlens, max_seqlen)
    elif cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, max_seqlen, q)
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if not backend.use_triton(q.device, q.dtype) or head_dim not in SUPPORTED_HEAD_DIMS:
        return attention_torch(q, k, v, key_padding_mask=key_padding_mask, bias=bias, scale=scale,
                               dropout_p=dropout_p, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride on its last (head) dim, got strides "
                             f"{tensor.stride()}; call .contiguous() first")
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("the Triton attention does not compute the gradient of bias; "
                                  "detach it, or use set_backend('torch')")
    max_seqlen = q.shape[1] if cu_seqlens is None else max_seqlen
    if dropout_p > 0 and max_seqlen > MAX_DROPOUT_SEQLEN:
        raise ValueError(f"the Triton attention's dropout supports sequences up to "
                         f"{MAX_DROPOUT_SEQLEN} tokens, got {max_seqlen}")
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch, heads, _ = _layout(q, cu_seqlens, max_seqlen)
    if heads > MAX_BATCH_HEADS:
        raise ValueError(f"the Triton attention takes at most {MAX_BATCH_HEADS} heads, got {heads}")
    if batch * heads > MAX_BATCH_HEADS:
        return _in_batch_chunks(q, k, v, key_padding_mask, bias, scale, dropout_p, cu_seqlens, max_seqlen)
    seed = _draw_dropout_seed() if dropout_p > 0 else None
    allow_tf32 = q.dtype == torch.float32 and backend.allows_tf32()
    return _call_attention_fwd(q, k, v, key_padding_mask, bias, cu_seqlens, seed, max_seqlen, scale,
                          dropout_p, allow_tf32)[0]


def _in_batch_chunks(q, k, v, key_padding_mask, bias, scale, dropout_p, cu_seqlens, max_seqlen):
    """`attention` over chunks of at most MAX_BATCH_HEADS // heads sequences, concatenated."""
    batch, heads, _ = _layout(q, cu_seqlens, max_seqlen)
    per_bias_batch = bias is not None and bias.dim() == 4 and bias.shape[0] > 1
    if cu_seqlens is not None and capturing(cu_seqlens):
        raise NotImplementedError(
            f"the Triton attention runs more than {MAX_BATCH_HEADS} sequences x heads in chunks whose "
            f"tokens it finds by reading cu_seqlens back, which a CUDA graph capture cannot do: pass "
            f"at most {MAX_BATCH_HEADS // heads} sequences a call there, or use set_backend('torch')")
    bounds = None if cu_seqlens is None else remembered(cu_seqlens, torch.Tensor.tolist)
    outs, per_chunk = [], MAX_BATCH_HEADS // heads
    for first in range(0, batch, per_chunk):
        last = min(first + per_chunk, batch)
        sequences = slice(first, last)
        options = dict(scale=scale, dropout_p=dropout_p, bias=bias[sequences] if per_bias_batch else bias)
        if cu_seqlens is None:
            rows = sequences
            options["key_padding_mask"] = None if key_padding_mask is None else key_padding_mask[sequences]
        else:
            rows = slice(bounds[first], bounds[last])
            options.update(cu_seqlens=cu_seqlens[first:last + 1] - bounds[first], max_seqlen=max_seqlen)
        outs.append(attention(q[rows], k[rows], v[rows], **options))
    return torch.cat(outs)


_TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_POINTER_TYPES = dict(Stats="*fp32", Delta="*fp32", KeyMask="*u8", KeyLengths="*i32", CuSeqlens="*i32", Keep="*i8")
_SCALAR_TYPES = dict(scale="fp32", scale_log2="fp32", dropout_p="fp32", seed="i64")


def _signature(kernel, element_type, constexprs):
    """Argument types of `kernel` as launched: tensors of the input dtype unless listed above."""
    names = inspect.signature(kernel.fn).parameters
    return {
        name: _POINTER_TYPES.get(name, f"*{element_type}" if name[0].isupper() else
                                 _SCALAR_TYPES.get(name, "i32"))
        for name in names if name not in constexprs
    }


def _uses_wgmma(kernel, config, dtype, allow_tf32):
    """Whether sm_90a code must show wgmma (HGMMA): tensor-core dot products (16-bit or TF32; fp32
    "ieee" runs on the FMA units) whose tiles have the 64 rows a warpgroup instruction needs (the
    dK/dV kernel's dots have BLOCK_N rows, the others' BLOCK_M)."""
    rows = config[1] if kernel is _attention_bwd_dkdv_kernel else config[0]
    return (dtype != torch.float32 or allow_tf32) and rows >= 64


_KERNEL_NAMES = {
    _attention_fwd_kernel: "attention_fwd",
    _attention_bwd_dkdv_kernel: "attention_bwd_dkdv",
    _attention_bwd_dq_kernel: "attention_bwd_dq",
}


# BERT-family models run 16-bit attention at these head dims (BERT and ALBERT 64, MiniLM 32): every
# layout and dropout variant they launch is compiled. Elsewhere each config compiles once, with
# the register-heaviest flags it is launched with.
_EVERY_VARIANT_HEAD_DIMS = (32, 64)


def _launches(head_dim, dtype, allow_tf32):
    """[(kernel, config, flags)] for every config launched at this head dim and precision.

    At the BERT-family precisions and head dims: each layout (padded without a mask, with a key
    padding mask, packed) with and without dropout, and with a bias its heaviest variant. Elsewhere
    one variant per config, with the key mask, dropout and (if it serves a bias) the bias: every
    flag only adds to the same tiles (a mask or bias load, Philox rounds), and the padded layout
    with a key mask is heavier than the packed one, which differs only in two scalar loads of
    cu_seqlens before the tiles."""
    every = dtype != torch.float32 and head_dim in _EVERY_VARIANT_HEAD_DIMS

    def flags(layout, has_bias, has_dropout):
        return dict(PACKED=layout == "packed", HAS_KEY_MASK=layout == "mask", HAS_BIAS=has_bias,
                    HAS_DROPOUT=has_dropout)

    launches = {}  # keyed by (kernel, config) alone where one variant stands for the config
    for has_bias in (False, True):  # a config serving both keeps the heavier flags, with the bias
        dkdv, dq = _bwd_configs(head_dim, dtype, allow_tf32, has_bias)
        for has_dropout in (False, True):
            fwd = _fwd_config(head_dim, dtype, allow_tf32, has_bias, has_dropout)
            for kernel, config in ((_attention_fwd_kernel, fwd), (_attention_bwd_dkdv_kernel, dkdv),
                                   (_attention_bwd_dq_kernel, dq)):
                if every and not has_bias:
                    for layout in ("padded", "mask", "packed"):
                        variant = flags(layout, False, has_dropout)
                        launches[kernel, config, tuple(variant.values())] = variant
                elif every:
                    launches[kernel, config, "bias"] = flags("mask", True, True)
                elif has_dropout or (kernel, config) not in launches:
                    launches[kernel, config] = flags("mask", has_bias, has_dropout)
    return [(key[0], key[1], variant) for key, variant in launches.items()]


def _flags_name(flags):
    names = dict(PACKED=" +packed", HAS_KEY_MASK=" +mask", HAS_BIAS=" +bias", HAS_DROPOUT=" +dropout")
    return "".join(names[flag] for flag, on in flags.items() if on)


def _runtime_specialisation(flags):
    """Argument values Triton specialises launches on, as the launcher passes them: a key mask
    [B, S] has unit stride over keys (an integer 1 compiles as the constant); without one both
    mask strides are 0, a multiple of 16."""
    return dict(stride_mk=1) if flags["HAS_KEY_MASK"] else {}


# The q/k/v/out/grad strides are multiples of 16 elements (head dims are) and so are the bias's
# (`_aligned_bias`): Triton specialises launches on that, and it is what lets tiles load as wide
# vectors. A key mask's row stride and max_seqlen are left unknown, as for any sequence length.
def _divisible_by_16(signature, flags=None):
    unknown = ("stride_mb", "stride_mk") if flags is None or flags["HAS_KEY_MASK"] else ()
    return [name for name in signature if name.startswith("stride") and name not in unknown]


def compile_cases():
    """Every launched config x dtype x head dim, for the static kernel report (kernels/report.py)."""
    for dtype, type_name in _TYPE_NAMES.items():
        fp32 = dtype == torch.float32
        for allow_tf32 in (False, True) if fp32 else (False,):
            precision = (" tf32" if allow_tf32 else " ieee") if fp32 else ""
            for head_dim in SUPPORTED_HEAD_DIMS:
                dims = dict(HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim))
                for kernel, config, flags in _launches(head_dim, dtype, allow_tf32):
                    block_m, block_n, num_warps, num_stages = config
                    constexprs = dict(**dims, BLOCK_M=block_m, BLOCK_N=block_n, **flags,
                                      ALLOW_TF32=allow_tf32, **_runtime_specialisation(flags))
                    signature = _signature(kernel, type_name, constexprs)
                    yield dict(
                        name=f"{_KERNEL_NAMES[kernel]} {block_m}x{block_n} w{num_warps} s{num_stages} "
                             f"D={head_dim} {type_name}{precision}{_flags_name(flags)}",
                        fn=kernel, signature=signature, constexprs=constexprs,
                        divisible_by_16=_divisible_by_16(signature, flags), num_warps=num_warps,
                        num_stages=num_stages, matmul=_uses_wgmma(kernel, config, dtype, allow_tf32),
                    )
                if allow_tf32:
                    continue  # the delta kernel has no dot product: fp32 is one kernel
                # its heaviest variant: the packed one adds only the two scalar loads
                constexprs = dict(**dims, BLOCK_M=_DELTA_BLOCK_M, PACKED=True)
                signature = _signature(_attention_bwd_delta_kernel, type_name, constexprs)
                yield dict(
                    name=f"attention_bwd_delta D={head_dim} {type_name} +packed",
                    fn=_attention_bwd_delta_kernel, signature=signature, constexprs=constexprs,
                    divisible_by_16=_divisible_by_16(signature), num_warps=4, num_stages=1,
                    matmul=False,
                )
    constexprs = dict(BLOCK=_DROPOUT_MASK_BLOCK)
    yield dict(
        name="attention_dropout_mask", fn=_dropout_mask_kernel,
        signature=_signature(_dropout_mask_kernel, "fp32", constexprs), constexprs=constexprs,
        num_warps=4, num_stages=1, matmul=False,
    )
