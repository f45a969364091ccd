"""What fastencoder's BERT and ALBERT share: config checks, input checks, mask conversion, the fused
embeddings and one post-LN encoder layer built on the fused ops.

A layer runs one QKV GEMM, the fused attention on strided views of its output (no head transposes),
the output projection, LayerNorm with the residual add fused, the FFN's first GEMM with its
activation fused, the second GEMM and LayerNorm(+residual) again.

Padding-free execution (`unpad`): when a batch is padded, the real tokens are gathered once after
the embeddings ([B, S, H] → [T, H]), every layer runs on those T rows with the attention in its
packed layout (cu_seqlens), and the result is scattered back once at the end, zeros at padding.
"""
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from fastencoder.kernels import layer_norm, linear
from fastencoder.kernels.attention import attention
from fastencoder.cuda_graphs import GraphRunner
from fastencoder.kernels import padding

# Hugging Face hidden_act → the activation fused into the linear op
FUSED_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

# Off by default: under unpadding, padded positions of last_hidden_state are zeros instead of the
# values Hugging Face computes there, which code comparing or pooling whole tensors would notice.
DEFAULT_UNPAD = False
# unpad="auto" runs padding-free when more than this fraction of the batch's positions is padding.
# PROVISIONAL, not measured: no GPU was available. Unpadding costs a gather and a scatter of [T, H]
# (plus a host sync to size T) and saves the padding's share of every GEMM, LayerNorm and of the
# attention, so it should pay off at a few percent of padding; 10% leaves margin until measured
# (`fastencoder bench`'s "N% padding" cases time both paths from 2 to 30% padding).
AUTO_UNPAD_MIN_PADDING = 0.10


def as_config(config, config_class):
    """`config` itself, or the config read from a config.json file or a model directory."""
    if isinstance(config, (str, os.PathLike)):
        if os.path.isfile(config):
            return config_class.from_json_file(config)
        return config_class.from_pretrained(config)
    if not isinstance(config, config_class):
        raise TypeError(f"expected a {config_class.__name__} or a path to a config.json, got {type(config).__name__}")
    return config


def fused_activation(config):
    act = config.hidden_act
    if not isinstance(act, str) or act not in FUSED_ACTIVATIONS:
        raise NotImplementedError(
            f"fastencoder supports hidden_act in {sorted(FUSED_ACTIVATIONS)}, got {act!r}"
        )
    return FUSED_ACTIVATIONS[act]


def check_supported(config):
    """Refuse, up front, what the fused encoder does not implement."""
    model = type(config).__name__
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise NotImplementedError(
            f"fastencoder implements encoders only: {model} has is_decoder={config.is_decoder}, "
            f"add_cross_attention={config.add_cross_attention} (causal or cross-attention)"
        )
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise NotImplementedError(
            f"fastencoder supports position_embedding_type='absolute' only, got {position_type!r}"
        )
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {config.num_attention_heads}"
        )
    fused_activation(config)


def output_flags(config, output_attentions, output_hidden_states, return_dict):
    """Each flag as passed, else the config's default (as Hugging Face resolves them)."""
    pick = lambda value, name, default: value if value is not None else getattr(config, name, default)
    return (
        bool(pick(output_attentions, "output_attentions", False)),
        bool(pick(output_hidden_states, "output_hidden_states", False)),
        bool(pick(return_dict, "return_dict", True)),
    )


