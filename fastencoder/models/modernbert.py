"""ModernBERT on fastencoder's fused ops, a drop-in for Hugging Face's.

Pre-LN layers: x + Wo(attention(Wqkv(attn_norm(x)))), then x + Wo(GeGLU(Wi(mlp_norm(x)))), the
first layer's attn_norm the identity; LayerNorms without bias (`norm_bias`), linear layers with or
without (`attention_bias`, `mlp_bias`). The attention op applies the rotary position embeddings
itself, with the theta of the layer's type (`rope_parameters`), and `layer_types` alternates full
attention with a bidirectional sliding window: key j is seen from query i when |i - j| <=
local_attention // 2, as Hugging Face's `create_bidirectional_sliding_window_mask` defines it. The
embeddings are the token table and its norm (no positions); a final norm closes the encoder.

Padding-free by default (`unpad`, see EncoderOptionsMixin): a padded batch's ids (or inputs_embeds)
are gathered once before the embeddings, every layer runs on the packed rows (cu_seqlens; rotary
positions and windows count from each sequence's start, which is Hugging Face's result: rotary
scores depend only on the distance of two positions), and the task heads read those rows: the
prediction heads score the real tokens (and one zero row standing for every padded position, what
they read there under unpadding), the MLM head's `sparse_prediction` the labelled ones, mean
pooling sums each row's real tokens. Only what an output holds is re-padded.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.models.modernbert import modeling_modernbert

from fastencoder.kernels import backend, padding
from fastencoder.kernels.attention import attention, attention_torch
from fastencoder.kernels.attention.reference import rotate, rotate_by, window_band

from .distilbert import PoolerlessHeadsMixin
from .inputs import (
    FUSED_ACTIVATIONS,
    AttentionMask,
    as_config,
    attention_mask_for,
    check_inputs,
    document_mask,
    output_flags,
    packed_document_starts,
    tracing,
)
from .layers import EncoderOptionsMixin, compute_dtype
from .packing import DEFAULT_UNPAD, PackedTokens, plan_unpadding
from .submodules import add_norm, add_projection, dropout, has_hooks, mixes_rows, project, project_geglu, refuse_hooks

LAYER_TYPES = ("full_attention", "sliding_attention")


def check_modernbert_supported(config):
    """Refuse, up front and naming the option, what the fused encoder does not implement."""
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                         f"{config.num_attention_heads}")
    head_dim = config.hidden_size // config.num_attention_heads
    if getattr(config, "head_dim", None) not in (None, head_dim):
        raise NotImplementedError(f"fastencoder's ModernBERT rotates whole heads of hidden_size / num_attention_heads "
                                  f"= {head_dim}; got head_dim={config.head_dim}")
    if head_dim % 2:
        raise NotImplementedError(f"rotary embeddings need an even head dim, got {head_dim}")
    activation = config.hidden_activation
    if not isinstance(activation, str) or activation not in FUSED_ACTIVATIONS:
        raise NotImplementedError(f"fastencoder supports ModernBERT's hidden_activation in "
                                  f"{sorted(FUSED_ACTIVATIONS)}, got {activation!r}")
    unknown = sorted(set(config.layer_types) - set(LAYER_TYPES))
    if unknown or len(config.layer_types) != config.num_hidden_layers:
        raise NotImplementedError(f"layer_types must give one of {LAYER_TYPES} for each of the "
                                  f"{config.num_hidden_layers} layers, got {config.layer_types}")
    for layer_type in set(config.layer_types):
        rope_type = (config.rope_parameters.get(layer_type) or {}).get("rope_type")
        if rope_type != "default":
            raise NotImplementedError(f"fastencoder supports rope_parameters with rope_type 'default' only, got "
                                      f"{rope_type!r} for {layer_type}")
    if not isinstance(config.local_attention, int) or config.local_attention < 0:
        raise ValueError(f"local_attention must be a non-negative int, got {config.local_attention!r}")


class ModernBertEmbeddings(modeling_modernbert.ModernBertEmbeddings):
    """Hugging Face's module: the token embeddings (or inputs_embeds, in the table's dtype), their
    norm, dropout; [B, S] ids, or the [T] ids of the packed rows."""

    def forward(self, input_ids=None, inputs_embeds=None):
        table = self.tok_embeddings
        words = table(input_ids) if inputs_embeds is None else inputs_embeds.to(table.weight.dtype)
        return dropout(self.drop, add_norm(self.norm, words))


class ModernBertEncoderLayer(GradientCheckpointingLayer):
    """Hugging Face's modules and names (`attn_norm`, `attn.Wqkv` / `Wo`, `mlp_norm`, `mlp.Wi` / `Wo`).
    `attn` is never called (the layer computes the attention from its projections); `mlp` is called
    as Hugging Face calls it when it has hooks, else computed fused."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attention_type = config.layer_types[layer_idx]
        self.num_heads = config.num_attention_heads
        self.activation = FUSED_ACTIVATIONS[config.hidden_activation]
        if layer_idx == 0:
            self.attn_norm = nn.Identity()
        else:
            self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.attn = modeling_modernbert.ModernBertAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.mlp = modeling_modernbert.ModernBertMLP(config)

    def forward(self, hidden_states, rotary=None, window=None, key_padding_mask=None, attention_bias=None,
                attentions=None, cu_seqlens=None, max_seqlen=None):
        """hidden_states: [B, S, H] (padded; masks as key_padding_mask / attention_bias) or [T, H] with
        cu_seqlens and max_seqlen (packed). rotary: the attention op's (cos, sin) tables of this
        layer's theta, or a TokenRotation; window: its half window, or None for full attention. With a list as
        `attentions`, appends the attention probabilities to it (computed unfused, padded only)."""
        attn = self.attn
        if type(attn) is not modeling_modernbert.ModernBertAttention:
            raise NotImplementedError(
                f"attn was replaced by a {type(attn).__name__}: fastencoder computes the attention fused from "
                "ModernBertAttention's Wqkv and Wo (which may be replaced, wrapped or adapted), never by calling it; "
                "or restore() the Hugging Face model")
        refuse_hooks(attn, "attn", "the projections, the norms and mlp")
        qkv = project(attn.Wqkv, add_norm(self.attn_norm, hidden_states))
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).unbind(-3)
        if isinstance(rotary, TokenRotation):
            q, k, rotary = rotary.apply(q), rotary.apply(k), None
        dropout_p = attn.attention_dropout if self.training else 0.0
        if attentions is not None:
            context, probabilities = attention_with_probabilities(
                q, k, v, AttentionMask(key_padding_mask, attention_bias), dropout_p, rotary, window)
            attentions.append(probabilities)
        else:
            # off the kernels, straight to the op's PyTorch path (the layer's inputs are well formed)
            fused = attention if backend.use_triton(q.device, q.dtype) else attention_torch
            context = fused(q, k, v, key_padding_mask=key_padding_mask, bias=attention_bias, dropout_p=dropout_p,
                            cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window=window, rotary=rotary)
        attended = add_projection(attn.Wo, context.flatten(-2), hidden_states, attn.out_drop)
        normed = add_norm(self.mlp_norm, attended)
        mlp = self.mlp
        if has_hooks(mlp):
            return attended + mlp(normed)
        return add_projection(mlp.Wo, dropout(mlp.drop, project_geglu(mlp.Wi, normed, self.activation)), attended)


