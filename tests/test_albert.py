"""fastencoder's ALBERT against Hugging Face's (eager attention, same weights), on the PyTorch
backend and on the Triton kernels (interpreted on CPU). Tolerances as in test_bert.py.

The config exercises everything ALBERT adds to BERT: factorised embeddings (embedding_size 16 !=
hidden_size 32, mapped up by embedding_hidden_mapping_in), cross-layer sharing (3 layer calls over
2 groups: group 0 runs twice) with 2 layers per group, and tanh GELU ("gelu_new").
"""
import pytest
import torch
import transformers
from test_bert import (
    FP16_TOL,
    FP32_TOL,
    assert_same_outputs,
    assert_same_values,
    backend,  # noqa: F401 (fixture)
    check_16_bit_against_transformers,
    check_gradient_checkpointing,
    check_parity,
    ragged_batch,
    task_labels,
    twin_models,
)

from fastencoder import models


def albert_config(**overrides):
    settings = dict(
        vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_hidden_groups=2,
        inner_group_num=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=16,
        type_vocab_size=2, hidden_act="gelu_new", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0, num_labels=2, attn_implementation="eager",
    )
    settings.update(overrides)
    return transformers.AlbertConfig(**settings)


LAYER_CALLS = 3 * 2  # num_hidden_layers x inner_group_num

ALBERT_TASKS = [
    (transformers.AlbertModel, models.AlbertModel),
    (transformers.AlbertForPreTraining, models.AlbertForPreTraining),
    (transformers.AlbertForMaskedLM, models.AlbertForMaskedLM),
    (transformers.AlbertForSequenceClassification, models.AlbertForSequenceClassification),
    (transformers.AlbertForTokenClassification, models.AlbertForTokenClassification),
    (transformers.AlbertForQuestionAnswering, models.AlbertForQuestionAnswering),
    (transformers.AlbertForMultipleChoice, models.AlbertForMultipleChoice),
]


@pytest.mark.parametrize("hf_class, our_class", ALBERT_TASKS, ids=[ours.__name__ for _, ours in ALBERT_TASKS])
def test_matches_transformers(hf_class, our_class, backend, kernel_launches):  # noqa: F811
    choices = 2 if "MultipleChoice" in our_class.__name__ else None
    check_parity(hf_class, our_class, albert_config(), kernel_launches, backend, choices=choices)


def test_hidden_states_one_per_layer_call(torch_backend):
    config = albert_config()
    reference, ours = (model.eval() for model in twin_models(transformers.AlbertModel, models.AlbertModel, config))
    inputs = ragged_batch(config)
    with torch.no_grad():
        output = ours(**inputs, output_hidden_states=True, output_attentions=True)
        mapped = reference.encoder.embedding_hidden_mapping_in(reference.embeddings(inputs["input_ids"],
                                                                                     token_type_ids=inputs["token_type_ids"]))
    assert len(output.hidden_states) == 1 + LAYER_CALLS and len(output.attentions) == LAYER_CALLS
    assert output.hidden_states[0].shape[-1] == config.hidden_size
    assert_same_values(output.hidden_states[0], mapped, FP32_TOL, "first hidden state: after the mapping")


def test_layer_sharing_follows_groups():
    config = albert_config(num_hidden_layers=5, num_hidden_groups=2, inner_group_num=1)
    model = models.AlbertModel(config)
    groups = model.encoder.albert_layer_groups
    expected = [groups[int(i / 2.5)].albert_layers[0] for i in range(5)]
    assert model.encoder.layer_calls() == expected
    assert [layer is groups[0].albert_layers[0] for layer in expected] == [True, True, True, False, False]


def test_task_models_keep_transformers_heads_and_ties():
    for hf_class, our_class in ALBERT_TASKS[1:]:
        model = our_class(albert_config())
        assert isinstance(model, hf_class) and type(model.albert) is models.AlbertModel
        assert (model.albert.pooler is None) == (hf_class(albert_config()).albert.pooler is None), our_class.__name__
    for our_class in (models.AlbertForPreTraining, models.AlbertForMaskedLM):
        model = our_class(albert_config())
        assert model.predictions.decoder.weight is model.albert.embeddings.word_embeddings.weight


