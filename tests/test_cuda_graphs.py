"""Opt-in CUDA graphs: what falls back to eager (and why) everywhere; the runner's logic on the
CPU with a simulated graph; capture and replay on a GPU."""
import contextlib

import pytest
import torch
import transformers

import fastencoder
from fastencoder import cuda_graphs, models
from fastencoder.cuda_graphs import GraphRunner, _stamp
from fastencoder.models import inputs, layers, packing
from test_bert import FP32_TOL, bert_config, ragged_batch, twin_models


def test_buckets_are_capped_by_max_position_embeddings():
    runner = GraphRunner(max_positions=300)
    assert runner.buckets == (32, 64, 128, 256, 300)
    assert [runner.bucket(n) for n in (1, 32, 33, 257, 300, 301)] == [32, 32, 64, 300, 300, None]


@pytest.mark.parametrize(
    "train, grad, inputs, reason",
    [
        (True, False, {}, "inference only"),
        (False, True, {}, "inference only"),
        (False, False, dict(output_hidden_states=True), "other arguments run eagerly"),
        (False, False, dict(return_dict=False), "return_dict=False"),
        (False, False, dict(input_ids=torch.zeros(1, 513, dtype=torch.long)), "beyond the largest bucket (512)"),
        (False, False, {}, "need input_ids on a CUDA device"),
    ],
)
def test_calls_a_graph_cannot_serve_run_eagerly_with_the_reason(train, grad, inputs, reason, torch_backend):
    config = bert_config(max_position_embeddings=600)
    model = models.BertModel(config).train(train)
    model.cuda_graphs = True
    batch = dict(ragged_batch(config, seqlen=10), **inputs)
    if "input_ids" in inputs:
        batch.pop("attention_mask"), batch.pop("token_type_ids")
    with torch.set_grad_enabled(grad):
        model(**batch)
    assert reason in model.cuda_graph_runner.fallback_reason
    assert model.cuda_graph_runner.graphs == {} and model.cuda_graph_runner.memory_bytes == 0


def test_optimize_turns_graphs_on_and_off(torch_backend):
    config = bert_config()
    reference, _ = twin_models(transformers.BertForSequenceClassification, models.BertForSequenceClassification, config)
    model = fastencoder.optimize(transformers.BertForSequenceClassification(config), cuda_graphs=True)
    model.load_state_dict(reference.state_dict())
    batch = ragged_batch(config)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, reference.eval()(**batch).logits)
    assert model.bert.cuda_graphs and "CUDA device" in model.bert.cuda_graph_runner.fallback_reason
    fastencoder.optimize(model, cuda_graphs=False)
    assert not model.bert.cuda_graphs and model.bert.cuda_graph_runner is None
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        model.bert.cuda_graphs = "yes"


def test_weight_changes_are_seen():
    """What makes the runner drop its graphs: an in-place change, a move or a replacement of any weight."""
    model = models.BertModel(bert_config())
    weights = [*model.parameters(), *model.buffers()]
    stamp = _stamp(weights)
    assert _stamp(weights) == stamp
    with torch.no_grad():
        model.pooler.dense.bias.add_(1)  # as an optimiser step or load_state_dict would
    assert _stamp(weights) != stamp
    stamp = _stamp(weights)
    model.double()  # the same Parameter objects, new storage
    assert _stamp(weights) != stamp
    stamp = _stamp([*model.parameters(), *model.buffers()])
    model.pooler.dense.weight = torch.nn.Parameter(model.pooler.dense.weight.detach().clone())
    assert _stamp([*model.parameters(), *model.buffers()]) != stamp


@contextlib.contextmanager
def as_if_capturing(monkeypatch):
    """What the model sees inside a real capture: tracing() is true, so no decision depends on data,
    and the eager path runs (a real replay reruns those kernels without entering Python at all)."""
    with monkeypatch.context() as patch:
        for module in (inputs, packing):
            patch.setattr(module, "tracing", lambda: True)
        patch.setattr(layers.EncoderOptionsMixin, "replay_cuda_graph", lambda self, *args, **kwargs: None)
        yield