class ModernBertEncoded(NamedTuple):
    """What the encoder gives its heads: the final-normed rows, packed [T, H] (with their packing)
    or padded [B, S, H] (packing None), and the hidden states and attentions asked for (padded)."""
    rows: torch.Tensor
    packing: PackedTokens | None
    hidden_states: tuple | None
    attentions: tuple | None

    @property
    def shape(self):
        """(batch, sequence) of the padded batch."""
        return tuple(self.rows.shape[:2]) if self.packing is None else (self.packing.batch, self.packing.seqlen)

    def padded(self):
        """The last hidden state [B, S, H], zeros at padding under unpadding."""
        if self.packing is None:
            return self.rows
        return padding.pad(self.rows, self.packing.indices, self.packing.batch, self.packing.seqlen)

    def with_zero_row(self):
        """(the rows of the padded positions' source: [T + 1, H] packed, the last one zeros; flat index
        b·S + s → its row). Padded: the rows flattened, and None."""
        if self.packing is None:
            return self.rows.flatten(0, 1), None
        packing = self.packing
        rows = torch.cat([self.rows, self.rows.new_zeros(1, self.rows.shape[-1])])
        source = torch.full((packing.batch * packing.seqlen,), packing.indices.shape[0], dtype=torch.long,
                            device=rows.device)
        source[packing.indices] = torch.arange(packing.indices.shape[0], device=rows.device)
        return rows, source

    def at_positions(self, flat_positions):
        """Rows [N, H] at flat positions b·S + s of the padded batch (a padded one's is zeros when packed)."""
        rows, source = self.with_zero_row()
        return rows.index_select(0, flat_positions if source is None else source.index_select(0, flat_positions))

    def per_position(self, head):
        """head(last hidden state) at every position, [B, S, *]: computed on the real rows and one zero
        row (what every padded position holds under unpadding), that row's result repeated there."""
        if self.packing is None:
            return head(self.rows)
        rows, source = self.with_zero_row()
        scored = head(rows)
        return scored.index_select(0, source).unflatten(0, (self.packing.batch, self.packing.seqlen))

    def mean(self, attention_mask):
        """Hugging Face's mean pooling: Σ_s h[b, s]·mask[b, s] / Σ_s mask[b, s] (mask None: every position)."""
        if self.packing is None:
            if attention_mask is None:
                attention_mask = torch.ones(self.rows.shape[:2], device=self.rows.device, dtype=torch.bool)
            return (self.rows * attention_mask.unsqueeze(-1)).sum(dim=1) / attention_mask.sum(dim=1, keepdim=True)
        packing = self.packing
        sequence_of_row = torch.div(packing.indices, packing.seqlen, rounding_mode="floor")
        sums = self.rows.new_zeros(packing.batch, self.rows.shape[-1]).index_add(0, sequence_of_row, self.rows)
        if attention_mask is None:
            return sums / packing.seqlen
        return sums / attention_mask.sum(dim=1, keepdim=True)


