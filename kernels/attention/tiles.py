"""Block helpers the forward and both backward kernels share: a sequence's bounds, its visible
keys, tile loads, score tiles with bias and key-mask bytes, and the exp2 of shifted scores."""
try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from .._no_triton import tl, triton


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
                 HAS_BIAS: tl.constexpr, RELATIVE_BIAS: tl.constexpr, BOUNDED: tl.constexpr,
                 ROWS: tl.constexpr, COLS: tl.constexpr):
    if not HAS_BIAS:
        return tl.zeros([ROWS, COLS], dtype=tl.float32)
    if RELATIVE_BIAS:
        bias_ptrs = _relative_bias_ptrs(Bias, q_idx, k_idx, stride_bm)
    else:
        bias_ptrs = Bias + q_idx * stride_bm + k_idx
    if BOUNDED:
        bias = tl.load(bias_ptrs, mask=in_bounds, other=0.0)
    else:
        bias = tl.load(bias_ptrs)
    if RELATIVE_BIAS:  # fp32, finite and divided by the scale already (`_relative_bias_rows`)
        return bias
    bias = bias.to(tl.float32)
    return tl.where(bias == float("-inf"), bias, tl.maximum(bias, bias_floor)) * inv_scale


# A relative bias (one value per head and distance k - q) as the launcher lays it out
# (`_relative_bias_rows`): the head's table T, T[center + k - q] = bias(k - q) with center =
# stride_bm / 2 a multiple of 16, in 16 copies of stride_bm elements, copy r shifted left by r.
# Query q's keys start at T[center - q] = copy (center - q) % 16 at 16 · ((center - q) // 16): a
# 16-element aligned row start, so the row loads as wide vectors (T indexed by k - q directly has
# no known alignment: element-wise loads, a 64-bit address each).
@triton.jit
def _relative_bias_ptrs(Bias, q_idx, k_idx, stride_bm):
    shift = stride_bm // 2 - q_idx
    return Bias + (shift % 16) * stride_bm + (shift // 16) * 16 + k_idx


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


# Whether query q sees key k under a sliding window, |q - k| <= window: `q_idx` and `k_idx` are
# positions within the sequence, broadcast against each other (either way round). One unsigned
# compare: k - q + window is in [0, 2·window] exactly when |k - q| <= window.
@triton.jit
def _in_window(q_idx, k_idx, window):
    shifted = (k_idx - q_idx + window).to(tl.uint32, bitcast=True)
    return shifted <= (2 * window).to(tl.uint32, bitcast=True)


# The blocks of OTHER positions (keys for a block of queries, or queries for a block of keys,
# blocks at multiples of OTHER from the sequence's start) that the OWN positions first..first+OWN-1
# reach through a window, below `limit` (the visible keys, or the sequence's queries; full_end:
# where its last, partial block starts): (lo, inner_lo, inner_hi, whole, tail). The whole blocks
# from lo below inner_lo and from inner_hi below `whole` hold pairs outside the window (the edges,
# masked); those from inner_lo below inner_hi are in every OWN position's window (the interior,
# unmasked); tail: whether the partial block is reached (masked, bounds-checked). Blocks outside
# these hold no pair in a window and are never visited.
@triton.jit
def _window_blocks(first, limit, full_end, window, OWN: tl.constexpr, OTHER: tl.constexpr):
    lo = tl.maximum(first - window, 0)
    lo = lo - lo % OTHER
    end = tl.minimum(first + OWN + window, limit)
    tail = (full_end >= lo) & (full_end < end)
    whole = tl.maximum(tl.minimum(end, full_end), lo)
    # interior: blocks [t, t + OTHER) with first + OWN - 1 - window <= t and t + OTHER - 1 <= first + window
    inner_lo = tl.maximum(first + OWN - 1 - window, lo)
    inner_lo = tl.minimum((inner_lo + OTHER - 1) // OTHER * OTHER, whole)
    inner_hi = tl.maximum(tl.minimum((first + window + 1) // OTHER * OTHER, whole), inner_lo)
    return lo, inner_lo, inner_hi, whole, tail


# The start of the i-th edge block of `_window_blocks` (the blocks below inner_lo, then those
# from inner_hi): both edges in one loop, one copy of the masked block's code.
@triton.jit
def _edge_block(i, lo, inner_lo, inner_hi, OTHER: tl.constexpr):
    below = (inner_lo - lo + OTHER - 1) // OTHER
    return tl.where(i < below, lo + i * OTHER, inner_hi + (i - below) * OTHER)


# How many edge blocks `_window_blocks` gives.
@triton.jit
def _edge_blocks(lo, inner_lo, inner_hi, whole, OTHER: tl.constexpr):
    return (inner_lo - lo + OTHER - 1) // OTHER + (whole - inner_hi + OTHER - 1) // OTHER
