"""`attention`, the public op: its checks, the backend switch, the launches of the forward and
backward kernels as torch.library custom ops, autograd, and batches beyond CUDA's grid in chunks."""
import math

import torch

from .. import backend
from .._checks import capturing, remembered
from .._dispatch import direct_when_eager
from .._launch import cdiv, launches_on_input_device, next_power_of_2
from .backward import _attention_bwd_delta_kernel, _attention_bwd_dkdv_kernel, _attention_bwd_dq_kernel
from .checks import _check_cu_seqlens, _check_inputs, _layout, _well_formed
from .configs import _DELTA_BLOCK_M, SUPPORTED_HEAD_DIMS, _bwd_configs, _fwd_config
from .dropout import MAX_DROPOUT_SEQLEN, _draw_dropout_seed, _seed_argument
from .forward import _attention_fwd_kernel
from .reference import attention_torch

# the kernels' grids put sequences x heads on CUDA's y axis (at most 65535 blocks): larger batches
# run in chunks
MAX_BATCH_HEADS = 65535
LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x · log2 e), exp2 is cheaper



def _bsh_strides(tensor, packed):
    """Strides over (sequence, token, head); the packed layout finds sequences via cu_seqlens."""
    return (0, *tensor.stride()[:2]) if packed else tensor.stride()[:3]


def _unused(device, dtype):
    """Placeholder for an absent optional tensor (its kernel flag is off, it is never read)."""
    return torch.empty(0, dtype=dtype, device=device)


def _rotary_args(cos, sin, q):
    """The rotary tables as the kernels read them (fp32 [P, D], rows of D contiguous values), or
    placeholders."""
    if cos is None:
        return _unused(q.device, torch.float32), _unused(q.device, torch.float32)
    return cos.contiguous(), sin.contiguous()


def _mask_bias_args(q, key_padding_mask, bias, relative_bias, batch, heads, max_seqlen, scale):
    """(key mask bytes, key lengths, bias, their strides) as the kernels take them; a relative
    bias goes in the bias's place (`_relative_bias_rows`)."""
    if key_padding_mask is None:
        mask, mask_strides = _unused(q.device, torch.uint8), (0, 0)
        lengths = _unused(q.device, torch.int32)
    else:
        mask = key_padding_mask.view(torch.uint8)  # same bytes; Triton loads it as u8
        if mask.stride(1) != 1:  # the variant compiled takes unit stride over keys (cases.py)
            mask = mask.contiguous()
        mask_strides = mask.stride()
        lengths = _key_lengths(key_padding_mask)
    if relative_bias is not None:
        bias = _relative_bias_rows(relative_bias, max_seqlen, scale)
        bias_strides = (0, *bias.stride()[:2])
    elif bias is None:
        bias, bias_strides = _unused(q.device, q.dtype), (0, 0, 0)
    else:
        bias, bias_strides = _aligned_bias(bias, batch, heads, max_seqlen)
    return mask, lengths, bias, (*mask_strides, *bias_strides)


# |relative bias / scale| in the kernels' tables: fp32's finite range, with room for the scores
RELATIVE_BIAS_LIMIT = 2.3e38


def _relative_bias_center(max_seqlen):
    """Where distance 0 sits in the kernels' tables of a relative bias: a multiple of 16, so that
    query rows start 16-element aligned (`_relative_bias_ptrs`); distances run to ±(max_seqlen - 1)."""
    return cdiv(max_seqlen, 16) * 16


