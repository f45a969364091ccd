"""One-line drop-in for Hugging Face and sentence-transformers models.

`optimize(model)` swaps the encoder inside a Hugging Face model of a supported family (a base model,
any task model, or a sentence-transformers model — SentenceTransformer, CrossEncoder, SparseEncoder,
MultiVectorEncoder — whose Transformer modules wrap one) for fastencoder's, in place.
The new encoder holds the very same parameter and buffer tensors, so optimisers, tied weights,
`save_pretrained` (Hugging Face's own keys), Trainer and pipelines carry on unchanged;
`restore(model)` puts the original encoder back.

`register_hf_attention()` is the lighter level: it registers fastencoder's attention kernel as a
Hugging Face attention implementation, so `model.set_attn_implementation("fastencoder")` runs it
inside the unchanged Hugging Face model.
"""
import sys

import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from fastencoder import models
from fastencoder.kernels.attention import attention
from fastencoder.models.packing import checked_unpad

_FASTENCODER_CLASS = {
    transformers.BertModel: models.BertModel,
    transformers.AlbertModel: models.AlbertModel,
    transformers.RobertaModel: models.RobertaModel,
    transformers.XLMRobertaModel: models.XLMRobertaModel,
    transformers.CamembertModel: models.CamembertModel,
    transformers.DistilBertModel: models.DistilBertModel,
    transformers.ElectraModel: models.ElectraModel,
    transformers.MPNetModel: models.MPNetModel,
    transformers.ModernBertModel: models.ModernBertModel,
}
_ORIGINAL = "_fastencoder_original"  # kept in the module's __dict__: not a submodule, not in state_dict


def optimize(model, *, unpad=None, cuda_graphs=None):
    """Replace `model`'s BERT/ALBERT encoder with fastencoder's, sharing its parameters; returns
    `model`. Applying it twice is harmless. Unsupported configurations raise before anything changes.

    Options of the encoder (see `fastencoder.models.layers.EncoderOptionsMixin`), None keeping its
    setting (the default, "auto", for a newly swapped one): unpad ("auto", True or False: padding-free execution)
    and cuda_graphs (True or False: inference replays CUDA graphs)."""
    options = {name: value for name, value in (("unpad", unpad), ("cuda_graphs", cuda_graphs)) if value is not None}
    if unpad is not None:
        checked_unpad(unpad)
    slots = _sentence_transformer_slots(model)
    if slots:
        done = []
        try:
            for holder, name in slots:
                setattr(holder, name, optimize(getattr(holder, name), **options))
                done.append((holder, name))
        except BaseException:
            for holder, name in done:  # all or nothing
                setattr(holder, name, restore(getattr(holder, name)))
            raise
        return model
    if _is_peft_model(model):
        optimize(model.get_base_model(), **options)
        return model
    if isinstance(model, tuple(_FASTENCODER_CLASS.values())):
        for name, value in options.items():
            setattr(model, name, value)
        return model
    if type(model) in _FASTENCODER_CLASS:
        return optimize(_fastencoder_encoder(model), **options)
    inner = _inner_encoder(model)
    if inner is None:
        raise TypeError(
            f"fastencoder.optimize takes a Hugging Face {' / '.join(cls.__name__ for cls in _FASTENCODER_CLASS)}, a "
            "task model built on one, or a sentence-transformers model (SentenceTransformer, CrossEncoder, "
            f"SparseEncoder, MultiVectorEncoder) that wraps one; got {type(model).__name__}"
        )
    setattr(model, model.base_model_prefix, optimize(inner, **options))
    return model


def restore(model):
    """Undo `optimize`: put the original Hugging Face encoder back; returns `model`."""
    slots = _sentence_transformer_slots(model)
    if slots:
        for holder, name in slots:
            setattr(holder, name, restore(getattr(holder, name)))
        return model
    if _is_peft_model(model):
        restore(model.get_base_model())
        return model
    if _ORIGINAL in vars(model):
        return vars(model)[_ORIGINAL]
    inner = _inner_encoder(model)
    if inner is not None and _ORIGINAL in vars(inner):
        setattr(model, model.base_model_prefix, vars(inner)[_ORIGINAL])
    return model


def _inner_encoder(model):
    prefix = getattr(model, "base_model_prefix", None)
    inner = getattr(model, prefix, None) if prefix else None
    if isinstance(inner, tuple(_FASTENCODER_CLASS.values())) or type(inner) in _FASTENCODER_CLASS:
        return inner
    return None


