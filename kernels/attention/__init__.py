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

A bidirectional sliding window (window=: query i sees key j iff |i - j| <= window) and rotary
position embeddings (rotary=(cos, sin), ModernBERT's) run in the kernels too: key blocks that no
window of a query block reaches are skipped by the loops' bounds, the window's edge blocks masked,
its interior ones not; q and k tiles are rotated as they load, the gradients turned back.

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

# One op, one concern a file: tiles.py (block helpers), dropout.py, rotary.py, forward.py, backward.py (the
# kernels), configs.py (launch configurations), checks.py, op.py (the public op, custom ops and
# autograd), reference.py (the reference and the PyTorch path), cases.py (the report's compile cases).
from .cases import compile_cases
from .configs import SUPPORTED_HEAD_DIMS
from .dropout import MAX_DROPOUT_SEQLEN
from .op import MAX_BATCH_HEADS, attention
from .reference import attention_reference, attention_torch

__all__ = ["MAX_BATCH_HEADS", "MAX_DROPOUT_SEQLEN", "SUPPORTED_HEAD_DIMS", "attention", "attention_reference",
           "attention_torch", "compile_cases"]
