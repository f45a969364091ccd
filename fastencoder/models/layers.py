"""The fused embeddings and the post-LN encoder layer that fastencoder's BERT and ALBERT share, and
the options and plumbing of their models.

A layer runs the Q/K/V projections as one GEMM, the fused attention on strided views of its output
(no head transposes), the output projection, LayerNorm with the residual add fused, the FFN's first
GEMM with its activation fused, the second GEMM and LayerNorm(+residual) again, each through the
Hugging Face submodule that holds its weights (fastencoder/models/submodules.py).
"""
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from fastencoder.cuda_graphs import GraphRunner
from fastencoder.kernels import backend, padding
from fastencoder.kernels.attention import attention, attention_torch
from fastencoder.kernels.attention.reference import relative_bias_matrix

from .inputs import AttentionMask, attention_mask_for, as_config, check_inputs, document_mask, packed_document_starts
from .packing import DEFAULT_UNPAD, checked_unpad, plan_unpadding
from .submodules import add_norm, autocast_input, dropout, has_hooks, is_plain, mixes_rows, project_qkv, refuse_hooks

IGNORE_INDEX = -100  # the label of a position without a loss, as in Hugging Face


def compute_dtype(weight):
    """The dtype the GEMMs and the attention compute in: autocast's where autocast is on for the
    weights' device, else the weights' own (see fastencoder/models/submodules.py)."""
    device_type = weight.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype


class FusedEmbeddingsMixin:
    """Forward for Hugging Face's BERT / ALBERT embeddings modules (same parameters and buffers):
    word + position + token-type embeddings (where the family has them), the sum fused into the
    LayerNorm, then dropout."""

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        weight_dtype = self.word_embeddings.weight.dtype
        # inputs_embeds may come in another dtype (e.g. from autocast): the ops need one dtype
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds.to(weight_dtype)
        seqlen = words.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, :seqlen]
        if getattr(self, "token_type_embeddings", None) is None:  # a family without token types (MPNet)
            token_types = 0
        elif token_type_ids is None:  # type 0 everywhere, as HF's default
            table = self.token_type_embeddings
            # a quantised table (a tensor subclass) is looked up through its module, as HF does
            token_types = table.weight[0] if is_plain(table.weight) else table(self.position_ids.new_zeros(1))[0]
        else:
            token_types = self.token_type_embeddings(token_type_ids)
        others = (self.position_embeddings(position_ids) + token_types).expand_as(words)
        return dropout(self.dropout, add_norm(self.LayerNorm, words, others))


class QKVProjection(nn.Module):
    """The query, key and value projections under Hugging Face's names; the layer runs them
    (`project_qkv`), this module itself is never called."""

    def __init__(self, hidden_size):
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)


def attention_with_probabilities(q, k, v, mask, dropout_p, relative_bias=None):
    """Unfused attention computed in PyTorch (fp32 softmax, like the kernel), for output_attentions:
    returns the context [B, S, H, D] and the probabilities [B, H, S, S]. Padding keys get finfo.min,
    as in Hugging Face, so a row with every key masked averages uniformly. The probabilities come
    in q's dtype, or in fp32 where Hugging Face's are fp32 under autocast: CUDA's autocast runs softmax
    in fp32, and its fp32 mask promotes the scores (a padding mask without padding, which it drops,
    aside: a host read, on this slow path only)."""
    device_type = q.device.type
    fp32_probabilities = torch.is_autocast_enabled(device_type) and (
        device_type in _FP32_SOFTMAX_UNDER_AUTOCAST or mask.bias is not None or relative_bias is not None
        or mask.key_padding is not None and not bool(mask.key_padding.all()))
    with torch.autocast(device_type, enabled=False):  # the products too in fp32
        context, probabilities = _attention_with_probabilities(q, k, v, mask, dropout_p, relative_bias)
    return context, probabilities if fp32_probabilities else probabilities.to(q.dtype)


_FP32_SOFTMAX_UNDER_AUTOCAST = frozenset({"cuda"})  # devices whose autocast runs softmax in fp32


def _attention_with_probabilities(q, k, v, mask, dropout_p, relative_bias):
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), k.to(compute)) / math.sqrt(q.shape[-1])
    if relative_bias is not None:  # before the mask, in Hugging Face's order
        scores = scores + relative_bias_matrix(relative_bias.to(compute), q.shape[1])
    if mask.bias is not None:
        scores = scores + mask.bias.to(compute)
    if mask.key_padding is not None:
        scores = scores.masked_fill(~mask.key_padding[:, None, None, :], torch.finfo(compute).min)
    probs = F.dropout(torch.softmax(scores, dim=-1), dropout_p)
    context = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(compute))
    return context.to(q.dtype).contiguous(), probs


