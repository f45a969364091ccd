"""The attention forward kernel: online softmax over key blocks (FlashAttention-2)."""
try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from .._no_triton import tl, triton

from .._launch import batch_generic
from .dropout import _dropout_keep, _keep_threshold
from .rotary import _half_dims, _load_rotated
from .tiles import (
    _byte_masked, _edge_block, _edge_blocks, _exp2_shifted, _in_window, _load_rows, _scores_init, _sequence,
    _visible_keys, _window_blocks,
)


# One key block of the forward's online softmax on raw scores (masked keys get r = -inf; m_i is
# the running max of r). TAIL: the block may run past n_keys. BAND: a window's edge block, keys
# outside a row's window masked too. With a dense bias, a key padding mask or a band a row may have
# seen no visible key yet (max -inf: shift by 0 instead, -inf - -inf being nan); otherwise every
# block holds a visible key for every row (a tail block starts below n_keys; a relative bias's
# table is finite, `_relative_bias_rows`).
@triton.jit
def _fwd_block(acc, l_i, m_i, q, q2, K, V, KeyMask, Bias, Cos, Sin, seed, batch_head, rows, bias_rows, dims,
               key_start, n_keys, byte_mask, window, stride_ks, stride_vs, stride_mk, stride_bm, scale_log2,
               inv_scale, bias_floor, groups_per_row, threshold,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, TAIL: tl.constexpr, BAND: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
               HAS_BIAS: tl.constexpr, RELATIVE_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               ROTARY: tl.constexpr, precision: tl.constexpr):
    cols = key_start + tl.arange(0, BLOCK_N)
    key_ok = cols < n_keys
    init = _scores_init(Bias, bias_rows[:, None], cols[None, :], key_ok[None, :], stride_bm,
                        inv_scale, bias_floor, HAS_BIAS, RELATIVE_BIAS, TAIL, BLOCK_M, BLOCK_N)
    if HAS_KEY_MASK:
        init = _byte_masked(init, KeyMask, cols, key_ok, stride_mk, byte_mask, TAIL)
    if ROTARY:  # q holds the rotated q's first half, q2 its second: two dot products over D/2
        k, k2 = _load_rotated(K, Cos, Sin, cols, _half_dims(BLOCK_D), key_ok, stride_ks, HEAD_DIM, TAIL)
        qk = tl.dot(q2, tl.trans(k2), tl.dot(q, tl.trans(k), init, input_precision=precision),
                    input_precision=precision)
    else:
        k = _load_rows(K, cols, dims, key_ok, stride_ks, HEAD_DIM, BLOCK_D, TAIL)
        qk = tl.dot(q, tl.trans(k), init, input_precision=precision)
    if TAIL:
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
    if BAND:
        qk = tl.where(_in_window(rows[:, None], cols[None, :], window), qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    if HAS_BIAS and not RELATIVE_BIAS or HAS_KEY_MASK or BAND:
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


# The forward's loop over the keys below n_keys: whole blocks unmasked, then one masked tail
# block. With a window (WINDOW) only the blocks some row's window reaches: its edges masked by the
# band (whole blocks, one loop for both edges), the interior unmasked (`_window_blocks`).
@triton.jit
def _fwd_keys(acc, l_i, m_i, q, q2, K, V, KeyMask, Bias, Cos, Sin, seed, batch_head, rows, bias_rows, dims,
              n_keys, byte_mask, window, stride_ks, stride_vs, stride_mk, stride_bm, scale_log2, inv_scale,
              bias_floor, groups_per_row, threshold,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
              RELATIVE_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, WINDOW: tl.constexpr,
              ROTARY: tl.constexpr, precision: tl.constexpr):
    full_end = n_keys - n_keys % BLOCK_N
    if WINDOW:
        lo, inner_lo, inner_hi, whole, tail = _window_blocks(tl.program_id(0) * BLOCK_M, n_keys, full_end,
                                                             window, BLOCK_M, BLOCK_N)
    else:
        lo, inner_lo, inner_hi, whole, tail = 0, 0, full_end, full_end, full_end < n_keys
    # With a dense bias tile to load, accumulators wider than 64 or fp32 dot products on the FMA
    # units ("ieee": the operands in registers), registers are short (a second copy of the block
    # code spills, up to 1.3 KB for "ieee" at D = 64): one loop, every block bounds-checked (and
    # banded). A relative bias's rows load as aligned vectors and fit the loops below.
    if (HAS_BIAS or precision == "ieee") and not RELATIVE_BIAS or BLOCK_D > 64:
        for key_start in range(lo, tl.where(tail, n_keys, whole), BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, q2, K, V, KeyMask, Bias, Cos, Sin, seed, batch_head, rows, bias_rows, dims,
                key_start, n_keys, byte_mask, window, stride_ks, stride_vs, stride_mk, stride_bm,
                scale_log2, inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM, BLOCK_D,
                BLOCK_M, BLOCK_N, True, WINDOW, HAS_KEY_MASK, HAS_BIAS, RELATIVE_BIAS, HAS_DROPOUT, ROTARY, precision)
        return acc, l_i, m_i
    if WINDOW:
        for edge in range(0, _edge_blocks(lo, inner_lo, inner_hi, whole, BLOCK_N)):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, q2, K, V, KeyMask, Bias, Cos, Sin, seed, batch_head, rows, bias_rows, dims,
                _edge_block(edge, lo, inner_lo, inner_hi, BLOCK_N), n_keys, byte_mask, window, stride_ks,
                stride_vs, stride_mk, stride_bm, scale_log2, inv_scale, bias_floor, groups_per_row, threshold,
                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, True, HAS_KEY_MASK, HAS_BIAS, RELATIVE_BIAS,
                HAS_DROPOUT, ROTARY, precision)
    # two loops over the interior, one of which runs: the keys bounded by a length only, or the
    # mask's bytes read
    bytes_from = tl.where(byte_mask, inner_lo, inner_hi)
    for key_start in range(inner_lo, bytes_from, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, q2, K, V, KeyMask, Bias, Cos, Sin, seed, batch_head, rows, bias_rows, dims,
            key_start, n_keys, False, window, stride_ks, stride_vs, stride_mk, stride_bm, scale_log2,
            inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
            False, False, False, HAS_BIAS, RELATIVE_BIAS, HAS_DROPOUT, ROTARY, precision)
    if HAS_KEY_MASK:
        for key_start in range(bytes_from, inner_hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, q2, K, V, KeyMask, Bias, Cos, Sin, seed, batch_head, rows, bias_rows, dims,
                key_start, n_keys, True, window, stride_ks, stride_vs, stride_mk, stride_bm, scale_log2,
                inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM, BLOCK_D, BLOCK_M,
                BLOCK_N, False, False, True, HAS_BIAS, RELATIVE_BIAS, HAS_DROPOUT, ROTARY, precision)
    if tail:
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, q2, K, V, KeyMask, Bias, Cos, Sin, seed, batch_head, rows, bias_rows, dims,
            full_end, n_keys, byte_mask, window, stride_ks, stride_vs, stride_mk, stride_bm, scale_log2,
            inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
            True, WINDOW, HAS_KEY_MASK, HAS_BIAS, RELATIVE_BIAS, HAS_DROPOUT, ROTARY, precision)
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
@batch_generic("seed", "num_heads", "max_seqlen", "stride_mb", "window")
def _attention_fwd_kernel(
    Q, K, V, Out, Stats, KeyMask, KeyLengths, Bias, Cos, Sin, CuSeqlens, seed,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
    stride_mb, stride_mk, stride_bb, stride_bh, stride_bm,
    num_heads, max_seqlen, scale_log2, dropout_p, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, RELATIVE_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, WINDOW: tl.constexpr, ROTARY: tl.constexpr, ALLOW_TF32: tl.constexpr,
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
    if ROTARY:  # rotated once, as its two halves
        q, q2 = _load_rotated(Q, Cos, Sin, rows, _half_dims(BLOCK_D), row_ok, stride_qs, HEAD_DIM, True)
    else:
        q = _load_rows(Q, rows, dims, row_ok, stride_qs, HEAD_DIM, BLOCK_D, True)
        q2 = q
    inv_scale = tl.fdiv(1.4426950408889634, scale_log2)  # approximate: no slow-path call
    bias_floor = -2.3e38 * tl.minimum(scale_log2 / 1.4426950408889634, 1.0)
    bias_rows = tl.minimum(rows, seqlen - 1)  # rows past the end read the last row's bias
    groups_per_row = (max_seqlen + 3) // 4
    threshold = _keep_threshold(dropout_p)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_keys(
        acc, l_i, m_i, q, q2, K, V, KeyMask, Bias, Cos, Sin, seed, batch_head, rows, bias_rows, dims, n_keys,
        byte_mask, window, stride_ks, stride_vs, stride_mk, stride_bm, scale_log2, inv_scale, bias_floor,
        groups_per_row, threshold, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_KEY_MASK, HAS_BIAS, RELATIVE_BIAS,
        HAS_DROPOUT, WINDOW, ROTARY, precision)
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
