"""Rotary position embeddings inside the attention kernels: tiles of q or k loaded as their two
halves (dims d and d + D/2, the pairs Hugging Face's rotate_half turns together), rotated by the
cos and sin tables' rows at their positions, and gradients turned back by the transpose."""
try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from .._no_triton import tl, triton


# A [rows × D/2] half of a [tokens, D] matrix (unit stride on D; SECOND: dims D/2.., else ..D/2).
# half_dims: 0..BLOCK_H - 1, BLOCK_H being D/2 padded to a power of two of at least 16 (a dot
# product's smallest inner size, `half_dims` in the kernels); the padding loads as zeros and adds
# nothing to the dot products.
@triton.jit
def _load_half(ptr, rows, half_dims, row_ok, stride, HEAD_DIM: tl.constexpr, SECOND: tl.constexpr,
               BOUNDED: tl.constexpr):
    BLOCK_H: tl.constexpr = half_dims.shape[0]
    ptrs = ptr + rows[:, None] * stride + half_dims[None, :]
    if SECOND:
        ptrs += HEAD_DIM // 2
    if BOUNDED:
        if HEAD_DIM // 2 == BLOCK_H:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        return tl.load(ptrs, mask=row_ok[:, None] & (half_dims < HEAD_DIM // 2)[None, :], other=0.0)
    if HEAD_DIM // 2 == BLOCK_H:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(half_dims < HEAD_DIM // 2)[None, :], other=0.0)


# The table rows (cos or sin, fp32 [P, D] contiguous) at positions `rows`, as two halves.
@triton.jit
def _table_halves(Table, rows, half_dims, row_ok, HEAD_DIM: tl.constexpr, BOUNDED: tl.constexpr):
    first = _load_half(Table, rows, half_dims, row_ok, HEAD_DIM, HEAD_DIM, False, BOUNDED)
    second = _load_half(Table, rows, half_dims, row_ok, HEAD_DIM, HEAD_DIM, True, BOUNDED)
    return first, second


# x·cos + rotate_half(x)·sin of a tile of q or k at positions `rows`, loaded as its halves x1, x2:
# (x1·cos1 - x2·sin1, x2·cos2 + x1·sin2), in fp32, rounded to x's dtype (as Hugging Face rotates
# q and k before the attention).
@triton.jit
def _load_rotated(ptr, Cos, Sin, rows, half_dims, row_ok, stride, HEAD_DIM: tl.constexpr, BOUNDED: tl.constexpr):
    x1 = _load_half(ptr, rows, half_dims, row_ok, stride, HEAD_DIM, False, BOUNDED)
    x2 = _load_half(ptr, rows, half_dims, row_ok, stride, HEAD_DIM, True, BOUNDED)
    cos1, cos2 = _table_halves(Cos, rows, half_dims, row_ok, HEAD_DIM, BOUNDED)
    sin1, sin2 = _table_halves(Sin, rows, half_dims, row_ok, HEAD_DIM, BOUNDED)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    return (a * cos1 - b * sin1).to(x1.dtype), (b * cos2 + a * sin2).to(x1.dtype)


# Stores the gradient of x from that of its rotation (g1, g2: fp32 halves, times `scale`, zeros at
# rows where `keep` is off), the rotation's transpose: dx = g·cos + rotate_halfᵀ(g·sin) =
# (g1·cos1 + g2·sin2, g2·cos2 - g1·sin1). One half at a time, stored before the other's tables
# load: fewer tiles live at once.
@triton.jit
def _store_rotated_back(ptr, g1, g2, scale, keep, Cos, Sin, rows, half_dims, row_ok, stride, HEAD_DIM: tl.constexpr):
    ptrs = ptr + rows[:, None] * stride + half_dims[None, :]
    mask = row_ok[:, None] & (half_dims < HEAD_DIM // 2)[None, :]
    cos1 = _load_half(Cos, rows, half_dims, row_ok, HEAD_DIM, HEAD_DIM, False, True)
    sin2 = _load_half(Sin, rows, half_dims, row_ok, HEAD_DIM, HEAD_DIM, True, True)
    first = tl.where(keep[:, None], (g1 * cos1 + g2 * sin2) * scale, 0.0)
    tl.store(ptrs, first.to(ptr.dtype.element_ty), mask=mask)
    cos2 = _load_half(Cos, rows, half_dims, row_ok, HEAD_DIM, HEAD_DIM, True, True)
    sin1 = _load_half(Sin, rows, half_dims, row_ok, HEAD_DIM, HEAD_DIM, False, True)
    second = tl.where(keep[:, None], (g2 * cos2 - g1 * sin1) * scale, 0.0)
    tl.store(ptrs + HEAD_DIM // 2, second.to(ptr.dtype.element_ty), mask=mask)


# 0..BLOCK_H - 1: the dims of a half (`_load_half`).
@triton.jit
def _half_dims(BLOCK_D: tl.constexpr):
    return tl.arange(0, 16 if BLOCK_D < 32 else BLOCK_D // 2)
