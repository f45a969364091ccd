"""BERT on fastencoder's fused ops, a drop-in for Hugging Face's.

`BertModel` subclasses Hugging Face's `BertPreTrainedModel` with the same module names, parameters
and buffers as `transformers.BertModel`, so state dicts match key for key and `from_pretrained` /
`save_pretrained` go through Hugging Face's machinery. The task models subclass Hugging Face's and
only swap their `bert` for this one: heads, losses and outputs are Hugging Face's own (the masked-LM
heads' opt-in `sparse_prediction` aside, see SparsePredictionMixin).
"""
import transformers
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
from transformers.models.bert import modeling_bert

from .inputs import HF_PACKS_SEQUENCES_BY_POSITION, as_config, check_inputs, check_supported, fused_activation, output_flags
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


class BertEmbeddings(FusedEmbeddingsMixin, modeling_bert.BertEmbeddings):
    pass


class BertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return project_add_norm(self.LayerNorm, self.dense, hidden_states, input_tensor, self.dropout)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = QKVProjection(config.hidden_size)
        self.output = BertSelfOutput(config)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = fused_activation(config)

    def forward(self, hidden_states):
        return project(self.dense, hidden_states, activation=self.activation)


class BertOutput(BertSelfOutput):
    def __init__(self, config):
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class BertLayer(FusedEncoderLayer):
    """Hugging Face's modules and names; `attention.output`, `intermediate` and `output` are called
    with Hugging Face's arguments (hooks on them see what they would see there)."""

    def __init__(self, config):
        super().__init__(config)
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def qkv(self):
        return self.attention.self

    def uncalled_modules(self):
        return {"attention": (self.attention, BertAttention), "attention.self": (self.attention.self, QKVProjection)}

    def attention_output(self, context, hidden_states):
        return self.attention.output(context, hidden_states)

    def feed_forward(self, attended):
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, packing=None):
        return project(self.dense, first_token_rows(hidden_states, packing)).tanh()


class BertModel(EncoderOptionsMixin, modeling_bert.BertPreTrainedModel):
    """BERT encoder (embeddings, layers, optional pooler) on fastencoder's fused ops.

    `config`: a `transformers.BertConfig`, or a path to a config.json or a model directory.
    `unpad`: "auto", True or False, padding-free execution (see EncoderOptionsMixin).
    """

    packs_sequences_by_position = HF_PACKS_SEQUENCES_BY_POSITION

    _no_split_modules = ["BertEmbeddings", "BertLayer"]
    _can_record_outputs = None  # hidden states and attentions are collected by the encoder itself

    def __init__(self, config, add_pooling_layer=True, unpad=DEFAULT_UNPAD):
        config = as_config(config, modeling_bert.BertConfig)
        check_supported(config)
        super().__init__(config)
        self.unpad = unpad
        self.gradient_checkpointing = False
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
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
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        cache=None,
        use_cache=None,
        *,
        head_mask=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        """Hugging Face's BertModel.forward (same positional order) for encoders; returns
        BaseModelOutputWithPoolingAndCrossAttentions (or its tuple with return_dict=False).
        use_cache is accepted and ignored, as Hugging Face does for encoders."""
        graphed = self.replay_cuda_graph(
            input_ids, attention_mask, token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask, cache=cache,
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
            self.config.hidden_size,
            dict(encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                 cache=cache, past_key_values=kwargs.get("past_key_values")),
        )
        weights = self.embeddings.word_embeddings.weight
        dtype = compute_dtype(weights)
        mask, packing = self.attention_plan(attention_mask, position_ids, batch, seqlen, output_attentions,
                                            dtype, weights.device)
        embeddings = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        sequence_output, hidden_states, attentions = run_layers(
            self.encoder.layer, gather_tokens(embeddings, packing), mask, output_attentions, output_hidden_states,
            packing,
        )
        pooled_output = self.pooler(sequence_output, packing) if self.pooler is not None else None
        output = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=hidden_states,
            attentions=attentions,
            # Hugging Face reports an empty tuple of cross-attentions whenever attentions are asked for
            cross_attentions=() if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class BertForPreTraining(SparsePredictionMixin, EncoderHeadsMixin, transformers.BertForPreTraining):
    encoder_class = BertModel
    prediction_head = "cls.predictions"


class BertForMaskedLM(SparsePredictionMixin, EncoderHeadsMixin, transformers.BertForMaskedLM):
    encoder_class = BertModel
    prediction_head = "cls.predictions"


class BertForSequenceClassification(EncoderHeadsMixin, transformers.BertForSequenceClassification):
    encoder_class = BertModel


class BertForTokenClassification(EncoderHeadsMixin, transformers.BertForTokenClassification):
    encoder_class = BertModel


class BertForQuestionAnswering(EncoderHeadsMixin, transformers.BertForQuestionAnswering):
    encoder_class = BertModel


class BertForMultipleChoice(EncoderHeadsMixin, transformers.BertForMultipleChoice):
    encoder_class = BertModel
