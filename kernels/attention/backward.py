"""The attention backward kernels: delta = rowsum(dO * O), dK/dV per key block, dQ per query
block, each recomputing P from the forward's statistics."""
try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from .._no_triton import tl, triton

from .._launch import batch_generic
from .dropout import _dropout_keep, _keep_threshold
from .rotary import _half_dims, _load_rotated, _store_rotated_back
from .tiles import (
    _byte_masked, _edge_block, _edge_blocks, _exp2_shifted, _in_window, _load_rows, _scores_init, _sequence,
    _visible_keys, _window_blocks,
)


# Backward preprocess: delta_i = Σ_d dO_id · O_id  (= Σ_j P_ij · dP_ij, dropout included), per row.
@batch_generic("num_heads", "max_seqlen")
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
# their P is exactly 0 (a bias is not read there) and nothing reaches the sums. BAND: a window's
# edge block, pairs outside the window get P = 0 (and dS = 0).
@triton.jit
def _dkdv_block(dk, dk2, dv, k, k2, v, Q, DO, Stats, Delta, Bias, DBias, Cos, Sin, seed, batch_head, key_start,
                bias_cols,
                visible, dims, query_start, seqlen, max_seqlen, window, stride_qs, stride_dos, stride_bm, scale_log2,
                inv_scale, bias_floor, groups_per_row, threshold, keep_fraction,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, TAIL: tl.constexpr, BAND: tl.constexpr, HAS_BIAS: tl.constexpr,
                RELATIVE_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, ROTARY: tl.constexpr,
                precision: tl.constexpr):
    rows = query_start + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen
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
                        inv_scale, bias_floor, HAS_BIAS, RELATIVE_BIAS, TAIL, BLOCK_N, BLOCK_M)
    if ROTARY:  # k, k2: the rotated k's halves; q rotated as loaded
        q, q2 = _load_rotated(Q, Cos, Sin, rows, _half_dims(BLOCK_D), row_ok, stride_qs, HEAD_DIM, TAIL)
        qk_t = tl.dot(k2, tl.trans(q2), tl.dot(k, tl.trans(q), init, input_precision=precision),
                      input_precision=precision)
    else:
        q = _load_rows(Q, rows, dims, row_ok, stride_qs, HEAD_DIM, BLOCK_D, TAIL)
        qk_t = tl.dot(k, tl.trans(q), init, input_precision=precision)
    if BAND:
        cols = key_start + tl.arange(0, BLOCK_N)
        qk_t = tl.where(_in_window(rows[None, :], cols[:, None], window), qk_t, float("-inf"))
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
    if RELATIVE_BIAS:  # the table's gradient: dS summed per distance k - q (keys visible only)
        counted = visible[:, None] & row_ok[None, :]
        cols = key_start + tl.arange(0, BLOCK_N)
        tl.atomic_add(DBias + (stride_bm // 2 + cols[:, None] - rows[None, :]),
                      tl.where(counted, ds_t, 0.0), mask=counted, sem="relaxed")
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=precision)
    if ROTARY:
        dk2 += tl.dot(ds_t.to(q.dtype), q2, input_precision=precision)
    return dk, dk2, dv