def _relative_bias_rows(relative_bias, max_seqlen, scale):
    """A relative bias [H, 2·max_seqlen - 1] as the kernels read it (`_relative_bias_ptrs`): per
    head, the fp32 table T (T[center + d] = the bias at distance d, divided by |scale| as the
    kernels' scores start, 0 beyond ±(max_seqlen - 1)) in 16 copies of 2·center elements, copy r
    shifted left by r: [H, 16, 2·center], 128·H·center bytes, never S x S."""
    center = _relative_bias_center(max_seqlen)
    table = relative_bias.new_zeros((relative_bias.shape[0], 2 * center + 16), dtype=torch.float32)
    # infinities (outside the op's contract) clamped finite: the forward takes every row's max as finite
    table[:, center - max_seqlen + 1:center + max_seqlen] = (
        relative_bias.float() / max(abs(scale), 1e-30)).clamp_(-RELATIVE_BIAS_LIMIT, RELATIVE_BIAS_LIMIT)
    return table.unfold(1, 2 * center, 1)[:, :16].contiguous()


def _key_lengths(key_padding_mask):
    """int32 [B]: each sequence's number of real keys where its mask row is right-padded (True
    exactly on a prefix, BERT's usual batch: the kernels then bound the keys by the length and read
    no mask bytes), else -1 (the kernels read the bytes). Computed on the device, no host read, and
    remembered while the mask is unchanged: every layer of a forward, and its backward, pass the
    same mask."""
    return remembered(key_padding_mask, _lengths_of_prefixes)


def _lengths_of_prefixes(key_padding_mask):
    lengths = key_padding_mask.sum(1, dtype=torch.int32)
    positions = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)
    prefix = (key_padding_mask == (positions < lengths[:, None])).all(1)
    return torch.where(prefix, lengths, -1)


def _positive_scale(q, scale):
    """(q, scale) with scale >= 0, as the kernels take them: a negative scale's sign goes into q
    (the forward takes its running max before scaling; dQ then changes sign)."""
    return (q, scale) if scale >= 0 else (-q, -scale)


def _scale_log2(scale):
    """scale (>= 0) · log2 e as the kernels take it, at least 1e-30 · log2 e: a masked score -inf
    times 0 would be nan. The scores change by at most 1e-30 · |q·k|: nothing in fp32."""
    return max(scale, 1e-30) * LOG2E


def _bias_strides(bias):
    """Strides over (sequence, head, query, key) of a [B, H, S, S] bias, 0 where broadcast."""
    return [0 if size == 1 else stride for size, stride in zip(bias.shape, bias.stride())]


def _aligned_bias(bias, batch, heads, max_seqlen):
    """The bias as the kernels read it: [B, H, S, S] with unit stride over keys and its other
    strides multiples of 16 elements (0 where broadcast), so that every row starts 16-element
    aligned and loads as wide vectors (loads of unknown alignment go element by element, a 64-bit
    address each, and spill). Copied, rows padded, only where it is not so already. Returns the
    bias and its (sequence, head, query) strides."""
    bias = bias.expand(batch, heads, max_seqlen, max_seqlen)  # broadcast dims get stride 0
    strides = _bias_strides(bias)
    if strides[3] != 1 or any(stride % 16 for stride in strides[:3]):
        varying = [size if stride else 1 for size, stride in zip(bias.shape[:3], strides[:3])]
        aligned = bias.new_empty(*varying, cdiv(max_seqlen, 16) * 16)[..., :max_seqlen]
        aligned.copy_(bias[tuple(slice(0, size) for size in varying)])
        bias = aligned.expand(batch, heads, max_seqlen, max_seqlen)
        strides = _bias_strides(bias)
    return bias, strides[:3]


