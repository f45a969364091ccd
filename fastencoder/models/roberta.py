"""RoBERTa, XLM-RoBERTa and CamemBERT on fastencoder's fused ops, drop-ins for Hugging Face's.

The three families are BERT's post-LN encoder with other embeddings: position ids are
`pad_token_id + 1 +` the running count of non-padding tokens of `input_ids` (so they depend on
where the pad tokens are), or sequential from `pad_token_id + 1` for `inputs_embeds`, as in
Hugging Face. The layers and the pooler are BERT's (the same module names, so state dicts match
key for key) under each family's own `PreTrainedModel`; the task models subclass Hugging Face's
and only swap their `roberta` for this one: heads, losses and outputs are Hugging Face's own.
The embeddings run on the padded [B, S] layout before padding-free execution gathers the real
tokens, so the position ids are Hugging Face's under left padding and unpadding alike.
"""
import torch
import transformers
from transformers.models.camembert import modeling_camembert
from transformers.models.roberta import modeling_roberta
from transformers.models.xlm_roberta import modeling_xlm_roberta

from .bert import BertEncoder, BertModel, BertPooler
from .inputs import HF_PACKS_SEQUENCES_BY_POSITION, as_config, check_inputs, check_supported, tracing
from .layers import EncoderHeadsMixin, EncoderOptionsMixin, FirstPositionHeadsMixin, FusedEmbeddingsMixin
from .packing import DEFAULT_UNPAD


def position_ids_from_input_ids(input_ids, padding_idx):
    """Hugging Face's `create_position_ids_from_input_ids` (the same casts): pad tokens get
    padding_idx, the others padding_idx + their count of non-padding tokens up to and with them."""
    mask = input_ids.ne(padding_idx).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + padding_idx


def check_derived_positions(limit, padding_idx, input_ids, seqlen):
    """The position ids derived from input_ids (or, with None, from inputs_embeds of length seqlen)
    must index the position table of `limit` rows: refused before any kernel (Hugging Face fails
    inside the embedding lookup). Read from the data only when the sequence is long enough to reach
    the table's end; skipped while tracing."""
    if seqlen + padding_idx < limit:
        return
    highest = padding_idx + seqlen if input_ids is None else None
    if highest is None and not tracing():
        highest = position_ids_from_input_ids(input_ids, padding_idx).max().item()
    if highest is not None and highest >= limit:
        raise ValueError(
            f"position ids start at pad_token_id + 1 = {padding_idx + 1}: at most {limit - padding_idx - 1} "
            f"non-padding tokens per sequence fit max_position_embeddings={limit}, got position {highest}"
        )


class PositionsFromIdsMixin(FusedEmbeddingsMixin):
    """Forward for Hugging Face's RoBERTa-family embeddings modules (same parameters and buffers)."""

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        if position_ids is None:
            if input_ids is not None:
                check_derived_positions(self.position_embeddings.num_embeddings, self.padding_idx, input_ids,
                                        input_ids.shape[1])
                position_ids = position_ids_from_input_ids(input_ids, self.padding_idx)
            else:
                seqlen = inputs_embeds.shape[1]
                check_derived_positions(self.position_embeddings.num_embeddings, self.padding_idx, None, seqlen)
                position_ids = torch.arange(self.padding_idx + 1, seqlen + self.padding_idx + 1,
                                            device=inputs_embeds.device)[None]
        return super().forward(input_ids, token_type_ids, position_ids, inputs_embeds)


class RobertaEmbeddings(PositionsFromIdsMixin, modeling_roberta.RobertaEmbeddings):
    pass


class XLMRobertaEmbeddings(PositionsFromIdsMixin, modeling_xlm_roberta.XLMRobertaEmbeddings):
    pass


class CamembertEmbeddings(PositionsFromIdsMixin, modeling_camembert.CamembertEmbeddings):
    pass