class ModernBertModel(EncoderOptionsMixin, modeling_modernbert.ModernBertPreTrainedModel):
    """ModernBERT encoder (embeddings, layers, final norm) on fastencoder's fused ops.

    `config`: a `transformers.ModernBertConfig`, or a path to a config.json or a model directory.
    `unpad`: "auto", True or False, padding-free execution (see EncoderOptionsMixin). A batch whose
    attention_mask has a gap inside a row runs padded (rotary positions and windows are distances in
    the padded row), as does, for the base model's callers that read position 0 (Hugging Face's
    classification head), a left-padded batch with unpad=True; deciding that costs one more
    device-to-host read.
    """

    _can_record_outputs = None  # hidden states and attentions are collected by the encoder itself

    def __init__(self, config, unpad=DEFAULT_UNPAD):
        config = as_config(config, transformers.ModernBertConfig)
        check_modernbert_supported(config)
        super().__init__(config)
        self.unpad = unpad
        self.gradient_checkpointing = False
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList([ModernBertEncoderLayer(config, index)
                                     for index in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.rotary_emb = modeling_modernbert.ModernBertRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.tok_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.tok_embeddings = value

    def check_ids(self, input_ids, token_type_ids):
        # ModernBERT has no token types
        check_inputs(self.config, input_ids, None, None, None, None, None, {})

    def rotary_tables(self, positions, dtype):
        """{layer type: (cos, sin)}, fp32 [*positions.shape, head_dim], as Hugging Face's rotary module
        computes them: fp32 products of the positions and the type's inverse frequencies (its buffers),
        each repeated for the two halves a rotate_half pairs, cos and sin rounded to `dtype` (the
        hidden states', which Hugging Face returns them in) and widened back."""
        tables = {}
        for layer_type in set(self.config.layer_types):
            inverse_frequencies = getattr(self.rotary_emb, f"{layer_type}_inv_freq").to(positions.device, torch.float32)
            angles = positions.float()[..., None] * inverse_frequencies
            angles = torch.cat((angles, angles), dim=-1)
            tables[layer_type] = (angles.cos().to(dtype).float(), angles.sin().to(dtype).float())
        return tables

    def attention_plan(self, attention_mask, position_ids, batch, seqlen, output_attentions, dtype, device,
                       reads_position_zero=True):
        """(the padded path's masks, or the padding-free layout): see EncoderOptionsMixin's. Rotary
        scores depend on the distance of the query's and key's positions only, so position_ids are
        taken as what they say about distances where they count up by one from token to token of each
        row (padding aside), or restart at 0 where a packed document starts (no attention_mask:
        Hugging Face's DataCollatorWithFlattening); other position_ids rotate each token by its own
        (see forward), with no packed documents. Any 4-D mask (Hugging
        Face's prepared masks) replaces both the padding mask and the sliding window, as in Hugging
        Face. `reads_position_zero`: the caller reads position 0 of the last hidden state (a
        left-padded batch with unpad=True then runs padded)."""
        if attention_mask is not None and attention_mask.dim() == 3:
            raise NotImplementedError("ModernBERT takes a 2-D padding mask [batch, sequence] or a prepared 4-D mask "
                                      "[batch or 1, 1 or heads, sequence, sequence] as attention_mask, not a 3-D one")
        mask = attention_mask_for(attention_mask, batch, seqlen, self.config.num_attention_heads, dtype)  # validates
        documents = packed_document_starts(position_ids, attention_mask, batch, seqlen)
        packing, maybe_padded = plan_unpadding(self.unpad, attention_mask, documents, batch, seqlen,
                                               output_attentions, device)
        if packing is not None:
            modules = list(self.modules())  # walked once: most of the scan's cost
            if any(map(has_hooks, modules)) or self.unpad == "auto" and mixes_rows(modules):
                packing = None
        if packing is not None and attention_mask is not None:
            real = attention_mask.bool()
            # a row's real tokens are one run when at most one of them follows a padding position
            runs = real[:, 0].int() + (real[:, 1:] & ~real[:, :-1]).sum(1)
            reads_padding = reads_position_zero and self.unpad is True  # "auto" never unpads a left-padded batch
            left_padded = packing.first_positions.any() if reads_padding else real.new_zeros(())
            gaps, left_padded = torch.stack([(runs > 1).any(), left_padded]).tolist()
            if gaps or left_padded:
                packing = None
        if packing is not None:
            return AttentionMask(None, None), packing
        if documents is not None:
            return document_mask(documents, dtype), None
        # a padding mask without padding is dropped, as Hugging Face does: every op then runs unmasked
        return mask if maybe_padded else mask._replace(key_padding=None), None

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        *,
        packed_output=False,
        reads_position_zero=True,
        **kwargs,
    ):
        """Hugging Face's ModernBertModel.forward (same positional order); returns BaseModelOutput (or
        its tuple with return_dict=False). output_attentions gives the probabilities as Hugging
        Face's eager attention computes them (its SDPA gives none). token_type_ids, if given, are
        ignored (ModernBERT has none; CUDA graphs pass zeros).

        fastencoder's task heads call it with packed_output=True: it then returns a ModernBertEncoded,
        the rows as they left the final norm, packed where the batch ran padding-free;
        reads_position_zero=False says the caller does not read position 0 (see attention_plan)."""
        graphed = None if packed_output else self.replay_cuda_graph(
            input_ids, attention_mask, kwargs.pop("token_type_ids", None), position_ids=position_ids,
            inputs_embeds=inputs_embeds, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs,
        )
        if graphed is not None:
            return graphed
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        batch, seqlen = check_inputs(self.config, input_ids, inputs_embeds, None, position_ids, None,
                                     self.config.hidden_size, {})
        weights = self.embeddings.tok_embeddings.weight
        dtype = compute_dtype(weights)
        mask, packing = self.attention_plan(attention_mask, position_ids, batch, seqlen, output_attentions, dtype,
                                            weights.device, reads_position_zero)
        # position_ids that are not distances within each sequence (under tracing: any, unread)
        by_token_positions = position_ids is not None and (
            tracing() or not _positions_are_distances(position_ids, attention_mask, batch, seqlen))
        if packing is not None:  # the real tokens' ids (or embeddings) only, before the embeddings
            if input_ids is not None:
                input_ids = input_ids.reshape(-1).index_select(0, packing.indices)
            else:
                inputs_embeds = padding.unpad(inputs_embeds, packing.indices)
        hidden_states = self.embeddings(input_ids, inputs_embeds)
        if by_token_positions:
            positions = position_ids.expand(batch, seqlen)
            if packing is not None:
                positions = positions.reshape(-1).index_select(0, packing.indices)
            tables = {layer_type: TokenRotation(*table)
                      for layer_type, table in self.rotary_tables(positions, hidden_states.dtype).items()}
        else:
            length = seqlen if packing is None else packing.max_seqlen
            tables = self.rotary_tables(torch.arange(length, device=weights.device), hidden_states.dtype)
        # a 4-D mask stands for every layer's mask, the sliding window's too (Hugging Face's rule)
        user_mask = attention_mask is not None and attention_mask.dim() == 4
        half_window = None if user_mask else self.config.local_attention // 2
        if packing is None:
            layer_kwargs = dict(key_padding_mask=mask.key_padding, attention_bias=mask.bias)
            as_padded = lambda rows: rows
        else:
            layer_kwargs = dict(cu_seqlens=packing.cu_seqlens, max_seqlen=packing.max_seqlen)
            as_padded = lambda rows: padding.pad(rows, packing.indices, batch, seqlen)
        layers = self.layers
        if isinstance(output_hidden_states, set):
            selected = output_hidden_states
        else:
            selected = set(range(len(layers) + 1)) if output_hidden_states else set()
        all_hidden = [as_padded(hidden_states) if 0 in selected else None]
        all_attentions = [] if output_attentions else None
        for index, layer in enumerate(layers, start=1):
            window = half_window if layer.attention_type == "sliding_attention" else None
            # hidden_states positional: Hugging Face's checkpointing needs tensors that require grad passed so
            hidden_states = layer(hidden_states, tables[layer.attention_type], window, attentions=all_attentions,
                                  **layer_kwargs)
            if index < len(layers):
                all_hidden.append(as_padded(hidden_states) if index in selected else None)
        rows = add_norm(self.final_norm, hidden_states)
        # Hugging Face's last hidden state is the final norm's output
        all_hidden.append(as_padded(rows) if len(layers) in selected else None)
        encoded = ModernBertEncoded(rows, packing, tuple(all_hidden) if output_hidden_states else None,
                                    None if all_attentions is None else tuple(all_attentions))
        if packed_output:
            return encoded
        last = all_hidden[-1] if all_hidden[-1] is not None else encoded.padded()
        output = BaseModelOutput(last_hidden_state=last, hidden_states=encoded.hidden_states,
                                 attentions=encoded.attentions)
        return output if return_dict else output.to_tuple()


def _positions_are_distances(position_ids, attention_mask, batch, seqlen):
    """Whether rotating by positions within each sequence gives Hugging Face's scores: position_ids
    count up by 1 from token to token of each row (padding aside), or, with no attention_mask, each
    row starts at 0 and restarts at 0 where a packed document starts. One device-to-host read."""
    positions = position_ids.expand(batch, seqlen)
    previous, current = positions[:, :-1], positions[:, 1:]
    steps = current == previous + 1
    if attention_mask is None:
        documents = (steps | (current == 0)).all() & (positions[:, 0] == 0).all()
        return bool(steps.all() | documents)
    if attention_mask.dim() == 2:
        real = attention_mask.bool()
        steps |= ~(real[:, 1:] & real[:, :-1])
    return bool(steps.all())


class TokenRotation(NamedTuple):
    """Hugging Face's rotation of each token by its own position_ids: cos and sin fp32 [B, S, D]
    (padded) or [T, D] (packed), applied to q and k before the attention."""
    cos: torch.Tensor
    sin: torch.Tensor

    def apply(self, x):
        """Hugging Face's apply_rotary_pos_emb in fp32, rounded to x's dtype."""
        return rotate_by(x, self.cos.unsqueeze(-2), self.sin.unsqueeze(-2)).to(x.dtype)


def attention_with_probabilities(q, k, v, mask, dropout_p, rotary, window):
    """Hugging Face's eager attention, unfused (output_attentions; the padded layout): q and k rotated
    in fp32 and rounded back to their dtype, fp32 scores with masked pairs (padding keys, a 4-D
    mask's, outside the window) at finfo.min, fp32 softmax; returns the context [B, S, H, D] and the
    probabilities [B, H, S, S] in q's dtype, after dropout, as Hugging Face returns them."""
    seqlen = q.shape[1]
    if rotary is not None:
        q, k = (rotate(t, rotary, slice(0, seqlen), torch.float32).to(t.dtype) for t in (q, k))
    compute = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):  # the products too in fp32
        scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), k.to(compute)) / q.shape[-1] ** 0.5
        if mask.bias is not None:
            scores = scores + mask.bias.to(compute)
        lowest = torch.finfo(compute).min
        if mask.key_padding is not None:
            scores = scores.masked_fill(~mask.key_padding[:, None, None, :], lowest)
        if window is not None:
            scores = scores.masked_fill(~window_band(0, seqlen, 0, seqlen, window, q.device), lowest)
        probabilities = F.dropout(torch.softmax(scores, dim=-1), dropout_p)
        context = torch.einsum("bhqk,bkhd->bqhd", probabilities, v.to(compute))
    return context.to(q.dtype).contiguous(), probabilities.to(q.dtype)


