"""DistilBERT on fastencoder's fused ops, a drop-in for Hugging Face's.

BERT's post-LN layer under DistilBERT's module names (`attention.q_lin` ... `out_lin`,
`sa_layer_norm`, `ffn.lin1` / `lin2`, `output_layer_norm`), no token types, the position table
learned or sinusoidal (Hugging Face's init fills it; the forward is the same lookup), `activation`
gelu or relu. Unlike BERT, no dropout follows the attention's output projection, as in Hugging
Face. The task models are Hugging Face's with `distilbert` swapped: heads, losses, outputs theirs.
"""
import copy

import transformers
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.distilbert import modeling_distilbert

from .inputs import FUSED_ACTIVATIONS, as_config, check_inputs, check_supported, output_flags
from .layers import (
    EncoderHeadsMixin,
    EncoderOptionsMixin,
    FirstPositionHeadsMixin,
    FusedEncoderLayer,
    compute_dtype,
    run_layers,
)
from .packing import DEFAULT_UNPAD, gather_tokens
from .submodules import add_norm, dropout, project, project_add_norm


def distilbert_activation(config):
    """The fused linear's activation for DistilBERT's `activation`."""
    if not isinstance(config.activation, str) or config.activation not in FUSED_ACTIVATIONS:
        raise NotImplementedError(
            f"fastencoder supports DistilBERT's activation in {sorted(FUSED_ACTIVATIONS)}, got {config.activation!r}")
    return FUSED_ACTIVATIONS[config.activation]


def bert_named(config):
    """A copy of a DistilBertConfig that also answers to the BERT names the shared layer and checks
    read (the user's config is left as it is)."""
    named = copy.copy(config)
    named.attention_probs_dropout_prob = config.attention_dropout
    named.hidden_act = config.activation
    return named


def check_distilbert_supported(config):
    """check_supported, naming DistilBERT's options."""
    if config.dim % config.n_heads:
        raise ValueError(f"dim {config.dim} is not a multiple of n_heads {config.n_heads}")
    distilbert_activation(config)
    check_supported(bert_named(config))


class PoolerlessHeadsMixin(EncoderHeadsMixin):
    """EncoderHeadsMixin for encoders without a pooler (their constructors take only the config)."""

    def post_init(self):
        if not isinstance(getattr(self, self.base_model_prefix), self.encoder_class):
            setattr(self, self.base_model_prefix, self.encoder_class(self.config))
        super().post_init()


class DistilBertEmbeddings(modeling_distilbert.Embeddings):
    """Hugging Face's module (its init writes the sinusoidal table): word + position embeddings, the
    sum fused into the LayerNorm, then dropout."""

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None):
        weight_dtype = self.word_embeddings.weight.dtype
        # inputs_embeds may come in another dtype (e.g. from autocast): the ops need one dtype
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds.to(weight_dtype)
        if position_ids is None:
            position_ids = self.position_ids[:, :words.shape[1]]
        positions = self.position_embeddings(position_ids).expand_as(words)
        return dropout(self.dropout, add_norm(self.LayerNorm, words, positions))


class DistilBertSelfAttention(nn.Module):
    """q_lin / k_lin / v_lin / out_lin under Hugging Face's names; never called (the layer runs them)."""

    def __init__(self, config):
        super().__init__()
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)
        self.dropout = nn.Dropout(config.attention_dropout)

    # the shared layer reads the projections as query / key / value
    query = property(lambda self: self.q_lin)
    key = property(lambda self: self.k_lin)
    value = property(lambda self: self.v_lin)


class DistilBertFFN(nn.Module):
    """Called as Hugging Face calls its FFN (with the tensor only): dropout(lin2(act(lin1(x))))."""

    def __init__(self, config):
        super().__init__()
        self.dropout = nn.Dropout(config.dropout)
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.activation = distilbert_activation(config)

    def forward(self, input):
        return dropout(self.dropout, project(self.lin2, project(self.lin1, input, activation=self.activation)))


