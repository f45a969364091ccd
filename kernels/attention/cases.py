"""The attention kernels' compile cases for the static kernel report (kernels/report.py): every
config the launcher picks, with the flags and argument specialisations it launches them with."""
import inspect

import torch

from .._launch import next_power_of_2, unspecialised
from .backward import _attention_bwd_delta_kernel, _attention_bwd_dkdv_kernel, _attention_bwd_dq_kernel
from .configs import _DELTA_BLOCK_M, SUPPORTED_HEAD_DIMS, _bwd_configs, _fwd_config
from .dropout import _DROPOUT_MASK_BLOCK, _dropout_mask_kernel
from .forward import _attention_fwd_kernel


_TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_POINTER_TYPES = dict(Stats="*fp32", Delta="*fp32", KeyMask="*u8", KeyLengths="*i32", CuSeqlens="*i32", Keep="*i8",
                      DBias="*fp32", Cos="*fp32", Sin="*fp32")
_SCALAR_TYPES = dict(scale="fp32", scale_log2="fp32", dropout_p="fp32", seed="i64")


def _signature(kernel, element_type, constexprs):
    """Argument types of `kernel` as launched: tensors of the input dtype unless listed above (a
    relative bias's table is fp32)."""
    names = inspect.signature(kernel.fn).parameters
    pointer_types = dict(_POINTER_TYPES, **({"Bias": "*fp32"} if constexprs.get("RELATIVE_BIAS") else {}))
    return {
        name: pointer_types.get(name, f"*{element_type}" if name[0].isupper() else
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
    padding mask, packed) with and without dropout, with a bias its heaviest variant, and with a
    relative bias (MPNet's) that and the packed one without dropout (inference's). Elsewhere one
    variant per config and bias: with the key mask and dropout, with and without the bias, and the
    same with a relative bias. A flag adds to the same tiles (a mask or bias load, Philox rounds),
    and the padded layout with a key mask is heavier than the packed one, which differs only in two
    scalar loads of cu_seqlens before the tiles; but a bias also changes the loops' structure (one
    loop where registers are short, see forward.py), so a config serving both runs both."""
    every = dtype != torch.float32 and head_dim in _EVERY_VARIANT_HEAD_DIMS

    def flags(layout, has_bias, has_dropout, relative=False, window=False, rotary=False):
        return dict(PACKED=layout == "packed", HAS_KEY_MASK=layout == "mask", HAS_BIAS=has_bias,
                    RELATIVE_BIAS=relative, HAS_DROPOUT=has_dropout, WINDOW=window, ROTARY=rotary)

    launches = {}  # keyed by (kernel, config, has_bias) where one variant stands for the config
    for has_bias in (False, True):
        dkdv, dq = _bwd_configs(head_dim, dtype, allow_tf32, has_bias)
        relative_dkdv, relative_dq = _bwd_configs(head_dim, dtype, allow_tf32, has_bias, relative=True)
        for has_dropout in (False, True):
            fwd = _fwd_config(head_dim, dtype, allow_tf32, has_bias, has_dropout)
            relative_fwd = _fwd_config(head_dim, dtype, allow_tf32, has_bias, has_dropout, relative=True)
            for kernel, config, relative_config in (
                    (_attention_fwd_kernel, fwd, relative_fwd), (_attention_bwd_dkdv_kernel, dkdv, relative_dkdv),
                    (_attention_bwd_dq_kernel, dq, relative_dq)):
                if every and not has_bias:
                    for layout in ("padded", "mask", "packed"):
                        variant = flags(layout, False, has_dropout)
                        launches[kernel, config, tuple(variant.values())] = variant
                elif every:
                    launches[kernel, config, "bias"] = flags("mask", True, True)
                    # a relative bias: training's heaviest, and inference's padding-free default
                    launches[kernel, relative_config, "relative", has_dropout] = flags(
                        "mask" if has_dropout else "packed", True, has_dropout, relative=True)
                elif has_dropout or (kernel, config, has_bias) not in launches:
                    launches[kernel, config, has_bias] = flags("mask", has_bias, has_dropout)
                    if has_bias:
                        launches[kernel, relative_config, "relative"] = flags("mask", True, has_dropout,
                                                                             relative=True)
    # ModernBERT's: rotary embeddings in every layer, a sliding window in most. At its precisions and
    # head dims: a window alone (padded), inference's layers (packed, with and without a window),
    # training's heaviest (a mask, dropout, both) and the same with a bias; elsewhere that heaviest
    # variant once a config.
    for has_dropout in (False, True):
        for has_bias in (False, True) if every else (False,):
            fwd = _fwd_config(head_dim, dtype, allow_tf32, has_bias, has_dropout, rotary=True)
            dkdv, dq = _bwd_configs(head_dim, dtype, allow_tf32, has_bias, rotary=True)
            window_fwd = _fwd_config(head_dim, dtype, allow_tf32, has_bias, has_dropout)
            window_dkdv, window_dq = _bwd_configs(head_dim, dtype, allow_tf32, has_bias)
            for kernel, config, window_config in ((_attention_fwd_kernel, fwd, window_fwd),
                                                  (_attention_bwd_dkdv_kernel, dkdv, window_dkdv),
                                                  (_attention_bwd_dq_kernel, dq, window_dq)):
                if has_dropout:
                    launches[kernel, config, "training", has_bias] = flags(
                        "mask", has_bias, True, window=True, rotary=True)
                elif every and not has_bias:
                    launches[kernel, window_config, "window"] = flags("padded", False, False, window=True)
                    for window in (False, True):
                        launches[kernel, config, "inference", window] = flags(
                            "packed", False, False, window=window, rotary=True)
    return [(key[0], key[1], variant) for key, variant in launches.items()]


def _flags_name(flags):
    names = dict(PACKED=" +packed", HAS_KEY_MASK=" +mask", HAS_BIAS=" +bias", RELATIVE_BIAS=" relative",
                 HAS_DROPOUT=" +dropout", WINDOW=" +window", ROTARY=" +rotary")
    return "".join(names[flag] for flag, on in flags.items() if on)


def _runtime_specialisation(flags):
    """Argument values Triton specialises launches on, as the launcher passes them: a key mask
    [B, S] has unit stride over keys (an integer 1 compiles as the constant); without one both
    mask strides are 0, a multiple of 16."""
    return dict(stride_mk=1) if flags["HAS_KEY_MASK"] else {}


# The q/k/v/out/grad strides are multiples of 16 elements (head dims are) and so are the bias's
# (`_aligned_bias`): Triton specialises launches on that, and it is what lets tiles load as wide
# vectors. What varies from batch to batch (the key mask's row stride, heads, max_seqlen) is never
# specialised on (`batch_generic`), whatever its value.
def _divisible_by_16(kernel, signature):
    return [name for name in signature if name.startswith("stride") and name not in unspecialised(kernel)]


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
                        divisible_by_16=_divisible_by_16(kernel, signature), num_warps=num_warps,
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
                    divisible_by_16=_divisible_by_16(_attention_bwd_delta_kernel, signature), num_warps=4,
                    num_stages=1, matmul=False,
                )
    constexprs = dict(BLOCK=_DROPOUT_MASK_BLOCK)
    yield dict(
        name="attention_dropout_mask", fn=_dropout_mask_kernel,
        signature=_signature(_dropout_mask_kernel, "fp32", constexprs), constexprs=constexprs,
        num_warps=4, num_stages=1, matmul=False,
    )
