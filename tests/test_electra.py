"""fastencoder's ELECTRA against Hugging Face's (eager attention, same weights), built directly and
through `optimize`, padded and padding-free, on the PyTorch backend and on the Triton kernels
(interpreted on CPU). Tolerances are test_bert.py's (FP32_TOL: the same math in another order, a
few fp32 ulps; FP16_TOL for a model run in half precision).

The config has embedding_size 16 != hidden_size 32, so `embeddings_project` maps the embeddings up
(run on the gathered rows under unpadding); a second config without it covers the base model.
"""
import copy

import pytest
import torch
import transformers
from test_bert import (
    FP16_TOL,
    FP32_TOL,
    assert_same_outputs,
    assert_same_values,
    backend,  # noqa: F401 (fixture)
    check_gradient_checkpointing,
    randomize,
    twin_models,
)
from test_distilbert import (
    RAGGED,
    RIGHT_PADDED,
    bad_inputs,
    batch_from_rows,
    check_16_bit_last_hidden_state,
    check_fp16_autocast_error,
    check_fullgraph_compile,
    check_hidden_states_selected_by_index,
    check_peft_lora,
    check_family_parity,
    check_forward_arguments,
    check_simulated_cuda_graph_replay,
    labels_for,
    packed_runs,  # noqa: F401 (fixture)
    simulated_captures,  # noqa: F401 (fixture)
)

import fastencoder
from fastencoder import models


def electra_config(**overrides):
    settings = dict(
        vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, type_vocab_size=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, summary_last_dropout=0.0, num_labels=2, pad_token_id=0,
        attn_implementation="eager",
    )
    settings.update(overrides)
    return transformers.ElectraConfig(**settings)


ELECTRA_TASKS = [
    (transformers.ElectraModel, models.ElectraModel),
    (transformers.ElectraForPreTraining, models.ElectraForPreTraining),
    (transformers.ElectraForMaskedLM, models.ElectraForMaskedLM),
    (transformers.ElectraForSequenceClassification, models.ElectraForSequenceClassification),
    (transformers.ElectraForTokenClassification, models.ElectraForTokenClassification),
    (transformers.ElectraForQuestionAnswering, models.ElectraForQuestionAnswering),
    (transformers.ElectraForMultipleChoice, models.ElectraForMultipleChoice),
]
LAYOUTS = dict(argnames="rows, unpad", argvalues=[(RAGGED, False), (RAGGED, True), (RIGHT_PADDED, True)],
               ids=["padded", "left-padded, unpad=True", "padding-free"])


@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("hf_class, our_class", ELECTRA_TASKS, ids=[ours.__name__ for _, ours in ELECTRA_TASKS])
def test_matches_transformers(hf_class, our_class, rows, unpad, backend, kernel_launches, packed_runs):  # noqa: F811
    config = electra_config()
    reference, ours = twin_models(hf_class, our_class, config)
    check_family_parity(reference, ours, config, rows, unpad, backend, kernel_launches, packed_runs)


@pytest.mark.parametrize(**LAYOUTS)
def test_without_embeddings_project_matches_transformers(rows, unpad, backend, kernel_launches,  # noqa: F811
                                                         packed_runs):
    config = electra_config(embedding_size=32)
    reference, ours = twin_models(transformers.ElectraModel, models.ElectraModel, config)
    assert not hasattr(ours, "embeddings_project")
    check_family_parity(reference, ours, config, rows, unpad, backend, kernel_launches, packed_runs)


@pytest.mark.parametrize("rows, unpad", [(RAGGED, "auto"), (RIGHT_PADDED, True)], ids=["auto", "padding-free"])
@pytest.mark.parametrize("hf_class", [hf for hf, _ in ELECTRA_TASKS], ids=lambda c: c.__name__)
def test_optimized_model_matches_untouched_copy(hf_class, rows, unpad, backend, kernel_launches,  # noqa: F811
                                                packed_runs):
    config = electra_config()
    reference = randomize(hf_class(config))
    model = copy.deepcopy(reference)
    parameters_before = {name: id(p) for name, p in model.named_parameters()}
    optimized = fastencoder.optimize(model)
    encoder = optimized if hf_class is transformers.ElectraModel else optimized.electra
    assert type(encoder) is models.ElectraModel
    assert {name: id(p) for name, p in optimized.named_parameters()} == parameters_before
    check_family_parity(reference, optimized, config, rows, unpad, backend, kernel_launches, packed_runs)
    restored = fastencoder.restore(optimized)
    encoder = restored if hf_class is transformers.ElectraModel else restored.electra
    assert type(encoder) is transformers.ElectraModel


