"""Device-to-host reads, each of which waits for the GPU: exactly the number the README documents.

  padded forward            1  the ids' ranges (input, position and token type ids in one copy)
  padded training step      1  the same; the backward reads nothing back
  padding-free forward      2  the ids' ranges, and the packed layout's sizes (which also bring
                               back what the ops' checks need of cu_seqlens and the indices)
  the same, unpad="auto"    3  and before the layout, the decision: the padding's share and
                               whether a row is left-padded (a batch that then runs padded
                               reads 2)
  CUDA-graph replay         1  the ids' ranges, checked before the replay

On the CPU the reads are counted where they happen (`tolist` / `item`); on a GPU CUDA's own sync
detector counts them, syncs inside torch ops included.
"""
import warnings

import pytest
import torch
from test_bert import bert_config
from test_unpad import mask_from_rows

from fastencoder import models

DOCUMENTED = {"padded forward": 1, "padded training step": 1, "padding-free forward": 2, "padding-free forward, auto": 3, "graph replay": 1}


def two_rows(config):
    """One full row and one right-padded row of random ids."""
    attention_mask = mask_from_rows(["11111111", "11110000"])
    return dict(input_ids=torch.randint(0, config.vocab_size, attention_mask.shape), attention_mask=attention_mask,
                token_type_ids=torch.randint(0, config.type_vocab_size, attention_mask.shape))


def run(case, model, batch):
    if case == "padded training step":
        model.train()(**batch).last_hidden_state.square().sum().backward()
        return
    with torch.inference_mode():
        model.eval()(**batch)


def model_for(case, config):
    return models.BertModel(config, unpad={"padding-free forward": True, "padding-free forward, auto": "auto"}.get(
        case, False))


@pytest.mark.parametrize("case", ["padded forward", "padded training step", "padding-free forward",
                                  "padding-free forward, auto"])
def test_device_to_host_reads(case, triton_backend, monkeypatch):
    reads = []
    for method in ("tolist", "item"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, original=original: reads.append(1) or original(self))
    config = bert_config()
    batch = two_rows(config)
    run(case, model_for(case, config), batch)
    assert len(reads) == DOCUMENTED[case]


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(DOCUMENTED))
def test_gpu_synchronizations(case, triton_backend):
    config = bert_config(max_position_embeddings=64)
    batch = {name: value.cuda() for name, value in two_rows(config).items()}
    model = model_for(case, config).cuda()
    model.cuda_graphs = case == "graph replay"
    run(case, model, batch)  # the first call compiles, autotunes and captures
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(case, model, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if case == "graph replay":
        assert model.cuda_graph_runner.fallback_reason is None
    syncs = [str(warning.message) for warning in caught if "synchroniz" in str(warning.message)]
    assert len(syncs) == DOCUMENTED[case], syncs
