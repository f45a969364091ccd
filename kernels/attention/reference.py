"""The float64/fp32 reference of `attention` and its fast PyTorch path (SDPA), same semantics."""
import math
from typing import NamedTuple

import torch

from .._checks import capturing_or_compiling, remembered
from .checks import _layout


def relative_bias_matrix(relative_bias, length):
    """[1, H, length, length]: relative_bias[h, j - i + S - 1] at query i, key j, for a
    relative_bias [H, 2·S - 1] and length <= S (autograd-tracked). Query i's row is the table's
    window of `length` columns from S - 1 - i: windows of the table (a view), the rows flipped
    (one contiguous copy, several times cheaper than a gather by index)."""
    center = (relative_bias.shape[1] - 1) // 2
    windows = relative_bias.unfold(1, length, 1)  # [H, 2·S - length, length]: window w holds columns w..
    return windows[:, center - length + 1:center + 1].flip(1)[None]


def window_band(query_start, queries, key_start, keys, window, device):
    """bool [queries, keys]: True where query i sees key j, |i - j| <= window, for the queries at
    positions query_start.. and the keys at key_start.. (positions within the sequence)."""
    rows = torch.arange(query_start, query_start + queries, device=device)
    cols = torch.arange(key_start, key_start + keys, device=device)
    return (rows[:, None] - cols[None, :]).abs() <= window


