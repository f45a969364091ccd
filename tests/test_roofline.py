"""The FLOP and byte counts behind every rate the benchmarks report, on hand-checked cases."""
import pytest

from fastencoder.benchmarks import roofline


def test_linear():
    assert roofline.linear_flops(2, 3, 4) == 48  # 2·M·N·K
    # x [2,4] + W [3,4] + y [2,3] + bias [3] = 8 + 12 + 6 + 3 elements of 2 bytes
    assert roofline.linear_bytes(2, 3, 4, 2) == 58
    assert roofline.linear_bytes(2, 3, 4, 2, bias=False, residual=True) == (8 + 12 + 6 + 6) * 2


def test_attention_counts_only_real_tokens():
    # lengths 2 and 3, one head of dim 4: 4·L²·D per sequence = 64 + 144
    assert roofline.attention_flops([2, 3], heads=1, head_dim=4) == 208
    assert roofline.attention_flops([2, 3], heads=1, head_dim=4, backward=True) == 520
    # q, k, v, o for 5 tokens × 2 heads × dim 4 × 2 bytes; backward adds o, dO, dq, dk, dv
    assert roofline.attention_bytes([2, 3], heads=2, head_dim=4, element_size=2) == 320
    assert roofline.attention_bytes([2, 3], heads=2, head_dim=4, element_size=2, backward=True) == 720


def test_layer_norm():
    assert roofline.layer_norm_bytes(10, 8, 2) == 320  # read x, write y
    assert roofline.layer_norm_bytes(10, 8, 2, residual=True) == 480
    assert roofline.layer_norm_bytes(10, 8, 2, residual=True, backward=True) == 640  # x, r, dy, dx


def test_encoder():
    # one layer, hidden 2, FFN 4, one sequence of 2 tokens: per token 2·(4·2² + 2·2·4) GEMM FLOP
    # plus 4·L·hidden attention FLOP = 64 + 16
    assert roofline.encoder_flops([2], layers=1, hidden=2, intermediate=4) == 160
    # BERT-base at 32×128: ~170 MFLOP per token of GEMMs, ~715 GFLOP in all (shared/targets.md)
    assert roofline.encoder_flops([128] * 32, 12, 768, 3072) == 715_112_054_784


def test_roofline_is_the_slower_of_compute_and_memory():
    assert roofline.roofline_seconds(2e12, 1e9, 1e12, 1e12) == pytest.approx(2.0)
    assert roofline.roofline_seconds(1e9, 3e12, 1e12, 1e12) == pytest.approx(3.0)