class SimulatedGraph:
    """A CUDA graph's behaviour on the CPU: capturing runs forward() as under a capture, and
    replay() runs it again the same way, writing into the output tensors the capture returned, as a
    replay rewrites the same memory from the same static inputs."""

    def __init__(self, forward, pool, monkeypatch):
        self.forward, self.pool_given, self.monkeypatch = forward, pool, monkeypatch
        with as_if_capturing(monkeypatch):
            self.output = forward()

    def replay(self):
        with as_if_capturing(self.monkeypatch), torch.inference_mode():
            fresh = self.forward()
            self.output.last_hidden_state.copy_(fresh.last_hidden_state)
            self.output.pooler_output.copy_(fresh.pooler_output)

    def pool(self):
        return "the shared pool"


@pytest.fixture
def simulated_captures(monkeypatch):
    """Every graph the runner captures, simulated (capture() and can_capture() are the runner's only
    CUDA-specific parts); each capture reports 1000 bytes and remembers the pool it was given."""
    graphs = []

    def simulated_capture(forward, device, pool):
        for _ in range(2):
            forward()  # the warm-up, which runs outside the capture
        graphs.append(SimulatedGraph(forward, pool, monkeypatch))
        return graphs[-1], graphs[-1].output, 1000

    monkeypatch.setattr(cuda_graphs, "capture", simulated_capture)
    monkeypatch.setattr(cuda_graphs, "can_capture", lambda device: True)
    return graphs


def eager_output(model, batch):
    runner = model.__dict__.pop("cuda_graph_runner")
    try:
        return model(**batch)
    finally:
        model.__dict__["cuda_graph_runner"] = runner


