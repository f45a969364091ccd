"""Padding-free execution (`unpad`): when a batch is padded, its real tokens are gathered once
after the embeddings ([B, S, H] → [T, H]), every layer runs on those T rows with the attention in
its packed layout (cu_seqlens), and the result is scattered back once at the end, zeros at padding."""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastencoder.kernels import padding
from fastencoder.kernels._checks import remember

from .inputs import tracing

# "auto" by default: a batch with enough padding runs padding-free, its padded positions of
# last_hidden_state then zeros instead of the values Hugging Face computes there (unpad=False keeps
# those). unpad="auto" runs padding-free when more than AUTO_UNPAD_MIN_PADDING of the batch's
# positions is padding. Measured on the CPU (all-MiniLM-L6-v2, B32xS128, one thread; CPU time of
# padding-free over padded): 0.94 at no padding, 0.99 at 5 %, 1.04 at 10 %, 1.15 at 20 %, 1.6 at 50 %.
# Not yet measured on a GPU, where unpadding also costs a host sync to size the packed layout
# (`fastencoder bench`'s "N% padding" cases time both paths from 2 to 30 % padding).
DEFAULT_UNPAD = "auto"
AUTO_UNPAD_MIN_PADDING = 0.10


def checked_unpad(value):
    # `is` comparisons: 1 and 0 compare equal to True and False but are refused
    if not (value == "auto" or value is True or value is False):
        raise ValueError(f"unpad must be 'auto', True or False, got {value!r}")
    return value



class PackedTokens(NamedTuple):
    """The padding-free layout of a batch: its real tokens back to back, as sequences."""
    indices: torch.Tensor  # int64 [T]: flat positions b·S + s of the real tokens, increasing
    cu_seqlens: torch.Tensor  # int32 [sequences + 1]: where each sequence starts among the T rows
    max_seqlen: int
    first_positions: torch.Tensor  # int64 [B]: each row's first real token, which the pooler reads
    batch: int
    seqlen: int


def plan_unpadding(unpad, attention_mask, document_starts, batch, seqlen, output_attentions, device):
    """(the PackedTokens to run a batch on, or None for the padded path; whether the batch may hold
    padding: False when the plan's read found none, so that the padded path can drop the mask).

    unpad=True runs padding-free whenever the mask is a 2-D padding mask or absent; "auto" only when
    that removes more than AUTO_UNPAD_MIN_PADDING of the positions and no row is left-padded (so that
    the pooler's first real token is position 0, as in Hugging Face), or for packed documents. Never
    with output_attentions (its probabilities come from the unfused padded path), with a 3-D / 4-D
    mask (a per-query mask the packed layout cannot express) or while tracing (T is data
    dependent)."""
    if unpad is False or output_attentions or tracing():
        return None, True
    if attention_mask is None:
        if unpad == "auto" and document_starts is None:
            return None, False  # nothing to remove
        real = torch.ones((batch, seqlen), dtype=torch.bool, device=device)
    elif attention_mask.dim() == 2:
        real = attention_mask.bool()
    else:
        return None, True
    if unpad == "auto" and document_starts is None:
        # decided from two numbers first, so that a batch that runs padded (most, and every small
        # one) costs four small ops and a read, not the layout's thirty: one more read when it is used
        real_tokens, left_padded = torch.stack([real.sum(), ~real[:, 0].all()]).tolist()
        if not _unpadding_pays(real_tokens, left_padded, batch, seqlen):
            return None, real_tokens < batch * seqlen
    # Sized by one device-to-host copy, which also brings back what the ops' input checks would
    # otherwise read back from indices and cu_seqlens (`remembered` in kernels/_checks.py): they are
    # told instead. Built outside inference mode, so that they can be remembered.
    with torch.inference_mode(False):
        first_positions = real.int().argmax(1)  # argmax returns the first maximum: the first real token
        starts = real & (torch.arange(seqlen, device=device) == first_positions[:, None])
        if document_starts is not None:
            starts |= document_starts
        # each real token's sequence is the number of starts up to it, minus one
        sequence_of = (starts.flatten().cumsum(0) - 1).clamp(min=0)
        lengths = torch.zeros(batch * seqlen, dtype=torch.long, device=device)
        lengths.scatter_add_(0, sequence_of, real.flatten().long())
        flat = real.flatten()
        first_real, last_real = flat.int().argmax(), flat.numel() - 1 - flat.flip(0).int().argmax()
        sequence_ends = lengths[:batch].cumsum(0)  # every sequence's, unless documents make more than B
        facts = torch.cat([torch.stack([real.sum(), starts.sum(), lengths.max(), first_real, last_real]),
                           sequence_ends]).tolist()
        real_tokens, sequences, max_seqlen, first_real, last_real = facts[:5]
        if real_tokens == 0:
            return None, True  # nothing to run the packed layout on
        indices = torch.nonzero_static(flat, size=real_tokens)[:, 0]
        cu_seqlens = F.pad(lengths[:sequences].cumsum(0), (1, 0)).to(torch.int32)
    remember(indices, padding.index_facts, (first_real, last_real, True))
    if sequences <= batch:
        remember(cu_seqlens, torch.Tensor.tolist, [0, *facts[5:5 + sequences]])
    return PackedTokens(indices, cu_seqlens, max_seqlen, first_positions, batch, seqlen), True


def _unpadding_pays(real_tokens, left_padded, batch, seqlen):
    """unpad="auto"'s rule for a padding mask."""
    return not left_padded and 1 - real_tokens / (batch * seqlen) > AUTO_UNPAD_MIN_PADDING


def first_token_rows(sequence_output, packing):
    """What the pooler reads: position 0 of each row (Hugging Face), or under unpadding each row's
    first real token (the same for right padding; for left padding Hugging Face reads a padding
    position)."""
    if packing is None:
        return sequence_output[:, 0]
    return sequence_output[torch.arange(packing.batch, device=sequence_output.device), packing.first_positions]



def gather_tokens(hidden_states, packing):
    """[B, S, *] → [T, *] under unpadding, else unchanged."""
    return hidden_states if packing is None else padding.unpad(hidden_states, packing.indices)
