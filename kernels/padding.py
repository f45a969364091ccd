"""Gather and scatter of token rows, for padding-free execution.

`unpad(hidden, indices)`: hidden [B, S, *F] → rows [T, *F], the positions listed in `indices`
    (flat positions b·S + s of the real tokens, strictly increasing, int32 or int64).
`pad(rows, indices, batch, seqlen)`: the inverse, rows [T, *F] → [B, S, *F] with zeros at every
    position not listed in `indices`.

Each is the other's backward. The scatter writes every output row exactly once (a real token's
row or zeros): each output position finds its token by binary search in the sorted `indices`, so
no zero-filled buffer is written first and no inverse map is built.
"""
import math

import torch
try:
    import triton.language as tl
except ImportError:  # triton ships for Linux only; elsewhere every op runs its PyTorch reference
    from ._no_triton import tl

from . import backend
from ._checks import capturing_or_compiling, check_float, remembered
from ._dispatch import direct_when_eager
from ._launch import batch_generic, cdiv, launches_on_input_device

INDEX_DTYPES = (torch.int32, torch.int64)
# A tile of 16 rows x 256 features (4096 elements, 32 per thread with 4 warps): wide, coalesced
# row copies; a hidden size of 768 takes three column blocks.
BLOCK_ROWS = 16
BLOCK_COLS = 256
NUM_WARPS = 4