# ------------------------------------------------------------------------------------------- heads
def prediction_head(head, x):
    """Hugging Face's ModernBertPredictionHead, norm(act(dense(x))): the activation fused into the
    GEMM where fastencoder has it (else, or with hooks on the head or its activation, the head is
    called as Hugging Face calls it)."""
    activation = head.config.classifier_activation
    if not isinstance(activation, str) or activation not in FUSED_ACTIVATIONS or has_hooks(head) or has_hooks(head.act):
        return head(x)
    return add_norm(head.norm, project(head.dense, x, activation=FUSED_ACTIVATIONS[activation]))


class ModernBertHeadsMixin(PoolerlessHeadsMixin):
    """A Hugging Face ModernBERT task model (modules, names, losses and outputs theirs) whose forward
    runs its head on the encoder's rows as they come out (ModernBertEncoded), packed under
    unpadding."""

    encoder_class = None  # set below: fastencoder's ModernBertModel

    def encode(self, input_ids, attention_mask, position_ids, inputs_embeds, output_attentions, output_hidden_states,
               reads_position_zero=False):
        return self.model(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                          output_hidden_states, packed_output=True, reads_position_zero=reads_position_zero)

    def head_output(self, rows):
        """drop(head(rows)): what the classifier reads."""
        return dropout(self.drop, prediction_head(self.head, rows))

    def returned(self, output, return_dict):
        return output if output_flags(self.config, None, None, return_dict)[2] else output.to_tuple()