@launches_on_input_device
def _attention_fwd_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
    bias: torch.Tensor | None, relative_bias: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
    seed: torch.Tensor | None, max_seqlen: int, scale: float, dropout_p: float, allow_tf32: bool,
    window: int | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    packed = cu_seqlens is not None
    batch, heads, _ = _layout(q, cu_seqlens, max_seqlen)
    head_dim = q.shape[-1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # packed: rows past a sequence's end have no query and are never written; zeros keep them defined
    stats = (torch.zeros if packed else torch.empty)((batch, heads, 2, max_seqlen), dtype=torch.float32,
                                                     device=q.device)
    mask, lengths, bias, mask_bias_strides = _mask_bias_args(q, key_padding_mask, bias, relative_bias, batch,
                                                             heads, max_seqlen, scale)
    block_m, block_n, num_warps, num_stages = _fwd_config(
        head_dim, q.dtype, allow_tf32, bias.numel() > 0, seed is not None, relative_bias is not None,
        cos is not None)
    q, scale = _positive_scale(q, scale)
    _attention_fwd_kernel[(cdiv(max_seqlen, block_m), batch * heads)](
        q, k, v, out, stats, mask, lengths, bias, *_rotary_args(cos, sin, q),
        cu_seqlens if packed else _unused(q.device, torch.int32), _seed_argument(seed, q),
        *_bsh_strides(q, packed), *_bsh_strides(k, packed), *_bsh_strides(v, packed),
        *_bsh_strides(out, packed), *mask_bias_strides,
        heads, max_seqlen, _scale_log2(scale), dropout_p, 0 if window is None else window,
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), BLOCK_M=block_m,
        BLOCK_N=block_n, PACKED=packed, HAS_KEY_MASK=key_padding_mask is not None,
        HAS_BIAS=bias.numel() > 0, RELATIVE_BIAS=relative_bias is not None, HAS_DROPOUT=seed is not None,
        WINDOW=window is not None, ROTARY=cos is not None, ALLOW_TF32=allow_tf32, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, stats


_attention_fwd = torch.library.custom_op("fastencoder::attention_fwd", _attention_fwd_impl, mutates_args=())


@_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, bias, relative_bias, cu_seqlens, seed, max_seqlen, scale, dropout_p,
      allow_tf32, window, cos, sin):
    batch, heads, _ = _layout(q, cu_seqlens, max_seqlen)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (batch, heads, 2, max_seqlen), dtype=torch.float32
    )