# Backward for one block of BLOCK_N keys, looping over query blocks (P recomputed from the
# forward's m·c and 1/l, Z = keep mask, D = delta, k = 1 / (1 - p) or 1 without dropout):
#   P = exp2(s - m·c) · (1/l),  dV = k · Σ_i (P∘Z)ᵀ·dO,  dP = (dO·Vᵀ)∘Z·k,  dS = P∘(dP - D),
#   dK = scale · Σ_i dSᵀ·Q = scale · k · Σ_i (P∘((dO·Vᵀ)∘Z - D/k))ᵀ·Q
# Tiles are kept transposed ([keys × queries]) so that no register tile needs transposing. Full
# query blocks run unmasked, then one masked tail block. Keys that no query sees (past the
# sequence's visible keys, or masked by the mask's bytes) store zero gradients; a block of them
# only (padding, with a right-padded mask) skips the loop.
@batch_generic("seed", "num_heads", "max_seqlen", "stride_mb", "window")
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Stats, Delta, KeyMask, KeyLengths, Bias, DBias, Cos, Sin, CuSeqlens, seed,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_mb, stride_mk, stride_bb, stride_bh, stride_bm,
    num_heads, max_seqlen, scale, scale_log2, dropout_p, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, RELATIVE_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, WINDOW: tl.constexpr, ROTARY: tl.constexpr, ALLOW_TF32: tl.constexpr,
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
    DBias += h64 * stride_bm  # the gradient's table, T's layout without the copies: [H, stride_bm]

    cols = key_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    in_sequence = cols < seqlen
    visible = cols < n_keys
    if HAS_KEY_MASK:
        real_key = tl.load(KeyMask + cols * stride_mk, mask=in_sequence, other=0) != 0
        visible = tl.where(byte_mask, real_key, visible)
    if ROTARY:  # rotated once, as its two halves, and so are dK's sums
        k, k2 = _load_rotated(K, Cos, Sin, cols, _half_dims(BLOCK_D), in_sequence, stride_ks, HEAD_DIM, True)
        dk = tl.zeros([BLOCK_N, _half_dims(BLOCK_D).shape[0]], dtype=tl.float32)
        dk2 = tl.zeros([BLOCK_N, _half_dims(BLOCK_D).shape[0]], dtype=tl.float32)
    else:
        k = _load_rows(K, cols, dims, in_sequence, stride_ks, HEAD_DIM, BLOCK_D, True)
        k2 = k
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dk2 = 0.0
    v = _load_rows(V, cols, dims, in_sequence, stride_vs, HEAD_DIM, BLOCK_D, True)
    inv_scale = tl.fdiv(1.4426950408889634, scale_log2)  # approximate: no slow-path call
    bias_floor = -2.3e38 * tl.minimum(scale_log2 / 1.4426950408889634, 1.0)
    bias_cols = tl.minimum(cols, seqlen - 1)  # keys past the end read the last key's bias
    groups_per_row = (max_seqlen + 3) // 4
    threshold = _keep_threshold(dropout_p)
    keep_fraction = 1.0 - dropout_p
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # no query sees these keys: skip the loop (their gradients are zeros)
    queries = tl.where(key_start < n_keys, seqlen, 0)
    full_end = queries - queries % BLOCK_M
    if WINDOW:  # the query blocks whose windows reach these keys: edges banded, the interior not
        lo, inner_lo, inner_hi, whole, tail = _window_blocks(key_start, queries, full_end, window, BLOCK_N,
                                                             BLOCK_M)
    else:
        lo, inner_lo, inner_hi, whole, tail = 0, 0, full_end, full_end, full_end < queries
    # whole query blocks unmasked, then the tail (and a window's edges); with a bias tile or
    # accumulators wider than 64 every block is bounds-checked (sm_80 spills with a second copy of
    # the block code)
    if HAS_BIAS or BLOCK_D > 64:
        for query_start in range(lo, tl.where(tail, queries, whole), BLOCK_M):
            dk, dk2, dv = _dkdv_block(
                dk, dk2, dv, k, k2, v, Q, DO, Stats, Delta, Bias, DBias, Cos, Sin, seed, batch_head, key_start,
                bias_cols, visible, dims, query_start, seqlen, max_seqlen, window, stride_qs, stride_dos, stride_bm,
                scale_log2, inv_scale, bias_floor, groups_per_row, threshold, keep_fraction, HEAD_DIM, BLOCK_D,
                BLOCK_M, BLOCK_N, True, WINDOW, HAS_BIAS, RELATIVE_BIAS, HAS_DROPOUT, ROTARY, precision)
    else:
        if WINDOW:
            for edge in range(0, _edge_blocks(lo, inner_lo, inner_hi, whole, BLOCK_M)):
                dk, dk2, dv = _dkdv_block(
                    dk, dk2, dv, k, k2, v, Q, DO, Stats, Delta, Bias, DBias, Cos, Sin, seed, batch_head, key_start,
                    bias_cols, visible, dims, _edge_block(edge, lo, inner_lo, inner_hi, BLOCK_M), seqlen, max_seqlen,
                    window, stride_qs, stride_dos, stride_bm, scale_log2, inv_scale, bias_floor, groups_per_row,
                    threshold, keep_fraction, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, True, HAS_BIAS,
                    RELATIVE_BIAS, HAS_DROPOUT, ROTARY, precision)
        for query_start in range(inner_lo, inner_hi, BLOCK_M):
            dk, dk2, dv = _dkdv_block(
                dk, dk2, dv, k, k2, v, Q, DO, Stats, Delta, Bias, DBias, Cos, Sin, seed, batch_head, key_start,
                bias_cols, visible, dims, query_start, seqlen, max_seqlen, window, stride_qs, stride_dos, stride_bm,
                scale_log2, inv_scale, bias_floor, groups_per_row, threshold, keep_fraction, HEAD_DIM, BLOCK_D,
                BLOCK_M, BLOCK_N, False, False, HAS_BIAS, RELATIVE_BIAS, HAS_DROPOUT, ROTARY, precision)
        if tail:
            dk, dk2, dv = _dkdv_block(
                dk, dk2, dv, k, k2, v, Q, DO, Stats, Delta, Bias, DBias, Cos, Sin, seed, batch_head, key_start,
                bias_cols, visible, dims, full_end, seqlen, max_seqlen, window, stride_qs, stride_dos, stride_bm,
                scale_log2, inv_scale, bias_floor, groups_per_row, threshold, keep_fraction, HEAD_DIM, BLOCK_D,
                BLOCK_M, BLOCK_N, True, WINDOW, HAS_BIAS, RELATIVE_BIAS, HAS_DROPOUT, ROTARY, precision)
    dk_scale = scale
    dv_scale = 1.0
    if HAS_DROPOUT:
        dv_scale = tl.fdiv(1.0, keep_fraction)
        dk_scale = scale * dv_scale
    # where, not a product: a masked key's row may hold inf or nan
    dv = tl.where(visible[:, None], dv * dv_scale, 0.0)
    store_mask = in_sequence[:, None] & (dims < HEAD_DIM)[None, :]
    tl.store(DV + cols[:, None] * stride_dvs + dims[None, :], dv.to(DV.dtype.element_ty),
             mask=store_mask)
    if ROTARY:  # the gradient of the unrotated k (after dV's store: fewer tiles live)
        _store_rotated_back(DK, dk, dk2, dk_scale, visible, Cos, Sin, cols, _half_dims(BLOCK_D), in_sequence,
                            stride_dks, HEAD_DIM)
    else:
        dk = tl.where(visible[:, None], dk * dk_scale, 0.0)
        tl.store(DK + cols[:, None] * stride_dks + dims[None, :], dk.to(DK.dtype.element_ty), mask=store_mask)