# rows[t] = hidden[indices[t]], one block of BLOCK_ROWS tokens per program, all columns.
@batch_generic("num_tokens")
def _unpad_kernel(
    Hidden, Indices, Rows, num_tokens, width, stride_hidden, stride_rows,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    token_ok = tokens < num_tokens
    positions = tl.load(Indices + tokens, mask=token_ok, other=0).to(tl.int64)
    tokens64 = tokens.to(tl.int64)
    for col_start in range(0, width, BLOCK_COLS):
        cols = col_start + tl.arange(0, BLOCK_COLS)
        mask = token_ok[:, None] & (cols < width)[None, :]
        values = tl.load(Hidden + positions[:, None] * stride_hidden + cols[None, :], mask=mask)
        tl.store(Rows + tokens64[:, None] * stride_rows + cols[None, :], values, mask=mask)


# out[p] = rows[t] where indices[t] == p, else zeros; one block of BLOCK_ROWS output positions per
# program. t is the lower bound of p in the strictly increasing indices (first t with
# indices[t] >= p), found in `search_steps` = bit length of T halvings of [0, T).
@batch_generic("num_tokens", "num_positions", "search_steps")
def _pad_kernel(
    Rows, Indices, Out, num_tokens, num_positions, width, stride_rows, stride_out, search_steps,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    positions = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    position_ok = positions < num_positions
    low = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
    high = low + num_tokens
    for _ in range(search_steps):
        mid = (low + high) // 2
        # past the end reads as "not below p", so the bound never moves beyond T
        at_mid = tl.load(Indices + mid, mask=mid < num_tokens, other=num_positions)
        below = at_mid < positions
        low = tl.where(below, mid + 1, low)
        high = tl.where(below, high, mid)
    has_token = low < num_tokens
    found = has_token & (tl.load(Indices + low, mask=has_token, other=-1) == positions)
    tokens64 = low.to(tl.int64)
    positions64 = positions.to(tl.int64)
    for col_start in range(0, width, BLOCK_COLS):
        cols = col_start + tl.arange(0, BLOCK_COLS)
        col_ok = (cols < width)[None, :]
        values = tl.load(Rows + tokens64[:, None] * stride_rows + cols[None, :],
                         mask=found[:, None] & col_ok, other=0.0)
        tl.store(Out + positions64[:, None] * stride_out + cols[None, :], values,
                 mask=position_ok[:, None] & col_ok)


def _unit_stride(rows):
    return rows if rows.stride(-1) == 1 else rows.contiguous()


@launches_on_input_device
def _unpad_impl(hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """hidden [positions, F] → [T, F]."""
    hidden = _unit_stride(hidden)
    num_tokens, width = indices.shape[0], hidden.shape[1]
    rows = torch.empty((num_tokens, width), dtype=hidden.dtype, device=hidden.device)
    if num_tokens and width:
        _unpad_kernel[(cdiv(num_tokens, BLOCK_ROWS),)](
            hidden, indices, rows, num_tokens, width, hidden.stride(0), rows.stride(0),
            BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, num_warps=NUM_WARPS,
        )
    return rows


_unpad = torch.library.custom_op("fastencoder::unpad", _unpad_impl, mutates_args=())


@_unpad.register_fake
def _(hidden, indices):
    return hidden.new_empty((indices.shape[0], hidden.shape[1]))


@launches_on_input_device
def _pad_impl(rows: torch.Tensor, indices: torch.Tensor, num_positions: int) -> torch.Tensor:
    """rows [T, F] → [num_positions, F], zeros where no token lands."""
    rows = _unit_stride(rows)
    num_tokens, width = rows.shape
    out = torch.empty((num_positions, width), dtype=rows.dtype, device=rows.device)
    if num_positions and width:
        _pad_kernel[(cdiv(num_positions, BLOCK_ROWS),)](
            rows, indices, out, num_tokens, num_positions, width, rows.stride(0), out.stride(0),
            num_tokens.bit_length(),
            BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, num_warps=NUM_WARPS,
        )
    return out


_pad = torch.library.custom_op("fastencoder::pad", _pad_impl, mutates_args=())


@_pad.register_fake
def _(rows, indices, num_positions):
    return rows.new_empty((num_positions, rows.shape[1]))


def _unpad_setup_context(ctx, inputs, output):
    hidden, indices = inputs
    ctx.num_positions = hidden.shape[0]
    ctx.save_for_backward(indices)


def _unpad_backward(ctx, grad_rows):
    (indices,) = ctx.saved_tensors
    return _call_pad(grad_rows, indices, ctx.num_positions), None


def _pad_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _pad_backward(ctx, grad_out):
    (indices,) = ctx.saved_tensors
    return _call_unpad(grad_out, indices), None, None


_unpad.register_autograd(_unpad_backward, setup_context=_unpad_setup_context)
_pad.register_autograd(_pad_backward, setup_context=_pad_setup_context)
_call_unpad = direct_when_eager(_unpad, _unpad_impl, _unpad_backward, _unpad_setup_context)
_call_pad = direct_when_eager(_pad, _pad_impl, _pad_backward, _pad_setup_context)


def unpad_reference(hidden, indices):
    """PyTorch reference of `unpad`."""
    return hidden.flatten(0, 1)[indices]


def pad_reference(rows, indices, batch, seqlen):
    """PyTorch reference of `pad`."""
    out = rows.new_zeros((batch * seqlen, *rows.shape[1:])).index_put((indices,), rows)
    return out.view(batch, seqlen, *rows.shape[1:])


def unpad_torch(hidden, indices):
    """The fast PyTorch path of `unpad`: one index_select (a gather of whole rows)."""
    return hidden.flatten(0, 1).index_select(0, indices)


def pad_torch(rows, indices, batch, seqlen):
    """The fast PyTorch path of `pad`: zeros, then the rows put in place."""
    out = rows.new_zeros((batch * seqlen, *rows.shape[1:])).index_put_((indices,), rows)
    return out.view(batch, seqlen, *rows.shape[1:])


def index_facts(indices):
    """(lowest, highest, strictly increasing) of non-empty indices, in one device-to-host copy."""
    low, high = torch.aminmax(indices)
    increasing = (indices[1:] > indices[:-1]).all()
    low, high, increasing = torch.stack([low, high, increasing.to(low.dtype)]).tolist()
    return low, high, bool(increasing)


def _check_indices(indices, device, num_positions):
    if not isinstance(indices, torch.Tensor) or indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must be an int32 or int64 tensor, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D [T], got shape {tuple(indices.shape)}")
    if indices.device != device:
        raise ValueError(f"indices is on {indices.device} but the tensor it indexes is on {device}")
    if num_positions >= 2**31:
        raise ValueError(f"at most 2**31 - 1 positions (B x S), got {num_positions}")
    # a data-dependent check can neither be traced nor captured in a CUDA graph: skipped there
    if indices.numel() == 0 or capturing_or_compiling(indices):
        return
    low, high, increasing = remembered(indices, index_facts)
    if low < 0 or high >= num_positions or not increasing:
        raise ValueError(f"indices must be strictly increasing positions in [0, {num_positions}) "
                         f"(B x S), got values in [{low}, {high}]"
                         f"{'' if increasing else ', not strictly increasing'}")


def unpad(hidden, indices):
    """Gather the real tokens: hidden [B, S, *F] → [T, *F], row t = hidden.flatten(0, 1)[indices[t]].

    indices: int32 or int64 [T], strictly increasing flat positions b·S + s (e.g.
    `attention_mask.flatten().nonzero()[:, 0]`). Differentiable (its backward is `pad`).
    """
    check_float("hidden", hidden)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [B, S, *features], got shape {tuple(hidden.shape)}")
    batch, seqlen, *features = hidden.shape
    _check_indices(indices, hidden.device, batch * seqlen)
    if not backend.use_triton(hidden.device):
        return unpad_torch(hidden, indices)
    rows = _call_unpad(hidden.reshape(batch * seqlen, math.prod(features)), indices)
    return rows.view(indices.shape[0], *features)


def pad(rows, indices, batch, seqlen):
    """Scatter rows back: rows [T, *F] → [batch, seqlen, *F], zeros at the positions not in indices.

    indices: as for `unpad` (strictly increasing flat positions, int32 or int64 [T]).
    Differentiable (its backward is `unpad`).
    """
    check_float("rows", rows)
    for name, value in (("batch", batch), ("seqlen", seqlen)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if rows.dim() < 1:
        raise ValueError("rows must be [T, *features], got a 0-d tensor")
    _check_indices(indices, rows.device, batch * seqlen)
    if indices.shape[0] != rows.shape[0]:
        raise ValueError(f"rows has {rows.shape[0]} rows but indices lists {indices.shape[0]} tokens")
    if not backend.use_triton(rows.device):
        return pad_torch(rows, indices, batch, seqlen)
    features = rows.shape[1:]
    out = _call_pad(rows.reshape(rows.shape[0], math.prod(features)), indices, batch * seqlen)
    return out.view(batch, seqlen, *features)


def compile_cases():
    """Every compiled variant, for the static kernel report (kernels/report.py). Widths and row
    strides are multiples of 16 in every BERT-family model: launches specialise on that."""
    constexprs = dict(BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS)
    for dtype in ("fp16", "bf16", "fp32"):
        for index_type in ("i32", "i64"):
            variant = f"{dtype} indices {index_type}"
            yield dict(
                name=f"padding_unpad {variant}", fn=_unpad_kernel,
                signature=dict(Hidden=f"*{dtype}", Indices=f"*{index_type}", Rows=f"*{dtype}",
                               num_tokens="i32", width="i32", stride_hidden="i32", stride_rows="i32"),
                constexprs=constexprs, divisible_by_16=("width", "stride_hidden", "stride_rows"),
                num_warps=NUM_WARPS, num_stages=1, matmul=False,
            )
            yield dict(
                name=f"padding_pad {variant}", fn=_pad_kernel,
                signature=dict(Rows=f"*{dtype}", Indices=f"*{index_type}", Out=f"*{dtype}",
                               num_tokens="i32", num_positions="i32", width="i32",
                               stride_rows="i32", stride_out="i32", search_steps="i32"),
                constexprs=constexprs, divisible_by_16=("width", "stride_rows", "stride_out"),
                num_warps=NUM_WARPS, num_stages=1, matmul=False,
            )