class RobertaEncoderMixin(FirstPositionHeadsMixin, EncoderOptionsMixin):
    """The encoder of a RoBERTa-family model (embeddings, BERT's layers, optional pooler).

    `config`: the family's config, or a path to a config.json or a model directory.
    `unpad`: "auto", True or False, padding-free execution (see EncoderOptionsMixin). With
    unpad=True a left-padded batch runs padded: the classification head reads position 0 of
    last_hidden_state, a padding position there, which Hugging Face computes and unpadding does not.
    """

    embeddings_class = None  # set by each family
    packs_sequences_by_position = HF_PACKS_SEQUENCES_BY_POSITION
    _can_record_outputs = None  # hidden states and attentions are collected by the encoder itself

    def __init__(self, config, add_pooling_layer=True, unpad=DEFAULT_UNPAD):
        config = as_config(config, self.config_class)
        check_supported(config)
        if not isinstance(config.pad_token_id, int) or not 0 <= config.pad_token_id < config.max_position_embeddings:
            raise NotImplementedError(
                f"fastencoder derives {type(config).__name__}'s position ids from pad_token_id, which must be an "
                f"int in [0, max_position_embeddings={config.max_position_embeddings}), got {config.pad_token_id!r}"
            )
        super().__init__(config)
        self.unpad = unpad
        self.gradient_checkpointing = False
        self.embeddings = self.embeddings_class(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    # BERT's forward: the same arguments and outputs; only the embeddings differ
    forward = BertModel.forward

    def longest_embedded_sequence(self):
        # positions count from pad_token_id + 1
        return self.config.max_position_embeddings - self.config.pad_token_id - 1

    def check_ids(self, input_ids, token_type_ids):
        check_inputs(self.config, input_ids, None, token_type_ids, None, None, None, {})
        check_derived_positions(self.config.max_position_embeddings, self.config.pad_token_id, input_ids,
                                input_ids.shape[1])


class RobertaModel(RobertaEncoderMixin, modeling_roberta.RobertaPreTrainedModel):
    __doc__ = RobertaEncoderMixin.__doc__
    embeddings_class = RobertaEmbeddings
    _no_split_modules = ["RobertaEmbeddings", "BertLayer"]


class XLMRobertaModel(RobertaEncoderMixin, modeling_xlm_roberta.XLMRobertaPreTrainedModel):
    __doc__ = RobertaEncoderMixin.__doc__
    embeddings_class = XLMRobertaEmbeddings
    _no_split_modules = ["XLMRobertaEmbeddings", "BertLayer"]


class CamembertModel(RobertaEncoderMixin, modeling_camembert.CamembertPreTrainedModel):
    __doc__ = RobertaEncoderMixin.__doc__
    embeddings_class = CamembertEmbeddings
    _no_split_modules = ["CamembertEmbeddings", "BertLayer"]


class RobertaForMaskedLM(EncoderHeadsMixin, transformers.RobertaForMaskedLM):
    encoder_class = RobertaModel


class RobertaForSequenceClassification(EncoderHeadsMixin, transformers.RobertaForSequenceClassification):
    encoder_class = RobertaModel


class RobertaForTokenClassification(EncoderHeadsMixin, transformers.RobertaForTokenClassification):
    encoder_class = RobertaModel


class RobertaForQuestionAnswering(EncoderHeadsMixin, transformers.RobertaForQuestionAnswering):
    encoder_class = RobertaModel


class RobertaForMultipleChoice(EncoderHeadsMixin, transformers.RobertaForMultipleChoice):
    encoder_class = RobertaModel


class XLMRobertaForMaskedLM(EncoderHeadsMixin, transformers.XLMRobertaForMaskedLM):
    encoder_class = XLMRobertaModel


class XLMRobertaForSequenceClassification(EncoderHeadsMixin, transformers.XLMRobertaForSequenceClassification):
    encoder_class = XLMRobertaModel


class XLMRobertaForTokenClassification(EncoderHeadsMixin, transformers.XLMRobertaForTokenClassification):
    encoder_class = XLMRobertaModel


class XLMRobertaForQuestionAnswering(EncoderHeadsMixin, transformers.XLMRobertaForQuestionAnswering):
    encoder_class = XLMRobertaModel


class XLMRobertaForMultipleChoice(EncoderHeadsMixin, transformers.XLMRobertaForMultipleChoice):
    encoder_class = XLMRobertaModel


class CamembertForMaskedLM(EncoderHeadsMixin, transformers.CamembertForMaskedLM):
    encoder_class = CamembertModel


class CamembertForSequenceClassification(EncoderHeadsMixin, transformers.CamembertForSequenceClassification):
    encoder_class = CamembertModel


class CamembertForTokenClassification(EncoderHeadsMixin, transformers.CamembertForTokenClassification):
    encoder_class = CamembertModel


class CamembertForQuestionAnswering(EncoderHeadsMixin, transformers.CamembertForQuestionAnswering):
    encoder_class = CamembertModel


class CamembertForMultipleChoice(EncoderHeadsMixin, transformers.CamembertForMultipleChoice):
    encoder_class = CamembertModel