def rotate_by(x, cos, sin):
    """Hugging Face's apply_rotary_pos_emb (rotate_half, pairs (d, d + D/2)) in cos's dtype, cos and
    sin broadcast over x's heads: x·cos + rotate_half(x)·sin."""
    x = x.to(cos.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def rotate(x, rotary, positions, compute):
    """rotate_by on x [..., P, H, D] (padded) or [T, H, D] (packed) with the rows at `positions` (a
    slice or int64 indices) of the tables cos, sin = rotary ([P, D]), computed in `compute`."""
    cos, sin = (table[positions][:, None, :].to(compute) for table in rotary)
    return rotate_by(x, cos, sin)


def _padded_reference(q, k, v, key_padding_mask, bias, scale, dropout_p, dropout_mask, band=None, rotary=None):
    """The attention in fp32 (or q's dtype, if wider) without SDPA; band: a bool [S_q, S_k] of the
    pairs a window lets through; rotary (cos, sin) rotates q and k at positions 0..S-1."""
    compute = torch.promote_types(q.dtype, torch.float32)
    if rotary is not None:
        positions = slice(0, q.shape[1])
        q, k = rotate(q, rotary, positions, compute), rotate(k, rotary, positions, compute)
    qh, kh, vh = (t.to(compute).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    scores = (qh @ kh.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(compute)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    if band is not None:
        scores = scores.masked_fill(~band, float("-inf"))
    # rows with no visible key give zeros; softmax of finite placeholders keeps gradients finite
    no_keys = (scores == float("-inf")).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(no_keys, 0.0), dim=-1).masked_fill(no_keys, 0.0)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return (probs @ vh).transpose(1, 2).to(v.dtype).contiguous()


def attention_reference(q, k, v, *, key_padding_mask=None, bias=None, relative_bias=None, scale=None,
                        dropout_p=0.0, cu_seqlens=None, max_seqlen=None, window=None, rotary=None,
                        dropout_mask=None):
    """PyTorch reference of `attention`, computed in fp32 (or in q's dtype when that is wider:
    float64 inputs give a float64 reference), result in q's dtype. The window masks scores with
    |i - j| > window; the rotary tables rotate q and k in that precision (no rounding to q's dtype
    in between).

    dropout_mask: optional boolean [B, H, S, S] (S = max_seqlen in the packed layout, indexed by
    positions within each sequence) of the probabilities kept; without it dropout_p > 0 draws
    torch's own dropout, which is not the kernels' mask.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if relative_bias is not None:
        bias = relative_bias_matrix(relative_bias, q.shape[1] if cu_seqlens is None else max_seqlen)
    if cu_seqlens is None:
        if q.shape[1] == 0:
            return torch.empty(q.shape, dtype=q.dtype, device=q.device)
        band = None if window is None else window_band(0, q.shape[1], 0, q.shape[1], window, q.device)
        return _padded_reference(q, k, v, key_padding_mask, bias, scale, dropout_p, dropout_mask, band, rotary)
    batch, heads, _ = _layout(q, cu_seqlens, max_seqlen)
    if bias is not None:
        bias = bias.expand(batch, heads, max_seqlen, max_seqlen)
    bounds = cu_seqlens.tolist()
    outs = [torch.empty((0, *q.shape[1:]), dtype=q.dtype, device=q.device)]
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end == start:
            continue
        length = end - start
        pairs = (slice(b, b + 1), slice(None), slice(0, length), slice(0, length))
        outs.append(_padded_reference(
            q[start:end][None], k[start:end][None], v[start:end][None], None,
            None if bias is None else bias[pairs], scale, dropout_p,
            None if dropout_mask is None else dropout_mask[pairs],
            None if window is None else window_band(0, length, 0, length, window, q.device), rotary,
        )[0])
    return torch.cat(outs)


def attention_torch(q, k, v, *, key_padding_mask=None, bias=None, relative_bias=None, scale=None,
                    dropout_p=0.0, cu_seqlens=None, max_seqlen=None, window=None, rotary=None):
    """The fast PyTorch path of `attention` (same arguments, same semantics): whichever
    `F.scaled_dot_product_attention` backend torch picks for the device (flash, memory-efficient,
    cuDNN, or its fused CPU kernel), on strided [B, H, S, D] views of the inputs, no copies.

    Rows with no visible key give zeros, as in the kernels. On the CPU (where reading cu_seqlens
    waits for nothing) the packed layout runs without a bias in a few length buckets
    (`_length_buckets`): each bucket's sequences gathered to its longest length, attended with the
    padding masked and gathered back, so that the attention's work follows the real lengths, not
    the batch's longest. Elsewhere, with a bias, and under torch.compile or a CUDA graph capture
    (which cannot read the lengths), it is scattered into a zero-padded [B, max_seqlen] batch by
    index ops, attended with the padding masked and gathered back: no host read, no loop over
    sequences. Dropout (dropout_p > 0) is SDPA's own, drawn from torch's generator: the kernels'
    distribution, not their mask. Gradients reach q, k, v, and a bias or relative bias that
    requires grad. A relative bias becomes the bias of each length it meets (`relative_bias_matrix`),
    in the buckets too; one of another dtype than q's runs the unfused fp32 math (SDPA takes a
    bias of q's dtype only: rounding it would add an error Hugging Face's does not have).
    Rotary tables rotate q and k first, as Hugging Face does (in fp32, rounded back to q's dtype).
    A window narrower than the sequence runs in chunks of queries, each attending to the keys of
    its windows only under a boolean band mask (`_windowed`): never an S x S mask.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if rotary is not None:
        positions = slice(0, q.shape[1]) if cu_seqlens is None else _token_positions(cu_seqlens, q.shape[0],
                                                                                     max_seqlen)
        q, k = (rotate(t, rotary, positions, torch.float32).to(t.dtype) for t in (q, k))
    if cu_seqlens is None:
        if relative_bias is not None:
            bias = relative_bias_matrix(relative_bias, q.shape[1])
        finite = relative_bias is not None and relative_bias.device.type == "cpu" and not capturing_or_compiling(
            relative_bias) and bool(relative_bias.isfinite().all())
        return _padded_torch(q, k, v, key_padding_mask, bias, scale, dropout_p, window, finite_bias=finite)
    if (bias is None and cu_seqlens.device.type == "cpu" and not capturing_or_compiling(cu_seqlens)
            and (relative_bias is None or relative_bias.dtype == q.dtype)):
        return _bucketed(q, k, v, remembered(cu_seqlens, _length_buckets, q.shape[0]), scale, dropout_p,
                         relative_bias, window)
    if relative_bias is not None:
        bias = relative_bias_matrix(relative_bias, max_seqlen)
    batch = cu_seqlens.shape[0] - 1
    flat, key_mask = _packed_positions(cu_seqlens, q.shape[0], max_seqlen)
    q, k, v = _scattered(q, k, v, flat, batch * max_seqlen)
    q, k, v = (t.view(batch, max_seqlen, *t.shape[1:]) for t in (q, k, v))
    if bias is None and window is None:  # every query row sees a key (see _packed_positions): SDPA as it is
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask[:, None, None, :],
            dropout_p=dropout_p, scale=scale).transpose(1, 2)
    else:
        out = _padded_torch(q, k, v, key_mask, bias, scale, dropout_p, window)
    return out.reshape(batch * max_seqlen, *out.shape[2:]).index_select(0, flat)


def _token_positions(cu_seqlens, tokens, max_seqlen):
    """int64 [T]: each packed token's position within its sequence (below max_seqlen)."""
    flat, _ = _packed_positions(cu_seqlens, tokens, max_seqlen)
    return flat % max_seqlen


class LengthBuckets(NamedTuple):
    """Where the packed rows go for `_bucketed`: the buckets' padded rows back to back."""
    gather: torch.Tensor  # int64 [rows]: the packed row each padded row reads (None: the rows as they are)
    # int64 [rows]: the packed row each padded row's output goes to, T for padding (None: as they are)
    destination: torch.Tensor
    shapes: list  # [(sequences, length)] per bucket
    key_masks: list  # per bucket: bool [sequences, 1, 1, length] of the real keys, or None (no padding)


def _bucketed(q, k, v, buckets, scale, dropout_p, relative_bias=None, window=None):
    if not buckets.shapes:  # no tokens: q's empty rows, still connected for autograd
        return q.clone()
    tokens = q.shape[0]
    if buckets.gather is not None:
        q, k, v = (t.index_select(0, buckets.gather) for t in (q, k, v))
    outs, start = [], 0
    for (sequences, length), key_mask in zip(buckets.shapes, buckets.key_masks):
        rows = slice(start, start + sequences * length)
        start = rows.stop
        if window is not None and window < length - 1:  # its own chunks, each with a band mask
            bias = None if relative_bias is None else relative_bias_matrix(relative_bias, length)
            out = _padded_torch(*(t[rows].view(sequences, length, *t.shape[1:]) for t in (q, k, v)),
                                None if key_mask is None else key_mask[:, 0, 0, :], bias, scale, dropout_p, window)
            outs.append(out.view(sequences * length, *q.shape[1:]))
            continue
        heads = [t[rows].view(sequences, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)]
        mask = key_mask
        if relative_bias is not None:  # every row sees a key: no -inf row
            mask = relative_bias_matrix(relative_bias, length)
            if key_mask is not None:
                mask = mask.masked_fill(~key_mask, float("-inf"))
        out = torch.nn.functional.scaled_dot_product_attention(*heads, attn_mask=mask, dropout_p=dropout_p,
                                                               scale=scale)
        outs.append(out.transpose(1, 2).reshape(sequences * length, *q.shape[1:]))
    if buckets.destination is None:
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    # one copy into place: each bucket's rows to their packed rows, its padding rows to a spare last row
    out, start = q.new_empty((tokens + 1, *q.shape[1:])), 0
    for bucket_out in outs:
        out.index_copy_(0, buckets.destination[start:start + bucket_out.shape[0]], bucket_out)
        start += bucket_out.shape[0]
    return out[:tokens]


# A bucket more must save the attention this many query-key pairs (per head) cost: it costs a
# call, a mask and a share of the gathers. At most MAX_LENGTH_BUCKETS: every SDPA call meets its
# threads at a barrier, which is slow on a loaded machine.
BUCKET_SPLIT_MIN_PAIRS = 128 * 128
MAX_LENGTH_BUCKETS = 4


def _length_buckets(cu_seqlens, tokens):
    """The sequences of cu_seqlens (a CPU tensor; empty sequences left out) sorted by length and
    cut into at most MAX_LENGTH_BUCKETS runs, each padded to its longest: cut greedily where a cut
    saves the most query-key pairs, while that is more than BUCKET_SPLIT_MIN_PAIRS."""
    bounds = cu_seqlens.tolist()
    sequences = sorted(((end - start, start) for start, end in zip(bounds[:-1], bounds[1:]) if end > start),
                       key=lambda sequence: -sequence[0])  # stable: equal lengths keep their order
    if not sequences:
        return LengthBuckets(None, None, [], [])
    lengths = [length for length, _ in sequences]
    cuts = [0, len(sequences)]  # bucket i: sequences[cuts[i]:cuts[i + 1]]
    while len(cuts) <= MAX_LENGTH_BUCKETS:
        # cutting the run [first, last) at m saves (last - m) · (lengths[first]² - lengths[m]²) pairs
        saved, at = max(((last - m) * (lengths[first] ** 2 - lengths[m] ** 2), m)
                        for first, last in zip(cuts[:-1], cuts[1:]) for m in range(first + 1, last)) \
            if len(cuts) - 1 < len(sequences) else (0, None)
        if saved <= BUCKET_SPLIT_MIN_PAIRS:
            break
        cuts = sorted(cuts + [at])
    shapes, key_masks, gathers, real_rows = [], [], [], []
    for first, last in zip(cuts[:-1], cuts[1:]):
        longest = lengths[first]
        bucket_lengths = torch.tensor(lengths[first:last])[:, None]
        within = torch.arange(longest)
        real = within < bucket_lengths
        shapes.append((last - first, longest))
        key_masks.append(None if lengths[last - 1] == longest else real[:, None, None, :])
        real_rows.append(real.flatten())
        # a padding row reads its sequence's last row: finite values, masked as a key, never gathered back
        starts = torch.tensor([start for _, start in sequences[first:last]])[:, None]
        gathers.append((starts + torch.minimum(within, bucket_lengths - 1)).flatten())
    gather, real_rows = torch.cat(gathers), torch.cat(real_rows)
    if gather.shape[0] == tokens and torch.equal(gather, torch.arange(tokens)):
        return LengthBuckets(None, None, shapes, key_masks)
    return LengthBuckets(gather, torch.where(real_rows, gather, tokens), shapes, key_masks)


def _scattered(q, k, v, flat, positions):
    """q, k, v [T, H, D] scattered to rows `flat` of zero-filled [positions, H, D] tensors. Views of
    one fused [T, 3, H, D] projection (what the models pass) are scattered as one tensor, outside
    autograd and tracing: one fill and one copy instead of three."""
    heads, dim = q.shape[1:]
    step = heads * dim
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    fused = not (needs_grad or torch.compiler.is_compiling()) and q.stride() == k.stride() == v.stride() == (
        3 * step, dim, 1) and k.data_ptr() - q.data_ptr() == v.data_ptr() - k.data_ptr() == step * q.element_size()
    if not fused:
        return (t.new_zeros((positions, heads, dim)).index_copy_(0, flat, t) for t in (q, k, v))
    qkv = q.as_strided((q.shape[0], 3, heads, dim), (3 * step, step, dim, 1))
    return q.new_zeros((positions, 3, heads, dim)).index_copy_(0, flat, qkv).unbind(1)


def _padded_torch(q, k, v, key_padding_mask, bias, scale, dropout_p, window=None, finite_bias=False):
    """finite_bias: the bias holds no -inf (a relative bias's): unmasked, every row sees its keys."""
    if window is not None and window < q.shape[1] - 1:
        return _windowed(q, k, v, key_padding_mask, bias, scale, dropout_p, window)
    return _attend(q, k, v, key_padding_mask, bias, scale, dropout_p, finite_bias=finite_bias)


# Queries per SDPA call of a windowed attention on the PyTorch path (`_windowed`): at most
# WINDOW_QUERY_CHUNK; on the CPU about the window's width (at least CPU_WINDOW_QUERY_CHUNK), where
# the work saved on keys outside the windows outweighs the extra calls (fp32, 6 heads of 64, window
# 64: B8 x S512 6.4 ms in chunks of 64 queries against 12.9 ms in one chunk of 512; B1 x S8192 27.7
# against 59.8 ms).
WINDOW_QUERY_CHUNK = 512
CPU_WINDOW_QUERY_CHUNK = 32


def _windowed(q, k, v, key_padding_mask, bias, scale, dropout_p, window):
    """The padded attention with a window, in chunks of queries: each chunk attends to the keys its
    windows reach, [first - window, last + window), under a boolean band mask: work and memory grow
    with S·(chunk + 2·window), not S² (S = 8192: no S x S mask)."""
    batch, seqlen, heads = q.shape[:3]
    if bias is not None:
        bias = bias.expand(batch, heads, seqlen, seqlen)  # a view: each chunk slices its block
    chunk = WINDOW_QUERY_CHUNK
    if q.device.type == "cpu":
        chunk = min(chunk, max(window, CPU_WINDOW_QUERY_CHUNK))
    outs = []
    for first in range(0, seqlen, chunk):
        last = min(first + chunk, seqlen)
        keys = slice(max(first - window, 0), min(last + window, seqlen))
        band = window_band(first, last - first, keys.start, keys.stop - keys.start, window, q.device)
        outs.append(_attend(q[:, first:last], k[:, keys], v[:, keys],
                            None if key_padding_mask is None else key_padding_mask[:, keys],
                            None if bias is None else bias[:, :, first:last, keys], scale, dropout_p, band))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def _attend(q, k, v, key_padding_mask, bias, scale, dropout_p, band=None, finite_bias=False):
    """SDPA on [B, S_q, H, D] queries and [B, S_k, H, D] keys and values, masked by the key padding
    mask, the bias and the band (bool [S_q, S_k]); the unfused math where SDPA would be wrong."""
    if bias is not None and bias.dtype != q.dtype or _needs_exact_backward(q, k, v, key_padding_mask, bias, band):
        return _padded_reference(q, k, v, key_padding_mask, bias, scale, dropout_p, None, band)
    if finite_bias and key_padding_mask is None and band is None:
        mask, no_keys = bias, None  # no row without keys: nothing to look for
    else:
        mask, no_keys = _sdpa_mask(key_padding_mask, bias, q.device, band)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p,
        scale=scale)
    if no_keys is not None:
        out = out.masked_fill(no_keys, 0.0)
    return out.transpose(1, 2).contiguous()  # SDPA's output is laid out [B, S, H, D] already