def tracing():
    """True under torch.compile or a CUDA graph capture, where no decision may depend on data."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_id_ranges(checks):
    """checks: (name, ids, limit, limit_name) for each id tensor given; values must lie in [0, limit).
    One device-to-host read for all of them (it waits for the GPU); skipped while tracing, where
    a data-dependent check would break the graph (the CUDA-graph runner checks before replaying)."""
    for name, ids, _, _ in checks:
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    checks = [check for check in checks if check[1].numel()]
    if not checks or tracing():
        return
    ranges = torch.stack([torch.stack(torch.aminmax(ids)).long() for _, ids, _, _ in checks]).tolist()
    for (name, _, limit, limit_name), (low, high) in zip(checks, ranges):
        if low < 0 or high >= limit:
            raise ValueError(f"{name} must lie in [0, {limit}) ({limit_name}={limit}), got values in [{low}, {high}]")


def check_inputs(config, input_ids, inputs_embeds, token_type_ids, position_ids, head_mask, embedding_size,
                 unsupported):
    """Validate the inputs before any kernel runs; returns (batch, sequence length).

    `unsupported`: keyword arguments Hugging Face's decoder variants take, which must be None here.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if head_mask is not None:
        raise ValueError("head_mask is not supported (Hugging Face 5 ignores it; fastencoder refuses it)")
    for name, value in unsupported.items():
        if value is not None:
            raise NotImplementedError(f"{name} is for decoders (cross-attention or caching); fastencoder "
                                      "implements encoders only")
    ranges = []
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, sequence], got shape {tuple(input_ids.shape)}")
        ranges.append(("input_ids", input_ids, config.vocab_size, "vocab_size"))
        batch, seqlen = input_ids.shape
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != embedding_size:
            raise ValueError(f"inputs_embeds must be [batch, sequence, {embedding_size}], got shape "
                             f"{tuple(inputs_embeds.shape)}")
        batch, seqlen = inputs_embeds.shape[:2]
    if position_ids is None:
        if seqlen > config.max_position_embeddings:
            raise ValueError(f"sequence length {seqlen} exceeds max_position_embeddings="
                             f"{config.max_position_embeddings}")
    else:
        ranges.append(("position_ids", position_ids, config.max_position_embeddings, "max_position_embeddings"))
    if token_type_ids is not None:
        if token_type_ids.shape[-1] != seqlen:
            raise ValueError(f"token_type_ids must be [batch, {seqlen}], got shape {tuple(token_type_ids.shape)}")
        ranges.append(("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size"))
    _check_id_ranges(ranges)
    return batch, seqlen


def without_autocast(device):
    """Autocast would hand the fused ops operands of mixed dtypes (its casts reach the PyTorch
    references, not the custom ops): inside the encoder it is off, so the encoder runs in its
    weights' dtype and the weights are never cast."""
    return torch.autocast(device.type, enabled=False)


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


def packed_document_starts(position_ids, attention_mask, batch, seqlen):
    """Hugging Face's packed-sequence convention (DataCollatorWithFlattening): no attention_mask and
    position_ids that restart at 0 inside a row, each row several documents back to back. Returns
    bool [B, S], True where a document starts, or None when the inputs do not follow it: every row
    starts at 0, each position is the previous one + 1 or a restart at 0, with at least one restart.
    (Hugging Face's own eager BERT lets such documents attend to each other; here they never do.)"""
    if position_ids is None or attention_mask is not None or seqlen < 2 or tracing():
        return None
    positions = position_ids.expand(batch, seqlen)
    previous, current = positions[:, :-1], positions[:, 1:]
    restarts = current == 0
    follows = ((current == previous + 1) | restarts).all() & (positions[:, 0] == 0).all()
    if not (follows & restarts.any()).item():
        return None
    return positions == 0


