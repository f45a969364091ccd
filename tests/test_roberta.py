"""fastencoder's RoBERTa, XLM-RoBERTa and CamemBERT against Hugging Face's (eager attention, same
weights), built directly and through `fastencoder.optimize`, padded and padding-free, on the
PyTorch backend and on the Triton kernels (interpreted on CPU).

Tolerances are test_bert.py's (FP32_TOL = 1e-5 of the magnitude): the layers are BERT's, so the
only differences are the same reduction orders; the position ids are integers and must be equal.
"""
import copy
import inspect

import pytest
import torch
import transformers

import fastencoder
from fastencoder import models
from fastencoder.models import layers
from test_distilbert import check_fp16_autocast_error
from test_bert import (
    BACKWARD_KERNELS, FORWARD_KERNELS, FP32_TOL, assert_same_grads, assert_same_outputs,
    check_16_bit_against_transformers, check_gradient_checkpointing, mlm_labels, randomize,
)
from test_cuda_graphs import simulated_captures  # noqa: F401 (a fixture)

PAD = 1
FAMILIES = {
    "Roberta": transformers.RobertaConfig,
    "XLMRoberta": transformers.XLMRobertaConfig,
    "Camembert": transformers.CamembertConfig,
}
HEADS = ["Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
         "ForMultipleChoice"]
CASES = [(family, head) for family in FAMILIES for head in HEADS]


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    request.getfixturevalue(f"{request.param}_backend")
    return request.param


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


def roberta_config(family="Roberta", **overrides):
    # 12 positions: the longest sequence of 10 tokens reaches position pad_token_id + 10 = 11
    settings = dict(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=12, type_vocab_size=1, pad_token_id=PAD, bos_token_id=0, eos_token_id=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2, attn_implementation="eager",
    )
    settings.update(overrides)
    return FAMILIES[family](**settings)


def classes(family, head):
    return getattr(transformers, family + head), getattr(models, family + head)


def twin_models(family, head, config):
    hf_class, our_class = classes(family, head)
    reference = randomize(hf_class(config))
    ours = our_class(config)
    ours.load_state_dict(reference.state_dict())
    reference.load_state_dict(ours.state_dict())
    return reference, ours


def roberta_batch(config, left_padding=True, choices=None, batch=3, seqlen=10):
    """Random ids with pad tokens where the mask is 0 (as tokenizers give them) and two pad tokens
    inside real text (their position ids repeat padding_idx, the next ones skip them): sequence 0
    full, 1 right-padded, 2 left-padded (or right-padded, shorter)."""
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


def head_labels(head, config, inputs):
    """Labels whose loss only reads real positions (so padded and padding-free losses agree)."""
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    batch, seqlen = ids.shape[0], ids.shape[-1]
    if head == "ForMaskedLM":
        return dict(labels=mlm_labels(ids).masked_fill(~real, -100))
    if head == "ForSequenceClassification":
        return dict(labels=torch.randint(0, config.num_labels, (batch,)))
    if head == "ForTokenClassification":
        return dict(labels=torch.randint(0, config.num_labels, (batch, seqlen)).masked_fill(~real, -100))
    if head == "ForMultipleChoice":
        return dict(labels=torch.randint(0, ids.shape[1], (batch,)))
    return {}  # the bare encoder; question answering's loss spans padded positions' logits too


def real_positions_only(output, real):
    """The output with every token-level tensor zeroed at padding: what padding-free execution
    defines (it computes no padded position). Sequence-level tensors are kept whole."""
    def keep(value):
        if isinstance(value, tuple):
            return tuple(keep(v) for v in value)
        if value is None or value.dim() < 2:
            return value
        rows = real.reshape(-1, real.shape[-1])
        if value.shape[:2] == rows.shape:
            return value * rows.reshape(rows.shape + (1,) * (value.dim() - 2))
        return value
    return {key: keep(value) for key, value in output.items()}


