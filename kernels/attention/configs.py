"""Launch configurations of the attention kernels, per precision, head-dim bucket and bias."""
import torch

SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)


# Launch configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed by (precision, head-dim
# bucket, has bias). Every one is listed in compile_cases() and checked there to compile without
# register spills for sm_80 and sm_90a, for every head dim it serves, under the Triton releases
# that supported torches pin (3.6, 3.8, 3.9: register allocation differs between them). What the
# registers must hold grows with the head dim (the [rows, D] fp32 accumulators), with fp32
# operands, with a bias tile (loaded, then moved into the dot's layout) and with dropout's Philox
# rounds; the biggest tiles that stay spill-free with all of them are below. Precision "16" is
# fp16/bf16 (tensor cores), "tf32" is fp32 on tensor cores, "ieee" is fp32 on the FMA units (no
# wgmma, so small tiles).
_FWD_CONFIGS = {
    ("16", 64, False): (128, 64, 8, 2),
    ("16", 64, True): (128, 64, 8, 2),
    ("16", 128, False): (128, 64, 8, 2),
    ("16", 128, True): (64, 64, 4, 2),
    ("tf32", 64, False): (64, 32, 4, 2),
    ("tf32", 64, True): (64, 32, 4, 2),
    # with dropout (and a bias: under Triton 3.6), 64x32 spills 8 B on sm_80
    ("tf32", 128, False): (32, 32, 4, 2),
    ("tf32", 128, True): (32, 32, 4, 2),
    ("ieee", 64, False): (32, 32, 4, 1),
    ("ieee", 64, True): (32, 32, 4, 1),
    # with dropout, one stage keeps 8 B of stack on sm_80 (a structured loop exit; without a bias
    # under Triton 3.6)
    ("ieee", 128, False): (16, 16, 4, 2),
    ("ieee", 128, True): (16, 16, 4, 2),
}
# Dropout's Philox rounds at head dims above 64 (the [rows, D] accumulators twice as wide): 32-key
# blocks, half the draws per block. (A single 128-key block for sequences up to 128 keys is not
# used: on sm_80 its 128 keys of K fragments spill, and on sm_90a it needs ~176 registers, one CTA
# per SM, where 128x64 keeps two.)
_FWD_DROPOUT_CONFIGS = {
    ("16", 128, False): (128, 32, 8, 2),
    ("16", 128, True): (64, 32, 4, 2),
}
# A relative bias's forward runs two loops (unmasked full key blocks, then the tail), which hold
# more registers: fp32 "ieee" 32x32 tiles spill with the mask and dropout (224-1528 B at D = 32, 64).
_RELATIVE_FWD_CONFIGS = {
    ("ieee", 64): (16, 16, 4, 1),
}
_BWD_CONFIGS = {  # (dK/dV kernel config, dQ kernel config)
    # dK/dV: 32-query blocks spill 8 B on sm_80 with dropout under Triton 3.6 (packed layout)
    ("16", 64, False): ((16, 64, 4, 2), (128, 32, 8, 2)),
    # dK/dV with a bias: 32-query blocks spill on sm_80 with dropout's draws
    ("16", 64, True): ((16, 64, 4, 1), (128, 32, 8, 2)),
    ("16", 128, False): ((16, 64, 4, 2), (64, 32, 4, 2)),
    # dK/dV with a bias at D >= 80: 4 warps spill 16-24 B on sm_90a under Triton 3.8 (255 registers
    # on sm_80); 8 warps, one CTA per SM, keep as many warps resident as two CTAs of 4
    ("16", 128, True): ((16, 64, 8, 2), (64, 32, 4, 1)),
    # dK/dV without a bias on 8 warps: 4 keep 16 B of stack at D = 64 on sm_80 with dropout under 3.6
    ("tf32", 64, False): ((16, 64, 8, 1), (64, 16, 4, 1)),
    ("tf32", 64, True): ((16, 64, 4, 1), (64, 16, 4, 1)),
    # TF32 at D >= 80. dK/dV: 64-key tiles (wgmma's minimum) spill, fp32 K, V, dK and dV tiles
    # being 4x as many registers as fp16 K, V: 32-key tiles run on mma.sync instead of wgmma, and
    # with a bias 16-key ones (16x32 spills 16 B on sm_90a under Triton 3.6). dQ: 64x16 spills
    # 128 B (216-224 B with a bias) on sm_90a under Triton 3.8; 32x32 holds the same tile (without a
    # bias in two stages: one keeps 32 B of stack at D = 80, 96 on sm_80 with dropout under 3.6).
    ("tf32", 128, False): ((16, 32, 4, 1), (32, 32, 4, 2)),
    ("tf32", 128, True): ((16, 16, 8, 1), (32, 32, 4, 1)),
    # dK/dV: 32-key tiles spill with dropout (D = 64 on sm_90a; with a bias, D = 32 on sm_80), and
    # 4 warps spill under Triton 3.8 (8 B at D = 16 on sm_80, 16 B with a bias at D = 32 on sm_90a)
    # dQ without a bias: 4 warps hold 720 B of stack with the key mask and dropout; dK/dV without a
    # bias in two stages: one keeps 8 B at D = 16 on sm_90a under 3.9 (16x32 and 32x16: 630-720 B)
    ("ieee", 64, False): ((16, 16, 8, 2), (16, 16, 8, 1)),
    # with a bias and dropout: dQ in one stage keeps 8 B of stack on sm_80 under Triton 3.8; dK/dV
    # 16x16 on 8 warps 8 B at D = 64 on sm_80 under 3.6 (4 warps: 16 B at D = 32 on sm_90a under 3.8)
    ("ieee", 64, True): ((32, 16, 8, 1), (16, 16, 4, 2)),
    # dQ: with 4 warps, dropout's draws spill at D = 80, 96 (on sm_90a with a bias; on sm_80 without
    # one, under Triton 3.6). dK/dV with a bias and dropout: one stage keeps 8 B of stack at D = 80,
    # 96 on sm_80 under 3.6 (8 warps: 8-16 B at D >= 80 there)
    ("ieee", 128, False): ((16, 16, 4, 1), (16, 16, 8, 1)),
    ("ieee", 128, True): ((16, 16, 4, 2), (16, 16, 8, 1)),
}
# Head dims whose variants spill in their bucket's configs, keyed by (precision, head dim, has bias):
# 16-bit dQ at D = 16 without a bias, where 128x32 keeps 8 B of stack on sm_80 with dropout.
_HEAD_DIM_BWD_CONFIGS = {
    ("16", 16, False): ((16, 64, 4, 2), (64, 32, 4, 2)),
}
# A relative bias (MPNet's) runs the bias's configs, but where its fp32 table's loads and its
# gradient's atomic adds in dK/dV need other ones: keyed by (precision, head dim) or (precision,
# head-dim bucket). fp32 dK/dV with 16x16 tiles: 8 warps spill 16 B at D = 32 on sm_90a under
# Triton 3.8 (32x16 holds there), 4 warps 8 B at D = 32, 64 under 3.9 and 8-16 B at D >= 80
# under 3.6 (8 warps hold).
_RELATIVE_BWD_CONFIGS = {
    ("ieee", 32): ((32, 16, 8, 1), (16, 16, 4, 1)),
    # the 64 bucket's head dims other than 32 (16, 64): the bias's 32x16 dK/dV keeps 8 B of stack at
    # D = 64 on sm_80 (3.8, 3.9)
    ("ieee", 64): ((16, 16, 8, 1), (16, 16, 4, 2)),
    ("ieee", 128): ((16, 16, 8, 1), (16, 16, 8, 1)),
    ("tf32", 128): ((16, 16, 8, 1), (32, 32, 4, 1)),
}
# Rotary embeddings: the kernels rotate each k tile (q's in dK/dV) as they load it, with fp32 cos
# and sin tiles, and on sm_80 (mma.sync, both operands in registers) every warp rotates the whole
# tile in the dot operand's layout (per use: the dQ and dK/dV kernels use it twice). 16x16 dK/dV
# and dQ tiles keep that small enough (larger ones spill 24-1000 B with dropout; fp32 dQ, "ieee"
# dK/dV and TF32 dK/dV at D > 64 with 8 warps: 4 spill 8-24 B); the forward takes 32-key blocks with 16-bit inputs (64
# queries at D > 64: 128 spill 16 B on sm_80), 32x32 tiles with TF32 (64x32 spills 56 B at D = 64)
# and 16x16 "ieee" (32x32 spills 16-800 B). 16-bit dQ at D <= 64 on 8 warps: with a bias and
# dropout, 4 keep 8 B of stack at D = 64 on sm_90a under Triton 3.6. Keyed as _FWD_CONFIGS and
# _BWD_CONFIGS.
_ROTARY_FWD_CONFIGS = {
    **{("16", 64, has_bias): (128, 32, 8, 2) for has_bias in (False, True)},
    **{("16", 128, has_bias): (64, 32, 4, 2) for has_bias in (False, True)},
    **{("tf32", bucket, has_bias): (32, 32, 4, 2) for bucket in (64, 128) for has_bias in (False, True)},
    **{("ieee", bucket, has_bias): (16, 16, 4, 1) for bucket in (64, 128) for has_bias in (False, True)},
}
_ROTARY_BWD_CONFIGS = {
    (precision, bucket, has_bias): configs
    for precision, bucket, configs in (
        ("16", 64, ((16, 16, 4, 1), (16, 16, 8, 1))), ("16", 128, ((16, 16, 4, 1), (16, 16, 4, 1))),
        ("tf32", 64, ((16, 16, 4, 1), (16, 16, 8, 1))), ("tf32", 128, ((16, 16, 8, 1), (16, 16, 8, 1))),
        ("ieee", 64, ((16, 16, 8, 1), (16, 16, 8, 1))), ("ieee", 128, ((16, 16, 8, 1), (16, 16, 8, 1))))
    for has_bias in (False, True)
}
_DELTA_BLOCK_M = 64