class ModernBertForMaskedLM(ModernBertHeadsMixin, transformers.ModernBertForMaskedLM):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        """Hugging Face's forward and outputs. With `sparse_prediction` (from the config) and labels,
        the logits are those of the positions whose label is not sparse_pred_ignore_index, in the order
        of labels.flatten(), and only those rows are scored."""
        encoded = self.encode(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                              output_hidden_states)
        score = lambda rows: project(self.decoder, prediction_head(self.head, rows))
        if self.sparse_prediction and labels is not None:
            labels = labels.view(-1)
            kept = labels != self.sparse_pred_ignore_index
            logits = score(encoded.at_positions(kept.nonzero()[:, 0]))
            labels = labels[kept]
        else:
            logits = encoded.per_position(score)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        output = MaskedLMOutput(loss=loss, logits=logits, hidden_states=encoded.hidden_states,
                                attentions=encoded.attentions)
        return self.returned(output, return_dict)


def pooled_rows(encoded, pooling, attention_mask, first_real_token):
    """classifier_pooling "cls": the row at position 0 (or, with first_real_token, at each row's
    first real token, where the mask has its first 1), "mean": Hugging Face's mean pooling."""
    if pooling == "mean":
        return encoded.mean(attention_mask)
    batch, seqlen = encoded.shape
    positions = torch.arange(batch, device=encoded.rows.device) * seqlen
    if first_real_token and attention_mask is not None:
        positions = positions + attention_mask.argmax(dim=-1)
    return encoded.at_positions(positions)