def plan_unpadding(unpad, attention_mask, document_starts, batch, seqlen, output_attentions, device):
    """The PackedTokens to run a batch on, or None for the padded path.

    unpad=True runs padding-free whenever the mask is a 2-D padding mask or absent; "auto" only when
    that removes more than AUTO_UNPAD_MIN_PADDING of the positions and no row is left-padded (so that
    the pooler's first real token is position 0, as in Hugging Face), or for packed documents. Never
    with output_attentions (its probabilities come from the unfused padded path), with a 3-D / 4-D
    mask (a per-query mask the packed layout cannot express) or while tracing (T is data
    dependent)."""
    if unpad is False or output_attentions or tracing():
        return None
    if attention_mask is None:
        if unpad == "auto" and document_starts is None:
            return None  # nothing to remove
        real = torch.ones((batch, seqlen), dtype=torch.bool, device=device)
    elif attention_mask.dim() == 2:
        real = attention_mask.bool()
    else:
        return None
    # built outside inference mode so that the ops' checks can remember them (`read_back` in
    # kernels/_checks.py), and sized by one device-to-host copy
    with torch.inference_mode(False):
        first_positions = real.int().argmax(1)  # argmax returns the first maximum: the first real token
        starts = real & (torch.arange(seqlen, device=device) == first_positions[:, None])
        if document_starts is not None:
            starts |= document_starts
        # each real token's sequence is the number of starts up to it, minus one
        sequence_of = (starts.flatten().cumsum(0) - 1).clamp(min=0)
        lengths = torch.zeros(batch * seqlen, dtype=torch.long, device=device)
        lengths.scatter_add_(0, sequence_of, real.flatten().long())
        counts = torch.stack([real.sum(), starts.sum(), lengths.max(), (~real[:, 0]).any().long()])
        real_tokens, sequences, max_seqlen, left_padded = counts.tolist()
        if real_tokens == 0:
            return None  # nothing to run the packed layout on
        if unpad == "auto" and document_starts is None:
            if left_padded or 1 - real_tokens / (batch * seqlen) <= AUTO_UNPAD_MIN_PADDING:
                return None
        indices = torch.nonzero_static(real.flatten(), size=real_tokens)[:, 0]
        cu_seqlens = F.pad(lengths[:sequences].cumsum(0), (1, 0)).to(torch.int32)
    return PackedTokens(indices, cu_seqlens, max_seqlen, first_positions, batch, seqlen)


def first_token_rows(sequence_output, packing):
    """What the pooler reads: position 0 of each row (Hugging Face), or under unpadding each row's
    first real token (the same for right padding; for left padding Hugging Face reads a padding
    position)."""
    if packing is None:
        return sequence_output[:, 0]
    return sequence_output[torch.arange(packing.batch, device=sequence_output.device), packing.first_positions]


class AttentionMask(NamedTuple):
    key_padding: torch.Tensor | None  # bool [B, S], True = real token
    bias: torch.Tensor | None  # additive, broadcastable to [B, H, S, S], in the compute dtype


def attention_mask_for(attention_mask, batch, seqlen, num_heads, dtype):
    """The attention op's masks for a Hugging Face `attention_mask`:
    2-D [B, S] padding mask (1 = real token)                      → key_padding_mask;
    3-D [B, S, S] mask (1 / True = attend, 0 / False = masked)     → additive bias (finfo.min), as
        Hugging Face 4's get_extended_attention_mask did;
    4-D [B|1, 1|H, S, S]: bool or integer = keep mask as above; floating = a prepared additive mask,
        used as is, as Hugging Face 5 does with 4-D masks.
    """
    if attention_mask is None:
        return AttentionMask(None, None)
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() == 2:
        if shape != (batch, seqlen):
            raise ValueError(f"a 2-D attention_mask must be [batch, sequence] = {(batch, seqlen)}, got {shape}")
        return AttentionMask(attention_mask.bool(), None)
    if attention_mask.dim() == 3:
        if shape != (batch, seqlen, seqlen):
            raise ValueError(f"a 3-D attention_mask must be [batch, sequence, sequence] = "
                             f"{(batch, seqlen, seqlen)}, got {shape}")
        keep = attention_mask[:, None]
    elif attention_mask.dim() == 4:
        if shape[0] not in (1, batch) or shape[1] not in (1, num_heads) or shape[2:] != (seqlen, seqlen):
            raise ValueError(f"a 4-D attention_mask must be [batch or 1, 1 or heads, sequence, sequence] with "
                             f"batch={batch}, heads={num_heads}, sequence={seqlen}, got {shape}")
        if attention_mask.is_floating_point():
            return AttentionMask(None, attention_mask.to(dtype).clamp(min=torch.finfo(dtype).min))
        keep = attention_mask
    else:
        raise ValueError(f"attention_mask must be 2-D, 3-D or 4-D, got shape {shape}")
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return AttentionMask(None, bias.masked_fill_(~keep.bool(), torch.finfo(dtype).min))