def run(model, inputs, labels, projections):
    """Forward with hidden states; backward of the loss plus random projections of the outputs."""
    output = real_positions_only(model(**inputs, **labels, output_hidden_states=True), inputs["attention_mask"])
    loss = output["loss"] if "loss" in output else 0
    for key, value in output.items():
        if key != "loss" and isinstance(value, torch.Tensor):
            projection = projections.setdefault(key, torch.randn(value.shape))
            loss = loss + (value * projection).sum()
    loss.backward()
    return output


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("family, head", CASES, ids=[family + head for family, head in CASES])
def test_matches_transformers(family, head, unpad, backend, kernel_launches, plans):
    """Outputs, losses and every parameter's gradient equal Hugging Face's; padding-free on a
    right-padded batch (with pad tokens inside the ids), padded on one with left padding too."""
    config = roberta_config(family)
    reference, ours = twin_models(family, head, config)
    ours.unpad = unpad
    inputs = roberta_batch(config, left_padding=not unpad, choices=2 if head == "ForMultipleChoice" else None)
    labels = head_labels(head, config, inputs)
    projections = {}
    outputs = [run(model.train(), inputs, labels, projections) for model in (ours, reference)]
    assert_same_outputs(*outputs, what=f"{family}{head} ({backend}, unpad={unpad})")
    assert_same_grads(ours, reference)
    assert (plans[0] is not None) == unpad
    if backend == "triton":
        assert FORWARD_KERNELS | BACKWARD_KERNELS <= set(kernel_launches)
        assert ("_unpad_kernel" in kernel_launches) == unpad


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_with_unpad_true_runs_padded(family, torch_backend, plans):
    """The classification head reads position 0, a padding position under left padding: Hugging Face
    computes it, padding-free execution would not, so unpad=True runs such a batch padded."""
    config = roberta_config(family)
    reference, ours = (model.eval() for model in twin_models(family, "ForSequenceClassification", config))
    ours.unpad = True
    inputs = roberta_batch(config, left_padding=True)
    with torch.no_grad():
        # the head's logits read position 0: padding-free, it would hold zeros
        assert_same_outputs(ours(**inputs), reference(**inputs), what="left padding, unpad=True")
    right_padded = roberta_batch(config, left_padding=False)
    with torch.no_grad():
        assert_same_outputs(ours(**right_padded), reference(**right_padded), what="right padding, unpad=True")
    assert plans[-1] is not None


def test_position_ids_are_hugging_faces(torch_backend):
    """From input_ids (pad tokens anywhere), from inputs_embeds (sequential from pad_token_id + 1),
    and explicit position_ids, on the padded and the padding-free path."""
    config = roberta_config()
    reference, ours = (model.eval() for model in twin_models("Roberta", "Model", config))
    inputs = roberta_batch(config)
    hf_positions = transformers.models.roberta.modeling_roberta.RobertaEmbeddings.create_position_ids_from_input_ids
    assert torch.equal(models.roberta.position_ids_from_input_ids(inputs["input_ids"], PAD),
                       hf_positions(inputs["input_ids"], PAD))
    embeds = torch.randn(3, 10, config.hidden_size)
    positions = torch.randint(0, config.max_position_embeddings, (3, 10))
    for unpad in (False, True):
        ours.unpad = unpad
        with torch.no_grad():
            for extra in (dict(input_ids=inputs["input_ids"]), dict(inputs_embeds=embeds),
                          dict(input_ids=inputs["input_ids"], position_ids=positions)):
                mask = roberta_batch(config, left_padding=False)["attention_mask"]
                expected = real_positions_only(reference(**extra, attention_mask=mask), mask)
                actual = real_positions_only(ours(**extra, attention_mask=mask), mask)
                assert_same_outputs(actual, expected, what=f"{sorted(extra)} unpad={unpad}")


@pytest.mark.parametrize("family", FAMILIES)
def test_optimize_and_restore_every_head(family, backend, kernel_launches):
    """optimize swaps the encoder of every task model (sharing its parameters) and matches an
    untouched copy in outputs and gradients; restore gives the original encoder back."""
    config = roberta_config(family)
    for head in HEADS:
        hf_class, our_class = classes(family, head)
        torch.manual_seed(1)
        untouched = randomize(hf_class(config))
        model = copy.deepcopy(untouched)
        parameters = {name: id(p) for name, p in model.named_parameters()}
        original_encoder = model if head == "Model" else model.roberta
        optimized = fastencoder.optimize(model)
        encoder = optimized if head == "Model" else optimized.roberta
        assert type(encoder) is getattr(models, family + "Model")
        assert {name: id(p) for name, p in optimized.named_parameters()} == parameters
        inputs = roberta_batch(config, choices=2 if head == "ForMultipleChoice" else None)
        labels = head_labels(head, config, inputs)
        projections = {}
        outputs = [run(m.train(), inputs, labels, projections) for m in (optimized, untouched)]
        assert_same_outputs(*outputs, what=f"optimized {family}{head} ({backend})")
        assert_same_grads(optimized, untouched)
        restored = fastencoder.restore(optimized)
        assert (restored if head == "Model" else restored.roberta) is original_encoder
    if backend == "triton":
        assert FORWARD_KERNELS <= set(kernel_launches)