def sequence_classification_loss(model, logits, labels):
    """Hugging Face's ModernBertForSequenceClassification loss: regression, single- or multi-label
    by config.problem_type (set from the labels on the first call, as there)."""
    config = model.config
    if config.problem_type is None:
        if model.num_labels == 1:
            config.problem_type = "regression"
        elif model.num_labels > 1 and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if model.num_labels == 1:
            return MSELoss()(logits.squeeze(), labels.squeeze())
        return MSELoss()(logits, labels)
    if config.problem_type == "single_label_classification":
        return CrossEntropyLoss()(logits.view(-1, model.num_labels), labels.view(-1))
    if config.problem_type == "multi_label_classification":
        return BCEWithLogitsLoss()(logits, labels)
    return None


class ModernBertForSequenceClassification(ModernBertHeadsMixin, transformers.ModernBertForSequenceClassification):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        pooling = self.config.classifier_pooling
        encoded = self.encode(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                              output_hidden_states, reads_position_zero=pooling == "cls")
        logits = project(self.classifier, self.head_output(pooled_rows(encoded, pooling, attention_mask, False)))
        loss = None if labels is None else sequence_classification_loss(self, logits, labels)
        output = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=encoded.hidden_states,
                                          attentions=encoded.attentions)
        return self.returned(output, return_dict)