def test_task_models_keep_transformers_heads_and_ties():
    for hf_class, our_class in ELECTRA_TASKS[1:]:
        model = our_class(electra_config())
        assert isinstance(model, hf_class) and type(model.electra) is models.ElectraModel
        assert model.state_dict().keys() == hf_class(electra_config()).state_dict().keys()
    model = models.ElectraForMaskedLM(electra_config())
    assert model.generator_lm_head.weight is model.electra.embeddings.word_embeddings.weight


def test_hidden_states_start_after_embeddings_project(torch_backend):
    config = electra_config()
    reference, ours = (model.eval() for model in twin_models(transformers.ElectraModel, models.ElectraModel, config))
    inputs = batch_from_rows(config, RAGGED)
    with torch.no_grad():
        output = ours(**inputs, output_hidden_states=True)
        projected = reference.embeddings_project(reference.embeddings(inputs["input_ids"],
                                                                      token_type_ids=inputs["token_type_ids"]))
    assert len(output.hidden_states) == 1 + config.num_hidden_layers
    assert_same_values(output.hidden_states[0], projected, FP32_TOL, "first hidden state: after the projection")


def test_alternative_inputs_match_transformers(backend):  # noqa: F811
    """inputs_embeds (embedding_size wide), explicit position_ids and token types, no mask;
    return_dict=False tuples."""
    config = electra_config()
    reference, ours = (model.eval() for model in twin_models(transformers.ElectraModel, models.ElectraModel, config))
    ids = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        for kwargs in (dict(input_ids=ids), dict(inputs_embeds=torch.randn(2, 7, 16)),
                       dict(input_ids=ids, position_ids=torch.randint(0, 16, (2, 7)),
                            token_type_ids=torch.randint(0, 2, (2, 7)))):
            assert_same_outputs(ours(**kwargs), reference(**kwargs), what=str(list(kwargs)))
        expected = reference(ids, output_hidden_states=True, output_attentions=True, return_dict=False)
        actual = ours(ids, output_hidden_states=True, output_attentions=True, return_dict=False)
        assert_same_values(actual, expected, FP32_TOL, "tuple")


