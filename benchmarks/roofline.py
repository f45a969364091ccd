"""FLOP and byte counts behind every TFLOP/s, GB/s and roofline percentage the benchmarks report.

Conventions: a multiply-add is 2 FLOP; bytes are the fewest a kernel must move through device
memory (each input read once, each output written once); attention counts only real (unmasked)
query-key pairs, so padding never inflates a rate.
"""


def linear_flops(m, n, k):
    return 2 * m * n * k


def linear_bytes(m, n, k, element_size, bias=True, residual=False):
    elements = m * k + n * k + m * n + (n if bias else 0) + (m * n if residual else 0)
    return elements * element_size


def attention_flops(seqlens, heads, head_dim, backward=False):
    """QKᵀ and PV per sequence: 2 matmuls × 2·L²·D FLOP per head. The backward recomputes QKᵀ and
    runs four more products (dV, dP, dQ, dK): 2.5× the forward, as FlashAttention counts."""
    forward = sum(4 * length * length * head_dim * heads for length in seqlens)
    return forward * 5 // 2 if backward else forward


def attention_bytes(seqlens, heads, head_dim, element_size, backward=False):
    """q, k, v read and o written (forward); the backward also reads o, dO and writes dq, dk, dv."""
    tokens = sum(seqlens)
    tensors = 4 if not backward else 4 + 5
    return tensors * tokens * heads * head_dim * element_size


def layer_norm_bytes(rows, hidden, element_size, residual=False, backward=False):
    """Forward reads x (and the residual) and writes y; backward reads x (and residual) and dy and
    writes dx. Weights, bias and per-row statistics are negligible and not counted."""
    inputs = 2 if residual else 1
    tensors = inputs + 2 if backward else inputs + 1
    return tensors * rows * hidden * element_size


def encoder_flops(tokens_per_sequence, layers, hidden, intermediate):
    """Forward FLOP of a BERT-style encoder (embeddings, pooler and heads not counted): per token
    and layer, the QKV, output and two FFN GEMMs, plus attention over that token's sequence."""
    gemm_per_token = 2 * (4 * hidden * hidden + 2 * hidden * intermediate)
    total = 0
    for length in tokens_per_sequence:
        total += length * layers * (gemm_per_token + 4 * length * hidden)
    return total


def roofline_seconds(flops, bytes_moved, peak_flops, peak_bytes_per_second):
    """The floor: whichever of compute and memory traffic takes longer at the measured ceilings."""
    return max(flops / peak_flops, bytes_moved / peak_bytes_per_second)
