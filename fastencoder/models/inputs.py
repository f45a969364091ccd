"""What the models check and convert before the encoder runs: supported configurations, inputs
(refused before any kernel launches) and Hugging Face's attention masks in the attention op's terms."""
import os
from typing import NamedTuple

import torch
import transformers
from packaging import version

# From transformers 5.25, BERT, the RoBERTa family and ELECTRA hand position_ids to their attention
# mask: without an attention_mask, a row whose positions jump (any step other than +1) holds packed
# sequences that attend only among themselves (masking_utils.find_packed_sequence_indices).
HF_PACKS_SEQUENCES_BY_POSITION = version.parse(transformers.__version__) >= version.parse("5.25.0")

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
    """Each flag as passed, else the config's default (as Hugging Face resolves them). As in
    Hugging Face, output_hidden_states may select hidden states by index instead (an int or a list
    of ints, negative ones counting back from config.num_hidden_layers + 1, out-of-range ones
    dropped): it then comes back as the set of selected indices, else as a bool."""
    pick = lambda value, name, default: value if value is not None else getattr(config, name, default)
    hidden_states = pick(output_hidden_states, "output_hidden_states", False)
    if isinstance(hidden_states, int) and not isinstance(hidden_states, bool):
        hidden_states = [hidden_states]
    if isinstance(hidden_states, (list, tuple)):
        count = config.num_hidden_layers + 1
        hidden_states = {index % count for index in hidden_states if -count <= index < count} if hidden_states else False
    return (
        bool(pick(output_attentions, "output_attentions", False)),
        hidden_states if isinstance(hidden_states, set) else bool(hidden_states),
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
        if tracing():
            return AttentionMask(attention_mask.bool(), None)
        # a normal tensor even under inference mode: the attention op then derives each sequence's
        # length from it once for all layers (an inference tensor can change unseen, so it would
        # derive them again in every layer)
        with torch.inference_mode(False):
            return AttentionMask(attention_mask != 0, None)
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



def packed_document_starts(position_ids, attention_mask, batch, seqlen, at_any_jump=False):
    """Packed documents, each row several documents back to back, given by position_ids without an
    attention_mask. Returns bool [B, S], True where a document starts, or None for one document per row.

    at_any_jump: Hugging Face's rule for the families that hand position_ids to their mask
    (HF_PACKS_SEQUENCES_BY_POSITION): a document starts wherever a position is not the previous one
    + 1; while tracing (no read back) the starts are returned unchecked, a single document per row
    then masking nothing. Otherwise the convention of DataCollatorWithFlattening: every row starts
    at 0, each position is the previous one + 1 or a restart at 0, with at least one restart
    (Hugging Face's own models before 5.25 let such documents attend to each other; here they never do)."""
    if position_ids is None or attention_mask is not None or seqlen < 2:
        return None
    positions = position_ids.expand(batch, seqlen)
    previous, current = positions[:, :-1], positions[:, 1:]
    if at_any_jump:
        jumps = current != previous + 1
        if not tracing() and not jumps.any().item():
            return None
        return torch.cat([torch.ones_like(jumps[:, :1]), jumps], 1)
    if tracing():
        return None
    restarts = current == 0
    follows = ((current == previous + 1) | restarts).all() & (positions[:, 0] == 0).all()
    if not (follows & restarts.any()).item():
        return None
    return positions == 0