class ModernBertForTokenClassification(ModernBertHeadsMixin, transformers.ModernBertForTokenClassification):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        encoded = self.encode(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                              output_hidden_states)
        logits = encoded.per_position(lambda rows: project(self.classifier, self.head_output(rows)))
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
        output = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=encoded.hidden_states,
                                       attentions=encoded.attentions)
        return self.returned(output, return_dict)


class ModernBertForQuestionAnswering(ModernBertHeadsMixin, transformers.ModernBertForQuestionAnswering):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, start_positions=None,
                end_positions=None, inputs_embeds=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        encoded = self.encode(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                              output_hidden_states)
        logits = encoded.per_position(lambda rows: project(self.classifier, self.head_output(rows)))
        start_logits, end_logits = (part.squeeze(-1).contiguous() for part in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions, **kwargs)
        output = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                              hidden_states=encoded.hidden_states, attentions=encoded.attentions)
        return self.returned(output, return_dict)


class ModernBertForMultipleChoice(ModernBertHeadsMixin, transformers.ModernBertForMultipleChoice):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        num_choices = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]
        flat = lambda tensor: None if tensor is None else tensor.view(-1, *tensor.shape[2:])
        attention_mask = flat(attention_mask)
        # "cls" reads each row's first real token here (Hugging Face's multiple-choice head does)
        encoded = self.encode(flat(input_ids), attention_mask, flat(position_ids), flat(inputs_embeds),
                              output_attentions, output_hidden_states)
        pooled = pooled_rows(encoded, self.config.classifier_pooling, attention_mask, True)
        logits = project(self.classifier, self.head_output(pooled)).view(-1, num_choices)
        loss = None if labels is None else CrossEntropyLoss()(logits, labels)
        output = MultipleChoiceModelOutput(loss=loss, logits=logits, hidden_states=encoded.hidden_states,
                                           attentions=encoded.attentions)
        return self.returned(output, return_dict)


ModernBertHeadsMixin.encoder_class = ModernBertModel
