"""What fastencoder's BERT and ALBERT share: config checks, input checks, mask conversion, the fused
embeddings and one post-LN encoder layer built on the fused ops.

A layer runs one QKV GEMM, the fused attention on strided views of its output (no head transposes),
the output projection, LayerNorm with the residual add fused, the FFN's first GEMM with its
activation fused, the second GEMM and LayerNorm(+residual) again.
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

# Hugging Face hidden_act → the activation fused into the linear op
FUSED_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


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


def _check_id_range(name, ids, limit, limit_name):
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() == 0 or torch.compiler.is_compiling():  # a data-dependent check would break the graph
        return
    low, high = (value.item() for value in torch.aminmax(ids))
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
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, sequence], got shape {tuple(input_ids.shape)}")
        _check_id_range("input_ids", input_ids, config.vocab_size, "vocab_size")
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
        _check_id_range("position_ids", position_ids, config.max_position_embeddings, "max_position_embeddings")
    if token_type_ids is not None:
        if token_type_ids.shape[-1] != seqlen:
            raise ValueError(f"token_type_ids must be [batch, {seqlen}], got shape {tuple(token_type_ids.shape)}")
        _check_id_range("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size")
    return batch, seqlen


def without_autocast(device):
    """Autocast would hand the fused ops operands of mixed dtypes (its casts reach the PyTorch
    references, not the custom ops): inside the encoder it is off, so the encoder runs in its
    weights' dtype and the weights are never cast."""
    return torch.autocast(device.type, enabled=False)


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

    def forward(self, hidden_states, key_padding_mask=None, attention_bias=None, output_attentions=False):
        """Returns the layer's output and, with output_attentions, the attention probabilities."""
        p = self.parts()
        batch, seqlen, width = hidden_states.shape
        qkv = p.qkv(hidden_states).view(batch, seqlen, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.unbind(2)  # strided views of one buffer
        mask = AttentionMask(key_padding_mask, attention_bias)
        dropout_p = self.attention_dropout if self.training else 0.0
        probabilities = None
        if output_attentions:
            context, probabilities = attention_with_probabilities(q, k, v, mask, dropout_p)
        else:
            context = attention(q, k, v, key_padding_mask=mask.key_padding, bias=mask.bias, dropout_p=dropout_p)
        attended = linear(context.view(batch, seqlen, width), p.attention_dense.weight, p.attention_dense.bias)
        attended = self._add_norm(attended, hidden_states, p.attention_norm, self.hidden_dropout)
        inner = linear(attended, p.ffn_in.weight, p.ffn_in.bias, activation=self.activation)
        out = linear(inner, p.ffn_out.weight, p.ffn_out.bias)
        return self._add_norm(out, attended, p.ffn_norm, self.ffn_output_dropout), probabilities

    def _add_norm(self, x, residual, norm, dropout_p):
        x = F.dropout(x, dropout_p, self.training)
        return layer_norm(x, norm.weight, norm.bias, norm.eps, residual=residual)


def run_layers(layers, hidden_states, mask, output_attentions, output_hidden_states):
    """Run `layers` (a sequence of FusedEncoderLayer calls, shared modules allowed) and collect
    (last hidden state, every hidden state or None, every attention map or None)."""
    all_hidden = [hidden_states] if output_hidden_states else None
    all_attentions = [] if output_attentions else None
    for layer in layers:
        # hidden_states positional: HF's checkpointing needs tensors that require grad passed so
        hidden_states, probabilities = layer(
            hidden_states, key_padding_mask=mask.key_padding, attention_bias=mask.bias,
            output_attentions=output_attentions,
        )
        if output_hidden_states:
            all_hidden.append(hidden_states)
        if output_attentions:
            all_attentions.append(probabilities)
    as_tuple = lambda items: None if items is None else tuple(items)
    return hidden_states, as_tuple(all_hidden), as_tuple(all_attentions)


class EncoderHeadsMixin:
    """For a Hugging Face task model (heads, losses and outputs kept): its `__init__` builds HF's
    encoder and then calls `post_init()`; here `post_init` first puts fastencoder's encoder in its
    place, so that weight init and tying see ours."""

    encoder_class = None  # set by subclasses: fastencoder's BertModel or AlbertModel
    supports_gradient_checkpointing = True

    def __init__(self, config, *args, **kwargs):
        super().__init__(as_config(config, self.config_class), *args, **kwargs)

    def post_init(self):
        hf_encoder = getattr(self, self.base_model_prefix)
        if not isinstance(hf_encoder, self.encoder_class):
            with_pooler = getattr(hf_encoder, "pooler", None) is not None
            setattr(self, self.base_model_prefix, self.encoder_class(self.config, add_pooling_layer=with_pooler))
        super().post_init()