# One key block of the dQ backward (rows past the sequence are never stored: no row mask).
@triton.jit
def _dq_block(dq, dq2, q, q2, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, Cos, Sin, seed, batch_head, rows,
              bias_rows, dims, key_start, n_keys, byte_mask, window, stride_ks, stride_vs, stride_mk,
              stride_bm, scale_log2, inv_scale, bias_floor, groups_per_row, threshold,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, TAIL: tl.constexpr, BAND: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
              HAS_BIAS: tl.constexpr, RELATIVE_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              ROTARY: tl.constexpr, precision: tl.constexpr):
    cols = key_start + tl.arange(0, BLOCK_N)
    key_ok = cols < n_keys
    v = _load_rows(V, cols, dims, key_ok, stride_vs, HEAD_DIM, BLOCK_D, TAIL)
    init = _scores_init(Bias, bias_rows[:, None], cols[None, :], key_ok[None, :], stride_bm,
                        inv_scale, bias_floor, HAS_BIAS, RELATIVE_BIAS, TAIL, BLOCK_M, BLOCK_N)
    if ROTARY:  # q, q2: the rotated q's halves; k rotated as loaded
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
    if HAS_KEY_MASK:
        qk = _byte_masked(qk, KeyMask, cols, key_ok, stride_mk, byte_mask, TAIL)
    p = _exp2_shifted(qk, row_max[:, None], scale_log2, HAS_BIAS) * inv_sum[:, None]
    dp = tl.dot(do, tl.trans(v), input_precision=precision)
    if HAS_DROPOUT:  # delta arrives as delta · (1 - p): 1 / (1 - p) is applied once, to dQ
        keep = _dropout_keep(seed, batch_head, rows, key_start, groups_per_row, threshold,
                             BLOCK_M, BLOCK_N)
        dp = tl.where(keep, dp, 0.0)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=precision)
    if ROTARY:
        dq2 += tl.dot(ds.to(k.dtype), k2, input_precision=precision)
    return dq, dq2