def _sdpa_mask(key_padding_mask, bias, device, band=None):
    """(SDPA's attn_mask, a mask of the query rows that see no key, or None).

    SDPA's backends disagree on rows with every key masked (NaN, or zeros); such rows get a
    harmless mask (every key visible, no -inf) and their output is zeroed afterwards, so no NaN
    reaches the forward or the backward. On the CPU the rare case is looked for first (reading a
    CPU tensor waits for nothing): without it, no extra pass; a padding mask without padding is
    dropped, as Hugging Face does, so that SDPA runs unmasked. On a GPU, and under torch.compile
    (which cannot branch on data), both run unconditionally (a device-to-host read would stall the
    stream). A band (a window's, bool [S_q, S_k]) lets each query see at least its own key: alone
    it leaves no row without keys."""
    read = key_padding_mask if bias is None else bias  # what the CPU's look reads, if anything
    on_cpu = read is not None and device.type == "cpu" and not capturing_or_compiling(read)
    if bias is None:
        if key_padding_mask is None or (on_cpu and key_padding_mask.all()):
            return (None if band is None else band), None
        if band is None:
            no_keys = ~key_padding_mask.any(-1)[:, None, None, None]
            mask = key_padding_mask[:, None, None, :]
        else:
            mask = key_padding_mask[:, None, None, :] & band
            no_keys = ~mask.any(-1, keepdim=True)
        if on_cpu and not no_keys.any():
            return mask, None
        return mask | no_keys, no_keys
    if key_padding_mask is not None:
        bias = bias.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    if band is not None:
        bias = bias.masked_fill(~band, float("-inf"))
    no_keys = (bias == float("-inf")).all(-1, keepdim=True)
    if on_cpu and not no_keys.any():
        return bias, None
    return bias.masked_fill(no_keys, 0.0), no_keys