def test_attention_masks_3d_and_4d_match_transformers(backend):  # noqa: F811
    config = electra_config()
    reference, ours = (model.eval() for model in twin_models(transformers.ElectraModel, models.ElectraModel, config))
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    keep = (torch.rand(2, 9, 9) < 0.6) | torch.eye(9, dtype=torch.bool)
    additive = torch.zeros(2, 1, 9, 9).masked_fill(~keep[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=additive)
        for mask in (keep, keep[:, None], additive):
            assert_same_outputs(ours(input_ids, attention_mask=mask), expected, what=f"mask {tuple(mask.shape)}")


def test_discriminator_training_step_matches_transformers(torch_backend):
    """One SGD step on the replaced-token-detection loss: same loss, and loss after the step."""
    config = electra_config()
    reference, ours = twin_models(transformers.ElectraForPreTraining, models.ElectraForPreTraining, config)
    inputs = batch_from_rows(config, RAGGED)
    labels = labels_for("PreTraining", config, inputs)
    losses = {}
    for name, model in (("ours", ours), ("reference", reference)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = model(**inputs, **labels).loss
        loss.backward()
        optimizer.step()
        losses[name] = (loss.detach(), model(**inputs, **labels).loss.detach())
    assert_same_values(losses["ours"], losses["reference"], FP32_TOL, "losses before and after the step")
    assert losses["ours"][1] < losses["ours"][0]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5.2x renames it activation_checkpointing_enable
def test_gradient_checkpointing_recomputes(backend, monkeypatch):  # noqa: F811
    config = electra_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = models.ElectraForMaskedLM(config)
    inputs = batch_from_rows(config, RAGGED)
    check_gradient_checkpointing(model, inputs, labels_for("MaskedLM", config, inputs), config.num_hidden_layers,
                                 monkeypatch)


def test_half_precision(backend):  # noqa: F811
    config = electra_config()
    reference, ours = twin_models(transformers.ElectraModel, models.ElectraModel, config)
    ours.half().eval()
    inputs = batch_from_rows(config, RAGGED)
    with torch.no_grad():
        actual = ours(**inputs).last_hidden_state
        expected = reference.eval()(**inputs).last_hidden_state
    assert actual.dtype == torch.float16
    assert_same_values(actual.float(), expected, FP16_TOL, "fp16 last_hidden_state")


def test_save_and_load_round_trip(tmp_path, torch_backend):
    config = electra_config()
    model = models.ElectraForMaskedLM(config).eval()
    inputs = batch_from_rows(config, RAGGED)
    model.save_pretrained(tmp_path)
    loaded = models.ElectraForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.generator_lm_head.weight is loaded.electra.embeddings.word_embeddings.weight
    hf_loaded = transformers.ElectraForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
        assert_same_values(hf_loaded(**inputs).logits, expected, FP32_TOL, "HF loading ours")
    encoder = models.ElectraModel.from_pretrained(tmp_path, unpad=True).eval()
    assert encoder.unpad is True
    with torch.no_grad():
        torch.testing.assert_close(encoder(**inputs).last_hidden_state, loaded.electra(**inputs).last_hidden_state,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("overrides, match", [
    (dict(hidden_act="silu"), "hidden_act"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (dict(is_decoder=True), "is_decoder"),
])
def test_unsupported_configs_are_refused(overrides, match):
    with pytest.raises(NotImplementedError, match=match):
        models.ElectraForSequenceClassification(electra_config(**overrides))
    model = transformers.ElectraForSequenceClassification(electra_config())
    for name, value in overrides.items():
        setattr(model.config, name, value)  # as a checkpoint with that setting would load
    with pytest.raises(NotImplementedError, match=match):
        fastencoder.optimize(model)
    assert type(model.electra) is transformers.ElectraModel  # nothing was changed


def test_causal_lm_is_refused():
    model = transformers.ElectraForCausalLM(electra_config(is_decoder=True))
    with pytest.raises(NotImplementedError, match="encoders only"):
        fastencoder.optimize(model)
    assert type(model.electra) is transformers.ElectraModel


def test_bad_inputs_are_refused_before_any_kernel(triton_backend, kernel_launches):
    config = electra_config()
    model = models.ElectraForSequenceClassification(config)
    ids = torch.randint(0, config.vocab_size, (2, 6))
    for kwargs, error, match in bad_inputs(config, config.embedding_size) + [
        (dict(input_ids=ids, token_type_ids=torch.full((2, 6), 2)), ValueError, "type_vocab_size=2"),
        (dict(input_ids=ids, encoder_hidden_states=torch.randn(2, 6, 32)), NotImplementedError, "encoders only"),
    ]:
        with pytest.raises(error, match=match):
            model(**kwargs)
    assert kernel_launches == []


def test_hidden_states_selected_by_index(torch_backend):
    check_hidden_states_selected_by_index(transformers.ElectraModel, models.ElectraModel, electra_config())


def test_peft_lora_matches_hugging_face_with_peft(backend):  # noqa: F811
    check_peft_lora(transformers.ElectraForSequenceClassification, electra_config(),
                    ["query", "key", "value", "dense", "embeddings_project"])


@pytest.mark.usefixtures("fresh_dynamo")
def test_fullgraph_compile_matches_transformers(backend):  # noqa: F811
    check_fullgraph_compile(transformers.ElectraForSequenceClassification, models.ElectraForSequenceClassification,
                            electra_config())


def test_forward_takes_hugging_faces_arguments(torch_backend):
    check_forward_arguments(models.ElectraModel, transformers.ElectraModel, electra_config())


def test_fp16_autocast_error_at_most_twice_hugging_faces(backend):  # noqa: F811
    check_fp16_autocast_error(transformers.ElectraModel, models.ElectraModel, electra_config())


def test_simulated_cuda_graph_replay_matches_eager(torch_backend, simulated_captures):  # noqa: F811
    config = electra_config()
    check_simulated_cuda_graph_replay(models.ElectraModel(config), config)


@pytest.mark.gpu
@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_16_bit_error_at_most_twice_hugging_faces(dtype, unpad, triton_backend):
    """Two ELECTRA-base-sized layers: see test_distilbert.check_16_bit_last_hidden_state."""
    config = electra_config(vocab_size=1000, embedding_size=768, hidden_size=768, num_attention_heads=12,
                            intermediate_size=3072, max_position_embeddings=512, attn_implementation="sdpa")
    check_16_bit_last_hidden_state(transformers.ElectraModel, models.ElectraModel, config, dtype, unpad)
