"""Dropout inside the attention kernels: Philox draws deciding four adjacent keys each, the
keep threshold, the per-call seed, and the exact keep mask as a tensor (for references and tests)."""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from .._no_triton import tl, triton

from .._checks import capturing
from .._launch import batch_generic, on_device_of

MAX_DROPOUT_SEQLEN = 46340  # i·S + j < 2³¹ for the dropout counters

_DROPOUT_MASK_BLOCK = 128


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


# The dropout keep mask as a tensor [B, H, S, S], drawn exactly as the attention kernels draw it.
@batch_generic("seed", "max_seqlen")
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