@launches_on_input_device
def _attention_bwd_impl(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    stats: torch.Tensor, key_padding_mask: torch.Tensor | None, bias: torch.Tensor | None,
    relative_bias: torch.Tensor | None, cu_seqlens: torch.Tensor | None, seed: torch.Tensor | None,
    max_seqlen: int, scale: float, dropout_p: float, allow_tf32: bool, window: int | None,
    cos: torch.Tensor | None, sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    packed = cu_seqlens is not None
    batch, heads, _ = _layout(q, cu_seqlens, max_seqlen)
    head_dim = q.shape[-1]
    block_d = next_power_of_2(head_dim)
    if do.stride(-1) != 1:
        do = do.contiguous()
    cu_seqlens = cu_seqlens if packed else _unused(q.device, torch.int32)
    seed_arg = _seed_argument(seed, q)
    mask, lengths, bias, mask_bias_strides = _mask_bias_args(q, key_padding_mask, bias, relative_bias, batch,
                                                             heads, max_seqlen, scale)
    relative = relative_bias is not None
    # the relative bias's gradient, per head and distance: T's layout (`_relative_bias_rows`)
    center = _relative_bias_center(max_seqlen)
    dbias = torch.zeros((heads, 2 * center) if relative else (0,), dtype=torch.float32, device=q.device)
    negative_scale = scale < 0
    q, scale = _positive_scale(q, scale)
    flags = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, PACKED=packed,
        HAS_KEY_MASK=key_padding_mask is not None, HAS_BIAS=bias.numel() > 0, RELATIVE_BIAS=relative,
        HAS_DROPOUT=seed is not None, WINDOW=window is not None, ROTARY=cos is not None, ALLOW_TF32=allow_tf32,
    )
    window = 0 if window is None else window
    cos, sin = _rotary_args(cos, sin, q)
    qkv_do_strides = (*_bsh_strides(q, packed), *_bsh_strides(k, packed),
                      *_bsh_strides(v, packed), *_bsh_strides(do, packed))

    delta = torch.empty((batch, heads, max_seqlen), dtype=torch.float32, device=q.device)
    _attention_bwd_delta_kernel[(cdiv(max_seqlen, _DELTA_BLOCK_M), batch * heads)](
        out, do, delta, cu_seqlens, *_bsh_strides(out, packed), *_bsh_strides(do, packed),
        heads, max_seqlen,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=_DELTA_BLOCK_M, PACKED=packed,
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    (dkdv_m, dkdv_n, dkdv_warps, dkdv_stages), (dq_m, dq_n, dq_warps, dq_stages) = _bwd_configs(
        head_dim, q.dtype, allow_tf32, bias.numel() > 0, relative, flags["ROTARY"])
    _attention_bwd_dkdv_kernel[(cdiv(max_seqlen, dkdv_n), batch * heads)](
        q, k, v, do, dk, dv, stats, delta, mask, lengths, bias, dbias, cos, sin, cu_seqlens, seed_arg,
        *qkv_do_strides, *_bsh_strides(dk, packed), *_bsh_strides(dv, packed), *mask_bias_strides,
        heads, max_seqlen, scale, _scale_log2(scale), dropout_p, window,
        BLOCK_M=dkdv_m, BLOCK_N=dkdv_n, **flags, num_warps=dkdv_warps, num_stages=dkdv_stages,
    )
    _attention_bwd_dq_kernel[(cdiv(max_seqlen, dq_m), batch * heads)](
        q, k, v, do, dq, stats, delta, mask, lengths, bias, cos, sin, cu_seqlens, seed_arg,
        *qkv_do_strides, *_bsh_strides(dq, packed), *mask_bias_strides,
        heads, max_seqlen, scale, _scale_log2(scale), dropout_p, window,
        BLOCK_M=dq_m, BLOCK_N=dq_n, **flags, num_warps=dq_warps, num_stages=dq_stages,
    )
    if negative_scale:  # the kernels' dQ is the gradient of -q
        dq.neg_()
    if not relative:
        return dq, dk, dv, dbias
    drelative = dbias[:, center - max_seqlen + 1:center + max_seqlen]
    if seed is not None:  # the kernels' dS leaves dropout's 1 / (1 - p) out
        drelative = drelative / (1.0 - dropout_p)
    return dq, dk, dv, drelative.to(relative_bias.dtype)


_attention_bwd = torch.library.custom_op("fastencoder::attention_bwd", _attention_bwd_impl, mutates_args=())


@_attention_bwd.register_fake
def _(do, q, k, v, out, stats, key_padding_mask, bias, relative_bias, cu_seqlens, seed, max_seqlen,
      scale, dropout_p, allow_tf32, window, cos, sin):
    grads = tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))
    drelative = q.new_empty((0,), dtype=torch.float32) if relative_bias is None else torch.empty_like(
        relative_bias, memory_format=torch.contiguous_format)
    return (*grads, drelative)


def _setup_context(ctx, inputs, output):
    (q, k, v, key_padding_mask, bias, relative_bias, cu_seqlens, seed, max_seqlen, scale, dropout_p,
     allow_tf32, window, cos, sin) = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, key_padding_mask, bias, relative_bias, cu_seqlens, seed, cos, sin)
    ctx.arguments = (max_seqlen, scale, dropout_p, allow_tf32, window)


def _backward(ctx, dout, _dstats):
    q, k, v, out, stats, key_padding_mask, bias, relative_bias, cu_seqlens, seed, cos, sin = ctx.saved_tensors
    dq, dk, dv, drelative = _call_attention_bwd(
        dout, q, k, v, out, stats, key_padding_mask, bias, relative_bias, cu_seqlens, seed, *ctx.arguments, cos, sin
    )
    drelative = None if relative_bias is None else drelative
    return dq, dk, dv, None, None, drelative, None, None, None, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
_call_attention_fwd = direct_when_eager(_attention_fwd, _attention_fwd_impl, _backward, _setup_context)
_call_attention_bwd = direct_when_eager(_attention_bwd, _attention_bwd_impl)


