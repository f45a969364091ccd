"""fastencoder: fused Triton kernels for BERT, ALBERT, DistilBERT and ELECTRA encoders."""
from .kernels import get_backend, set_backend

# The models and the drop-in need transformers, an optional dependency: imported on first access.
MODELS = (
    "AlbertForMaskedLM",
    "AlbertForMultipleChoice",
    "AlbertForPreTraining",
    "AlbertForQuestionAnswering",
    "AlbertForSequenceClassification",
    "AlbertForTokenClassification",
    "AlbertModel",
    "BertForMaskedLM",
    "BertForMultipleChoice",
    "BertForPreTraining",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "CamembertForMaskedLM",
    "CamembertForMultipleChoice",
    "CamembertForQuestionAnswering",
    "CamembertForSequenceClassification",
    "CamembertForTokenClassification",
    "CamembertModel",
    "DistilBertForMaskedLM",
    "DistilBertForMultipleChoice",
    "DistilBertForQuestionAnswering",
    "DistilBertForSequenceClassification",
    "DistilBertForTokenClassification",
    "DistilBertModel",
    "ElectraForMaskedLM",
    "ElectraForMultipleChoice",
    "ElectraForPreTraining",
    "ElectraForQuestionAnswering",
    "ElectraForSequenceClassification",
    "ElectraForTokenClassification",
    "ElectraModel",
    "ModernBertForMaskedLM",
    "ModernBertForMultipleChoice",
    "ModernBertForQuestionAnswering",
    "ModernBertForSequenceClassification",
    "ModernBertForTokenClassification",
    "ModernBertModel",
    "MPNetForMaskedLM",
    "MPNetForMultipleChoice",
    "MPNetForQuestionAnswering",
    "MPNetForSequenceClassification",
    "MPNetForTokenClassification",
    "MPNetModel",
    "RobertaForMaskedLM",
    "RobertaForMultipleChoice",
    "RobertaForQuestionAnswering",
    "RobertaForSequenceClassification",
    "RobertaForTokenClassification",
    "RobertaModel",
    "XLMRobertaForMaskedLM",
    "XLMRobertaForMultipleChoice",
    "XLMRobertaForQuestionAnswering",
    "XLMRobertaForSequenceClassification",
    "XLMRobertaForTokenClassification",
    "XLMRobertaModel",
)

DROP_IN = ("optimize", "register_hf_attention", "restore")

__all__ = ["get_backend", "set_backend", *MODELS, *DROP_IN]
__version__ = "0.1.0"


def __getattr__(name):
    if name not in MODELS and name not in DROP_IN:
        raise AttributeError(f"module 'fastencoder' has no attribute {name!r}")
    try:
        from . import dropin, models
    except ModuleNotFoundError as error:
        if error.name != "transformers":
            raise
        raise ImportError(f"fastencoder.{name} needs transformers: pip install 'fastencoder[hf]'") from error
    return getattr(models if name in MODELS else dropin, name)


def __dir__():
    return sorted([*globals(), *MODELS, *DROP_IN])
