"""ALBERT on fastencoder's fused ops, a drop-in for Hugging Face's.

Same layout as Hugging Face's `AlbertModel` (factorised embeddings mapped up by
`encoder.embedding_hidden_mapping_in`; `num_hidden_groups` groups of `inner_group_num` layers,
shared across the `num_hidden_layers` layer calls), so state dicts match key for key. Unlike
Hugging Face's ALBERT, gradient checkpointing is supported.
"""
import transformers
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.albert import modeling_albert

from .inputs import as_config, check_inputs, check_supported, fused_activation, output_flags
from .layers import (
    EncoderHeadsMixin,
    EncoderOptionsMixin,
    FusedEmbeddingsMixin,
    FusedEncoderLayer,
    QKVProjection,
    SparsePredictionMixin,
    compute_dtype,
    run_layers,
)
from .packing import DEFAULT_UNPAD, first_token_rows, gather_tokens
from .submodules import dropout, project, project_add_norm


class AlbertEmbeddings(FusedEmbeddingsMixin, modeling_albert.AlbertEmbeddings):
    pass


class AlbertAttention(QKVProjection):
    """query / key / value, the output projection and its LayerNorm, under Hugging Face's names;
    never called itself (AlbertLayer runs its parts)."""

    def __init__(self, config):
        super().__init__(config.hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class AlbertLayer(FusedEncoderLayer):
    def __init__(self, config):
        super().__init__(config)
        self.full_layer_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = AlbertAttention(config)
        self.ffn = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = fused_activation(config)

    def qkv(self):
        return self.attention

    def uncalled_modules(self):
        return {"attention": (self.attention, AlbertAttention)}

    def attention_output(self, context, hidden_states):
        attention = self.attention
        return project_add_norm(attention.LayerNorm, attention.dense, context, hidden_states, attention.output_dropout)

    def feed_forward(self, attended):
        # Hugging Face's ALBERT applies no dropout to the FFN output
        inner = project(self.ffn, attended, activation=self.activation)
        return project_add_norm(self.full_layer_layer_norm, self.ffn_output, inner, attended)


class AlbertLayerGroup(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.albert_layers = nn.ModuleList([AlbertLayer(config) for _ in range(config.inner_group_num)])


class AlbertTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embedding_hidden_mapping_in = nn.Linear(config.embedding_size, config.hidden_size)
        self.albert_layer_groups = nn.ModuleList([AlbertLayerGroup(config) for _ in range(config.num_hidden_groups)])

    def layer_calls(self):
        """The layers in the order they run: layer i uses group int(i / (layers / groups)), as in
        Hugging Face, and each group runs all its inner layers."""
        layers, groups = self.config.num_hidden_layers, self.config.num_hidden_groups
        return [
            layer
            for i in range(layers)
            for layer in self.albert_layer_groups[int(i / (layers / groups))].albert_layers
        ]


class AlbertModel(EncoderOptionsMixin, modeling_albert.AlbertPreTrainedModel):
    """ALBERT encoder (embeddings, shared layers, optional pooler) on fastencoder's fused ops.

    `config`: a `transformers.AlbertConfig`, or a path to a config.json or a model directory.
    `unpad`: "auto", True or False, padding-free execution (see EncoderOptionsMixin).
    """

    supports_gradient_checkpointing = True
    _can_record_outputs = None  # hidden states and attentions are collected by the encoder itself

    def __init__(self, config, add_pooling_layer=True, unpad=DEFAULT_UNPAD):
        config = as_config(config, modeling_albert.AlbertConfig)
        check_supported(config)
        super().__init__(config)
        self.unpad = unpad
        self.gradient_checkpointing = False
        self.embeddings = AlbertEmbeddings(config)
        self.encoder = AlbertTransformer(config)
        if add_pooling_layer:
            self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
            self.pooler_activation = nn.Tanh()
        else:
            self.pooler = None
            self.pooler_activation = None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        *,
        head_mask=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        """Hugging Face's AlbertModel.forward; returns BaseModelOutputWithPooling (or its tuple with
        return_dict=False). hidden_states has one entry per layer call, the first after
        embedding_hidden_mapping_in, as in Hugging Face."""
        graphed = self.replay_cuda_graph(
            input_ids, attention_mask, token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
            head_mask=head_mask, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict, **kwargs,
        )
        if graphed is not None:
            return graphed
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        batch, seqlen = check_inputs(
            self.config, input_ids, inputs_embeds, token_type_ids, position_ids, head_mask,
            self.config.embedding_size, {},
        )
        weights = self.embeddings.word_embeddings.weight
        dtype = compute_dtype(weights)
        mask, packing = self.attention_plan(attention_mask, position_ids, batch, seqlen, output_attentions,
                                            dtype, weights.device)
        embeddings = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        # gathered before the mapping: it too runs on the real tokens only. Under autocast its output,
        # the first layer's input and residual, is 16-bit, as in Hugging Face
        hidden_states = project(self.encoder.embedding_hidden_mapping_in, gather_tokens(embeddings, packing))
        sequence_output, all_hidden_states, attentions = run_layers(
            self.encoder.layer_calls(), hidden_states, mask, output_attentions, output_hidden_states, packing
        )
        pooled_output = None
        if self.pooler is not None:
            pooled_output = project(self.pooler, first_token_rows(sequence_output, packing)).tanh()
        output = BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=all_hidden_states,
            attentions=attentions,
        )
        return output if return_dict else output.to_tuple()


class AlbertForPreTraining(SparsePredictionMixin, EncoderHeadsMixin, transformers.AlbertForPreTraining):
    encoder_class = AlbertModel
    prediction_head = "predictions"


class AlbertForMaskedLM(SparsePredictionMixin, EncoderHeadsMixin, transformers.AlbertForMaskedLM):
    encoder_class = AlbertModel
    prediction_head = "predictions"


class AlbertForSequenceClassification(EncoderHeadsMixin, transformers.AlbertForSequenceClassification):
    encoder_class = AlbertModel


class AlbertForTokenClassification(EncoderHeadsMixin, transformers.AlbertForTokenClassification):
    encoder_class = AlbertModel


class AlbertForQuestionAnswering(EncoderHeadsMixin, transformers.AlbertForQuestionAnswering):
    encoder_class = AlbertModel


class AlbertForMultipleChoice(EncoderHeadsMixin, transformers.AlbertForMultipleChoice):
    encoder_class = AlbertModel
