"""ELECTRA on fastencoder's fused ops, a drop-in for Hugging Face's.

BERT's embeddings and layers exactly (fastencoder's BERT modules, the same names), with the
embeddings mapped up by `embeddings_project` when `embedding_size != hidden_size` (run on the real
tokens only under unpadding, as ALBERT's factorised embeddings are), and no pooler. The task models
(discriminator, generator and the others) are Hugging Face's with `electra` swapped.
"""
import transformers
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
from transformers.models.electra import modeling_electra

from .bert import BertEncoder
from .distilbert import PoolerlessHeadsMixin
from .inputs import HF_PACKS_SEQUENCES_BY_POSITION, as_config, check_inputs, check_supported, output_flags
from .layers import (
    EncoderOptionsMixin,
    FirstPositionHeadsMixin,
    FusedEmbeddingsMixin,
    compute_dtype,
    run_layers,
)
from .packing import DEFAULT_UNPAD, gather_tokens
from .submodules import project


class ElectraEmbeddings(FusedEmbeddingsMixin, modeling_electra.ElectraEmbeddings):
    pass


class ElectraModel(FirstPositionHeadsMixin, EncoderOptionsMixin, modeling_electra.ElectraPreTrainedModel):
    """ELECTRA encoder (embeddings, optional embeddings_project, layers) on fastencoder's fused ops.

    `config`: a `transformers.ElectraConfig`, or a path to a config.json or a model directory.
    `unpad`: "auto", True or False, padding-free execution (see EncoderOptionsMixin; left-padded
    batches run padded, see FirstPositionHeadsMixin).
    """

    packs_sequences_by_position = HF_PACKS_SEQUENCES_BY_POSITION

    _no_split_modules = ["ElectraEmbeddings", "BertLayer"]
    _can_record_outputs = None  # hidden states and attentions are collected by the encoder itself

    def __init__(self, config, unpad=DEFAULT_UNPAD):
        config = as_config(config, modeling_electra.ElectraConfig)
        check_supported(config)
        super().__init__(config)
        self.unpad = unpad
        self.gradient_checkpointing = False
        self.embeddings = ElectraEmbeddings(config)
        if config.embedding_size != config.hidden_size:
            self.embeddings_project = nn.Linear(config.embedding_size, config.hidden_size)
        self.encoder = BertEncoder(config)
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
        """Hugging Face's ElectraModel.forward (same positional order) for encoders; returns
        BaseModelOutputWithPastAndCrossAttentions (or its tuple with return_dict=False).
        hidden_states[0] is after embeddings_project, as in Hugging Face. use_cache is accepted
        and ignored, as Hugging Face does for encoders."""
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
            self.config.embedding_size,
            dict(encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                 cache=cache, past_key_values=kwargs.get("past_key_values")),
        )
        weights = self.embeddings.word_embeddings.weight
        dtype = compute_dtype(weights)
        mask, packing = self.attention_plan(attention_mask, position_ids, batch, seqlen, output_attentions,
                                            dtype, weights.device)
        embeddings = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        # gathered before the projection: it too runs on the real tokens only. Under autocast its
        # output, the first layer's input and residual, is 16-bit, as in Hugging Face
        hidden_states = gather_tokens(embeddings, packing)
        if hasattr(self, "embeddings_project"):
            hidden_states = project(self.embeddings_project, hidden_states)
        sequence_output, all_hidden_states, attentions = run_layers(
            self.encoder.layer, hidden_states, mask, output_attentions, output_hidden_states, packing,
        )
        output = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=sequence_output,
            hidden_states=all_hidden_states,
            attentions=attentions,
            # Hugging Face reports an empty tuple of cross-attentions whenever attentions are asked for
            cross_attentions=() if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class ElectraForPreTraining(PoolerlessHeadsMixin, transformers.ElectraForPreTraining):
    encoder_class = ElectraModel


class ElectraForMaskedLM(PoolerlessHeadsMixin, transformers.ElectraForMaskedLM):
    encoder_class = ElectraModel


class ElectraForSequenceClassification(PoolerlessHeadsMixin, transformers.ElectraForSequenceClassification):
    encoder_class = ElectraModel


class ElectraForTokenClassification(PoolerlessHeadsMixin, transformers.ElectraForTokenClassification):
    encoder_class = ElectraModel


class ElectraForQuestionAnswering(PoolerlessHeadsMixin, transformers.ElectraForQuestionAnswering):
    encoder_class = ElectraModel


class ElectraForMultipleChoice(PoolerlessHeadsMixin, transformers.ElectraForMultipleChoice):
    encoder_class = ElectraModel
