"""MPNet on fastencoder's fused ops, a drop-in for Hugging Face's.

BERT's post-LN layer under MPNet's module names (`attention.attn.q` / `k` / `v` / `o`,
`attention.LayerNorm`, `intermediate`, `output`), RoBERTa's embeddings without token types (position
ids counted from padding_idx 1 + 1 over the non-padding tokens of `input_ids`), and a relative
position bias: `encoder.relative_attention_bias`, one learned score per head for each of 32 buckets
of the key's distance to the query, shared by all layers. Its [heads, 2·S - 1] table is gathered
once per forward and added to every layer's scores by the attention op (`relative_bias`), in the
padded and the padding-free layouts alike. The task models are Hugging Face's with `mpnet` swapped:
heads, losses and outputs theirs.
"""
import math

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.mpnet import modeling_mpnet

from .bert import BertIntermediate, BertOutput, BertPooler
from .inputs import as_config, attention_mask_for, check_inputs, check_supported, output_flags, tracing
from .layers import (
    EncoderHeadsMixin,
    EncoderOptionsMixin,
    FirstPositionHeadsMixin,
    FusedEncoderLayer,
    compute_dtype,
    run_layers,
)
from .packing import DEFAULT_UNPAD, gather_tokens
from .roberta import PositionsFromIdsMixin, check_derived_positions
from .submodules import dropout, project_add_norm

# Hugging Face's MPNetEncoder.compute_position_bias buckets with these, whatever the config says
NUM_BUCKETS = 32
MAX_DISTANCE = 128


def relative_position_bucket(relative_position, num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE):
    """Hugging Face's MPNetEncoder.relative_position_bucket, op for op (the float log rounds the same):
    half the buckets for keys after the query, half for keys before; within each, exact distances
    up to num_buckets / 4, then logarithmic bins up to max_distance, the last bin beyond it."""
    half = num_buckets // 2
    max_exact = half // 2
    n = -relative_position
    after = (n < 0).to(torch.long) * half
    n = torch.abs(n)
    logarithmic = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).to(torch.long)
    logarithmic = torch.min(logarithmic, torch.full_like(logarithmic, half - 1))
    return after + torch.where(n < max_exact, n, logarithmic)


class MPNetEmbeddings(PositionsFromIdsMixin, modeling_mpnet.MPNetEmbeddings):
    """Hugging Face's module (padding_idx 1, no token types): word + position embeddings, the sum
    fused into the LayerNorm, then dropout."""

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None):
        return super().forward(input_ids, None, position_ids, inputs_embeds)


class MPNetSelfAttention(nn.Module):
    """q / k / v / o under Hugging Face's names; never called (the layer runs them)."""

    def __init__(self, config):
        super().__init__()
        self.q = nn.Linear(config.hidden_size, config.hidden_size)
        self.k = nn.Linear(config.hidden_size, config.hidden_size)
        self.v = nn.Linear(config.hidden_size, config.hidden_size)
        self.o = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    # the shared layer reads the projections as query / key / value
    query = property(lambda self: self.q)
    key = property(lambda self: self.k)
    value = property(lambda self: self.v)


class MPNetAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = MPNetSelfAttention(config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class MPNetLayer(FusedEncoderLayer):
    """Hugging Face's modules and names; `intermediate` and `output` are called with Hugging Face's
    arguments (hooks on them see what they would see there)."""

    def __init__(self, config):
        super().__init__(config)
        self.attention = MPNetAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def qkv(self):
        return self.attention.attn

    def uncalled_modules(self):
        return {"attention": (self.attention, MPNetAttention), "attention.attn": (self.attention.attn, MPNetSelfAttention)}

    def attention_output(self, context, hidden_states):
        attention = self.attention
        return project_add_norm(attention.LayerNorm, attention.attn.o, context, hidden_states, attention.dropout)

    def feed_forward(self, attended):
        return self.output(self.intermediate(attended), attended)


class MPNetEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([MPNetLayer(config) for _ in range(config.num_hidden_layers)])
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_attention_heads)

    def relative_bias(self, max_seqlen, device):
        """The attention op's relative_bias, [heads, 2·max_seqlen - 1]: column d + max_seqlen - 1 holds
        each head's score for a key d positions after its query (a lookup through the module, so that
        the table gets its gradient)."""
        distances = torch.arange(1 - max_seqlen, max_seqlen, dtype=torch.long, device=device)
        return self.relative_attention_bias(relative_position_bucket(distances)).t().contiguous()


def check_mpnet_supported(config):
    check_supported(config)
    if config.relative_attention_num_buckets < NUM_BUCKETS:
        raise ValueError(
            f"MPNet buckets relative positions into {NUM_BUCKETS} buckets (as Hugging Face's compute_position_bias "
            f"does, whatever the config says): relative_attention_num_buckets must be at least {NUM_BUCKETS}, got "
            f"{config.relative_attention_num_buckets}")