def _config_key(head_dim, dtype, allow_tf32, has_bias):
    precision = "16" if dtype != torch.float32 else ("tf32" if allow_tf32 else "ieee")
    return precision, 64 if head_dim <= 64 else 128, has_bias


def _fwd_config(head_dim, dtype, allow_tf32, has_bias, has_dropout, relative=False, rotary=False):
    key = _config_key(head_dim, dtype, allow_tf32, has_bias)
    if rotary and key in _ROTARY_FWD_CONFIGS:
        return _ROTARY_FWD_CONFIGS[key]
    if relative and key[:2] in _RELATIVE_FWD_CONFIGS:
        return _RELATIVE_FWD_CONFIGS[key[:2]]
    return _FWD_DROPOUT_CONFIGS.get(key, _FWD_CONFIGS[key]) if has_dropout else _FWD_CONFIGS[key]


def _bwd_configs(head_dim, dtype, allow_tf32, has_bias, relative=False, rotary=False):
    key = _config_key(head_dim, dtype, allow_tf32, has_bias)
    if rotary and key in _ROTARY_BWD_CONFIGS:
        return _ROTARY_BWD_CONFIGS[key]
    if relative:
        precision, bucket, _ = key
        return _RELATIVE_BWD_CONFIGS.get((precision, head_dim), _RELATIVE_BWD_CONFIGS.get(
            (precision, bucket), _BWD_CONFIGS[key]))
    return _HEAD_DIM_BWD_CONFIGS.get((key[0], head_dim, key[2]), _BWD_CONFIGS[key])