def document_mask(document_starts, dtype):
    """For the padded path: packed documents (`packed_document_starts`) as an additive bias
    [B, 1, S, S] that keeps each document's tokens from attending outside it."""
    documents = document_starts.cumsum(-1)
    keep = documents[:, :, None] == documents[:, None, :]
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return AttentionMask(None, bias.masked_fill_(~keep, torch.finfo(dtype).min)[:, None])


class FusedEmbeddingsMixin:
    """Forward for Hugging Face's BERT / ALBERT embeddings modules (same parameters and buffers):
    word + position + token-type embeddings, the sum fused into the LayerNorm, then dropout."""

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        weight_dtype = self.word_embeddings.weight.dtype
        # inputs_embeds may come in another dtype (e.g. from autocast): the ops need one dtype
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds.to(weight_dtype)
        seqlen = words.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, :seqlen]
        if token_type_ids is None:
            token_types = self.token_type_embeddings.weight[0]  # type 0 everywhere, as HF's default
        else:
            token_types = self.token_type_embeddings(token_type_ids)
        others = (self.position_embeddings(position_ids) + token_types).expand_as(words)
        norm = self.LayerNorm
        return self.dropout(layer_norm(words, norm.weight, norm.bias, norm.eps, residual=others))


class QKVProjection(nn.Module):
    """The query, key and value projections: three Linear modules (Hugging Face's parameters), run as
    one GEMM over their concatenated weights."""

    def __init__(self, hidden_size):
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states):
        weight, bias = self.fused_weight_and_bias()
        return linear(hidden_states, weight, bias)

    def fused_weight_and_bias(self):
        parts = (self.query, self.key, self.value)
        params = [p.weight for p in parts] + [p.bias for p in parts]
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            # concatenated anew each call so that gradients reach the three parameters
            return torch.cat(params[:3]), torch.cat(params[3:])
        # Inference: reuse the concatenation while the parameters are unchanged. An optimiser step or
        # load_state_dict bumps _version; .to() / .half() swap the storage (data_ptr, dtype, device).
        stamp = tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        cached = self.__dict__.get("_fused_cache")
        if cached is None or cached[0] != stamp:
            # a normal tensor even under inference_mode, so that later autograd calls may save it
            with torch.inference_mode(False), torch.no_grad():
                cached = (stamp, torch.cat(params[:3]), torch.cat(params[3:]))
            self.__dict__["_fused_cache"] = cached  # a plain attribute: not in the state dict
        return cached[1], cached[2]