class FusedEncoderLayer(GradientCheckpointingLayer):
    """One post-LN transformer layer. Subclasses build the modules under Hugging Face's names and
    say how the attention's output projection and the feed-forward block run over them; the
    attention is here. Subclassing GradientCheckpointingLayer makes `gradient_checkpointing_enable()`
    recompute it in the backward."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.attention_dropout = config.attention_probs_dropout_prob

    def qkv(self) -> QKVProjection:
        raise NotImplementedError

    def uncalled_modules(self):
        """{name: (module, the type it must have)} of the containers the layer reads weights from but
        never calls."""
        raise NotImplementedError

    def attention_output(self, context, hidden_states):
        """LayerNorm(dropout(dense(context)) + hidden_states)."""
        raise NotImplementedError

    def feed_forward(self, attended):
        """LayerNorm(dropout(dense_out(act(dense_in(attended)))) + attended)."""
        raise NotImplementedError

    def forward(self, hidden_states, relative_bias=None, key_padding_mask=None, attention_bias=None,
                attentions=None, cu_seqlens=None, max_seqlen=None):
        """Returns the layer's output; with a list as `attentions`, appends the attention
        probabilities to it (computed unfused, padded layout only).

        hidden_states: [B, S, H] (padded; masks as key_padding_mask / attention_bias) or [T, H] with
        cu_seqlens and max_seqlen (padding-free: the attention's packed layout). relative_bias: the
        attention op's, [heads, 2·S - 1] (S, or max_seqlen packed), or None (positional, so that
        reentrant gradient checkpointing passes its gradient on)."""
        for name, (module, expected) in self.uncalled_modules().items():
            if type(module) is not expected:
                raise NotImplementedError(
                    f"{name} was replaced by a {type(module).__name__}: fastencoder computes the attention fused "
                    f"from {expected.__name__}'s query, key and value modules (which may be replaced, wrapped or "
                    "adapted), never by calling it; or restore() the Hugging Face model")
            refuse_hooks(module, name, "the projections, the LayerNorms and the modules Hugging Face calls "
                                       "with tensors only (BERT's intermediate, output, attention.output)")
        qkv = self.qkv()
        # under autocast the residual stream (hidden_states) is fp32, as in Hugging Face, and the
        # projections' input 16-bit
        q, k, v = project_qkv(qkv.query, qkv.key, qkv.value, autocast_input(hidden_states))
        heads = (self.num_heads, -1)
        q, k, v = q.unflatten(-1, heads), k.unflatten(-1, heads), v.unflatten(-1, heads)
        dropout_p = self.attention_dropout if self.training else 0.0
        if attentions is not None:
            mask = AttentionMask(key_padding_mask, attention_bias)
            context, probabilities = attention_with_probabilities(q, k, v, mask, dropout_p, relative_bias)
            attentions.append(probabilities)
        else:
            if relative_bias is not None and attention_bias is not None:
                # the op takes one or the other: a 3-D / 4-D mask or packed documents run padded with
                # the relative bias in the dense bias (whose gradient only the PyTorch path computes)
                attention_bias = (relative_bias_matrix(relative_bias, q.shape[1]) + attention_bias).to(q.dtype)
                relative_bias = None
            # off the kernels, straight to the op's PyTorch path (the layer's inputs are well formed)
            fused = attention if backend.use_triton(q.device, q.dtype) else attention_torch
            context = fused(q, k, v, key_padding_mask=key_padding_mask, bias=attention_bias,
                            relative_bias=relative_bias, dropout_p=dropout_p, cu_seqlens=cu_seqlens,
                            max_seqlen=max_seqlen)
        return self.feed_forward(self.attention_output(context.flatten(-2), hidden_states))


def run_layers(layers, hidden_states, mask, output_attentions, output_hidden_states, packing=None,
               relative_bias=None):
    """Run `layers` (a sequence of FusedEncoderLayer calls, shared modules allowed) and collect
    (last hidden state, the hidden states asked for or None, every attention map or None).
    `relative_bias` (the attention op's, or None) goes to every layer.

    output_hidden_states: a bool, or the set of indices of the hidden states to keep (`output_flags`;
    the others are None, as in Hugging Face). With `packing`, hidden_states are
    the gathered [T, H] rows (`gather_tokens`); the last and every collected hidden state come back
    scattered to [B, S, H], zeros at padding."""
    if packing is None:
        layer_kwargs = dict(key_padding_mask=mask.key_padding, attention_bias=mask.bias)
        as_padded = lambda rows: rows
    else:
        layer_kwargs = dict(cu_seqlens=packing.cu_seqlens, max_seqlen=packing.max_seqlen)
        as_padded = lambda rows: padding.pad(rows, packing.indices, packing.batch, packing.seqlen)
    if isinstance(output_hidden_states, set):
        selected = output_hidden_states
    else:
        selected = set(range(len(layers) + 1)) if output_hidden_states else set()
    keep = lambda index, rows: as_padded(rows) if index in selected else None
    all_hidden = [keep(0, hidden_states)]
    all_attentions = [] if output_attentions else None
    for index, layer in enumerate(layers, start=1):
        # hidden_states positional: HF's checkpointing needs tensors that require grad passed so
        hidden_states = layer(hidden_states, relative_bias, attentions=all_attentions, **layer_kwargs)
        all_hidden.append(keep(index, hidden_states))
    last = all_hidden[-1] if all_hidden[-1] is not None else as_padded(hidden_states)
    hidden_out = tuple(all_hidden) if output_hidden_states else None
    return last, hidden_out, None if all_attentions is None else tuple(all_attentions)


class EncoderOptionsMixin:
    """fastencoder's execution options on BertModel / AlbertModel, plain attributes (not in the
    state dict; `from_pretrained(..., unpad=...)` passes them to the constructor).

    unpad: "auto", True or False (DEFAULT_UNPAD); see `plan_unpadding`. Under unpadding padded positions of
    last_hidden_state and of every hidden state are zeros, and the pooler reads each row's first real
    token (Hugging Face's position 0 for right padding).

    cuda_graphs: False or True: inference calls replay CUDA graphs (fastencoder/cuda_graphs.py);
    `cuda_graph_runner` then tells why a call ran eagerly and how much memory the graphs hold."""

    # whether this family's Hugging Face model reads packed sequences off position_ids
    # (`packed_document_starts`' at_any_jump); set by BERT, the RoBERTa family and ELECTRA
    packs_sequences_by_position = False

    @property
    def unpad(self):
        return self.__dict__.get("_unpad", DEFAULT_UNPAD)

    @unpad.setter
    def unpad(self, value):
        self.__dict__["_unpad"] = checked_unpad(value)

    @property
    def cuda_graphs(self):
        return self.cuda_graph_runner is not None

    @cuda_graphs.setter
    def cuda_graphs(self, enabled):
        if not isinstance(enabled, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {enabled!r}")
        if enabled != self.cuda_graphs:
            self.__dict__["cuda_graph_runner"] = GraphRunner(self.longest_embedded_sequence()) if enabled else None

    def longest_embedded_sequence(self):
        """The longest sequence whose positions the position table holds (a graph's bucket embeds
        every position up to its length)."""
        return self.config.max_position_embeddings

    @property
    def cuda_graph_runner(self):
        return self.__dict__.get("cuda_graph_runner")

    def replay_cuda_graph(self, input_ids, attention_mask, token_type_ids, **others):
        """The output of a replayed graph when CUDA graphs are on and this call qualifies, else None."""
        runner = self.cuda_graph_runner
        return None if runner is None else runner.run(self, input_ids, attention_mask, token_type_ids, others)

    def check_ids(self, input_ids, token_type_ids):
        check_inputs(self.config, input_ids, None, token_type_ids, None, None, None, {})

    def attention_plan(self, attention_mask, position_ids, batch, seqlen, output_attentions, dtype, device):
        """(the padded path's masks, or the padding-free layout) for this call: exactly one is used.
        With hooks inside the encoder (where the padding-free path runs on [tokens, hidden] rows) the
        model runs padded, so that they see Hugging Face's shapes; under "auto" so does an encoder
        with modules that mix rows (`mixes_rows`: dynamic per-tensor quantisation), whose results
        on the real tokens alone would differ from Hugging Face's."""
        mask = attention_mask_for(attention_mask, batch, seqlen, self.config.num_attention_heads, dtype)  # validates
        documents = packed_document_starts(position_ids, attention_mask, batch, seqlen,
                                           at_any_jump=self.packs_sequences_by_position)
        packing, maybe_padded = plan_unpadding(self.unpad, attention_mask, documents, batch, seqlen,
                                               output_attentions, device)
        if packing is not None:
            modules = list(self.encoder.modules())  # walked once: most of the scan's cost
            if any(map(has_hooks, modules)) or self.unpad == "auto" and mixes_rows(modules):
                packing = None
        if packing is not None:
            return AttentionMask(None, None), packing
        if documents is not None:
            return document_mask(documents, dtype), None
        # a padding mask without padding is dropped, as Hugging Face does: every op then runs unmasked
        return mask if maybe_padded else mask._replace(key_padding=None), None


class FirstPositionHeadsMixin:
    """For families whose task heads read position 0 of last_hidden_state themselves (RoBERTa's
    and ELECTRA's classification heads, DistilBERT's pre_classifier, ELECTRA's sequence summary): a left-padded batch runs
    padded, so that position 0 holds what Hugging Face computes there, not the zeros of padding-free
    execution. unpad="auto" never unpads such a batch, so only unpad=True pays the one more
    device-to-host read this takes."""

    def attention_plan(self, attention_mask, position_ids, batch, seqlen, output_attentions, dtype, device):
        mask, packing = super().attention_plan(attention_mask, position_ids, batch, seqlen, output_attentions,
                                               dtype, device)
        if packing is not None and self.unpad is True and packing.first_positions.any().item():
            return attention_mask_for(attention_mask, batch, seqlen, self.config.num_attention_heads, dtype), None
        return mask, packing


class EncoderHeadsMixin:
    """For a Hugging Face task model (heads, losses and outputs kept): its `__init__` builds HF's
    encoder and then calls `post_init()`; here `post_init` first puts fastencoder's encoder in its
    place, so that weight init and tying see ours."""

    encoder_class = None  # set by subclasses: fastencoder's BertModel or AlbertModel
    supports_gradient_checkpointing = True

    def __init__(self, config, *args, unpad=DEFAULT_UNPAD, **kwargs):
        super().__init__(as_config(config, self.config_class), *args, **kwargs)
        self.unpad = unpad

    @property
    def unpad(self):
        """The encoder's `unpad` option (see EncoderOptionsMixin)."""
        return getattr(self, self.base_model_prefix).unpad

    @unpad.setter
    def unpad(self, value):
        getattr(self, self.base_model_prefix).unpad = value

    def post_init(self):
        hf_encoder = getattr(self, self.base_model_prefix)
        if not isinstance(hf_encoder, self.encoder_class):
            with_pooler = getattr(hf_encoder, "pooler", None) is not None
            setattr(self, self.base_model_prefix, self.encoder_class(self.config, add_pooling_layer=with_pooler))
        super().post_init()


class SparsePredictionMixin:
    """The `sparse_prediction` option of a masked-LM head (off by default: Hugging Face's outputs).

    With `sparse_prediction=True` and `labels` given, the prediction head scores only the positions
    whose label is not -100 (as FlashAttention's BERT and ModernBERT's `sparse_prediction` do): its
    logits (`prediction_logits` / `logits`) are [number of labelled positions, vocab_size], one row
    per labelled position in the order of `labels.flatten()`; the loss is Hugging Face's (the mean
    cross-entropy over the labelled positions, which are the only ones it reads). Without labels the
    logits are dense, as in Hugging Face. The head is per position, so scoring the labelled rows only
    is exact: Hugging Face's forward runs unchanged, with the head's input rows and the labels
    narrowed to the labelled positions."""

    prediction_head = None  # set by subclasses: the head module's path (hidden states → vocabulary logits)

    def __init__(self, config, *args, sparse_prediction=False, **kwargs):
        super().__init__(config, *args, **kwargs)
        if not isinstance(sparse_prediction, bool):
            raise ValueError(f"sparse_prediction must be True or False, got {sparse_prediction!r}")
        self.sparse_prediction = sparse_prediction

    def forward(self, *args, **kwargs):
        if not self.sparse_prediction:
            return super().forward(*args, **kwargs)
        call = inspect.signature(super().forward).bind(*args, **kwargs)  # labels may come positionally
        labels = call.arguments.get("labels")
        if labels is None:
            return super().forward(*args, **kwargs)
        labelled = labels != IGNORE_INDEX
        call.arguments["labels"] = labels[labelled]
        head = self.get_submodule(self.prediction_head)
        narrowing = head.register_forward_pre_hook(lambda _, inputs: (inputs[0][labelled], *inputs[1:]))
        try:
            return super().forward(*call.args, **call.kwargs)
        finally:
            narrowing.remove()