# The dQ backward's loop over the keys: as the forward's (`_fwd_keys`), whole blocks unmasked,
# then the tail, or with a window the blocks it reaches, its edges banded.
@triton.jit
def _dq_keys(dq, dq2, q, q2, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, Cos, Sin, seed, batch_head, rows,
             bias_rows, dims, n_keys, byte_mask, window, stride_ks, stride_vs, stride_mk, stride_bm,
             scale_log2, inv_scale, bias_floor, groups_per_row, threshold,
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
    # with a bias tile or accumulators wider than 64 every block is bounds-checked (sm_80 spills
    # with a second copy of the block code)
    if HAS_BIAS or BLOCK_D > 64:
        for key_start in range(lo, tl.where(tail, n_keys, whole), BLOCK_N):
            dq, dq2 = _dq_block(dq, dq2, q, q2, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, Cos, Sin, seed,
                    batch_head, rows, bias_rows, dims, key_start, n_keys, byte_mask, window, stride_ks, stride_vs,
                    stride_mk, stride_bm, scale_log2, inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM,
                    BLOCK_D, BLOCK_M, BLOCK_N, True, WINDOW, HAS_KEY_MASK, HAS_BIAS, RELATIVE_BIAS, HAS_DROPOUT,
                    ROTARY, precision)
        return dq, dq2
    if WINDOW:
        for edge in range(0, _edge_blocks(lo, inner_lo, inner_hi, whole, BLOCK_N)):
            dq, dq2 = _dq_block(dq, dq2, q, q2, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, Cos, Sin, seed,
                    batch_head, rows, bias_rows, dims, _edge_block(edge, lo, inner_lo, inner_hi, BLOCK_N), n_keys,
                    byte_mask, window, stride_ks, stride_vs, stride_mk, stride_bm, scale_log2, inv_scale,
                    bias_floor, groups_per_row, threshold, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, True,
                    HAS_KEY_MASK, HAS_BIAS, RELATIVE_BIAS, HAS_DROPOUT, ROTARY, precision)
    for key_start in range(inner_lo, inner_hi, BLOCK_N):
        dq, dq2 = _dq_block(dq, dq2, q, q2, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, Cos, Sin, seed,
                batch_head, rows, bias_rows, dims, key_start, n_keys, byte_mask, window, stride_ks, stride_vs,
                stride_mk, stride_bm, scale_log2, inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM,
                BLOCK_D, BLOCK_M, BLOCK_N, False, False, HAS_KEY_MASK, HAS_BIAS, RELATIVE_BIAS, HAS_DROPOUT, ROTARY,
                precision)
    if tail:
        dq, dq2 = _dq_block(dq, dq2, q, q2, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, Cos, Sin, seed,
                batch_head, rows, bias_rows, dims, full_end, n_keys, byte_mask, window, stride_ks, stride_vs,
                stride_mk, stride_bm, scale_log2, inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM,
                BLOCK_D, BLOCK_M, BLOCK_N, True, WINDOW, HAS_KEY_MASK, HAS_BIAS, RELATIVE_BIAS, HAS_DROPOUT, ROTARY,
                precision)
    return dq, dq2


# Backward for one block of BLOCK_M queries, looping over key blocks (full blocks unmasked, one
# masked tail block; with a window, `_dq_keys`):
#   P = exp2(s - m·c) · (1/l),  dP = (dO·Vᵀ)∘Z·k,  dS = P∘(dP - D),
#   dQ = scale · Σ_j dS·K = scale · k · Σ_j (P∘((dO·Vᵀ)∘Z - D/k))·K
@batch_generic("seed", "num_heads", "max_seqlen", "stride_mb", "window")
def _attention_bwd_dq_kernel(
    Q, K, V, DO, DQ, Stats, Delta, KeyMask, KeyLengths, Bias, Cos, Sin, CuSeqlens, seed,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_mb, stride_mk, stride_bb, stride_bh, stride_bm,
    num_heads, max_seqlen, scale, scale_log2, dropout_p, window,
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
    DO += b64 * stride_dob + token0 * stride_dos + h64 * stride_doh
    DQ += b64 * stride_dqb + token0 * stride_dqs + h64 * stride_dqh
    KeyMask += b64 * stride_mb
    Bias += b64 * stride_bb + h64 * stride_bh

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen
    if ROTARY:  # rotated once, as its two halves, and so are dQ's sums
        q, q2 = _load_rotated(Q, Cos, Sin, rows, _half_dims(BLOCK_D), row_ok, stride_qs, HEAD_DIM, True)
        dq = tl.zeros([BLOCK_M, _half_dims(BLOCK_D).shape[0]], dtype=tl.float32)
        dq2 = tl.zeros([BLOCK_M, _half_dims(BLOCK_D).shape[0]], dtype=tl.float32)
    else:
        q = _load_rows(Q, rows, dims, row_ok, stride_qs, HEAD_DIM, BLOCK_D, True)
        q2 = q
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq2 = 0.0
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
    # a sequence whose mask is not a prefix reads its bytes in every key block; the others run a
    # copy of the loops without that code
    if byte_mask:
        dq, dq2 = _dq_keys(dq, dq2, q, q2, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, Cos, Sin, seed,
                batch_head, rows, bias_rows, dims, n_keys, byte_mask, window, stride_ks, stride_vs, stride_mk,
                stride_bm, scale_log2, inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM, BLOCK_D, BLOCK_M,
                BLOCK_N, HAS_KEY_MASK, HAS_BIAS, RELATIVE_BIAS, HAS_DROPOUT, WINDOW, ROTARY, precision)
    else:
        dq, dq2 = _dq_keys(dq, dq2, q, q2, do, row_max, inv_sum, delta, K, V, KeyMask, Bias, Cos, Sin, seed,
                batch_head, rows, bias_rows, dims, n_keys, byte_mask, window, stride_ks, stride_vs, stride_mk,
                stride_bm, scale_log2, inv_scale, bias_floor, groups_per_row, threshold, HEAD_DIM, BLOCK_D, BLOCK_M,
                BLOCK_N, False, HAS_BIAS, RELATIVE_BIAS, HAS_DROPOUT, WINDOW, ROTARY, precision)
    if ROTARY:  # the gradient of the unrotated q
        _store_rotated_back(DQ, dq, dq2, dq_scale, row_ok, Cos, Sin, rows, _half_dims(BLOCK_D), row_ok, stride_dqs,
                            HEAD_DIM)
    else:
        dq_mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
        tl.store(DQ + rows[:, None] * stride_dqs + dims[None, :], (dq * dq_scale).to(DQ.dtype.element_ty),
                 mask=dq_mask)