def attention_with_probabilities(q, k, v, mask, dropout_p):
    """Unfused attention computed in PyTorch (fp32 softmax, like the kernel), for output_attentions:
    returns the context [B, S, H, D] and the probabilities [B, H, S, S]. Padding keys get finfo.min,
    as in Hugging Face, so a row with every key masked averages uniformly."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), k.to(compute)) / math.sqrt(q.shape[-1])
    if mask.bias is not None:
        scores = scores + mask.bias.to(compute)
    if mask.key_padding is not None:
        scores = scores.masked_fill(~mask.key_padding[:, None, None, :], torch.finfo(compute).min)
    probs = F.dropout(torch.softmax(scores, dim=-1), dropout_p)
    context = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(compute))
    return context.to(q.dtype).contiguous(), probs.to(q.dtype)


class LayerParts(NamedTuple):
    """Where a layer's parameters live: Hugging Face's BERT and ALBERT lay them out differently."""
    qkv: QKVProjection
    attention_dense: nn.Linear
    attention_norm: nn.LayerNorm
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    ffn_norm: nn.LayerNorm


class FusedEncoderLayer(GradientCheckpointingLayer):
    """One post-LN transformer layer. Subclasses build the modules under Hugging Face's names and
    return them from `parts()`; the computation is here. Subclassing GradientCheckpointingLayer
    makes `gradient_checkpointing_enable()` recompute it in the backward."""

    def __init__(self, config, ffn_output_dropout):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.activation = fused_activation(config)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.hidden_dropout = config.hidden_dropout_prob
        self.ffn_output_dropout = ffn_output_dropout

    def parts(self) -> LayerParts:
        raise NotImplementedError

    def forward(self, hidden_states, key_padding_mask=None, attention_bias=None, output_attentions=False,
                cu_seqlens=None, max_seqlen=None):
        """Returns the layer's output and, with output_attentions, the attention probabilities.

        hidden_states: [B, S, H] (padded; masks as key_padding_mask / attention_bias) or [T, H] with
        cu_seqlens and max_seqlen (padding-free: the attention's packed layout)."""
        p = self.parts()
        *tokens, width = hidden_states.shape
        qkv = p.qkv(hidden_states).view(*tokens, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.unbind(-3)  # strided views of one buffer
        mask = AttentionMask(key_padding_mask, attention_bias)
        dropout_p = self.attention_dropout if self.training else 0.0
        probabilities = None
        if output_attentions:
            context, probabilities = attention_with_probabilities(q, k, v, mask, dropout_p)
        else:
            context = attention(q, k, v, key_padding_mask=mask.key_padding, bias=mask.bias, dropout_p=dropout_p,
                                cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        attended = linear(context.view(*tokens, width), p.attention_dense.weight, p.attention_dense.bias)
        attended = self._add_norm(attended, hidden_states, p.attention_norm, self.hidden_dropout)
        inner = linear(attended, p.ffn_in.weight, p.ffn_in.bias, activation=self.activation)
        out = linear(inner, p.ffn_out.weight, p.ffn_out.bias)
        return self._add_norm(out, attended, p.ffn_norm, self.ffn_output_dropout), probabilities

    def _add_norm(self, x, residual, norm, dropout_p):
        x = F.dropout(x, dropout_p, self.training)
        return layer_norm(x, norm.weight, norm.bias, norm.eps, residual=residual)


def gather_tokens(hidden_states, packing):
    """[B, S, *] → [T, *] under unpadding, else unchanged."""
    return hidden_states if packing is None else padding.unpad(hidden_states, packing.indices)


def run_layers(layers, hidden_states, mask, output_attentions, output_hidden_states, packing=None):
    """Run `layers` (a sequence of FusedEncoderLayer calls, shared modules allowed) and collect
    (last hidden state, every hidden state or None, every attention map or None).

    With `packing`, hidden_states are the gathered [T, H] rows (`gather_tokens`); the last and every
    collected hidden state come back scattered to [B, S, H], zeros at padding."""
    if packing is None:
        layer_kwargs = dict(key_padding_mask=mask.key_padding, attention_bias=mask.bias,
                            output_attentions=output_attentions)
        as_padded = lambda rows: rows
    else:
        layer_kwargs = dict(cu_seqlens=packing.cu_seqlens, max_seqlen=packing.max_seqlen)
        as_padded = lambda rows: padding.pad(rows, packing.indices, packing.batch, packing.seqlen)
    all_hidden = [as_padded(hidden_states)] if output_hidden_states else None
    all_attentions = [] if output_attentions else None
    for layer in layers:
        # hidden_states positional: HF's checkpointing needs tensors that require grad passed so
        hidden_states, probabilities = layer(hidden_states, **layer_kwargs)
        if output_hidden_states:
            all_hidden.append(as_padded(hidden_states))
        if output_attentions:
            all_attentions.append(probabilities)
    last = all_hidden[-1] if output_hidden_states else as_padded(hidden_states)
    as_tuple = lambda items: None if items is None else tuple(items)
    return last, as_tuple(all_hidden), as_tuple(all_attentions)


class EncoderOptionsMixin:
    """fastencoder's execution options on BertModel / AlbertModel, plain attributes (not in the
    state dict; `from_pretrained(..., unpad=...)` passes them to the constructor).

    unpad: "auto", True or False (DEFAULT_UNPAD); see `plan_unpadding`. Under unpadding padded positions of
    last_hidden_state and of every hidden state are zeros, and the pooler reads each row's first real
    token (Hugging Face's position 0 for right padding).

    cuda_graphs: False or True: inference calls replay CUDA graphs (fastencoder/cuda_graphs.py);
    `cuda_graph_runner` then tells why a call ran eagerly and how much memory the graphs hold."""

    @property
    def unpad(self):
        return self.__dict__.get("_unpad", DEFAULT_UNPAD)

    @unpad.setter
    def unpad(self, value):
        self.__dict__["_unpad"] = checked_unpad(value)

    @property
    def cuda_graphs(self):
        return self.cuda_graph_runner is not None

    @cuda_graphs.setter
    def cuda_graphs(self, enabled):
        if not isinstance(enabled, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {enabled!r}")
        if enabled != self.cuda_graphs:
            self.__dict__["cuda_graph_runner"] = GraphRunner(self.config.max_position_embeddings) if enabled else None

    @property
    def cuda_graph_runner(self):
        return self.__dict__.get("cuda_graph_runner")

    def replay_cuda_graph(self, input_ids, attention_mask, token_type_ids, **others):
        """The output of a replayed graph when CUDA graphs are on and this call qualifies, else None."""
        runner = self.cuda_graph_runner
        return None if runner is None else runner.run(self, input_ids, attention_mask, token_type_ids, others)

    def check_ids(self, input_ids, token_type_ids):
        check_inputs(self.config, input_ids, None, token_type_ids, None, None, None, {})

    def attention_plan(self, attention_mask, position_ids, batch, seqlen, output_attentions, dtype, device):
        """(the padded path's masks, or the padding-free layout) for this call: exactly one is used."""
        mask = attention_mask_for(attention_mask, batch, seqlen, self.config.num_attention_heads, dtype)  # validates
        documents = packed_document_starts(position_ids, attention_mask, batch, seqlen)
        packing = plan_unpadding(self.unpad, attention_mask, documents, batch, seqlen, output_attentions, device)
        if packing is not None:
            return AttentionMask(None, None), packing
        if documents is not None:
            return document_mask(documents, dtype), None
        return mask, None


class EncoderHeadsMixin:
    """For a Hugging Face task model (heads, losses and outputs kept): its `__init__` builds HF's
    encoder and then calls `post_init()`; here `post_init` first puts fastencoder's encoder in its
    place, so that weight init and tying see ours."""

    encoder_class = None  # set by subclasses: fastencoder's BertModel or AlbertModel
    supports_gradient_checkpointing = True

    def __init__(self, config, *args, unpad=DEFAULT_UNPAD, **kwargs):
        super().__init__(as_config(config, self.config_class), *args, **kwargs)
        self.unpad = unpad

    @property
    def unpad(self):
        """The encoder's `unpad` option (see EncoderOptionsMixin)."""
        return getattr(self, self.base_model_prefix).unpad

    @unpad.setter
    def unpad(self, value):
        getattr(self, self.base_model_prefix).unpad = value

    def post_init(self):
        hf_encoder = getattr(self, self.base_model_prefix)
        if not isinstance(hf_encoder, self.encoder_class):
            with_pooler = getattr(hf_encoder, "pooler", None) is not None
            setattr(self, self.base_model_prefix, self.encoder_class(self.config, add_pooling_layer=with_pooler))
        super().post_init()
