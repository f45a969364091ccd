"""Input checks of `attention`, run before any launch, and the layouts they describe."""
import math

import torch

from .._checks import FLOAT_DTYPES, capturing_or_compiling, check_float, check_like, remembered


def _layout(q, cu_seqlens, max_seqlen):
    """(batch, heads, padded or max sequence length) of either layout."""
    if cu_seqlens is None:
        return q.shape[0], q.shape[2], q.shape[1]
    return cu_seqlens.shape[0] - 1, q.shape[1], max_seqlen


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_inputs(q, k, v, key_padding_mask, bias, scale, dropout_p, cu_seqlens, max_seqlen,
                  relative_bias=None, window=None, rotary=None):
    check_float("q", q)
    check_like("k", k, q, "q")
    check_like("v", v, q, "q")
    packed = cu_seqlens is not None
    if q.dim() != (3 if packed else 4):
        raise ValueError(
            f"q must be [T, H, D] with cu_seqlens (packed layout) or [B, S, H, D] without, got "
            f"shape {tuple(q.shape)} {'with' if packed else 'without'} cu_seqlens"
        )
    for name, tensor in (("k", k), ("v", v)):
        if tensor.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(tensor.shape)}")
    if scale is not None and not (_is_number(scale) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None (1/sqrt(head dim)), got {scale!r}")
    if not (_is_number(dropout_p) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if packed:
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask cannot be used with cu_seqlens: the packed layout "
                             "holds real tokens only")
        _check_cu_seqlens(cu_seqlens, max_seqlen, q)
    elif max_seqlen is not None:
        raise ValueError("max_seqlen is only for the packed layout (with cu_seqlens)")
    batch, heads, seqlen = _layout(q, cu_seqlens, max_seqlen)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(
                "key_padding_mask must be a torch.bool tensor (True = real token), got "
                f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}; "
                "for a Hugging Face attention_mask pass attention_mask.bool()"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        if tuple(key_padding_mask.shape) != (batch, seqlen):
            raise ValueError(f"key_padding_mask must have shape [B, S] = {(batch, seqlen)}, got "
                             f"{tuple(key_padding_mask.shape)}")
    if bias is not None:
        check_like("bias", bias, q, "q")
        target = (batch, heads, seqlen, seqlen)
        if bias.dim() > 4 or any(n not in (1, t) for n, t in zip(bias.shape[::-1], target[::-1])):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to [B, H, S, S] "
                             f"= {target}")
    if relative_bias is not None:
        check_float("relative_bias", relative_bias)
        if relative_bias.device != q.device:
            raise ValueError(f"relative_bias is on {relative_bias.device} but q is on {q.device}")
        if bias is not None:
            raise ValueError("pass bias or relative_bias, not both")
        if tuple(relative_bias.shape) != (heads, 2 * seqlen - 1):
            raise ValueError(f"relative_bias must have shape [H, 2·S - 1] = {(heads, 2 * seqlen - 1)} (S = "
                             f"{'max_seqlen' if packed else 'the padded length'}), got "
                             f"{tuple(relative_bias.shape)}")
    _check_window(window)
    _check_rotary(rotary, q, seqlen, "max_seqlen" if packed else "the padded length")


def _check_window(window):
    if window is None:
        return
    if not isinstance(window, int) or isinstance(window, bool):
        raise TypeError(f"window must be an int (query i sees key j iff |i - j| <= window) or None, got "
                        f"{type(window).__name__}")
    if window < 0:
        raise ValueError(f"window must be >= 0 (query i sees key j iff |i - j| <= window), got {window}")


def _check_rotary(rotary, q, seqlen, seqlen_name):
    if rotary is None:
        return
    if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
        raise TypeError(f"rotary must be a pair (cos, sin) of float32 [P, D] tables, got {type(rotary).__name__}"
                        f"{'' if not isinstance(rotary, (tuple, list)) else f' of {len(rotary)}'}")
    head_dim = q.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head dim (it rotates dims d and d + D/2 together), got {head_dim}")
    for name, table in zip(("cos", "sin"), rotary):
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"rotary's {name} must be a torch.Tensor, got {type(table).__name__}")
        if table.dtype != torch.float32:
            raise TypeError(f"rotary's {name} must be float32 (Hugging Face's values converted), got {table.dtype}")
        if table.device != q.device:
            raise ValueError(f"rotary's {name} is on {table.device} but q is on {q.device}")
        if table.dim() != 2 or table.shape[1] != head_dim or table.shape[0] < seqlen:
            raise ValueError(f"rotary's {name} must be [P, D] with D = {head_dim} (the head dim) and P >= {seqlen} "
                             f"({seqlen_name}), got shape {tuple(table.shape)}")
        if table.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"rotary's {name} requires grad, but the attention computes no gradient for the "
                             f"rotary tables: pass them detached")


def _well_formed(q, k, v, key_padding_mask, bias, scale, dropout_p, cu_seqlens, max_seqlen, window=None,
                 rotary=None):
    """A model's call (padded with at most a key padding mask, or packed; no bias, default scale;
    a window, rotary tables) found valid in a few attribute reads, cu_seqlens' values aside; the full
    checks, whose messages explain a refusal, run for the others. Per-call host time is what small
    batches wait for."""
    if not (bias is None and scale is None and type(dropout_p) is float and 0.0 <= dropout_p < 1.0
            and type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
            and q.dtype in FLOAT_DTYPES and k.dtype == q.dtype == v.dtype and k.device == q.device == v.device
            and k.shape == q.shape == v.shape and (window is None or (type(window) is int and window >= 0))):
        return False
    if cu_seqlens is not None:
        layout_ok = key_padding_mask is None and q.dim() == 3
        seqlen = max_seqlen
    else:
        layout_ok = max_seqlen is None and q.dim() == 4 and (key_padding_mask is None or (
            type(key_padding_mask) is torch.Tensor and key_padding_mask.dtype == torch.bool
            and key_padding_mask.device == q.device and key_padding_mask.shape == q.shape[:2]))
        seqlen = q.shape[1] if layout_ok else None
    return layout_ok and (rotary is None or (
        type(rotary) is tuple and len(rotary) == 2 and type(seqlen) is int and q.shape[-1] % 2 == 0 and all(
            type(table) is torch.Tensor and table.dtype == torch.float32 and table.device == q.device
            and table.dim() == 2 and table.shape[1] == q.shape[-1] and table.shape[0] >= seqlen
            and not table.requires_grad for table in rotary)))


def _check_cu_seqlens(cu_seqlens, max_seqlen, q):
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError("cu_seqlens must be 1-D [B + 1] with B >= 1, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be an int >= 1 (and >= the longest sequence), got {max_seqlen!r}")
    if capturing_or_compiling(cu_seqlens):
        return  # values unread (see _sequence: the kernels cut a sequence to max_seqlen)
    bounds = remembered(cu_seqlens, torch.Tensor.tolist)  # read back, to refuse bad values up front
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or min(lengths) < 0 or bounds[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at T = {q.shape[0]} (q's tokens), "
            f"got {bounds if len(bounds) <= 10 else bounds[:5] + ['...'] + bounds[-2:]}"
        )
    if max_seqlen < max(lengths):
        raise ValueError(f"max_seqlen must be an int >= the longest sequence ({max(lengths)}) and "
                         f">= 1, got {max_seqlen!r}")