def attention(q, k, v, *, key_padding_mask=None, bias=None, relative_bias=None, scale=None, dropout_p=0.0,
              cu_seqlens=None, max_seqlen=None, window=None, rotary=None):
    """Multi-head attention softmax(q·kᵀ·scale + mask)·v, non-causal, with optional dropout.

    q, k, v: [B, S, H, D] (padded layout; any strides on B, S, H, unit stride on D) or [T, H, D]
        with cu_seqlens (int32 [B + 1], cumulative lengths from 0) and max_seqlen (an int, at
        least the longest sequence): the packed layout. cu_seqlens' values are checked on the host,
        except while a CUDA graph captures or torch.compile traces (a read back would fail the
        capture): there the kernels cut a sequence longer than max_seqlen to its first max_seqlen
        tokens, which attend among themselves, and leave its later rows of the output (and of
        the gradients) unwritten; nothing outside the sequence's rows is touched.
    key_padding_mask: bool [B, S], True = real token (padded layout only).
    bias: additive, q's dtype, broadcastable to [B, H, S, S] (S = max_seqlen when packed; -inf and
        finfo.min allowed). Its gradient is not computed: a bias that requires grad is refused.
    relative_bias: a bias by relative position (MPNet's, T5's), float [H, 2·S - 1] (S = max_seqlen
        when packed): query i and key j (positions within the sequence) get
        relative_bias[h, j - i + S - 1] added to their scaled score. Finite values (no -inf
        masking through it: the kernels clamp infinities into fp32's range). The kernels read it from a table of H · 16 · 2·S values (never an
        S x S bias) and compute its gradient (summed per distance with atomic adds: its last bits
        vary from run to run). Not with `bias`.
    scale: default 1/sqrt(D). dropout_p: in [0, 1), dropout on the probabilities (kept ones
        scaled by 1/(1-p)); the seed comes from torch's default CPU generator.
    window: None (every key) or an int >= 0, a bidirectional sliding window: query i sees key j
        iff |i - j| <= window, i and j positions within the sequence (padded layout: the index in
        the row, padding included; packed: from the sequence's start). Hugging Face's ModernBERT
        masks exactly this with window = config.sliding_window = config.local_attention // 2
        (transformers' sliding_window_bidirectional_overlay: abs(q_idx - kv_idx) <= sliding_window;
        its attention module's own `sliding_window`, one more, is FlashAttention's exclusive bound).
        Combines with key padding masks, biases and dropout. The kernels skip the key blocks outside
        a query block's windows; a window >= S - 1 is no window.
    rotary: None or (cos, sin), rotary position embeddings applied to q and k inside the
        attention, as Hugging Face's apply_rotary_pos_emb with rotate_half: x·cos + rotate_half(x)·sin,
        rotate_half pairing dims d and d + D/2, in fp32, then rounded to q's dtype. cos and sin:
        float32 [P, D] tables (Hugging Face's rotary embedding at positions 0..P-1, converted to
        float32), indexed by the position within the sequence as for `window`; P >= S (max_seqlen
        when packed). Gradients flow to q and k; the tables get none (one that requires grad is
        refused).
    float16, bfloat16 and float32 all run in the kernels (float32 with fp32 dot products, or TF32
    where torch allows it for cuBLAS matmuls: torch.backends.cuda.matmul.fp32_precision or
    torch.backends.fp32_precision "tf32", or the legacy allow_tf32). Head dims 16, 32, 64, 80, 96,
    128 run in the kernels, others on the PyTorch path (`attention_torch`), as does every call the
    backend switch (kernels/backend.py) does not give to the kernels.
    Returns a contiguous tensor of q's shape; rows whose keys are all masked are zeros.
    """
    if relative_bias is not None or not _well_formed(q, k, v, key_padding_mask, bias, scale, dropout_p,
                                                      cu_seqlens, max_seqlen, window, rotary):
        _check_inputs(q, k, v, key_padding_mask, bias, scale, dropout_p, cu_seqlens, max_seqlen, relative_bias,
                      window, rotary)
    elif cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, max_seqlen, q)
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if window is not None and window >= (q.shape[1] if cu_seqlens is None else max_seqlen) - 1:
        window = None  # every key of every sequence is in every window
    rotary = None if rotary is None else tuple(rotary)
    if not backend.use_triton(q.device, q.dtype) or head_dim not in SUPPORTED_HEAD_DIMS:
        return attention_torch(q, k, v, key_padding_mask=key_padding_mask, bias=bias, relative_bias=relative_bias,
                               scale=scale, dropout_p=dropout_p, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                               window=window, rotary=rotary)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride on its last (head) dim, got strides "
                             f"{tensor.stride()}; call .contiguous() first")
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("the Triton attention does not compute the gradient of bias; "
                                  "detach it, or use set_backend('torch')")
    max_seqlen = q.shape[1] if cu_seqlens is None else max_seqlen
    if dropout_p > 0 and max_seqlen > MAX_DROPOUT_SEQLEN:
        raise ValueError(f"the Triton attention's dropout supports sequences up to "
                         f"{MAX_DROPOUT_SEQLEN} tokens, got {max_seqlen}")
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch, heads, _ = _layout(q, cu_seqlens, max_seqlen)
    if heads > MAX_BATCH_HEADS:
        raise ValueError(f"the Triton attention takes at most {MAX_BATCH_HEADS} heads, got {heads}")
    if batch * heads > MAX_BATCH_HEADS:
        return _in_batch_chunks(q, k, v, key_padding_mask, bias, relative_bias, scale, dropout_p, cu_seqlens,
                                max_seqlen, window, rotary)
    seed = _draw_dropout_seed() if dropout_p > 0 else None
    allow_tf32 = q.dtype == torch.float32 and backend.allows_tf32()
    cos, sin = (None, None) if rotary is None else rotary
    return _call_attention_fwd(q, k, v, key_padding_mask, bias, relative_bias, cu_seqlens, seed, max_seqlen,
                               scale, dropout_p, allow_tf32, window, cos, sin)[0]