# Below this, a row's largest visible bias swamps its scores' logsumexp in fp32 rounding (Hugging
# Face's finfo.min masks a row everywhere that way: the forward averages the visible values
# uniformly, as the kernels do). SDPA's backward recomputes P as exp(s - logsumexp) and would get
# such rows wrong (P = 1 instead of 1 / keys): with gradients needed they run `_padded_reference`.
SWAMPING_BIAS = -1e3


def _needs_exact_backward(q, k, v, key_padding_mask, bias, band=None):
    """Whether this call's gradients must come from the unfused math (see SWAMPING_BIAS). Reads
    one flag back from the device: only for a bias, with gradients needed; under torch.compile,
    which cannot branch on data, and in a CUDA graph capture, such calls always take the unfused
    math."""
    if bias is None or not torch.is_grad_enabled() or not any(
            t.requires_grad for t in (q, k, v, bias)):
        return False
    if capturing_or_compiling(bias):
        return True
    if key_padding_mask is not None:
        bias = bias.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    if band is not None:
        bias = bias.masked_fill(~band, float("-inf"))
    largest = bias.amax(-1)
    return bool(((largest < SWAMPING_BIAS) & (largest > float("-inf"))).any())


def _packed_positions(cu_seqlens, tokens, max_seqlen):
    """(int64 [T]: each token's flat position b·max_seqlen + s in the padded batch, bool
    [B, max_seqlen]: True at the real tokens, and at every position of an empty sequence, whose
    query rows are never gathered back: so every query row sees a key), computed on the device
    without a host read, and remembered while cu_seqlens is unchanged: every layer of a
    padding-free forward passes the same cu_seqlens."""
    return remembered(cu_seqlens, _positions_in_padded_batch, tokens, max_seqlen)


def _positions_in_padded_batch(cu_seqlens, tokens, max_seqlen):
    device = cu_seqlens.device
    starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff().long()
    sequence = torch.repeat_interleave(torch.arange(lengths.shape[0], device=device), lengths,
                                       output_size=tokens)
    within = torch.arange(tokens, device=device) - starts[sequence]
    # a sequence longer than max_seqlen (unchecked while capturing or compiling) stays in its row
    flat = sequence * max_seqlen + within.clamp_(max=max_seqlen - 1)
    key_mask = (torch.arange(max_seqlen, device=device) < lengths[:, None]) | (lengths == 0)[:, None]
    return flat, key_mask