def test_pretraining_step_matches_transformers(torch_backend):
    """One SGD step on MLM + SOP: same loss, gradients, and loss after the step."""
    config = albert_config()
    reference, ours = twin_models(transformers.AlbertForPreTraining, models.AlbertForPreTraining, config)
    inputs = ragged_batch(config)
    labels = task_labels("AlbertForPreTraining", config, inputs)
    losses = {}
    for name, model in (("ours", ours), ("reference", reference)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = model(**inputs, **labels).loss
        loss.backward()
        optimizer.step()
        losses[name] = (loss.detach(), model(**inputs, **labels).loss.detach())
    assert_same_values(losses["ours"], losses["reference"], FP32_TOL, "losses before and after the step")
    assert losses["ours"][1] < losses["ours"][0]


def test_return_dict_false_gives_transformers_tuples(backend):  # noqa: F811
    config = albert_config()
    inputs = ragged_batch(config)
    for hf_class, our_class, extra in (
        (transformers.AlbertModel, models.AlbertModel, dict(output_hidden_states=True, output_attentions=True)),
        (transformers.AlbertForPreTraining, models.AlbertForPreTraining,
         dict(task_labels("AlbertForPreTraining", config, inputs), output_hidden_states=True)),
    ):
        reference, ours = (model.eval() for model in twin_models(hf_class, our_class, config))
        with torch.no_grad():
            expected = reference(**inputs, **extra, return_dict=False)
            actual = ours(**inputs, **extra, return_dict=False)
        assert_same_values(actual, expected, FP32_TOL, f"{our_class.__name__} tuple")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5.2x renames it activation_checkpointing_enable
def test_gradient_checkpointing_recomputes(backend, monkeypatch):  # noqa: F811
    """Hugging Face's ALBERT has no gradient checkpointing; ours does, shared layers included."""
    config = albert_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = models.AlbertForMaskedLM(config)
    inputs = ragged_batch(config)
    check_gradient_checkpointing(model, inputs, task_labels("MaskedLM", config, inputs), LAYER_CALLS, monkeypatch)


def test_save_and_load_round_trip(tmp_path, torch_backend):
    config = albert_config()
    model = models.AlbertForPreTraining(config).eval()
    inputs = ragged_batch(config)
    model.save_pretrained(tmp_path)
    loaded = models.AlbertForPreTraining.from_pretrained(tmp_path).eval()
    assert loaded.predictions.decoder.weight is loaded.albert.embeddings.word_embeddings.weight
    hf_loaded = transformers.AlbertForPreTraining.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = model(**inputs)
        for field in ("prediction_logits", "sop_logits"):
            torch.testing.assert_close(loaded(**inputs)[field], expected[field], rtol=0, atol=0)
        assert_same_outputs(hf_loaded(**inputs), expected, what="HF loading ours")


def test_attention_masks_3d_and_4d_match_transformers(backend):  # noqa: F811
    config = albert_config()
    reference, ours = (model.eval() for model in twin_models(transformers.AlbertModel, models.AlbertModel, config))
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    keep = (torch.rand(2, 9, 9) < 0.6) | torch.eye(9, dtype=torch.bool)
    additive = torch.zeros(2, 1, 9, 9).masked_fill(~keep[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=additive)
        for mask in (keep, keep[:, None], additive):
            assert_same_outputs(ours(input_ids, attention_mask=mask), expected, what=f"mask {tuple(mask.shape)}")


def test_half_precision(backend):  # noqa: F811
    config = albert_config()
    reference, ours = twin_models(transformers.AlbertModel, models.AlbertModel, config)
    ours.half().eval()
    inputs = ragged_batch(config)
    with torch.no_grad():
        actual = ours(**inputs).last_hidden_state
        expected = reference.eval()(**inputs).last_hidden_state
    assert actual.dtype == torch.float16
    assert_same_values(actual.float(), expected, FP16_TOL, "fp16 last_hidden_state")


@pytest.mark.parametrize("overrides, error, match", [
    (dict(hidden_act="swish"), NotImplementedError, "hidden_act"),
    (dict(position_embedding_type="relative_key_query"), NotImplementedError, "position_embedding_type"),
])
def test_unsupported_configs_are_refused(overrides, error, match):
    with pytest.raises(error, match=match):
        models.AlbertForMaskedLM(albert_config(**overrides))


def test_bad_inputs_are_refused_before_any_kernel(triton_backend, kernel_launches):
    model = models.AlbertModel(albert_config())
    ids = torch.randint(0, 50, (2, 6))
    for kwargs, match in (
        (dict(input_ids=ids + 50), "vocab_size=50"),
        (dict(input_ids=torch.randint(0, 50, (2, 17))), "max_position_embeddings=16"),
        (dict(input_ids=ids, token_type_ids=torch.full((2, 6), 2)), "type_vocab_size=2"),
        (dict(input_ids=ids, attention_mask=torch.ones(3, 6)), r"\(2, 6\)"),
        (dict(inputs_embeds=torch.randn(2, 6, 32)), r"inputs_embeds must be \[batch, sequence, 16\]"),
        (dict(input_ids=ids, head_mask=torch.ones(3)), "head_mask"),
    ):
        with pytest.raises(ValueError, match=match):
            model(**kwargs)
    assert kernel_launches == []


def test_config_from_path(tmp_path):
    albert_config().save_pretrained(tmp_path)
    model = models.AlbertModel(str(tmp_path / "config.json"))
    assert model.config.embedding_size == 16 and model.encoder.embedding_hidden_mapping_in.in_features == 16
    with pytest.raises(TypeError, match="AlbertConfig"):
        models.AlbertModel(transformers.BertConfig())


@pytest.mark.gpu
@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
def test_gpu_bf16_error_at_most_twice_hugging_faces(unpad, triton_backend):
    """ALBERT-base-sized shared layers (tanh GELU, the 128 → 768 embedding mapping) in bf16: see
    test_bert.check_16_bit_against_transformers."""
    config = albert_config(vocab_size=1000, embedding_size=128, hidden_size=768, num_hidden_layers=2,
                           num_hidden_groups=1, inner_group_num=1, num_attention_heads=12, intermediate_size=3072,
                           max_position_embeddings=512, attn_implementation="sdpa")
    check_16_bit_against_transformers(transformers.AlbertModel, models.AlbertModel, config, torch.bfloat16, unpad)