def _in_batch_chunks(q, k, v, key_padding_mask, bias, relative_bias, scale, dropout_p, cu_seqlens, max_seqlen,
                     window, rotary):
    """`attention` over chunks of at most MAX_BATCH_HEADS // heads sequences, concatenated."""
    batch, heads, _ = _layout(q, cu_seqlens, max_seqlen)
    per_bias_batch = bias is not None and bias.dim() == 4 and bias.shape[0] > 1
    if cu_seqlens is not None and capturing(cu_seqlens):
        raise NotImplementedError(
            f"the Triton attention runs more than {MAX_BATCH_HEADS} sequences x heads in chunks whose "
            f"tokens it finds by reading cu_seqlens back, which a CUDA graph capture cannot do: pass "
            f"at most {MAX_BATCH_HEADS // heads} sequences a call there, or use set_backend('torch')")
    bounds = None if cu_seqlens is None else remembered(cu_seqlens, torch.Tensor.tolist)
    outs, per_chunk = [], MAX_BATCH_HEADS // heads
    for first in range(0, batch, per_chunk):
        last = min(first + per_chunk, batch)
        sequences = slice(first, last)
        options = dict(scale=scale, dropout_p=dropout_p, bias=bias[sequences] if per_bias_batch else bias,
                       relative_bias=relative_bias, window=window, rotary=rotary)
        if cu_seqlens is None:
            rows = sequences
            options["key_padding_mask"] = None if key_padding_mask is None else key_padding_mask[sequences]
        else:
            rows = slice(bounds[first], bounds[last])
            options.update(cu_seqlens=cu_seqlens[first:last + 1] - bounds[first], max_seqlen=max_seqlen)
        outs.append(attention(q[rows], k[rows], v[rows], **options))
    return torch.cat(outs)