class MPNetModel(FirstPositionHeadsMixin, EncoderOptionsMixin, modeling_mpnet.MPNetPreTrainedModel):
    """MPNet encoder (embeddings, layers with the shared relative position bias, optional pooler).

    `config`: a `transformers.MPNetConfig`, or a path to a config.json or a model directory.
    `unpad`: "auto", True or False, padding-free execution (see EncoderOptionsMixin). The relative
    positions are Hugging Face's, distances in the padded row: a batch whose attention_mask has a gap
    inside a row (not only leading or trailing padding) runs padded, as does a left-padded batch
    with unpad=True (see FirstPositionHeadsMixin); deciding that costs one more device-to-host read.
    """

    _no_split_modules = ["MPNetEmbeddings", "MPNetLayer"]
    _can_record_outputs = None  # hidden states and attentions are collected by the encoder itself

    def __init__(self, config, add_pooling_layer=True, unpad=DEFAULT_UNPAD):
        config = as_config(config, transformers.MPNetConfig)
        check_mpnet_supported(config)
        super().__init__(config)
        self.unpad = unpad
        self.gradient_checkpointing = False
        self.embeddings = MPNetEmbeddings(config)
        self.encoder = MPNetEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def longest_embedded_sequence(self):
        # positions count from padding_idx + 1
        return self.config.max_position_embeddings - self.embeddings.padding_idx - 1

    def check_ids(self, input_ids, token_type_ids):
        # MPNet has no token types; Hugging Face ignores token_type_ids
        check_inputs(self.config, input_ids, None, None, None, None, None, {})
        check_derived_positions(self.config.max_position_embeddings, self.embeddings.padding_idx, input_ids,
                                input_ids.shape[1])

    def attention_plan(self, attention_mask, position_ids, batch, seqlen, output_attentions, dtype, device):
        mask, packing = super().attention_plan(attention_mask, position_ids, batch, seqlen, output_attentions,
                                               dtype, device)
        if packing is not None and attention_mask is not None and not tracing():
            real = attention_mask.bool()
            # a row's real tokens are one run when at most one of them follows a padding position
            runs = real[:, 0].int() + (real[:, 1:] & ~real[:, :-1]).sum(1)
            if (runs > 1).any().item():
                return attention_mask_for(attention_mask, batch, seqlen, self.config.num_attention_heads, dtype), None
        return mask, packing

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        """Hugging Face's MPNetModel.forward (same positional order); returns
        BaseModelOutputWithPooling (or its tuple with return_dict=False). token_type_ids, if given,
        are ignored, as there."""
        graphed = self.replay_cuda_graph(
            input_ids, attention_mask, kwargs.pop("token_type_ids", None), position_ids=position_ids,
            inputs_embeds=inputs_embeds, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs,
        )
        if graphed is not None:
            return graphed
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        batch, seqlen = check_inputs(self.config, input_ids, inputs_embeds, None, position_ids,
                                     kwargs.get("head_mask"), self.config.hidden_size, {})
        weights = self.embeddings.word_embeddings.weight
        dtype = compute_dtype(weights)
        mask, packing = self.attention_plan(attention_mask, position_ids, batch, seqlen, output_attentions,
                                            dtype, weights.device)
        embeddings = self.embeddings(input_ids, position_ids, inputs_embeds)
        relative_bias = self.encoder.relative_bias(seqlen if packing is None else packing.max_seqlen,
                                                   weights.device)
        sequence_output, hidden_states, attentions = run_layers(
            self.encoder.layer, gather_tokens(embeddings, packing), mask, output_attentions, output_hidden_states,
            packing, relative_bias,
        )
        pooled_output = self.pooler(sequence_output, packing) if self.pooler is not None else None
        output = BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output,
                                            hidden_states=hidden_states, attentions=attentions)
        return output if return_dict else output.to_tuple()


class MPNetForMaskedLM(EncoderHeadsMixin, transformers.MPNetForMaskedLM):
    encoder_class = MPNetModel


class MPNetForSequenceClassification(EncoderHeadsMixin, transformers.MPNetForSequenceClassification):
    encoder_class = MPNetModel


class MPNetForMultipleChoice(EncoderHeadsMixin, transformers.MPNetForMultipleChoice):
    encoder_class = MPNetModel


class MPNetForTokenClassification(EncoderHeadsMixin, transformers.MPNetForTokenClassification):
    encoder_class = MPNetModel


class MPNetForQuestionAnswering(EncoderHeadsMixin, transformers.MPNetForQuestionAnswering):
    encoder_class = MPNetModel