@pytest.mark.parametrize("overrides, match", [
    (dict(is_decoder=True), "is_decoder"),
    (dict(is_decoder=True, add_cross_attention=True), "add_cross_attention"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (dict(hidden_act="silu"), "hidden_act"),
    (dict(pad_token_id=None), "pad_token_id"),
])
@pytest.mark.parametrize("family", FAMILIES)
def test_unsupported_configs_are_refused(family, overrides, match):
    with pytest.raises(NotImplementedError, match=match):
        getattr(models, family + "ForMaskedLM")(roberta_config(family, **overrides))
    model = getattr(transformers, family + "ForSequenceClassification")(roberta_config(family))
    for name, value in overrides.items():
        setattr(model.config, name, value)  # as a checkpoint with that setting would load
    with pytest.raises(NotImplementedError, match=match):
        fastencoder.optimize(model)
    assert type(model.roberta) is getattr(transformers, family + "Model")  # nothing was changed


def test_causal_lm_decoder_is_refused():
    model = transformers.RobertaForCausalLM(roberta_config(is_decoder=True))
    with pytest.raises(NotImplementedError, match="is_decoder"):
        fastencoder.optimize(model)


def test_bad_inputs_are_refused_before_any_kernel(triton_backend, kernel_launches):
    config = roberta_config()
    model = models.RobertaForMaskedLM(config)
    ids = torch.randint(2, 50, (2, 6))
    bad = [
        (dict(input_ids=ids.index_put((torch.tensor(0), torch.tensor(2)), torch.tensor(50))), "vocab_size=50"),
        (dict(input_ids=ids, attention_mask=torch.ones(2, 5)), r"\(2, 6\)"),
        (dict(input_ids=ids, token_type_ids=torch.ones(2, 6, dtype=torch.long)), "type_vocab_size=1"),
        # 11 tokens reach position 12: one past the table (Hugging Face's lookup fails there)
        (dict(input_ids=torch.randint(2, 50, (2, 11))), "max_position_embeddings=12"),
        (dict(inputs_embeds=torch.randn(2, 11, 32)), "max_position_embeddings=12"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            model(**kwargs)
    assert kernel_launches == []
    # with two pad tokens the same 11 ids fit, as in Hugging Face
    fits = torch.randint(2, 50, (2, 11)).index_fill(1, torch.tensor([0, 5]), PAD)
    with torch.no_grad():
        assert model(input_ids=fits).logits.shape == (2, 11, 50)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(family, tmp_path, torch_backend):
    config = roberta_config(family)
    reference, _ = twin_models(family, "ForMaskedLM", config)
    reference.save_pretrained(tmp_path / "hf")
    ours = getattr(models, family + "ForMaskedLM").from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert ours.lm_head.decoder.weight is ours.roberta.embeddings.word_embeddings.weight
    ours.save_pretrained(tmp_path / "ours")
    reloaded = getattr(transformers, family + "ForMaskedLM").from_pretrained(tmp_path / "ours",
                                                                          attn_implementation="eager")
    inputs = roberta_batch(config)
    with torch.no_grad():
        expected = reference.eval()(**inputs)
        assert_same_outputs(ours.eval()(**inputs), expected, what="from_pretrained")
        assert_same_outputs(reloaded.eval()(**inputs), expected, what="save_pretrained")


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_takes_hugging_faces_arguments(family):
    ours, theirs = getattr(models, family + "Model"), getattr(transformers, family + "Model")
    mine, hf = inspect.signature(ours.forward).parameters, inspect.signature(theirs.forward).parameters
    positional = lambda params: [name for name, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    inputs = positional(hf)[:positional(hf).index("inputs_embeds") + 1]
    assert positional(mine)[:len(inputs)] == inputs
    config = roberta_config(family)
    model = ours(config).eval()
    every_argument = {name: None for name in positional(hf) if name != "self"}
    with torch.no_grad():
        model(**dict(every_argument, input_ids=torch.randint(2, config.vocab_size, (2, 5))),
              output_attentions=False, output_hidden_states=False, return_dict=True)


def test_output_attentions_and_tuples_match_transformers(torch_backend):
    config = roberta_config()
    reference, ours = (model.eval() for model in twin_models("Roberta", "ForSequenceClassification", config))
    inputs = roberta_batch(config)
    with torch.no_grad():
        assert_same_outputs(ours(**inputs, output_attentions=True), reference(**inputs, output_attentions=True),
                            what="output_attentions")
        for mine, theirs in zip(ours(**inputs, return_dict=False), reference(**inputs, return_dict=False)):
            torch.testing.assert_close(mine, theirs, atol=FP32_TOL * max(1, theirs.abs().max().item()), rtol=FP32_TOL)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fullgraph_compile_matches_transformers(backend_name, request, fresh_dynamo):
    request.getfixturevalue(f"{backend_name}_backend")
    config = roberta_config("XLMRoberta")
    reference, ours = twin_models("XLMRoberta", "ForSequenceClassification", config)
    inputs = roberta_batch(config)
    labels = torch.randint(0, config.num_labels, (3,))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    outputs = {}
    for key, model in (("ours", compiled), ("reference", reference)):
        outputs[key] = model.train()(**inputs, labels=labels)
        outputs[key].loss.backward()
    assert_same_outputs(outputs["ours"], outputs["reference"], what=f"compiled ({backend_name})")
    assert_same_grads(ours, reference)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5.2x renames it activation_checkpointing_enable
def test_gradient_checkpointing_recomputes(torch_backend, monkeypatch):
    config = roberta_config("Camembert", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = models.CamembertForMaskedLM(config)
    inputs = roberta_batch(config)
    check_gradient_checkpointing(model, inputs, head_labels("ForMaskedLM", config, inputs),
                                 config.num_hidden_layers, monkeypatch)


def test_lora_matches_peft_on_hugging_face(torch_backend):
    peft = pytest.importorskip("peft")
    config = roberta_config("XLMRoberta")
    torch.manual_seed(0)
    base = randomize(transformers.XLMRobertaForSequenceClassification(config))
    lora = peft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(base), lora)
    ours = fastencoder.optimize(peft.get_peft_model(copy.deepcopy(base), lora))
    ours.load_state_dict(reference.state_dict())
    assert type(ours.get_base_model().roberta) is models.XLMRobertaModel
    inputs = roberta_batch(config)
    labels = torch.randint(0, config.num_labels, (3,))
    outputs = [model.train()(**inputs, labels=labels) for model in (ours, reference)]
    for output in outputs:
        output.loss.backward()
    assert_same_outputs(*outputs, what="LoRA")
    for (name, mine), (_, theirs) in zip(ours.named_parameters(), reference.named_parameters()):
        if theirs.requires_grad:
            torch.testing.assert_close(mine.grad, theirs.grad, atol=FP32_TOL * theirs.grad.abs().max().item(),
                                       rtol=1e-4, msg=name)


def test_forward_hooks_fire(torch_backend):
    config = roberta_config()
    reference, _ = twin_models("Roberta", "ForTokenClassification", config)
    ours = fastencoder.optimize(copy.deepcopy(reference))
    seen = {}
    for key, model in (("reference", reference), ("ours", ours)):
        model.roberta.encoder.layer[1].output.register_forward_hook(
            lambda module, args, output, key=key: seen.__setitem__(key, output))
    inputs = roberta_batch(config)
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), reference(**inputs), what="hooked")
    torch.testing.assert_close(seen["ours"], seen["reference"], atol=FP32_TOL * 10, rtol=FP32_TOL)


def test_lazy_exports():
    assert set(fastencoder.MODELS) == set(models.__all__)
    assert fastencoder.XLMRobertaForSequenceClassification is models.XLMRobertaForSequenceClassification


def test_simulated_cuda_graph_replay_matches_transformers(torch_backend, simulated_captures):
    """A graph embeds positions up to pad_token_id + its bucket: buckets stop at
    max_position_embeddings - pad_token_id - 1 (31 here, where BERT's would be 33), and a replayed
    left-padded batch with pad tokens in the ids gives Hugging Face's outputs at the real tokens."""
    config = roberta_config(max_position_embeddings=33)
    reference, ours = (model.eval() for model in twin_models("Roberta", "Model", config))
    ours.cuda_graphs = True
    runner = ours.cuda_graph_runner
    assert runner.buckets[-1] == 31
    batch = roberta_batch(config, seqlen=20)
    with torch.inference_mode():
        replayed, expected = ours(**batch), reference(**batch)
    assert runner.fallback_reason is None and len(simulated_captures) == 1
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(replayed.last_hidden_state[real], expected.last_hidden_state[real],
                               atol=FP32_TOL * 10, rtol=FP32_TOL)
    with pytest.raises(ValueError, match="max_position_embeddings=33"):  # checked before a replay
        ours.check_ids(torch.randint(2, 50, (1, 32)), None)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_autocast_error_at_most_twice_hugging_faces(family, backend):
    """The error rule of test_autocast.py (FlashAttention's): under fp16 autocast, the distance to
    Hugging Face in fp32 (outputs at real tokens, every gradient) is at most twice Hugging Face's own."""
    hf_class, our_class = classes(family, "Model")
    check_fp16_autocast_error(hf_class, our_class, roberta_config(family))


@pytest.mark.gpu
@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_16_bit_error_at_most_twice_hugging_faces(dtype, unpad, triton_backend):
    """Two XLM-RoBERTa layers of BERT-base's width: see test_bert's check_16_bit_against_transformers."""
    config = roberta_config("XLMRoberta", vocab_size=1000, hidden_size=768, num_attention_heads=12,
                            intermediate_size=3072, max_position_embeddings=514, attn_implementation="sdpa")
    check_16_bit_against_transformers(transformers.XLMRobertaModel, models.XLMRobertaModel, config, dtype, unpad)