def _is_peft_model(model):
    """A peft PeftModel (adapters on a Hugging Face model, which `get_base_model()` returns)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _sentence_transformer_slots(model):
    """[(module, attribute)] holding each Hugging Face model inside a sentence-transformers model
    (SentenceTransformer, CrossEncoder, SparseEncoder, MultiVectorEncoder: their `Transformer`
    modules, wherever they sit, a Router's routes included); None for any other model."""
    if not _is_sentence_transformers_model(model):
        return None
    return list(_hf_model_slots(model))


def _is_sentence_transformers_model(model):
    # sentence-transformers 6's model classes share a base class; older releases have SentenceTransformer
    base = sys.modules.get("sentence_transformers.base.model")
    root = sys.modules.get("sentence_transformers")
    classes = tuple(cls for cls in (getattr(base, "BaseModel", None), getattr(root, "SentenceTransformer", None))
                    if cls is not None)
    return bool(classes) and isinstance(model, classes)


def _hf_model_slots(module):
    # a Transformer module keeps the model in `.model` (sentence-transformers 6; `.auto_model` is a
    # read-only alias there) or `.auto_model` (older releases); nothing inside a model is searched
    for name, child in module._modules.items():
        if isinstance(child, transformers.PreTrainedModel) or _is_peft_model(child):
            yield module, name
        elif child is not None:
            yield from _hf_model_slots(child)


# what a module's hooks live in: shared between a Hugging Face container and fastencoder's, so
# that hooks registered on either fire and their handles still remove them
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _fastencoder_encoder(original):
    """fastencoder's encoder built around `original`'s own modules: every module that holds weights
    (Linear, LayerNorm, Embedding, and whatever wraps or replaces them: peft's LoRA layers, quantised
    modules) is the very object `original` holds, with its hooks; fastencoder's containers, which
    compute the fused layer, share their hooks with the Hugging Face containers they replace."""
    # the constructor refuses unsupported configurations (on the meta device: nothing has changed yet);
    # DistilBERT and ELECTRA have no pooler
    pooler = {"add_pooling_layer": original.pooler is not None} if hasattr(original, "pooler") else {}
    with torch.device("meta"):
        encoder = _FASTENCODER_CLASS[type(original)](original.config, **pooler)
    for name, ours in list(encoder.named_modules()):
        theirs = original.get_submodule(name)
        if next(ours.children(), None) is None:
            owner, _, leaf = name.rpartition(".")
            setattr(encoder.get_submodule(owner), leaf, theirs)
            continue
        for hooks in _HOOK_DICTS:
            setattr(ours, hooks, getattr(theirs, hooks))
        for key, value in theirs._parameters.items():  # held by a container itself (none in BERT / ALBERT)
            ours._parameters[key] = value
        ours._buffers.update(theirs._buffers)  # embeddings' position_ids, token_type_ids
    if encoder.state_dict().keys() != original.state_dict().keys():
        missing = sorted(original.state_dict().keys() - encoder.state_dict().keys())
        raise NotImplementedError(f"fastencoder's {type(encoder).__name__} cannot hold these weights of the model: "
                                  f"{missing[:5]}")
    encoder.train(original.training)
    if any(getattr(module, "gradient_checkpointing", False) for module in original.modules()):
        encoder.gradient_checkpointing_enable()
    vars(encoder)[_ORIGINAL] = original
    return encoder


def hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Hugging Face's attention-function signature over fastencoder's kernel: q, k, v arrive as
    [B, H, S, D] and are read in place as [B, S, H, D] views; returns ([B, S, H, D], None)."""
    if kwargs.get("is_causal", getattr(module, "is_causal", False)):
        raise NotImplementedError("fastencoder's attention is bidirectional (encoders); causal attention is not supported")
    key_padding_mask = bias = None
    if attention_mask is not None and attention_mask.dim() == 2:
        key_padding_mask = attention_mask.bool()
    elif attention_mask is not None:  # a user's 3-D / 4-D mask, passed through by Hugging Face as is
        bias = attention_mask if attention_mask.is_floating_point() else torch.zeros(
            attention_mask.shape, dtype=query.dtype, device=query.device
        ).masked_fill(~attention_mask.bool(), float("-inf"))
        bias = bias.to(query.dtype)
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                    key_padding_mask=key_padding_mask, bias=bias, scale=scaling, dropout_p=dropout)
    return out, None


def hf_padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The mask Hugging Face hands to `hf_attention`: the 2-D padding mask itself (None without
    padding), as for FlashAttention — the kernel takes key padding directly, no [B, 1, S, S] tensor."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    return None if attention_mask.all() else attention_mask


def register_hf_attention(name="fastencoder"):
    """Register the kernel as Hugging Face attention implementation `name` (both the attention
    function and its mask: without the mask, Hugging Face would pass no padding mask at all)."""
    AttentionInterface.register(name, hf_attention)
    AttentionMaskInterface.register(name, hf_padding_mask)