def assert_same_on_real_positions(replayed, eager, batch):
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(replayed.last_hidden_state[real], eager.last_hidden_state[real],
                               atol=FP32_TOL, rtol=FP32_TOL)
    torch.testing.assert_close(replayed.pooler_output, eager.pooler_output, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_simulated_replay_matches_eager_and_captures_once_per_bucket(backend, request, simulated_captures):
    request.getfixturevalue(f"{backend}_backend")
    model = models.BertModel(bert_config(max_position_embeddings=128, vocab_size=100)).eval()
    model.cuda_graphs = True
    runner = model.cuda_graph_runner
    with torch.inference_mode():
        for seqlen, graphs in ((20, 1), (31, 1), (40, 2), (64, 2), (20, 2)):  # buckets 32, 32, 64, 64, 32
            batch = ragged_batch(model.config, seqlen=seqlen)
            replayed = model(**batch)
            assert runner.fallback_reason is None and len(runner.graphs) == len(simulated_captures) == graphs
            assert replayed.last_hidden_state.shape[1] == seqlen
            assert_same_on_real_positions(replayed, eager_output(model, batch), batch)
        only_ids = dict(input_ids=ragged_batch(model.config, seqlen=20)["input_ids"])  # no mask, type 0
        replayed = model(**only_ids)
        assert runner.fallback_reason is None and len(simulated_captures) == 2
        assert_same_on_real_positions(replayed, eager_output(model, only_ids),
                                      dict(attention_mask=torch.ones_like(only_ids["input_ids"])))
    assert runner.memory_bytes == 2000
    # the first capture starts a pool, the second shares it
    assert [graph.pool_given for graph in simulated_captures] == [None, "the shared pool"]


def test_simulated_graphs_follow_weight_changes_modes_and_unpad(torch_backend, simulated_captures):
    """Captured under inference_mode, replayed under no_grad; an unpad=True model captures the
    padded path and keeps its option; weights loaded in place drop the graphs and their memory."""
    config = bert_config(max_position_embeddings=128, vocab_size=100)
    reference, other = twin_models(transformers.BertModel, models.BertModel, config)
    model = models.BertModel(config, unpad=True).eval()
    model.cuda_graphs = True
    runner = model.cuda_graph_runner
    batch = ragged_batch(config, seqlen=20)
    with torch.inference_mode():
        first = model(**batch)
    assert model.unpad is True and len(simulated_captures) == 1
    with torch.no_grad():
        again = model(**batch)
        assert torch.equal(again.last_hidden_state, first.last_hidden_state) and len(simulated_captures) == 1
        model.load_state_dict(other.state_dict())
        replayed = model(**batch)
        assert len(simulated_captures) == 2 and len(runner.graphs) == 1 and runner.memory_bytes == 1000
        # dropping the graphs dropped their pool: the new capture starts its own
        assert [graph.pool_given for graph in simulated_captures] == [None, None]
        assert_same_on_real_positions(replayed, other.eval()(**batch), batch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_replay_matches_eager_and_reuses_graphs_per_bucket(dtype, device, triton_backend):
    config = bert_config(max_position_embeddings=128, vocab_size=100)
    torch.manual_seed(0)
    model = models.BertModel(config).to(device=device, dtype=dtype).eval()
    model.cuda_graphs = True
    runner = model.cuda_graph_runner
    tolerance = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        for seqlen, graphs in ((20, 1), (31, 1), (40, 2), (64, 2)):  # buckets 32, 32, 64, 64
            batch = {k: v.to(device) for k, v in ragged_batch(config, seqlen=seqlen).items()}
            replayed = model(**batch)
            assert runner.fallback_reason is None and len(runner.graphs) == graphs
            model.cuda_graphs = False
            eager = model(**batch)
            model.__dict__["cuda_graph_runner"] = runner  # back on, keeping the captured graphs
            real = batch["attention_mask"].bool()
            torch.testing.assert_close(replayed.last_hidden_state[real], eager.last_hidden_state[real], **tolerance)
            torch.testing.assert_close(replayed.pooler_output, eager.pooler_output, **tolerance)
    assert runner.memory_bytes > 0


@pytest.mark.gpu
def test_graphs_follow_weight_changes_modes_and_unpad(device, triton_backend):
    """Captured under inference_mode then replayed under no_grad; an unpad=True model (its graphs run
    the padded path); new weights loaded in place drop the graphs, and the replay uses the new ones."""
    config = bert_config(max_position_embeddings=128, vocab_size=100)
    torch.manual_seed(0)
    model = models.BertModel(config, unpad=True).to(device=device, dtype=torch.float16).eval()
    other = models.BertModel(config).to(device=device, dtype=torch.float16).eval()
    model.cuda_graphs = True
    runner = model.cuda_graph_runner
    batch = {k: v.to(device) for k, v in ragged_batch(config, seqlen=20).items()}
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        first = model(**batch)
    assert runner.fallback_reason is None and len(runner.graphs) == 1 and model.unpad is True
    with torch.no_grad():
        again = model(**batch)  # refills the static inputs made under inference_mode
        assert runner.fallback_reason is None and len(runner.graphs) == 1
        assert torch.equal(again.last_hidden_state, first.last_hidden_state)
        model.load_state_dict(other.state_dict())
        replayed = model(**batch)
        assert runner.fallback_reason is None and len(runner.graphs) == 1
        expected = other(**batch)
    torch.testing.assert_close(replayed.last_hidden_state[real], expected.last_hidden_state[real], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(replayed.pooler_output, expected.pooler_output, atol=2e-3, rtol=2e-3)


def test_graphs_are_captured_without_autocasts_weight_cache(torch_backend, simulated_captures):
    """Autocast caches the 16-bit copies of fp32 weights until the caller's autocast region ends: a
    graph that read such a copy (a called module's weight) would read freed memory on later
    replays, so the runner's warm-up and capture run with the cache off, under the same autocast."""
    model = models.BertModel(bert_config(max_position_embeddings=128, vocab_size=100)).eval()
    model.cuda_graphs = True
    seen = []  # (autocast on, its dtype, its cache on) at every call of the model
    model.register_forward_pre_hook(lambda module, args: seen.append(
        (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_autocast_cache_enabled())))
    batch = ragged_batch(model.config, seqlen=20)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        replayed = model(**batch)
        assert model.cuda_graph_runner.fallback_reason is None and len(simulated_captures) == 1
        eager = eager_output(model, batch)
    # the call itself, then the two warm-up runs and the capture
    assert seen[0] == (True, torch.bfloat16, True)
    assert seen[1:4] == [(True, torch.bfloat16, False)] * 3
    # bf16 GEMMs over the bucket's 32 positions accumulate in another order than over 20: the
    # LayerNorm'd outputs (of order 1) differ by well under one bf16 step (7.8e-3)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(replayed.last_hidden_state[real], eager.last_hidden_state[real], atol=1e-3, rtol=0)