class DistilBertLayer(FusedEncoderLayer):
    def __init__(self, config):
        super().__init__(bert_named(config))
        self.attention = DistilBertSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)
        self.ffn = DistilBertFFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)

    def qkv(self):
        return self.attention

    def uncalled_modules(self):
        return {"attention": (self.attention, DistilBertSelfAttention)}

    def attention_output(self, context, hidden_states):
        # Hugging Face's DistilBERT applies no dropout to the attention's output projection
        return project_add_norm(self.sa_layer_norm, self.attention.out_lin, context, hidden_states)

    def feed_forward(self, attended):
        return add_norm(self.output_layer_norm, self.ffn(attended), attended)


class DistilBertTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([DistilBertLayer(config) for _ in range(config.n_layers)])


class DistilBertModel(FirstPositionHeadsMixin, EncoderOptionsMixin, modeling_distilbert.DistilBertPreTrainedModel):
    """DistilBERT encoder (embeddings, layers) on fastencoder's fused ops.

    `config`: a `transformers.DistilBertConfig`, or a path to a config.json or a model directory.
    `unpad`: "auto", True or False, padding-free execution (see EncoderOptionsMixin; left-padded
    batches run padded, see FirstPositionHeadsMixin).
    """

    _no_split_modules = ["DistilBertEmbeddings", "DistilBertLayer"]
    _can_record_outputs = None  # hidden states and attentions are collected by the encoder itself

    def __init__(self, config, unpad=DEFAULT_UNPAD):
        config = as_config(config, modeling_distilbert.DistilBertConfig)
        check_distilbert_supported(config)
        super().__init__(config)
        self.unpad = unpad
        self.gradient_checkpointing = False
        self.embeddings = DistilBertEmbeddings(config)
        self.transformer = DistilBertTransformer(config)
        self.post_init()

    # padding-free execution and the hook check look for the layers under `encoder`
    encoder = property(lambda self: self.transformer)

    def get_position_embeddings(self):
        return self.embeddings.position_embeddings

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def check_ids(self, input_ids, token_type_ids):
        # DistilBERT has no token types; Hugging Face ignores token_type_ids
        check_inputs(self.config, input_ids, None, None, None, None, None, {})

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        position_ids=None,
        *,
        head_mask=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        """Hugging Face's DistilBertModel.forward (same positional order); returns BaseModelOutput
        (or its tuple with return_dict=False). token_type_ids, if given, are ignored, as there."""
        graphed = self.replay_cuda_graph(
            input_ids, attention_mask, kwargs.pop("token_type_ids", None), position_ids=position_ids,
            inputs_embeds=inputs_embeds, head_mask=head_mask, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs,
        )
        if graphed is not None:
            return graphed
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        batch, seqlen = check_inputs(self.config, input_ids, inputs_embeds, None, position_ids, head_mask,
                                     self.config.dim, {})
        weights = self.embeddings.word_embeddings.weight
        dtype = compute_dtype(weights)
        mask, packing = self.attention_plan(attention_mask, position_ids, batch, seqlen, output_attentions,
                                            dtype, weights.device)
        embeddings = self.embeddings(input_ids, inputs_embeds, position_ids)
        sequence_output, hidden_states, attentions = run_layers(
            self.transformer.layer, gather_tokens(embeddings, packing), mask, output_attentions, output_hidden_states,
            packing,
        )
        output = BaseModelOutput(last_hidden_state=sequence_output, hidden_states=hidden_states, attentions=attentions)
        return output if return_dict else output.to_tuple()


class DistilBertForMaskedLM(PoolerlessHeadsMixin, transformers.DistilBertForMaskedLM):
    encoder_class = DistilBertModel


class DistilBertForSequenceClassification(PoolerlessHeadsMixin, transformers.DistilBertForSequenceClassification):
    encoder_class = DistilBertModel


class DistilBertForTokenClassification(PoolerlessHeadsMixin, transformers.DistilBertForTokenClassification):
    encoder_class = DistilBertModel


class DistilBertForQuestionAnswering(PoolerlessHeadsMixin, transformers.DistilBertForQuestionAnswering):
    encoder_class = DistilBertModel


class DistilBertForMultipleChoice(PoolerlessHeadsMixin, transformers.DistilBertForMultipleChoice):
    encoder_class = DistilBertModel
